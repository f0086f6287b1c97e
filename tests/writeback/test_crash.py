"""Crash safety: kill -9 the daemon anywhere; nothing acknowledged is lost or duplicated.

Each trial writes images into a writeback mount, kills the daemon (at a random moment, or
at a named step of the import through a failpoint), remounts the same source with the same
spool, flushes and unmounts. Then every image whose ``close()`` returned must be in the
project exactly once with its bytes, and nothing else may be half there. These run with the
default durability (``close()`` does not flush: a killed daemon leaves the bytes in the
kernel); a power cut, which drops what the kernel held, is played for ``fsync``'d files and
for ``--sync-close``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import harness
from tests.support.crash import recover_and_verify, write_until_dead
from tests.support.sample import png_bytes

pytestmark = pytest.mark.fuse

FAILPOINTS = ["pack-after-tar", "pack-after-anns", "after-import"]
RANDOM_TRIALS = 8
CHAIN_KILLS = 20


@pytest.mark.parametrize("trial", range(RANDOM_TRIALS))
def test_kill9_at_a_random_moment_loses_nothing_acknowledged(
    trial: int, project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    rng = random.Random(trial)
    spool = tmp_path / "spool"
    d = mounts.start_writeback(project, tmp_path / "mnt", spool, log=tmp_path / "log", delay_s=0.05)
    seeds = range(1000 + 100 * trial, 1000 + 100 * trial + 60)
    acked: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(
        target=write_until_dead, args=(tmp_path / "mnt" / "ds" / "img", seeds, acked, stop)
    )
    writer.start()
    time.sleep(rng.uniform(0.0, 0.4))
    d.kill9()
    stop.set()
    writer.join(10)
    recover_and_verify(project, tmp_path, spool, seeds, list(acked), f"random-{trial}")


@pytest.mark.parametrize("point", FAILPOINTS * 2)
def test_crash_at_each_import_step_is_finished_on_the_next_mount(
    point: str, project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    spool = tmp_path / "spool"
    d = mounts.start_writeback(
        project,
        tmp_path / "mnt",
        spool,
        log=tmp_path / "log",
        delay_s=30,
        env={"BLOBFS_FAILPOINT": point},
    )
    seeds = range(2000, 2012)
    for seed in seeds:
        (tmp_path / "mnt" / "ds" / "img" / f"c_{seed:05d}.png").write_bytes(png_bytes(seed))
    subprocess.run(
        [sys.executable, "-m", "blobfs", "flush", str(tmp_path / "mnt")],
        capture_output=True,
        timeout=60,
    )
    assert d.wait_exit(30) == 137, "the failpoint should have stopped the daemon"
    d.kill9()  # only unmounts the dead mount
    recover_and_verify(project, tmp_path, spool, seeds, list(seeds), point)


def write_or_rename(img: Path, seed: int) -> None:
    """Half the files the way rsync writes them: a temp name, then a rename."""
    name = f"c_{seed:05d}.png"
    if seed % 2:
        (img / name).write_bytes(png_bytes(seed))
    else:
        (img / f".{name}.part").write_bytes(png_bytes(seed))
        os.rename(img / f".{name}.part", img / name)


def test_kill9_again_and_again_keeps_every_closed_file(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """A chain of kills: each daemon finds what every earlier one acknowledged (in the
    mount, from the spool), writes more, and is killed at a random moment; at the end one
    flush imports all of it exactly once."""
    rng = random.Random(13)
    spool = tmp_path / "spool"
    acked: list[int] = []
    seeds = iter(range(4000, 9000))
    for kill in range(CHAIN_KILLS):
        mnt = tmp_path / f"mnt{kill}"
        d = mounts.start_writeback(project, mnt, spool, log=tmp_path / f"log{kill}", delay_s=3600)
        img = mnt / "ds" / "img"
        for seed in acked:
            assert (img / f"c_{seed:05d}.png").read_bytes() == png_bytes(seed), (kill, seed)
        stop = threading.Event()

        def writer(img: Path = img, stop: threading.Event = stop) -> None:
            for seed in seeds:
                if stop.is_set():
                    return
                try:
                    write_or_rename(img, seed)
                except OSError:
                    return
                acked.append(seed)

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(rng.uniform(0.02, 0.3))
        d.kill9()
        stop.set()
        thread.join(10)
    assert len(acked) > CHAIN_KILLS
    final = range(4000, max(acked) + 2)
    recover_and_verify(project, tmp_path, spool, final, acked, "chain")


def test_a_power_cut_after_fsync_loses_nothing(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """``kill -9`` keeps the kernel's page cache; a power cut does not. With the default
    durability a file is safe from it once ``fsync()`` returned: play the worst case by
    wiping every staged file the kill leaves behind, and every fsync'd image must still
    arrive, from the journal alone."""
    spool = tmp_path / "spool"
    d = mounts.start_writeback(project, tmp_path / "mnt", spool, log=tmp_path / "log", delay_s=3600)
    seeds = range(3100, 3116)
    for seed in seeds:
        with open(tmp_path / "mnt" / "ds" / "img" / f"c_{seed:05d}.png", "wb") as f:
            f.write(png_bytes(seed))
            f.flush()
            os.fsync(f.fileno())
    d.kill9()
    wiped = [p for p in (spool / "staged").rglob("*") if p.is_file()]
    assert wiped == []  # small files are held in the journal: none has a file of its own
    for path in wiped:
        path.unlink()
    recover_and_verify(project, tmp_path, spool, seeds, list(seeds), "power-cut-fsync")


def test_with_sync_close_a_power_cut_after_close_loses_nothing(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """``--sync-close``: small files are acknowledged at ``close()`` once their journal
    record is durable, their staged copies are left to the kernel: wipe every staged file
    the kill leaves behind, and every closed image must still arrive."""
    spool = tmp_path / "spool"
    d = mounts.start_writeback(
        project, tmp_path / "mnt", spool, "--sync-close", log=tmp_path / "log", delay_s=3600
    )
    seeds = range(3000, 3016)
    for seed in seeds:
        (tmp_path / "mnt" / "ds" / "img" / f"c_{seed:05d}.png").write_bytes(png_bytes(seed))
    d.kill9()
    wiped = [p for p in (spool / "staged").rglob("*") if p.is_file()]
    assert wiped == []  # small files are held in the journal: none has a file of its own
    for path in wiped:
        path.unlink()
    recover_and_verify(project, tmp_path, spool, seeds, list(seeds), "power-cut")
