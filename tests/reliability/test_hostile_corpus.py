"""Hostile input corpus: no code runs, bad entries are not served, good ones still are.

The corpus (``tests.support.hostile``) holds 40+ broken or malicious projects. Each is
checked in-process on the view and through a real mount: exact bytes for the good images,
ENOENT for refused entries, EIO for images whose blob is unusable, the mount alive after
every error, ``blobfs check`` failing where it must, and the sentinel file that the
hostile pickles aim at never created.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobfs.cache.blocks import BlockCache
from blobfs.commands.check import check_project
from blobfs.errors import BlobfsError, to_errno
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from tests.support import harness
from tests.support.hostile import Case, build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Case], Path]:
    root = tmp_path_factory.mktemp("hostile")
    sentinel = root / "SENTINEL"
    return build_corpus(root / "cases", sentinel), sentinel


def test_corpus_has_at_least_thirty_distinct_cases(corpus: tuple[list[Case], Path]) -> None:
    cases, _ = corpus
    assert len({c.name for c in cases}) >= 30


def test_each_case_in_process(corpus: tuple[list[Case], Path]) -> None:
    cases, sentinel = corpus
    for case in cases:
        view = ProjectView(LocalProjectSource(case.root, BlockCache(4096, 1 << 20)))
        for path, data in case.good.items():
            assert view.read_path(path, 0, 1 << 20) == data, (case.name, path)
        for path in case.absent:
            assert view.lookup(path) is None, (case.name, path)
        for path in case.eio:
            with pytest.raises(BlobfsError) as info:
                view.read_path(path, 0, 1 << 20)
            assert to_errno(info.value) == errno.EIO, (case.name, path)
        report = check_project(case.root)
        assert bool(report.problems) == case.check_fails, (case.name, report.lines())
    assert not sentinel.exists(), "a hostile pickle executed code"


@pytest.mark.fuse
@pytest.mark.timeout(900)  # one mount per case, about a second each
def test_each_case_through_a_real_mount(corpus: tuple[list[Case], Path], tmp_path: Path) -> None:
    cases, sentinel = corpus
    for case in cases:
        mnt, log = tmp_path / f"mnt-{case.name}", tmp_path / f"{case.name}.log"
        if case.mount_refused:
            mnt.mkdir()
            refused = subprocess.run(
                [sys.executable, "-P", "-m", "blobfs", "mount", str(case.root), str(mnt)],
                capture_output=True,
                text=True,
            )
            assert refused.returncode != 0 and not os.path.ismount(mnt), case.name
            assert case.mount_refused in refused.stderr, (case.name, refused.stderr)
            continue
        with harness.start(case.root, mnt, log=log) as proc:
            for path in case.eio:
                with pytest.raises(OSError) as info:
                    (mnt / path.lstrip("/")).read_bytes()
                assert info.value.errno == errno.EIO, (case.name, path)
            for path in case.absent:
                assert not os.path.exists(mnt / path.lstrip("/")), (case.name, path)
            for path, data in case.good.items():  # still served after the errors above
                assert (mnt / path.lstrip("/")).read_bytes() == data, (case.name, path)
            assert proc.unmount(20) == 0, (case.name, log.read_text()[-2000:])
        text = log.read_text()
        if case.eio:
            assert "blob" in text, f"{case.name}: the log must say why"
        assert "Traceback" not in text, (case.name, text[-2000:])
        if case.name == "many-bad-entries-one-log-line":  # 20,000 problems, one line
            lines = [line for line in text.splitlines() if "many_offsets.pkl" in line]
            assert len(lines) == 1 and "20000 entries" in lines[0], lines
    assert not sentinel.exists(), "a hostile pickle executed code"
