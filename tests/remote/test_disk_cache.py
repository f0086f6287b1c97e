"""The persistent disk cache serves a block only when its checksum matches its key and bytes.

The folder under ``--cache-dir`` lives on a file system blobfs does not control: a block
rewritten with the same length (bit rot, a tool, a person) or copied under another block's
name must be fetched again, never served.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.cache.disk import DiskBlockStore

from .conftest import TOKEN, build_project, mount_remote


class Bytes:
    """A reader over bytes that counts its calls."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, 0

    def read(self, start: int, end: int) -> bytes:
        self.calls += 1
        return self.data[start:end]


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def block_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.blk"))


def test_a_block_rewritten_with_the_same_length_is_fetched_again(tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    store = DiskBlockStore(tmp_path / "cache", 1 << 20)
    first = Bytes(data)
    BlockCache(1024, 8192, disk=store).read(CachedBlob("b", "v1", len(data), first), 0, 4096)
    files = block_files(tmp_path / "cache")
    assert len(files) == 4
    sizes = [p.stat().st_size for p in files]
    for path in files:
        flip_last_byte(path)
    assert [p.stat().st_size for p in files] == sizes  # same length: only a checksum can tell

    again = Bytes(data)
    cache = BlockCache(1024, 8192, disk=DiskBlockStore(tmp_path / "cache", 1 << 20))
    assert cache.read(CachedBlob("b", "v1", len(data), again), 0, 4096) == data[:4096]
    assert again.calls >= 1
    assert cache.stats.disk_hits == 0
    assert cache.stats.disk_corrupt == 4
    # the refetched blocks replaced the damaged files: a third cache reads them from disk
    third = BlockCache(1024, 8192, disk=DiskBlockStore(tmp_path / "cache", 1 << 20))
    never = Bytes(b"")
    assert third.read(CachedBlob("b", "v1", len(data), never), 0, 4096) == data[:4096]
    assert never.calls == 0 and third.stats.disk_hits == 4


def test_a_block_copied_under_another_blocks_name_is_refused(tmp_path: Path) -> None:
    store = DiskBlockStore(tmp_path / "cache", 1 << 20)
    store.put(("b", "v1", 0), b"A" * 100)
    store.put(("b", "v1", 1), b"B" * 100)
    a, b = store._path(("b", "v1", 0)), store._path(("b", "v1", 1))
    b.write_bytes(a.read_bytes())  # a whole, well-formed block, under the wrong name
    assert store.get(("b", "v1", 0), 100) == b"A" * 100
    assert store.get(("b", "v1", 1), 100) is None
    assert store.corrupt_blocks == 1
    assert not b.exists()


def test_a_short_or_headerless_block_is_treated_as_missing(tmp_path: Path) -> None:
    store = DiskBlockStore(tmp_path / "cache", 1 << 20)
    store.put(("b", "v", 0), b"x" * 100)
    path = store._path(("b", "v", 0))
    path.write_bytes(b"x" * 100)  # the length the caller expects, but no header
    assert store.get(("b", "v", 0), 100) is None
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"BLOB")
    assert store.get(("b", "v", 0), 100) is None
    assert store.corrupt_blocks == 2
    assert store.used_bytes == 0


@pytest.mark.fuse
@pytest.mark.remote
def test_a_damaged_disk_cache_never_serves_wrong_bytes_through_the_mount(
    tmp_path: Path, emulator: Emulator
) -> None:
    project, expected = build_project(tmp_path, count=20)
    pid = upload_local_project(emulator.url, TOKEN, project)
    cache = tmp_path / "disk-cache"
    mnt = tmp_path / "mnt"
    proc = mount_remote(emulator, pid, mnt, tmp_path / "log0", "--cache-dir", str(cache))
    try:
        for rel, data in expected.items():
            assert (mnt / rel).read_bytes() == data
    finally:
        assert proc.unmount(30) == 0
    files = block_files(cache)
    assert files
    for path in files:
        flip_last_byte(path)

    log = tmp_path / "log1"
    proc = mount_remote(emulator, pid, mnt, log, "--cache-dir", str(cache))
    try:
        emulator.reset_stats()
        wrong = [rel for rel, data in sorted(expected.items()) if (mnt / rel).read_bytes() != data]
        assert wrong == []
        assert emulator.stats()["methods"].get("images.data.download", 0) >= 1  # refetched
        stats = json.loads(
            subprocess.run(
                [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert stats["cache"]["disk_corrupt"] == len(files)
    finally:
        assert proc.unmount(30) == 0
    lines = [line for line in log.read_text().splitlines() if "disk cache" in line]
    assert len(lines) == 2, lines  # the first damaged block, then the total at unmount
    assert f"{len(files)} damaged blocks" in lines[-1]
