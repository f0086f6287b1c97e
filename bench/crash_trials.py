"""Writeback durability, long version: N kill -9 trials at random moments (default 200).

    python bench/crash_trials.py [--trials 200] [--seed 1]

Each trial (the suite runs 20 of the same, see tests/writeback/test_crash.py): a fresh
project, a writeback mount with a short delay, a writer that copies images one by one and
records which ``close()`` calls returned, ``kill -9`` of the daemon after a random time
(during writes, packing or import), a remount with the same spool, ``blobfs flush``,
unmount; then every acknowledged image must be in the project exactly once with its
bytes, and ``blobfs check`` must find nothing wrong. Prints lost/duplicated counts.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from blobfs.blob.pack import ProjectPacker  # noqa: E402
from blobfs.testing.sample import make_images  # noqa: E402
from tests.writeback.conftest import Daemon, cleanup_mount  # noqa: E402
from tests.writeback.test_crash import recover_and_verify, write_until_dead  # noqa: E402


def trial(n: int, rng: random.Random, base: Path) -> tuple[int, str | None]:
    """One trial; returns (acknowledged images, failure message or None)."""
    tmp = base / f"t{n}"
    tmp.mkdir()
    project = tmp / "project"
    ProjectPacker(project, "ds").pack(make_images(tmp / "seed", 5))
    spool = tmp / "spool"
    d = Daemon(
        project, tmp / "mnt", spool, tmp / "log", delay_s=rng.choice([0.02, 0.1, 0.3])
    ).start()
    seeds = range(10_000 + 1000 * n, 10_000 + 1000 * n + 80)
    acked: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(
        target=write_until_dead, args=(tmp / "mnt" / "ds" / "img", seeds, acked, stop)
    )
    writer.start()
    time.sleep(rng.uniform(0.0, 0.8))
    d.kill9()
    stop.set()
    writer.join(10)
    try:
        recover_and_verify(project, tmp, spool, seeds, list(acked), f"trial-{n}")
    except AssertionError as exc:
        return len(acked), str(exc)[:300]
    finally:
        cleanup_mount(tmp / "mnt")
        shutil.rmtree(tmp, ignore_errors=True)
    return len(acked), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="blobfs-crash-"))
    failures, acked_total = [], 0
    start = time.monotonic()
    for n in range(args.trials):
        acked, failure = trial(n, rng, base)
        acked_total += acked
        if failure:
            failures.append((n, failure))
            print(f"trial {n}: FAIL {failure}", flush=True)
    shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.trials} trials in {time.monotonic() - start:.0f} s: {acked_total} acknowledged "
        f"images, {len(failures)} trials with a lost or duplicated image"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
