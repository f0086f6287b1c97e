"""Durability trials shared by the suite (``tests/writeback/test_crash.py``) and the long
version (``bench/crash_trials.py``): write until the daemon dies, then remount, flush and
check that every acknowledged image arrived exactly once with its bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from blobfs.cache.blocks import BlockCache
from blobfs.commands.check import check_project
from blobfs.format.offsets import _entry_fields, iter_raw_entries
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from tests.support import harness
from tests.support.sample import png_bytes


def project_images(root: Path) -> dict[str, bytes]:
    """``dataset/name -> bytes`` of every image the project serves (read like the mount)."""
    view = ProjectView(LocalProjectSource(root, BlockCache(1 << 16, 1 << 20)))
    out = {}
    for path, rec in view.walk_files():
        if "/img/" in path:
            out[path] = view.read_path(path, 0, rec.size or 0)
    return out


def write_until_dead(
    img_dir: Path,
    seeds: range,
    acked: list[int],
    stop: threading.Event,
    fsync: Callable[[int], bool] | None = None,
) -> None:
    """Write ``c_<seed>.png`` one by one; a seed is acknowledged once its ``close()``
    returned. With ``fsync`` (which seeds to ``fsync`` before the close) only those are
    acknowledged, once ``fsync()`` returned (durable: what a power cut must keep). Stops
    at the first error (the daemon died) or when ``stop`` is set."""
    for seed in seeds:
        if stop.is_set():
            return
        synced = fsync is not None and fsync(seed)
        try:
            with open(img_dir / f"c_{seed:05d}.png", "wb") as f:
                f.write(png_bytes(seed))
                if synced:
                    f.flush()
                    os.fsync(f.fileno())
                    acked.append(seed)  # fsync() returned: durable
        except OSError:
            return
        if fsync is None:
            acked.append(seed)  # close() returned: the write is acknowledged


def recover_and_verify(
    project: Path, tmp_path: Path, spool: Path, seeds: range, acked: list[int], trial: str
) -> None:
    """Remount ``project`` with ``spool``, flush, unmount; then every acknowledged seed
    is served once with its bytes, any other seed whole or not at all, and the project
    checks clean (a duplicated name would show there)."""
    mnt = tmp_path / f"mnt-{trial}-again"
    with harness.start_writeback(project, mnt, spool, log=tmp_path / f"log-{trial}-again") as again:
        flushed = subprocess.run(
            [sys.executable, "-m", "blobfs", "flush", str(mnt)], capture_output=True, text=True
        )
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
        assert again.unmount() == 0
    served = project_images(project)
    for seed in acked:
        assert served.get(f"/ds/img/c_{seed:05d}.png") == png_bytes(seed), (trial, seed)
    for seed in seeds:
        got = served.get(f"/ds/img/c_{seed:05d}.png")
        assert got is None or got == png_bytes(seed), (trial, seed)
    assert check_project(project).problems == [], trial


def tally(project: Path, seeds: range, acked: list[int]) -> tuple[int, int]:
    """``(lost, duplicated)`` after a recovery: acknowledged seeds not served with their
    bytes, and names listed more than once across the dataset's offsets files."""
    served = project_images(project)
    lost = sum(served.get(f"/ds/img/c_{seed:05d}.png") != png_bytes(seed) for seed in acked)
    names: list[str] = []
    for offsets in (project / "ds").glob("*_offsets.pkl"):
        with open(offsets, "rb") as f:
            names.extend(str(_entry_fields(e)[0]) for e in iter_raw_entries(f))
    return lost, len(names) - len(set(names))
