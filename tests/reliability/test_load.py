"""Load: many concurrent readers over a real mount, every byte checked, memory bounded.

The mount uses ``direct_io`` so every read reaches blobfs (not the page cache): the block
cache, its single flight and its LRU (8 MiB, much smaller than the data) are under load.
The fast subset: 16 threads and 16 processes over 2,000 images, random and sequential
order, for a bounded time.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import threading
import time
from pathlib import Path

import pytest

from blobfs.format.pack import ProjectPacker
from tests.support import harness
from tests.support.sample import png_bytes

pytestmark = pytest.mark.fuse

IMAGES = 2000
CACHE_BYTES = 8 << 20
RSS_OVERHEAD_BYTES = 120 << 20


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("load")
    src = root / "src"
    src.mkdir()
    digests = {}
    for i in range(IMAGES):
        data = png_bytes(i)
        (src / f"l_{i:05d}.png").write_bytes(data)
        digests[f"l_{i:05d}.png"] = hashlib.sha256(data).hexdigest()
    ProjectPacker(root / "project", "ds", blob_size=2 << 20).pack(sorted(src.iterdir()))
    mnt = root / "mnt"
    proc = harness.start(
        root / "project",
        mnt,
        "--cache-size",
        str(CACHE_BYTES),
        "--block-size",
        "64K",
        "-o",
        "direct_io",
        log=root / "log",
    )
    with proc:
        yield mnt / "ds" / "img", digests, proc
        proc.unmount(20)


def _reader(
    img_dir: str, names: list[str], digests: dict[str, str], seconds: float, seed: int
) -> tuple[int, int]:
    """Read files (random or sequential by seed parity) until time is up; (reads, wrong)."""
    rng = random.Random(seed)
    order = list(names) if seed % 2 else rng.sample(names, len(names))
    reads = wrong = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in order:
            with open(os.path.join(img_dir, name), "rb") as f:
                data = f.read()
            reads += 1
            wrong += hashlib.sha256(data).hexdigest() != digests[name]
            if time.monotonic() >= deadline:
                break
    return reads, wrong


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_sixteen_threads_read_every_byte_right(mounted) -> None:  # type: ignore[no-untyped-def]
    img_dir, digests, proc = mounted
    names = sorted(digests)
    results: list[tuple[int, int]] = []
    threads = [
        threading.Thread(
            target=lambda s=s: results.append(_reader(str(img_dir), names, digests, 3.0, s))
        )
        for s in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16
    assert sum(r for r, _ in results) >= IMAGES
    assert sum(w for _, w in results) == 0
    assert _rss_bytes(proc.pid) < CACHE_BYTES + RSS_OVERHEAD_BYTES


def test_sixteen_processes_read_every_byte_right(mounted) -> None:  # type: ignore[no-untyped-def]
    img_dir, digests, proc = mounted
    names = sorted(digests)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(16) as pool:
        results = pool.starmap(_reader, [(str(img_dir), names, digests, 3.0, s) for s in range(16)])
    assert sum(w for _, w in results) == 0
    assert sum(r for r, _ in results) >= IMAGES
    assert proc.poll() is None
    assert _rss_bytes(proc.pid) < CACHE_BYTES + RSS_OVERHEAD_BYTES
