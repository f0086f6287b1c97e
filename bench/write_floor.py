"""The floor of a ``cp -r`` into a FUSE mount: the same copy into three targets, same run.

    python bench/write_floor.py [--images 30000] [--rounds 3] [--latency-ms 2]
                                [--blobfs-only] [--tree LABEL=PATH] [--variant LABEL=FLAGS]
                                [--anchor] [--pins unpinned both daemon cp]
                                [--floor-variants] [--cpu]

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
daemon), so the rows compared were measured minutes apart at most. ``--pins`` names the
passes of a round instead: ``unpinned``, ``both`` (the pinned pass), ``daemon`` (the daemon
alone on CPU 0, ``cp`` free), ``cp`` (``cp`` alone on CPU 0) and ``apart`` (the daemon on
CPU 0, ``cp`` on CPU 1: every request crosses the CPUs). Prints the median
(min-max) per-file microseconds and the ratio of each median to the plain folder's.

``--floor-variants`` adds three more Python floors: ``+ journal`` (each close appends the
file's bytes to a journal file with one ``pwritev``: the least a close must do for the bytes
to survive a kill of the daemon), ``no flush`` (flush answered ENOSYS, so the kernel stops
sending it; release left to libfuse: one round trip fewer per file) and both.
``--variant`` flags of the form ``env:NAME=VALUE`` set the daemon's environment instead.

``--cpu`` adds a table of where each file's time went: the daemon's CPU (user and kernel,
every thread) and ``cp``'s over each copy, per file, and the share of the machine's CPU
left idle meanwhile.

``--anchor`` adds, to each pass, the SDK's whole flow of ``bench/writeback_bench.py`` (run in
this process, pinned to CPU 0 in the pinned pass; the emulator is never pinned) and times
blobfs's flush after its copy. It then prints, per pass, (the Python floor's copy + blobfs's
flush) over the anchor next to blobfs's own (copy + flush) over it: what the whole flow
would cost if blobfs's callbacks cost the floor's, against what it costs.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from stat import S_IFDIR, S_IFREG
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, Mounts, mountpoint, spawn_foreground, table
from remote_scan import TOKEN, start_emulator
from writeback_bench import ONE_BATCH, bench_sdk, dataset_folder, new_project, writeback_mount

HERE = Path(__file__).resolve().parent
PYTHON_FLOOR = "Python floor (BlobfsFUSE, a dict of sizes)"
BLOBFS = "blobfs writeback, default durability"


def build_floor() -> Path:
    """Compile ``floor_writefs.c`` into bench/out (when the source is newer)."""
    binary = OUT / "floor_writefs"
    source = HERE / "floor_writefs.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        pkg = ["pkg-config", "--cflags", "--libs", "fuse3"]
        flags = subprocess.run(pkg, capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source), *flags], check=True)
    return binary


#: What each ``--pins`` choice runs ``taskset -c`` with: (the daemon's CPUs, ``cp``'s), None: free.
PINS: dict[str, tuple[str | None, str | None]] = {
    "unpinned": (None, None),
    "both": ("0", "0"),
    "daemon": ("0", None),
    "cp": (None, "0"),
    "apart": ("0", "1"),
}
PIN_LABELS = {
    "unpinned": "unpinned",
    "both": "taskset -c 0",
    "daemon": "daemon pinned, cp free",
    "cp": "cp pinned, daemon free",
    "apart": "daemon on 0, cp on 1",
}


def daemon_pin(pin: str) -> list[str]:
    cpus = PINS[pin][0]
    return [] if cpus is None else ["taskset", "-c", cpus]


class CpuSplit(NamedTuple):
    """Seconds of CPU over one copy: the daemon's (all its threads, ended ones included)
    in user and kernel mode, ``cp``'s, and the machine's idle time (all CPUs)."""

    wall: float
    daemon_user: float
    daemon_sys: float
    cp_user: float
    cp_sys: float
    idle: float


CPUS = os.cpu_count() or 1
#: Where ``timed_cp`` adds the CPU split of each copy into a daemon (``--cpu``).
CPU_SPLITS: list[CpuSplit] = []


def _counters(daemon: int) -> tuple[float, float, float, float, float]:
    """CPU seconds so far, in ``CpuSplit``'s order after ``wall``: the daemon's user and
    system time (/proc/PID/stat: every thread, ended ones included), this process's
    children's (``cp``), and the idle time of all CPUs (/proc/stat: idle + iowait)."""
    tick = os.sysconf("SC_CLK_TCK")
    own = Path(f"/proc/{daemon}/stat").read_text().rpartition(")")[2].split()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (
        int(own[11]) / tick,
        int(own[12]) / tick,
        kids.ru_utime,
        kids.ru_stime,
        (int(machine[4]) + int(machine[5])) / tick,
    )


def timed_cp(src: Path, target: Path, pin: str, daemon: int | None = None) -> float:
    """Seconds of ``cp -r src/. target``; with the ``daemon``'s pid, also its CPU split
    (appended to ``CPU_SPLITS``)."""
    cpus = PINS[pin][1]
    cmd = [*([] if cpus is None else ["taskset", "-c", cpus]), "cp", "-r", f"{src}/.", str(target)]
    before = None if daemon is None else _counters(daemon)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    took = time.perf_counter() - start
    if daemon is not None and before is not None:
        after = _counters(daemon)
        CPU_SPLITS.append(CpuSplit(took, *(b - a for a, b in zip(before, after, strict=True))))
    return took


def local_round(src: Path, pin: str) -> float:
    target = OUT / "wb-local-copy"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    try:
        return timed_cp(src, target, pin)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def floor_round(src: Path, pin: str, binary: Path) -> float:
    with Mounts() as mounts:
        mnt = mountpoint("floor-writefs")
        cmd = [*daemon_pin(pin), str(binary), str(mnt)]
        _, mount = spawn_foreground(mounts, cmd, mnt, OUT / "floor-writefs.log")
        return timed_cp(src, mnt, pin, mount.pid)


#: The Python floor's kinds (``--floor-variants`` adds all but ``plain``): with
#: ``journal`` each close (or, without flush, each write) appends the file's bytes to a
#: journal file (one ``pwritev`` of a header, the name and the bytes: the least a close
#: must do for the bytes to survive a kill of the daemon); with ``noflush`` the flush is
#: answered ENOSYS, so the kernel stops sending it, and release is left to libfuse (one
#: round trip fewer per file: what a design that commits at write would save).
FLOOR_KINDS = {
    "plain": PYTHON_FLOOR,
    "journal": "Python floor + journal",
    "noflush": "Python floor, no flush",
    "journal-noflush": "Python floor + journal, no flush",
}


class FloorJournal:
    """The Python floor's journal: one record per file, a header, the name, the bytes."""

    HEADER = struct.Struct("<IIQ")

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.end = 0

    def append(self, name: str, data: bytes) -> None:
        raw = name.encode()
        crc = zlib.crc32(data, zlib.crc32(raw))
        parts = (self.HEADER.pack(len(raw), crc, len(data)), raw, data)
        self.end += os.pwritev(self.fd, parts, self.end)


def serve_python_floor(mnt: str, kind: str = "plain") -> None:
    """Run the Python floor on ``mnt`` in the foreground (see the module docstring)."""
    sys.path.insert(0, str(HERE.parent))
    from blobfs.fuse.compat import BlobfsFUSE, FuseOSError, Operations

    journal, noflush = "journal" in kind, "noflush" in kind
    now = int(time.time())
    base = {"st_nlink": 1, "st_uid": os.getuid(), "st_gid": os.getgid(), "st_mtime": now}
    dirs = {"/", "/ds", "/ds/img", "/ds/ann"}
    dir_attrs = {**base, "st_mode": S_IFDIR | 0o755, "st_nlink": 2}
    sizes: dict[str, int] = {}
    handles: dict[int, str] = {}
    pending: dict[int, bytes] = {}
    numbers = itertools.count(1)
    append = FloorJournal(OUT / "python-floor-journal").append

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
            fh = next(numbers)  # never reused: without flush, handles end late
            handles[fh] = path
            return fh

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            name = handles[fh]
            sizes[name] = max(sizes[name], offset + len(data))
            if journal and noflush:
                append(name, data)
            elif journal:
                pending[fh] = data
            return len(data)

        def flush(self, path: str, fh: int) -> None:
            if noflush:
                raise FuseOSError(errno.ENOSYS)
            name = handles.pop(fh, None)
            if journal and name is not None:
                append(name, pending.pop(fh, b""))

        def release(self, path: str, fh: int) -> None:
            handles.pop(fh, None)

        # the handle ended at flush, or (no flush) the floor does not care
        release.libfuse_ignore = True  # type: ignore[attr-defined]

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


def python_floor_round(src: Path, pin: str, kind: str = "plain") -> float:
    with Mounts() as mounts:
        mnt = mountpoint("python-floor")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-python-floor", str(mnt)]
        cmd += ["--floor-kind", kind]
        _, mount = spawn_foreground(mounts, [*daemon_pin(pin), *cmd], mnt, OUT / "python-floor.log")
        return timed_cp(src, mnt / "ds", pin, mount.pid)


def anchor_round(src: Path, pin: str, url: str, emu: int, images: int) -> float:
    """The SDK's whole flow (``writeback_bench.py``'s anchor), this process pinned to
    CPU 0 when the daemons are (the emulator is not, in either case)."""
    cpus = os.sched_getaffinity(0)
    if PINS[pin][0] is not None:
        os.sched_setaffinity(0, {int(PINS[pin][0])})
    try:
        got = bench_sdk(url, src, images, 0, emu, [])
    finally:
        os.sched_setaffinity(0, cpus)
    assert got is not None, "the anchor needs the supervisely SDK"
    return got[0]


def blobfs_round(
    src: Path,
    pin: str,
    url: str,
    tree: str | None = None,
    options: Sequence[str] = (),
    flushes: list[float] | None = None,
) -> float:
    """One copy into blobfs; ``tree``: a folder holding another ``blobfs`` package to run
    instead of this one (an export of an older commit), ``options``: more mount flags,
    ``flushes``: where to add the seconds of the ``blobfs flush`` after the copy."""
    project, _ = new_project(url, f"floor-{time.time_ns()}")
    spool = OUT / "wb-floor-spool"
    shutil.rmtree(spool, ignore_errors=True)
    with Mounts() as mounts:
        mnt = mountpoint("writeback-floor")
        flags = [o for o in options if not o.startswith("env:")]
        cmd = writeback_mount(project, mnt, url, spool, [*ONE_BATCH, *flags])
        env = {"API_TOKEN": TOKEN}
        env.update(o[4:].split("=", 1) for o in options if o.startswith("env:"))  # type: ignore[misc]
        if tree is not None:  # -P: not the working directory's package, the tree's
            cmd = [cmd[0], "-P", *cmd[1:]]
            env["PYTHONPATH"] = tree
        cmd = [*daemon_pin(pin), *cmd]
        _, mount = spawn_foreground(mounts, cmd, mnt, OUT / "wb-floor-daemon.log", env=env)
        took = timed_cp(src, mnt / "ds", pin, mount.pid)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "blobfs", "flush", str(mnt)], check=True, capture_output=True
        )
        if flushes is not None:
            flushes.append(time.perf_counter() - start)
        print(f"  copy {took:.2f} s, flush {time.perf_counter() - start:.2f} s", flush=True)
    shutil.rmtree(spool, ignore_errors=True)
    return took


def parse_args() -> argparse.Namespace:
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
        help="also copy into blobfs run from the package under PATH (e.g. an older commit's);"
        " 'LABEL=PATH FLAGS...' mounts it with more flags",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="also copy into blobfs mounted with these extra flags (e.g. '-o nothreads')",
    )
    parser.add_argument(
        "--pins",
        nargs="+",
        choices=list(PINS),
        default=["unpinned", "both"],
        help="the passes of each round: what runs where (see the module docstring)",
    )
    parser.add_argument(
        "--anchor",
        action="store_true",
        help="also the SDK's whole flow and blobfs's flush: the whole flow against the floor's",
    )
    parser.add_argument(
        "--floor-variants",
        action="store_true",
        help="also the Python floor with a journal record per file, without flush, and both",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="also each daemon's and cp's CPU (user, system) and the idle CPU, per file",
    )
    parser.add_argument("--serve-python-floor", metavar="MNT", help=argparse.SUPPRESS)
    parser.add_argument("--floor-kind", choices=list(FLOOR_KINDS), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve_python_floor:
        serve_python_floor(args.serve_python_floor, args.floor_kind or "plain")
        return
    src = dataset_folder(args.images)
    binary = build_floor()
    state = OUT / "wb-floor-emu"
    shutil.rmtree(state, ignore_errors=True)
    emu, url = start_emulator(state, args.latency_ms)
    flushes: dict[str, list[float]] = {pin: [] for pin in args.pins}
    anchors: dict[str, list[float]] = {pin: [] for pin in args.pins}
    targets: dict[str, Callable[[str], float]] = {}
    if not args.blobfs_only:
        targets["plain local folder"] = lambda pin: local_round(src, pin)
        targets["floor_writefs (C, libfuse3 low-level)"] = lambda pin: floor_round(src, pin, binary)
    if not args.blobfs_only or args.anchor:
        targets[PYTHON_FLOOR] = lambda pin: python_floor_round(src, pin)
    if args.floor_variants:
        for kind, label in list(FLOOR_KINDS.items())[1:]:
            targets[label] = lambda pin, k=kind: python_floor_round(src, pin, k)
    targets[BLOBFS] = lambda pin: blobfs_round(src, pin, url, flushes=flushes[pin])
    for label, _, spec in (item.partition("=") for item in args.tree):
        tree, *flags = spec.split()
        targets[f"blobfs {label}"] = lambda pin, t=tree, f=flags: blobfs_round(
            src, pin, url, t, options=f
        )
    for label, _, flags in (item.partition("=") for item in args.variant):
        targets[f"blobfs {label}"] = lambda pin, f=flags: blobfs_round(
            src, pin, url, options=f.split()
        )
    samples: dict[tuple[str, str], list[float]] = {}
    splits: dict[tuple[str, str], list[CpuSplit]] = {}
    try:
        for round_ in range(args.rounds):
            for pin in args.pins:
                if args.anchor:
                    anchors[pin].append(anchor_round(src, pin, url, emu.pid, args.images))
                    print(f"round {round_ + 1} {pin} anchor: {anchors[pin][-1]:.2f} s", flush=True)
                for name, run in targets.items():
                    CPU_SPLITS.clear()
                    took = run(pin)
                    samples.setdefault((name, pin), []).append(took)
                    splits.setdefault((name, pin), []).extend(CPU_SPLITS)
                    print(f"round {round_ + 1} {pin} {name}: {took:.2f} s", flush=True)
    finally:
        emu.terminate()
        emu.wait()
    report(args, list(targets), samples, anchors, flushes)
    print_cpu(args, list(targets), splits)


def print_cpu(
    args: argparse.Namespace, targets: list[str], splits: dict[tuple[str, str], list[CpuSplit]]
) -> None:
    """With ``--cpu``: one row per daemon and pinning, where each file's time went.

    A copy into FUSE is a ping-pong (``cp`` waits for each answer, the daemon for each
    request), so the wall time is about the two sides' CPU added up; what the same work
    costs unpinned against pinned shows what crossing the CPUs costs each side."""
    if not args.cpu:
        return
    files = 2 * args.images
    rows: list[tuple[str, ...]] = [
        ("target", "cpu", "daemon user", "daemon sys", "cp user", "cp sys", "idle")
    ]
    for pin in args.pins:
        for name in targets:
            got = splits.get((name, pin))
            if not got:
                continue
            per_file = [
                [s.daemon_user * 1e6 / files for s in got],
                [s.daemon_sys * 1e6 / files for s in got],
                [s.cp_user * 1e6 / files for s in got],
                [s.cp_sys * 1e6 / files for s in got],
            ]
            idle = [s.idle / (CPUS * s.wall) * 100 for s in got]
            rows.append(
                (
                    name,
                    PIN_LABELS[pin],
                    *(spread(v, "{:.0f}") for v in per_file),
                    spread(idle, "{:.0f}%"),
                )
            )
    print("\nCPU per file copied, us, median (min-max); idle: of all CPUs, share of the copy\n")
    print(table(rows))


def report(
    args: argparse.Namespace,
    targets: list[str],
    samples: dict[tuple[str, str], list[float]],
    anchors: dict[str, list[float]],
    flushes: dict[str, list[float]],
) -> None:
    files = 2 * args.images
    print(f"\ncp -r of {args.images} images + {args.images} annotations, {args.rounds} rounds\n")
    first = targets[0]
    rows = [("target", "cpu", "us per file: median (min-max)", f"x {first}")]
    for pin in args.pins:
        base = statistics.median(samples[(first, pin)])
        for name in targets:
            got = samples[(name, pin)]
            us = [s / files * 1e6 for s in got]
            rows.append(
                (
                    name,
                    PIN_LABELS[pin],
                    spread(us, "{:.0f}"),
                    f"{statistics.median(got) / base:.2f}",
                )
            )
    print(table(rows))
    if args.anchor:
        print(f"\nthe whole flow, seconds, median (min-max) of {args.rounds} rounds\n")
        print(table(whole_flow_rows(args.pins, anchors, samples, flushes)))


def spread(values: Sequence[float], fmt: str) -> str:
    """``median (min-max)`` of ``values``, each written with ``fmt``."""
    mid, low, high = (fmt.format(v) for v in (statistics.median(values), min(values), max(values)))
    return f"{mid} ({low}-{high})"


def whole_flow_rows(
    pins: Sequence[str],
    anchors: dict[str, list[float]],
    samples: dict[tuple[str, str], list[float]],
    flushes: dict[str, list[float]],
) -> list[tuple[str, ...]]:
    """Per pinning: the anchor, the floor's copy, blobfs's copy and flush, and the two
    ratios each round gives: (floor's copy + blobfs's flush) and blobfs's own copy +
    flush, over that round's anchor. The first is what the flow would cost if blobfs's
    callbacks cost what the floor's do; the gap between the two is blobfs's own work."""
    head = (
        "cpu",
        "anchor",
        "floor cp",
        "blobfs cp",
        "blobfs flush",
        "(floor cp + flush) x",
        "blobfs x",
    )
    rows: list[tuple[str, ...]] = [head]
    for pin in pins:
        anchor, floor, cp, flush = (
            anchors[pin],
            samples[(PYTHON_FLOOR, pin)],
            samples[(BLOBFS, pin)],
            flushes[pin],
        )
        floor_x = [(f + fl) / a for a, f, fl in zip(anchor, floor, flush, strict=True)]
        own_x = [(c + fl) / a for a, c, fl in zip(anchor, cp, flush, strict=True)]
        rows.append(
            (
                PIN_LABELS[pin],
                *(spread(v, "{:.2f}") for v in (anchor, floor, cp, flush, floor_x, own_x)),
            )
        )
    return rows


if __name__ == "__main__":
    main()
