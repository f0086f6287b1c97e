"""Listing-attribute policy benchmark: ``--readdirplus always`` against ``auto``, for the
readers that only list and for the readers that list and then stat or open every file.

    python bench/readdirplus.py [--rounds 3] [--small 50000] [--modes always,auto]
                                [--daemon-cpus 0] [--reader-cpus 0] [--floorfs /tmp/floorfs]
                                [--no-big] [--json out.json]

Two projects, built once by ``bench/scale.py``'s builder (cached under ``bench/out``):

- the scale project (4 datasets x 250,000 images, 10 tars): per mode, a mount with an empty
  index cache ("cold") and one with the cache it left ("warm"), each timing the first
  ``ls DIR | wc -l`` of one dataset's ``img/`` and then ``find MNT | wc -l``; floorfs (the
  C floor, ``--rdplus=always`` and ``auto``) serving the first tar, its first ``ls`` and
  ``find``; the plain folder's ``ls`` and ``find``.
- a small project (one dataset of ``--small`` images, one tar, below the size at which a
  folder is listed with names only whatever the mode): per mode and reader, a fresh warm
  mount (nothing in the kernel's caches) and one reader: ``ls -l img | wc -l``, ``du -s``
  of the dataset and of its ``img/`` (``du``, like ``cp -r``, ``rsync`` or ``tar``, reads a
  whole folder before it stats its files), and Python listing ``img/`` then opening and
  reading every file in shuffled order. The daemon's FUSE calls of each reader
  (``getattr``: one per kernel LOOKUP; ``readdir_plus``: one per listing page) are
  reported too. Plain folder alike.

Modes and systems alternate in each round (their order rotates by round). Median / min /
max over the rounds; ratios against the plain folder of the same round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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
from tests.support.scale import ScaleProject

Figures = dict[str, float]


def timed_shell(command: str, cpus: list[int]) -> tuple[float, str]:
    """Seconds ``sh -c command`` took (on ``cpus`` when given), and its output."""
    argv = ["sh", "-c", command]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout.strip()


def counted(command: str, cpus: list[int], expected: int) -> float:
    seconds, out = timed_shell(command, cpus)
    if int(out) != expected:
        raise RuntimeError(f"{command!r} counted {out}, expected {expected}")
    return seconds


def list_then_read(folder: Path, seed: int) -> tuple[float, int]:
    """Seconds to list ``folder``, then open and read each file in shuffled order."""
    started = time.perf_counter()
    names = os.listdir(folder)
    random.Random(seed).shuffle(names)
    total = 0
    for name in names:
        with open(folder / name, "rb", buffering=0) as f:
            total += len(f.read())
    return time.perf_counter() - started, total


def python_reader(folder: Path, seed: int, cpus: list[int]) -> float:
    """:func:`list_then_read` in a child process (pinned like the other readers)."""
    code = (
        "import sys; from pathlib import Path; from bench.readdirplus import list_then_read; "
        f"print(list_then_read(Path({str(folder)!r}), {seed})[0])"
    )
    argv = [sys.executable, "-c", code]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": root}
    )
    return float(out.stdout.strip())


class Bench:
    def __init__(self, args: argparse.Namespace, mounts: Mounts) -> None:
        self.args = args
        self.mounts = mounts
        self.caches: dict[str, Path] = {}

    def mount(self, root: Path, mode: str, cache_key: str) -> tuple[Path, int]:
        cache = self.caches.get(cache_key)
        if cache is None:
            cache = self.caches[cache_key] = Path(tempfile.mkdtemp(prefix="rdplus-xdg-", dir=OUT))
        mnt = mountpoint(f"rdplus-{mode}")
        env = {"XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(Path(__file__).parent.parent)}
        _, pid = blobfs_mount_cli(self.mounts, str(root), mnt, ["--readdirplus", mode], env=env)
        if self.args.daemon_cpus:
            pin(pid, set(self.args.daemon_cpus))
        return mnt, pid

    def drop_caches(self) -> None:
        for cache in self.caches.values():
            shutil.rmtree(cache, ignore_errors=True)
        self.caches.clear()

    # ---- the scale project: listing only ----

    def big(self, project: ScaleProject, mode: str, r: int) -> Figures:
        got: Figures = {}
        ls_rel = f"{project.datasets[r % len(project.datasets)]}/img"
        expected = 2 + len(project.datasets) * (3 + 2 * project.per_dataset)
        for phase in ("cold", "warm"):
            mnt, _ = self.mount(project.root, mode, f"big-{mode}")
            got[f"{mode} {phase} first ls s"] = counted(
                f"ls '{mnt / ls_rel}' | wc -l", self.args.reader_cpus, project.per_dataset
            )
            got[f"{mode} {phase} find s"] = counted(
                f"find '{mnt}' | wc -l", self.args.reader_cpus, expected
            )
            ops = daemon_stats(mnt).get("fuse_ops", {})
            got[f"{mode} {phase} find: readdir pages"] = ops.get("readdir_plus", 0)
            self.mounts.release(mnt)
        return got

    def big_plain(self, project: ScaleProject, plain: Path, r: int) -> Figures:
        ls_rel = f"{project.datasets[r % len(project.datasets)]}/img"
        expected = 2 + len(project.datasets) * (3 + 2 * project.per_dataset)
        cpus = self.args.reader_cpus
        return {
            "plain first ls s": counted(
                f"ls '{plain / ls_rel}' | wc -l", cpus, project.per_dataset
            ),
            "plain find s": counted(f"find '{plain}' | wc -l", cpus, expected),
        }

    def floorfs(self, project: ScaleProject, rdplus: str) -> Figures:
        tar = project.root / "blob" / "blob_000.tar"
        mnt = mountpoint(f"rdplus-floor-{rdplus}")
        cmd = [self.args.floorfs, f"--rdplus={rdplus}", str(tar), str(mnt)]
        if self.args.daemon_cpus:
            cmd = ["taskset", "-c", ",".join(map(str, self.args.daemon_cpus)), *cmd]
        log = OUT / f"rdplus-floorfs-{rdplus}.log"
        _, proc = spawn_foreground(self.mounts, cmd, mnt, log)
        members = len(os.listdir(mnt))  # the count only; this first listing is not timed
        self.mounts.release(mnt)
        _, proc = spawn_foreground(self.mounts, cmd, mnt, log)
        got = {
            f"floorfs {rdplus} first ls s": counted(
                f"ls '{mnt}' | wc -l", self.args.reader_cpus, members
            )
        }
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.05)
        self.mounts.release(mnt)
        got[f"floorfs {rdplus} members"] = members
        return got

    # ---- the small project: listing, then every file ----

    def readers(self, folder: Path, seed: int) -> dict[str, Callable[[], float]]:
        cpus = self.args.reader_cpus
        n = self.args.small
        return {
            "ls -l": lambda: counted(f"ls -l '{folder / 'img'}' | wc -l", cpus, n + 1),
            "du -s": lambda: timed_shell(f"du -s '{folder}'", cpus)[0],
            "du -s img": lambda: timed_shell(f"du -s '{folder / 'img'}'", cpus)[0],
            "list+shuffled read": lambda: python_reader(folder / "img", seed, cpus),
        }

    def small(self, project: ScaleProject, mode: str, r: int) -> Figures:
        got: Figures = {}
        if "small" not in self.caches:  # the index cache, so that every reader finds it
            mnt, _ = self.mount(project.root, mode, "small")
            os.listdir(mnt / project.datasets[0] / "img")
            self.mounts.release(mnt)
        for reader in self.readers(project.root, r):  # names only: a mount per reader
            mnt, _ = self.mount(project.root, mode, "small")
            dataset = mnt / project.datasets[0]
            got[f"{mode} {reader} s"] = self.readers(dataset, r)[reader]()
            ops = daemon_stats(mnt).get("fuse_ops", {})
            got[f"{mode} {reader}: getattr calls"] = ops.get("getattr", 0)
            got[f"{mode} {reader}: readdir pages"] = ops.get("readdir_plus", 0)
            self.mounts.release(mnt)
        return got

    def small_plain(self, plain: Path, r: int) -> Figures:
        return {
            f"plain {reader} s": run() for reader, run in self.readers(plain / "ds0", r).items()
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=50_000)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["always", "auto"])
    cpus = lambda s: [int(c) for c in s.split(",")]  # noqa: E731
    parser.add_argument("--daemon-cpus", type=cpus, default=[])
    parser.add_argument("--reader-cpus", type=cpus, default=[])
    parser.add_argument("--floorfs", default="/tmp/floorfs")
    parser.add_argument("--no-big", action="store_true", help="only the small project")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    clean_stale_mounts()
    big, big_plain = build(argparse.Namespace(datasets=4, per_dataset=250_000, tars=10))
    small, small_plain = build(argparse.Namespace(datasets=1, per_dataset=args.small, tars=1))
    print(load_note(), flush=True)
    samples: dict[str, list[float]] = {}

    def add(found: Figures) -> None:
        for key, value in found.items():
            samples.setdefault(key, []).append(value)

    with Mounts() as mounts:
        bench = Bench(args, mounts)
        for r in range(args.rounds):
            jobs: list[Callable[[], Figures]] = []
            for mode in args.modes:
                jobs.append(functools.partial(bench.small, small, mode, r))
                if not args.no_big:
                    jobs.append(functools.partial(bench.big, big, mode, r))
            jobs.append(functools.partial(bench.small_plain, small_plain, r))
            if not args.no_big:
                jobs.append(functools.partial(bench.big_plain, big, big_plain, r))
                for rdplus in ("always", "auto"):
                    jobs.append(functools.partial(bench.floorfs, big, rdplus))
            try:
                for k in range(len(jobs)):
                    add(jobs[(k + r) % len(jobs)]())
            finally:
                bench.drop_caches()
            print(f"round {r + 1}/{args.rounds} done; {load_note()}", flush=True)
    rows = [["figure", "median", "min", "max"]]
    for key, values in samples.items():
        rows.append([key, fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))])
    for key in list(samples):
        mode, _, rest = key.partition(" ")
        plain_key = f"plain {rest}".replace("cold ", "").replace("warm ", "")
        if mode in args.modes and plain_key in samples and key.endswith(" s"):
            ratio = [a / b for a, b in zip(samples[key], samples[plain_key], strict=True)]
            rows.append(
                [
                    f"{key[:-2]} / plain",
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
