"""Load, long version: 16 and 64 concurrent readers (threads, then processes) over 30,000
images, random and sequential order, for a bounded time, every byte checked, daemon RSS
measured against the cache budget.

    python bench/load.py [--images 30000] [--seconds 20] [--cache-size 64M]

The mount uses ``-o direct_io`` so every read reaches blobfs instead of the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, Mounts, mountpoint, rss_mb, spawn_foreground, table
from local_scan import DATASET, build

from blobfs.config import parse_size


def reader(
    img_dir: str, names: list[str], digests: dict[str, str], seconds: float, seed: int
) -> tuple[int, int]:
    rng = random.Random(seed)
    order = names if seed % 2 else rng.sample(names, len(names))
    reads = wrong = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in order[rng.randrange(len(order)) :]:
            with open(os.path.join(img_dir, name), "rb") as f:
                wrong += hashlib.sha1(f.read()).hexdigest() != digests[name]
            reads += 1
            if time.monotonic() >= deadline:
                break
    return reads, wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--cache-size", default="64M")
    args = parser.parse_args()
    root = build(args.images, 36)
    plain = root / "plain"
    names = sorted(os.listdir(plain))
    digests = {n: hashlib.sha1((plain / n).read_bytes()).hexdigest() for n in names}
    rows = [("readers", "kind", "reads", "reads/s", "wrong bytes", "RSS MB")]
    failed = False
    with Mounts() as mounts:
        mnt = mountpoint("load")
        cmd = [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            str(root / "project"),
            str(mnt),
            "--foreground",
            "-o",
            "direct_io",
            "--cache-size",
            args.cache_size,
            "--log-level",
            "WARNING",
        ]
        _, proc = spawn_foreground(mounts, cmd, mnt, OUT / "load-daemon.log")
        img = str(mnt / DATASET / "img")
        for count in (16, 64):
            for kind in ("threads", "processes"):
                jobs = [(img, names, digests, args.seconds, s) for s in range(count)]
                if kind == "threads":
                    results: list[tuple[int, int]] = []
                    ts = [
                        threading.Thread(target=lambda j=j, out=results: out.append(reader(*j)))
                        for j in jobs
                    ]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                else:
                    with multiprocessing.get_context("fork").Pool(
                        count, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)
                    ) as pool:
                        results = pool.starmap(reader, jobs)
                reads, wrong = sum(r for r, _ in results), sum(w for _, w in results)
                failed |= wrong > 0 or proc.poll() is not None
                rows.append(
                    (
                        str(count),
                        kind,
                        str(reads),
                        f"{reads / args.seconds:.0f}",
                        str(wrong),
                        f"{rss_mb(proc.pid):.0f}",
                    )
                )
                print(rows[-1], flush=True)
    print(table(rows))
    budget = parse_size(args.cache_size) / 2**20
    print(f"cache budget {budget:.0f} MB; daemon alive throughout: {not failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
