"""A file's copy into a writeback mount, callback by callback, in process (no kernel).

    python bench/write_callbacks.py [--files 3000] [--rounds 3] [--profile]

Calls the callbacks libfuse makes for each file ``cp`` copies into a writeback mount, in
the order it makes them and through the same FUSE class (``BlobfsFUSE``, mfusepy's error
boundary): two lookups of the new name (getattr, answered ENOENT), the create, the
getattr libfuse makes after it (with the handle), the write, the close (``flush``). The
files alternate between ``ds/img/`` and ``ds/ann/`` (~4 KB each), over a local project of
10 images with its spool on the disk; the queue never runs.

The same sequence runs against the Python floor of ``bench/write_floor.py`` (a dict of
sizes), so the table shows what blobfs's own work costs per callback: microseconds per
file, median (min-max) over the rounds, the two file systems interleaved. ``--profile``
adds a cProfile of blobfs's callbacks (one round), sorted by own time.

Pin it (``taskset -c 0``) for stable figures: nothing here waits for another thread.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import errno
import itertools
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # (also puts the repository on the path)

from blobfs.cache.blocks import BlockCache
from blobfs.format.pack import ProjectPacker
from blobfs.fuse.compat import FUSE, BlobfsFUSE, c_stat
from blobfs.fuse.writeback_ops import WritebackOperations
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from blobfs.writeback.fs import WritebackFS
from blobfs.writeback.importer import LocalImporter
from blobfs.writeback.queue import WritebackQueue
from blobfs.writeback.spool import Spool
from blobfs.writeback.validate import Validator
from tests.support.sample import make_images, png_bytes

STEPS = ("lookup", "lookup again", "create", "getattr (handle)", "write", "flush")


class FileInfo(ctypes.Structure):
    """The fields of libfuse's ``fuse_file_info`` these callbacks read or set."""

    _fields_ = [("flags", ctypes.c_int), ("bits", ctypes.c_uint64), ("fh", ctypes.c_uint64)]


def fuse_over(ops: Any) -> Any:
    """The FUSE object without mounting (its constructor runs the mount loop)."""
    f = BlobfsFUSE.__new__(BlobfsFUSE)
    f.operations = ops
    f.encoding, f.errors, f.use_ns, f.raw_fi = "utf-8", "surrogateescape", True, False
    return f


def floor_ops() -> Any:
    """The Python floor's operations (``bench/write_floor.py``): a dict of sizes."""
    from stat import S_IFDIR, S_IFREG

    base = {"st_nlink": 1, "st_mtime": int(time.time())}
    dirs = {"/", "/ds", "/ds/img", "/ds/ann"}
    dir_attrs = {**base, "st_mode": S_IFDIR | 0o755, "st_nlink": 2}
    sizes: dict[str, int] = {}
    handles: dict[int, str] = {}
    numbers = itertools.count(1)

    class Sizes:
        op_counts: ClassVar[dict[str, int]] = {}
        direct_io_prefix = None
        serves_readdir_plus = False

        def find_attrs(self, path: str, fh: Any = None) -> dict[str, int] | None:
            if path in dirs:
                return dir_attrs
            size = sizes.get(path)
            return None if size is None else {**base, "st_mode": S_IFREG | 0o644, "st_size": size}

        def create(self, path: str, mode: int, flags: int = 0) -> int:
            sizes[path] = 0
            fh = next(numbers)
            handles[fh] = path
            return fh

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            name = handles[fh]
            sizes[name] = max(sizes[name], offset + len(data))
            return len(data)

        def flush(self, path: str, fh: int) -> None:
            handles.pop(fh, None)

    return Sizes()


def blobfs_ops(work: Path) -> tuple[Any, Callable[[], None]]:
    """A writeback layer over a 10-image local project, wired as the daemon wires it."""
    project = work / "project"
    ProjectPacker(project, "ds").pack(make_images(work / "seed", 10))
    spool = Spool(work / "spool")
    base = ProjectView(LocalProjectSource(project, BlockCache(1 << 16, 1 << 22)))
    queue = WritebackQueue(
        spool, LocalImporter(project), Validator(spool, base), delay_s=3600, batch_files=0
    )
    ops = WritebackOperations(WritebackFS(base, spool, queue), queue)

    def close() -> None:
        queue.stop(drain=False)
        spool.close()

    return ops, close


def run(f: Any, files: list[tuple[bytes, bytes]]) -> dict[str, float]:
    """Seconds per step over ``files`` ((path, bytes) each), as libfuse calls them."""
    spent = dict.fromkeys(STEPS, 0.0)
    clock = time.perf_counter
    wrapper = FUSE._wrapper
    st = c_stat()
    stp = ctypes.pointer(st)
    for path, data in files:
        fi = FileInfo(flags=0o1 | 0o100 | 0o200)  # O_WRONLY | O_CREAT | O_EXCL
        fip = ctypes.pointer(fi)
        buf = ctypes.create_string_buffer(data, len(data))
        t0 = clock()
        assert wrapper(f, f.fgetattr, path, stp, None) == -errno.ENOENT
        t1 = clock()
        assert wrapper(f, f.fgetattr, path, stp, None) == -errno.ENOENT
        t2 = clock()
        assert wrapper(f, f.create, path, 0o100644, fip) == 0
        t3 = clock()
        assert wrapper(f, f.fgetattr, path, stp, fip) == 0
        t4 = clock()
        assert wrapper(f, f.write, path, buf, len(data), 0, fip) == len(data)
        t5 = clock()
        assert wrapper(f, f.flush, path, fip) == 0
        t6 = clock()
        steps = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
        for step, took in zip(STEPS, steps, strict=True):
            spent[step] += took
    return spent


def corpus(n: int, round_: int) -> list[tuple[bytes, bytes]]:
    files = []
    for i in range(n):
        name = f"r{round_}_{i:06d}.png"
        image = png_bytes(i, 36, 36)
        if i % 2:
            files.append((f"/ds/ann/{name}.json".encode(), b'{"size": 1}\n' * 340))
        else:
            files.append((f"/ds/img/{name}".encode(), image))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--lines", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="write-callbacks-"))
    ops, close = blobfs_ops(work)
    targets = {"Python floor": fuse_over(floor_ops()), "blobfs": fuse_over(ops)}
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for name, f in targets.items():
                files = corpus(args.files, round_)
                spent = run(f, files)
                for step, took in spent.items():
                    samples.setdefault((name, step), []).append(took / args.files * 1e6)
                total = sum(spent.values()) / args.files * 1e6
                samples.setdefault((name, "all"), []).append(total)
        if args.profile:
            profiler = cProfile.Profile()
            files = corpus(args.files, args.rounds)
            profiler.enable()
            run(targets["blobfs"], files)
            profiler.disable()
            pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.lines)
    finally:
        close()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for step in (*STEPS, "all"):
        cells = []
        for name in targets:
            values = samples[(name, step)]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        rows.append([step, *cells])
    print(
        f"in process, {args.files} files (half img/, half ann/), {args.rounds} rounds, "
        "us per file, median (min-max)"
    )
    print(table([["step", *targets], *rows]))


if __name__ == "__main__":
    main()
