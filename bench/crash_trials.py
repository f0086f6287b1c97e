"""Writeback durability, long version: N kill -9 trials at random moments (default 200).

    python bench/crash_trials.py [--trials 200] [--seed 1] [--mode default|sync-close]
                                 [--power-cut] [--files 80]

Each trial (the suite runs the same, see tests/writeback/test_crash.py): a fresh project,
a writeback mount with a short delay, a writer that copies images one by one and records
which calls returned, ``kill -9`` of the daemon after a random time (during writes,
packing or import), a remount with the same spool, ``blobfs flush``, unmount; then every
acknowledged image must be in the project exactly once with its bytes, and ``blobfs
check`` must find nothing wrong. Prints lost/duplicated counts.

``--mode`` is the mount's durability: ``default`` (``close()`` acknowledges a file the
kernel holds) or ``sync-close`` (``close()`` acknowledges a durable file). ``--power-cut``
plays the loss of the page cache as well (``tests/support/power_cut.py``): the daemon logs
what each of its syncs made durable, and before the remount every spool entry no sync
covered is removed and the journal's bytes past its last flush are kept, zeroed or
garbled page by page at random. With ``default`` the writer then ``fsync``s about half the
files and counts only those acknowledged, when ``fsync()`` returned; the others must be
whole or absent. Power-cut trials import nothing before the kill (the project's own
files are not part of the played cut); the remount imports everything.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import harness

from blobfs.format.pack import ProjectPacker
from tests.support.crash import recover_and_verify, tally, write_until_dead
from tests.support.power_cut import cut_power
from tests.support.power_cut import env as power_cut_env
from tests.support.sample import make_images


@dataclass
class Outcome:
    acked: int
    lost: int
    duplicated: int
    failure: str | None
    cut_removed: int = 0  # spool entries the played power cut removed
    cut_bytes: int = 0  # journal bytes past its last flush when the power was cut


def trial(
    n: int, rng: random.Random, base: Path, mode: str, power_cut: bool, files: int = 80
) -> Outcome:
    """One trial: what was acknowledged, lost, duplicated, and the first failure."""
    tmp = base / f"t{n}"
    tmp.mkdir()
    project = tmp / "project"
    ProjectPacker(project, "ds").pack(make_images(tmp / "seed", 5))
    spool = tmp / "spool"
    cut_log = tmp / "power-cut.log"
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
        env=power_cut_env(cut_log) if power_cut else None,
    )
    first = 10_000 + max(1000, files) * n
    seeds = range(first, first + files)
    acked: list[int] = []
    cut_removed = cut_bytes = 0
    stop = threading.Event()
    share = rng.random()

    def fsync(seed: int) -> bool:
        return random.Random(seed).random() < share  # a share of the files, per trial

    writer = threading.Thread(
        target=write_until_dead,
        args=(
            tmp / "mnt" / "ds" / "img",
            seeds,
            acked,
            stop,
            fsync if power_cut and mode == "default" else None,
        ),
    )
    writer.start()
    time.sleep(rng.uniform(0.0, 0.8))
    d.kill9()
    stop.set()
    writer.join(10)
    if power_cut:  # the page cache is gone: only what was flushed is left
        cut = cut_power(spool, cut_log, rng)
        cut_removed, cut_bytes = len(cut.removed), cut.unflushed_bytes
    failure = None
    try:
        recover_and_verify(project, tmp, spool, seeds, list(acked), f"trial-{n}")
    except AssertionError as exc:
        failure = str(exc)[:300]
    finally:
        d.close()
    lost, duplicated = tally(project, seeds, list(acked))
    shutil.rmtree(tmp, ignore_errors=True)
    return Outcome(len(acked), lost, duplicated, failure, cut_removed, cut_bytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=["default", "sync-close"], default="default")
    parser.add_argument("--power-cut", action="store_true")
    parser.add_argument(
        "--files", type=int, default=80, help="files each writer copies (more: kills mid-copy)"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="blobfs-crash-"))
    failures, acked_total, lost_total, dup_total, removed, unflushed = [], 0, 0, 0, 0, 0
    start = time.monotonic()
    for n in range(args.trials):
        outcome = trial(n, rng, base, args.mode, args.power_cut, args.files)
        acked_total += outcome.acked
        lost_total += outcome.lost
        dup_total += outcome.duplicated
        removed += outcome.cut_removed
        unflushed += outcome.cut_bytes
        if outcome.failure:
            failures.append((n, outcome.failure))
            print(f"trial {n}: FAIL {outcome.failure}", flush=True)
    shutil.rmtree(base, ignore_errors=True)
    print(
        f"{args.mode}{' + power cut' if args.power_cut else ''}: "
        f"{args.trials} trials in {time.monotonic() - start:.0f} s: {acked_total} acknowledged "
        f"images, {lost_total} lost, {dup_total} duplicated, "
        f"{len(failures)} trials with a lost or duplicated image"
        + (
            f" (the cuts removed {removed} spool entries and dropped or garbled "
            f"{unflushed} journal bytes written after its last flush)"
            if args.power_cut
            else ""
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
