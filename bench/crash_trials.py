"""Writeback durability, long version: N kill -9 trials at random moments (default 200).

    python bench/crash_trials.py [--trials 200] [--seed 1] [--mode default|sync-close]
                                 [--power-cut]

Each trial (the suite runs the same, see tests/writeback/test_crash.py): a fresh project,
a writeback mount with a short delay, a writer that copies images one by one and records
which calls returned, ``kill -9`` of the daemon after a random time (during writes,
packing or import), a remount with the same spool, ``blobfs flush``, unmount; then every
acknowledged image must be in the project exactly once with its bytes, and ``blobfs
check`` must find nothing wrong. Prints lost/duplicated counts.

``--mode`` is the mount's durability: ``default`` (``close()`` acknowledges a file the
kernel holds) or ``sync-close`` (``close()`` acknowledges a durable file). ``--power-cut``
plays the loss of the page cache as well: every staged file the kill leaves is wiped before
the remount, so only what the journal made durable can come back; with ``default`` the
writer then ``fsync``s each file and counts a file acknowledged when ``fsync()`` returned.
Power-cut trials import nothing before the kill (a batch's checkpoint makes the staged
folder durable, which the wipe would not respect); the remount imports everything.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import harness

from blobfs.format.pack import ProjectPacker
from tests.support.crash import recover_and_verify, write_until_dead
from tests.support.sample import make_images


def trial(
    n: int, rng: random.Random, base: Path, mode: str, power_cut: bool
) -> tuple[int, str | None]:
    """One trial; returns (acknowledged images, failure message or None)."""
    tmp = base / f"t{n}"
    tmp.mkdir()
    project = tmp / "project"
    ProjectPacker(project, "ds").pack(make_images(tmp / "seed", 5))
    spool = tmp / "spool"
    d = harness.start_writeback(
        project,
        tmp / "mnt",
        spool,
        *(("--sync-close",) if mode == "sync-close" else ()),
        log=tmp / "log",
        # with --power-cut no import runs during the writes: a batch starts with a
        # checkpoint, which makes the staged folder durable, so wiping it would play a
        # power cut that cannot happen
        delay_s=3600 if power_cut else rng.choice([0.02, 0.1, 0.3]),
    )
    seeds = range(10_000 + 1000 * n, 10_000 + 1000 * n + 80)
    acked: list[int] = []
    stop = threading.Event()
    fsync = power_cut and mode == "default"
    writer = threading.Thread(
        target=write_until_dead,
        args=(tmp / "mnt" / "ds" / "img", seeds, acked, stop, fsync),
    )
    writer.start()
    time.sleep(rng.uniform(0.0, 0.8))
    d.kill9()
    stop.set()
    writer.join(10)
    if power_cut:  # the page cache is gone: only what was flushed is left
        for path in (spool / "staged").rglob("*"):
            if path.is_file():
                path.unlink()
    try:
        recover_and_verify(project, tmp, spool, seeds, list(acked), f"trial-{n}")
    except AssertionError as exc:
        return len(acked), str(exc)[:300]
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return len(acked), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=["default", "sync-close"], default="default")
    parser.add_argument("--power-cut", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="blobfs-crash-"))
    failures, acked_total = [], 0
    start = time.monotonic()
    for n in range(args.trials):
        acked, failure = trial(n, rng, base, args.mode, args.power_cut)
        acked_total += acked
        if failure:
            failures.append((n, failure))
            print(f"trial {n}: FAIL {failure}", flush=True)
    shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.mode}{' + power cut' if args.power_cut else ''}: "
        f"{args.trials} trials in {time.monotonic() - start:.0f} s: {acked_total} acknowledged "
        f"images, {len(failures)} trials with a lost or duplicated image"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
