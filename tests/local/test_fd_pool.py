"""Blob descriptors stay below the process's limit, however many tars a project has."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import pytest

from blobfs.errors import CorruptData
from blobfs.transport.local import FdPool, open_regular, pool_capacity
from tests.support import harness
from tests.support.scale import write_scale_project


def blobs(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"b{i}.tar"
        path.write_bytes(bytes([i % 256]) * 100 + f"blob {i}".encode())
        paths.append(str(path))
    return paths


def test_the_pool_keeps_at_most_its_capacity_open_and_reopens_on_demand(tmp_path: Path) -> None:
    paths = blobs(tmp_path, 20)
    pool = FdPool(capacity=3)
    for _ in range(3):
        for i, path in enumerate(paths):
            assert pool.pread(path, 100, 100 + len(f"blob {i}")) == f"blob {i}".encode()
            assert pool.open_count <= 3
    assert pool.opens == 60 and pool.closes == 57
    assert pool.pread(paths[-1], 0, 2) == bytes([19, 19]) and pool.opens == 60  # still open
    pool.close()
    assert pool.open_count == 0


def test_a_descriptor_in_use_is_never_closed_under_its_reader(tmp_path: Path) -> None:
    """Closing a descriptor a read is using would let the next open reuse its number, and
    the read would return another file's bytes."""
    paths = blobs(tmp_path, 8)
    inside = threading.Event()
    go_on = threading.Event()
    real_pread = os.pread

    def opener(path: str) -> int:
        return open_regular(path)

    pool = FdPool(opener, capacity=1)

    def slow_pread(fd: int, n: int, offset: int) -> bytes:
        if threading.current_thread().name == "slow":
            inside.set()
            assert go_on.wait(10)
        return real_pread(fd, n, offset)

    got: list[bytes] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pread", slow_pread)
        reader = threading.Thread(
            target=lambda: got.append(pool.pread(paths[0], 100, 106)), name="slow"
        )
        reader.start()
        assert inside.wait(10)
        for path in paths[1:]:  # each open would evict paths[0] if it were idle
            pool.pread(path, 0, 1)
        assert paths[0] in pool._slots and pool.open_count <= 2  # kept while in use
        go_on.set()
        reader.join(10)
    assert got == [b"blob 0"]
    assert pool.open_count == 1


def test_a_missing_or_special_blob_is_corrupt_data(tmp_path: Path) -> None:
    pool = FdPool(capacity=2)
    with pytest.raises(CorruptData, match="missing"):
        pool.pread(str(tmp_path / "gone.tar"), 0, 1)
    os.mkfifo(tmp_path / "fifo.tar")
    with pytest.raises(CorruptData, match="not a regular file"):
        pool.pread(str(tmp_path / "fifo.tar"), 0, 1)
    (tmp_path / "short.tar").write_bytes(b"abc")
    with pytest.raises(CorruptData, match="truncated"):
        pool.pread(str(tmp_path / "short.tar"), 0, 10)
    (tmp_path / "link.tar").symlink_to(tmp_path / "short.tar")
    with pytest.raises(CorruptData):
        pool.pread(str(tmp_path / "link.tar"), 0, 1)


def test_the_capacity_leaves_half_the_limit_as_headroom() -> None:
    assert pool_capacity(1024) == 512
    assert pool_capacity(256) == 128
    assert pool_capacity(1 << 20) == 512
    assert pool_capacity(6) == 4


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.mark.fuse
def test_1100_tars_in_one_dataset_all_serve_under_ulimit_1024(
    tmp_path: Path, mounts: harness.Mounts
) -> None:
    project = write_scale_project(tmp_path / "p", ["ds"], 1100, 1100)
    mnt = tmp_path / "mnt"
    log = tmp_path / "log"
    proc = mounts.start(
        project.root,
        mnt,
        log=log,
        env={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
        preexec=_limit_descriptors,
    )
    try:
        for _ in range(2):
            for i in range(1100):
                assert (mnt / project.path(0, i)).read_bytes() == project.expected(0, i), i
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 1024 // 2 + 64
    finally:
        proc.unmount(30)
    assert "Too many open files" not in log.read_text()
