"""Listing benchmark: the first ``ls | wc -l`` and ``find | wc -l`` of a large blob folder,
through blobfs, through the C floor (floorfs) and on the same files in a plain folder.

    python bench/listing.py [--images 250000] [--rounds 3] [--pin-cpu N]
                            [--floorfs /tmp/floorfs] [--floor-args=--rdplus=always]
                            [--json out.json]

The project (one dataset of ``--images`` PNGs in ONE tar, one annotation per image) and its
plain copy are built once by ``bench/scale.py``'s builder and cached under ``bench/out``.
floorfs (``../shared/floor/floorfs.c``, a minimal libfuse3 low-level file system) serves
that very tar, so it lists the same names as blobfs's ``img/``. In interleaved rounds (the
order of the systems rotates each round), with median / min / max:

- blobfs, mounted with an empty index cache ("cold": the pickles are parsed) and again with
  the cache the first mount left ("warm"): ``ls MNT/ds0/img | wc -l`` right after the mount
  returned, then ``find MNT | wc -l`` (``img/`` and ``ann/``), then ``ls`` again;
- floorfs: ``ls MNT | wc -l`` right after it is mounted, ``find MNT | wc -l``, ``ls`` again;
- the plain folder: ``ls``, ``find`` of the whole tree and ``find`` of ``img/`` alone.

Ratios compare like with like: blobfs ``ls`` against the plain ``ls`` and floorfs's; blobfs
``find MNT`` against the plain ``find`` of the whole tree; floorfs ``find`` against the plain
``find`` of ``img/``. Also printed: the FUSE calls that reached blobfs's Python during the
first ``ls`` (``blobfs stats``), and floorfs's requests by opcode. With ``--pin-cpu N`` the
readers and both daemons run on CPU N only (each round trip then skips the cross-CPU wakeup).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    OUT,
    Mounts,
    blobfs_mount_cli,
    clean_stale_mounts,
    fmt,
    load_note,
    mountpoint,
    pin,
    spawn_foreground,
    table,
)
from bench.scale import build, daemon_stats

DATASET = "ds0"


def timed_shell(command: str, cpu: int | None) -> tuple[float, str]:
    """Seconds ``sh -c command`` took, and its output (run on ``cpu`` when given)."""
    argv = ["sh", "-c", command]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout.strip()


def counted(command: str, cpu: int | None, expected: int) -> float:
    seconds, out = timed_shell(command, cpu)
    if int(out) != expected:
        raise RuntimeError(f"{command!r} counted {out}, expected {expected}")
    return seconds


def fuse_ops(mnt: Path) -> dict[str, int]:
    ops: dict[str, int] = daemon_stats(mnt).get("fuse_ops", {})
    return ops


def blobfs_round(
    args: argparse.Namespace, root: Path, mounts: Mounts, cache: Path, phase: str
) -> dict[str, float]:
    got: dict[str, float] = {}
    n = args.images
    mnt = mountpoint(f"listing-{phase}")
    env = {"XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    got[f"blobfs {phase} mount s"], pid = blobfs_mount_cli(mounts, str(root), mnt, [], env=env)
    if args.pin_cpu is not None:
        pin(pid, {args.pin_cpu})
    img = mnt / DATASET / "img"
    got[f"blobfs {phase} first ls s"] = counted(f"ls '{img}' | wc -l", args.pin_cpu, n)
    if phase == "warm":
        for op, calls in sorted(fuse_ops(mnt).items()):
            got[f"blobfs first ls: {op} calls"] = calls
    # the mount point, meta.json, ds0, img/, ann/ and the files of both
    got[f"blobfs {phase} find s"] = counted(f"find '{mnt}' | wc -l", args.pin_cpu, 5 + 2 * n)
    got[f"blobfs {phase} second ls s"] = counted(f"ls '{img}' | wc -l", args.pin_cpu, n)
    mounts.release(mnt)
    return got


def blobfs_rounds(
    args: argparse.Namespace,
    root: Path,
    mounts: Mounts,
    cache: Path,
    phases: tuple[str, ...],
    add: Any,
) -> None:
    if "cold" not in phases:  # the warm mount needs the index cache a first mount leaves
        blobfs_round(args, root, mounts, cache, "cold")
    for phase in phases:
        add(blobfs_round(args, root, mounts, cache, phase))


def floorfs_round(args: argparse.Namespace, tar: Path, mounts: Mounts) -> dict[str, float]:
    got: dict[str, float] = {}
    n = args.images
    mnt = mountpoint("listing-floor")
    cmd = [args.floorfs, *args.floor_args, str(tar), str(mnt)]
    if args.pin_cpu is not None:
        cmd = ["taskset", "-c", str(args.pin_cpu), *cmd]
    log = OUT / "listing-floorfs.log"
    _, proc = spawn_foreground(mounts, cmd, mnt, log)
    got["floorfs first ls s"] = counted(f"ls '{mnt}' | wc -l", args.pin_cpu, n)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.05)
    got["floorfs find s"] = counted(f"find '{mnt}' | wc -l", args.pin_cpu, n + 1)
    got["floorfs second ls s"] = counted(f"ls '{mnt}' | wc -l", args.pin_cpu, n)
    mounts.release(mnt)
    first = log.read_text().splitlines()
    counts = [line for line in first if line.startswith("LOOKUP=")]
    if counts:
        for pair in counts[0].split():
            op, _, value = pair.partition("=")
            if int(value):
                got[f"floorfs first ls: {op} requests"] = int(value)
    return got


def plain_round(args: argparse.Namespace, plain: Path) -> dict[str, float]:
    n = args.images
    img = plain / DATASET / "img"
    return {
        "plain ls s": counted(f"ls '{img}' | wc -l", args.pin_cpu, n),
        "plain find s": counted(f"find '{plain}' | wc -l", args.pin_cpu, 5 + 2 * n),
        "plain find img s": counted(f"find '{img}' | wc -l", args.pin_cpu, n + 1),
    }


RATIOS = [
    ("blobfs cold first ls / plain ls", "blobfs cold first ls s", "plain ls s"),
    ("blobfs warm first ls / plain ls", "blobfs warm first ls s", "plain ls s"),
    ("blobfs warm first ls / floorfs first ls", "blobfs warm first ls s", "floorfs first ls s"),
    ("blobfs warm find / plain find", "blobfs warm find s", "plain find s"),
    ("blobfs cold find / plain find", "blobfs cold find s", "plain find s"),
    ("floorfs find / plain find img", "floorfs find s", "plain find img s"),
    ("floorfs first ls / plain ls", "floorfs first ls s", "plain ls s"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pin-cpu", type=int, default=None)
    parser.add_argument("--floorfs", default="/tmp/floorfs")
    parser.add_argument(
        "--floor-args", type=lambda s: s.split(), default=["--rdplus=always"], metavar="ARGS"
    )
    parser.add_argument(
        "--no-cold",
        action="store_true",
        help="do not report the cold-index mounts (one still primes the cache)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not shutil.which(args.floorfs) and not os.access(args.floorfs, os.X_OK):
        parser.error(f"{args.floorfs}: build it from ../shared/floor/floorfs.c first")
    OUT.mkdir(parents=True, exist_ok=True)
    clean_stale_mounts()
    project, plain = build(argparse.Namespace(datasets=1, per_dataset=args.images, tars=1))
    tar = project.root / "blob" / "blob_000.tar"
    print(load_note(), flush=True)
    samples: dict[str, list[float]] = {}

    def add(found: dict[str, float]) -> None:
        for key, value in found.items():
            samples.setdefault(key, []).append(value)

    with Mounts() as mounts:
        for r in range(args.rounds):
            cache = Path(tempfile.mkdtemp(prefix="listing-xdg-", dir=OUT))
            phases = (() if args.no_cold else ("cold",)) + ("warm",)
            systems: list[Any] = [
                functools.partial(blobfs_rounds, args, project.root, mounts, cache, phases, add),
                lambda: add(floorfs_round(args, tar, mounts)),
                lambda: add(plain_round(args, plain)),
            ]
            try:
                for k in range(len(systems)):
                    systems[(k + r) % len(systems)]()
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            print(f"round {r + 1}/{args.rounds} done; {load_note()}", flush=True)
    rows = [["figure", "median", "min", "max"]]
    for key, values in samples.items():
        rows.append([key, fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))])
    for label, top, bottom in RATIOS:
        if top in samples and bottom in samples:
            ratio = [a / b for a, b in zip(samples[top], samples[bottom], strict=True)]
            rows.append(
                [
                    label,
                    fmt(statistics.median(ratio), ".2f", "x"),
                    fmt(min(ratio), ".2f"),
                    fmt(max(ratio), ".2f"),
                ]
            )
    print(table(rows))
    print(load_note())
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "samples": samples})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
