"""The floor of a ``cp -r`` into a FUSE mount: the same copy into three targets, same run.

    python bench/write_floor.py [--images 30000] [--rounds 3] [--latency-ms 2]
                                [--blobfs-only] [--tree LABEL=PATH] [--variant LABEL=FLAGS]

The dataset of ``bench/writeback_bench.py`` (N ~4 KB images + N annotations) is copied with
``cp -r`` into:

- a plain local folder on the disk holding the spool;
- ``floor_writefs`` (``bench/floor_writefs.c``, built here with gcc): a minimal libfuse3
  low-level file system in C that keeps a tree in memory and only the sizes of the files,
  mounted as a writeback blobfs mount is where a copy feels it (no writeback_cache, no
  default_permissions, 1 s entry/attribute timeouts, libfuse's default max_write, the
  multithreaded loop). What FUSE itself costs per file on this kernel;
- the Python floor (``--serve-python-floor``, run by this script): a do-nothing writable file
  system on blobfs's own FUSE layer (``BlobfsFUSE``, mfusepy, a writeback mount's options)
  whose ``ds/img`` and ``ds/ann`` exist before the copy, as blobfs's do, and whose callbacks
  answer the requests a copy sends (two lookups of a new name -> ENOENT, create and the
  getattr libfuse makes after it, write, flush; release left to libfuse) from a dict of
  sizes. What the design's stack costs per file before blobfs does anything;
- blobfs, remote writeback mount with default durability and nothing imported during the
  copy (``--writeback-delay 3600 --blob-size 1G --batch-files 0``); the flush after each
  round is not timed.

``--tree before=/tmp/old`` adds blobfs run from the package in ``/tmp/old`` (``git archive
<commit> blobfs | tar -x -C /tmp/old``), ``--variant 'one-thread=-o max_idle_threads=1'``
blobfs with more mount flags; ``--blobfs-only`` leaves out the plain folder, the C file
system and the Python floor (the ratios are then to the first blobfs row).

Each round runs every target unpinned and then pinned (``taskset -c 0`` for ``cp`` and the
daemon), so the rows compared were measured minutes apart at most. Prints the median
(min-max) per-file microseconds and the ratio of each median to the plain folder's.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from stat import S_IFDIR, S_IFREG
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, Mounts, mountpoint, spawn_foreground, table
from remote_scan import TOKEN, start_emulator
from writeback_bench import ONE_BATCH, dataset_folder, new_project, writeback_mount

HERE = Path(__file__).resolve().parent
PIN = ["taskset", "-c", "0"]


def build_floor() -> Path:
    """Compile ``floor_writefs.c`` into bench/out (when the source is newer)."""
    binary = OUT / "floor_writefs"
    source = HERE / "floor_writefs.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        pkg = ["pkg-config", "--cflags", "--libs", "fuse3"]
        flags = subprocess.run(pkg, capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source), *flags], check=True)
    return binary


def timed_cp(src: Path, target: Path, pinned: bool) -> float:
    start = time.perf_counter()
    subprocess.run([*(PIN if pinned else []), "cp", "-r", f"{src}/.", str(target)], check=True)
    return time.perf_counter() - start


def local_round(src: Path, pinned: bool) -> float:
    target = OUT / "wb-local-copy"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    try:
        return timed_cp(src, target, pinned)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def floor_round(src: Path, pinned: bool, binary: Path) -> float:
    with Mounts() as mounts:
        mnt = mountpoint("floor-writefs")
        cmd = [*(PIN if pinned else []), str(binary), str(mnt)]
        spawn_foreground(mounts, cmd, mnt, OUT / "floor-writefs.log")
        return timed_cp(src, mnt, pinned)


def serve_python_floor(mnt: str) -> None:
    """Run the Python floor on ``mnt`` in the foreground (see the module docstring)."""
    sys.path.insert(0, str(HERE.parent))
    from blobfs.fuse.compat import BlobfsFUSE, FuseOSError, Operations

    now = int(time.time())
    base = {"st_nlink": 1, "st_uid": os.getuid(), "st_gid": os.getgid(), "st_mtime": now}
    dirs = {"/", "/ds", "/ds/img", "/ds/ann"}
    dir_attrs = {**base, "st_mode": S_IFDIR | 0o755, "st_nlink": 2}
    sizes: dict[str, int] = {}
    handles: dict[int, str] = {}

    class Sizes(Operations):  # type: ignore[misc]
        direct_io_prefix = None
        serves_readdir_plus = False

        def __init__(self) -> None:
            self.op_counts: dict[str, int] = {}  # what the adapter counts in

        def find_attrs(self, path: str, fh: Any = None) -> dict[str, int] | None:
            """The adapter's getattr: None for a missing path."""
            if path in dirs:
                return dir_attrs
            size = sizes.get(path)
            if size is None:
                return None
            return {**base, "st_mode": S_IFREG | 0o644, "st_size": size}

        def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
            attrs = self.find_attrs(path)
            if attrs is None:
                raise FuseOSError(errno.ENOENT)
            return attrs

        def create(self, path: str, mode: int, flags: int = 0) -> int:
            sizes[path] = 0
            fh = len(handles) + 1
            handles[fh] = path
            return fh

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            name = handles[fh]
            sizes[name] = max(sizes[name], offset + len(data))
            return len(data)

        def flush(self, path: str, fh: int) -> None:
            handles.pop(fh, None)

    BlobfsFUSE(
        Sizes(),
        mnt,
        raw_fi=False,
        foreground=True,
        fsname="python-floor",
        subtype="blobfs",
        attr_timeout=1.0,
        entry_timeout=1.0,
        negative_timeout=60.0,
        max_idle_threads=10,
    )


def python_floor_round(src: Path, pinned: bool) -> float:
    with Mounts() as mounts:
        mnt = mountpoint("python-floor")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-python-floor", str(mnt)]
        spawn_foreground(mounts, [*(PIN if pinned else []), *cmd], mnt, OUT / "python-floor.log")
        return timed_cp(src, mnt / "ds", pinned)


def blobfs_round(
    src: Path, pinned: bool, url: str, tree: str | None = None, options: Sequence[str] = ()
) -> float:
    """One copy into blobfs; ``tree``: a folder holding another ``blobfs`` package to run
    instead of this one (an export of an older commit), ``options``: more mount flags."""
    project, _ = new_project(url, f"floor-{time.time_ns()}")
    spool = OUT / "wb-floor-spool"
    shutil.rmtree(spool, ignore_errors=True)
    with Mounts() as mounts:
        mnt = mountpoint("writeback-floor")
        cmd = writeback_mount(project, mnt, url, spool, [*ONE_BATCH, *options])
        env = {"API_TOKEN": TOKEN}
        if tree is not None:  # -P: not the working directory's package, the tree's
            cmd = [cmd[0], "-P", *cmd[1:]]
            env["PYTHONPATH"] = tree
        cmd = [*(PIN if pinned else []), *cmd]
        spawn_foreground(mounts, cmd, mnt, OUT / "wb-floor-daemon.log", env=env)
        took = timed_cp(src, mnt / "ds", pinned)
        subprocess.run(
            [sys.executable, "-m", "blobfs", "flush", str(mnt)], check=True, capture_output=True
        )
    shutil.rmtree(spool, ignore_errors=True)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument(
        "--blobfs-only", action="store_true", help="no plain folder, no C file system"
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also copy into blobfs run from the package under PATH (e.g. an older commit's)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="also copy into blobfs mounted with these extra flags (e.g. '-o nothreads')",
    )
    parser.add_argument("--serve-python-floor", metavar="MNT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_python_floor:
        serve_python_floor(args.serve_python_floor)
        return
    src = dataset_folder(args.images)
    files = 2 * args.images
    binary = build_floor()
    state = OUT / "wb-floor-emu"
    shutil.rmtree(state, ignore_errors=True)
    emu, url = start_emulator(state, args.latency_ms)
    targets: dict[str, Callable[[bool], float]] = {}
    if not args.blobfs_only:
        targets["plain local folder"] = lambda pinned: local_round(src, pinned)
        targets["floor_writefs (C, libfuse3 low-level)"] = lambda pinned: floor_round(
            src, pinned, binary
        )
        targets["Python floor (BlobfsFUSE, a dict of sizes)"] = lambda pinned: python_floor_round(
            src, pinned
        )
    targets["blobfs writeback, default durability"] = lambda pinned: blobfs_round(src, pinned, url)
    for label, _, tree in (item.partition("=") for item in args.tree):
        targets[f"blobfs {label}"] = lambda pinned, t=tree: blobfs_round(src, pinned, url, t)
    for label, _, flags in (item.partition("=") for item in args.variant):
        targets[f"blobfs {label}"] = lambda pinned, f=flags: blobfs_round(
            src, pinned, url, options=f.split()
        )
    samples: dict[tuple[str, bool], list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for pinned in (False, True):
                for name, run in targets.items():
                    took = run(pinned)
                    samples.setdefault((name, pinned), []).append(took)
                    pin = "pinned" if pinned else "unpinned"
                    print(f"round {round_ + 1} {pin} {name}: {took:.2f} s", flush=True)
    finally:
        emu.terminate()
        emu.wait()
    print(f"\ncp -r of {args.images} images + {args.images} annotations, {args.rounds} rounds\n")
    first = next(iter(targets))
    rows = [("target", "cpu", "us per file: median (min-max)", f"x {first}")]
    for pinned in (False, True):
        base = statistics.median(samples[(first, pinned)])
        for name in targets:
            got = samples[(name, pinned)]
            us = [s / files * 1e6 for s in got]
            rows.append(
                (
                    name,
                    "taskset -c 0" if pinned else "unpinned",
                    f"{statistics.median(us):.0f} ({min(us):.0f}-{max(us):.0f})",
                    f"{statistics.median(got) / base:.2f}",
                )
            )
    print(table(rows))


if __name__ == "__main__":
    main()
