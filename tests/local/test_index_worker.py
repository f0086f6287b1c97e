"""The blob indexes built by a worker process into the index cache, and every way it fails.

In-process on the source (the worker is a real process), then through a real mount.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

from blobfs.cache.blocks import BlockCache
from blobfs.cache.index_store import IndexStore
from blobfs.format.offsets import OFFSETS_SUFFIX
from blobfs.sources.index_worker import FAILPOINT
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from tests.support import harness
from tests.support.scale import ScaleProject, write_scale_project

KEYS = ["a", "b", "c"]
#: The worker's jobs for KEYS in a walk's order: the first dataset's ann/ while the daemon
#: builds its img/, then each other dataset whole, the first one's blob index last.
WALK_JOBS = [
    ("plain", "a"),
    ("blob", "b"),
    ("plain", "b"),
    ("blob", "c"),
    ("plain", "c"),
    ("blob", "a"),
]
#: The worker is started only when the daemon may use two CPUs.
two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no worker")


def source(root: Path, store_dir: Path) -> LocalProjectSource:
    return LocalProjectSource(root, BlockCache(4096, 1 << 20), index_store=IndexStore(store_dir))


@pytest.fixture
def small(tmp_path: Path) -> ScaleProject:
    """3 datasets of 2,000 images in 4 tars."""
    return write_scale_project(tmp_path / "p", KEYS, 2000, 4)


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.sentinel}",)


def _read_all(view: ProjectView, project: ScaleProject) -> None:
    for d in range(len(project.datasets)):
        assert len(view.readdir(f"/{project.datasets[d]}/img")) == 2000
        for i in (0, 1999):
            assert view.read_path("/" + project.path(d, i), 0, 1 << 20) == project.expected(d, i)


@two_cpus
def test_the_worker_writes_index_files_that_the_daemon_loads_without_parsing(
    small: ScaleProject, tmp_path: Path
) -> None:
    daemon = source(small.root, tmp_path / "cache")
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None
    worker.wait()
    assert worker.status == 0
    view = ProjectView(daemon)
    _read_all(view, small)
    assert daemon.index_builds == 0
    assert daemon.index_store is not None and daemon.index_store.hits == 3
    daemon.close()


@two_cpus
def test_the_worker_also_lists_the_ordinary_folders_that_the_daemon_then_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = write_scale_project(tmp_path / "p", KEYS, 300, 2, anns=True)
    time.sleep(2.1)  # folders changed a moment ago are never cached (PLAIN_SETTLED_NS)
    alone = ProjectView(source(project.root, tmp_path / "alone"))
    expected = {k: list(alone.readdir(f"/{k}/ann")) for k in KEYS}
    daemon = source(project.root, tmp_path / "cache")
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None
    worker.wait()
    assert worker.status == 0

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the daemon read a folder the worker listed")

    monkeypatch.setattr("blobfs.safe_open.ProjectRoot.list_regular", refuse)
    view = ProjectView(daemon)
    for k in KEYS:
        assert list(view.readdir(f"/{k}/ann")) == expected[k]
        name = expected[k][0]
        assert (
            view.read_path(f"/{k}/ann/{name}", 0, 1 << 20)
            == (project.root / k / "ann" / name).read_bytes()
        )
    daemon.close()


@two_cpus
def test_a_hostile_pickle_through_the_worker_is_reported_as_without_it(
    small: ScaleProject, tmp_path: Path
) -> None:
    sentinel = tmp_path / "ran"
    (small.root / "b" / f"evil{OFFSETS_SUFFIX}").write_bytes(
        pickle.dumps([_Evil(sentinel)], protocol=2)
    )
    alone = source(small.root, tmp_path / "alone")
    _read_all(ProjectView(alone), small)
    daemon = source(small.root, tmp_path / "cache")
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None
    worker.wait()
    _read_all(ProjectView(daemon), small)
    assert daemon.index_builds == 0
    assert not sentinel.exists()
    assert daemon.problems() == alone.problems()
    assert any("evil" in p for p in daemon.problems())
    daemon.close()


@two_cpus
def test_a_failed_worker_leaves_every_folder_to_the_daemon_which_reports_once(
    small: ScaleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (small.root / "a" / f"evil{OFFSETS_SUFFIX}").write_bytes(b"\x80\x02garbage")
    alone = source(small.root, tmp_path / "alone")
    _read_all(ProjectView(alone), small)
    monkeypatch.setenv("BLOBFS_FAILPOINT", FAILPOINT)
    daemon = source(small.root, tmp_path / "cache")
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None
    worker.wait()
    assert worker.status == 137
    _read_all(ProjectView(daemon), small)
    assert daemon.index_builds == 3
    assert daemon.problems() == alone.problems() and len(daemon.problems()) == 1


@two_cpus
def test_a_folder_the_worker_has_not_reached_is_built_at_once_and_unmount_kills_it(
    small: ScaleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOBFS_FAILPOINT", f"{FAILPOINT}:sleep=60")
    daemon = source(small.root, tmp_path / "cache")
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None
    started = time.monotonic()
    _read_all(ProjectView(daemon), small)
    assert time.monotonic() - started < 30
    assert daemon.index_builds == 3
    daemon.close()
    worker.wait()
    assert worker.status == -9


@two_cpus
@pytest.mark.fuse
def test_a_mount_has_its_indexes_built_by_the_worker(
    small: ScaleProject, tmp_path: Path, mounts: harness.Mounts
) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    mnt = tmp_path / "mnt"
    log = tmp_path / "log"
    proc = mounts.start(small.root, mnt, log=log, env=env)
    deadline = time.monotonic() + 60
    while "indexed" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "indexed" in log.read_text()
    for d in range(3):
        assert len(os.listdir(mnt / small.datasets[d] / "img")) == 2000
        assert (mnt / small.path(d, 7)).read_bytes() == small.expected(d, 7)
    assert _stats_index(mnt)["builds"] == 0
    assert proc.unmount(30) == 0
    assert not _workers_of(small.root)


def _stats_index(mnt: Path) -> dict[str, object]:
    from tests.local.test_index import stats

    index = stats(mnt)["index"]
    assert isinstance(index, dict)
    return index


def _workers_of(project: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"blobfs.sources.index_worker" in cmd and str(project).encode() in cmd:
            found.append(pid)
    return found


@two_cpus
def test_a_folder_the_daemon_has_begun_is_not_handed_to_the_worker(
    small: ScaleProject, tmp_path: Path
) -> None:
    daemon = source(small.root, tmp_path / "cache")
    view = ProjectView(daemon)
    assert len(view.readdir("/a/img")) == 2000
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None and worker.jobs == [j for j in WALK_JOBS if j != ("blob", "a")]
    worker.wait()
    _read_all(view, small)
    assert daemon.index_builds == 1
    daemon.close()


@two_cpus
def test_the_worker_lists_the_first_dataset_s_ann_first_and_leaves_its_blob_index_last(
    small: ScaleProject, tmp_path: Path
) -> None:
    """A walk demands the first dataset's ``img/`` at once (the daemon builds it); the
    worker takes that dataset's ``ann/`` meanwhile, then each other dataset whole."""
    daemon = source(small.root, tmp_path / "cache")
    worker = daemon.start_index_worker(KEYS)
    assert worker is not None
    assert worker.jobs == WALK_JOBS
    _read_all(ProjectView(daemon), small)
    worker.wait()
    assert worker.status == 0
    daemon.close()


def test_no_worker_is_started_for_a_daemon_on_one_cpu(
    small: ScaleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    daemon = source(small.root, tmp_path / "cache")
    assert daemon.start_index_worker(KEYS) is None
    _read_all(ProjectView(daemon), small)
    assert daemon.index_builds == 3
