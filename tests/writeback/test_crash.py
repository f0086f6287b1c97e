"""Crash safety: kill -9 the daemon anywhere; nothing acknowledged is lost or duplicated.

Each trial writes images into a writeback mount, kills the daemon (at a random moment, or
at a named step of the import through a failpoint), remounts the same source with the same
spool, flushes and unmounts. Then every image whose ``close()`` returned must be in the
project exactly once with its bytes, and nothing else may be half there. These run with the
default durability (``close()`` does not flush: a killed daemon leaves the bytes in the
kernel); a power cut, which drops what no sync covered (``tests/support/power_cut.py``), is
played for ``fsync``'d files and for ``--sync-close``.
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
from tests.support.crash import project_images, recover_and_verify, write_until_dead
from tests.support.power_cut import cut_power
from tests.support.power_cut import env as cut_env
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
    durability a file is safe from it once ``fsync()`` returned: play the worst cut (every
    spool entry no sync covered removed, every journal byte past its last flush zeroed),
    and every fsync'd image must still arrive, from what was flushed alone."""
    spool, log = tmp_path / "spool", tmp_path / "power-cut.log"
    d = mounts.start_writeback(
        project, tmp_path / "mnt", spool, log=tmp_path / "log", delay_s=3600, env=cut_env(log)
    )
    seeds = range(3100, 3116)
    for seed in seeds:
        with open(tmp_path / "mnt" / "ds" / "img" / f"c_{seed:05d}.png", "wb") as f:
            f.write(png_bytes(seed))
            f.flush()
            os.fsync(f.fileno())
    d.kill9()
    cut_power(spool, log)
    recover_and_verify(project, tmp_path, spool, seeds, list(seeds), "power-cut-fsync")


def test_with_sync_close_a_power_cut_after_close_loses_nothing(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """``--sync-close``: small files are acknowledged at ``close()`` once their journal
    record is flushed: after the worst cut every closed image must still arrive."""
    spool, log = tmp_path / "spool", tmp_path / "power-cut.log"
    d = mounts.start_writeback(
        project,
        tmp_path / "mnt",
        spool,
        "--sync-close",
        log=tmp_path / "log",
        delay_s=3600,
        env=cut_env(log),
    )
    seeds = range(3000, 3016)
    for seed in seeds:
        (tmp_path / "mnt" / "ds" / "img" / f"c_{seed:05d}.png").write_bytes(png_bytes(seed))
    d.kill9()
    cut_power(spool, log)
    recover_and_verify(project, tmp_path, spool, seeds, list(seeds), "power-cut")


@pytest.mark.parametrize("cut", ["worst", "random"])
def test_a_power_cut_keeps_the_fsyncd_file_and_drops_what_was_never_flushed(
    cut: str, project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """Files closed, one of them ``fsync``'d, more closed after it: the cut drops the
    journal past its last flush (worst: zeros; random: pages kept, zeroed or noise). The
    fsync'd file arrives with its bytes, nothing twice, and replay stops quietly at the
    damage, never with a traceback."""
    spool, log = tmp_path / "spool", tmp_path / "power-cut.log"
    d = mounts.start_writeback(
        project, tmp_path / "mnt", spool, log=tmp_path / "log", delay_s=3600, env=cut_env(log)
    )
    img = tmp_path / "mnt" / "ds" / "img"
    before, synced, after = range(3200, 3203), 3203, range(3204, 3210)
    for seed in before:
        (img / f"c_{seed:05d}.png").write_bytes(png_bytes(seed))
    with open(img / f"c_{synced:05d}.png", "wb") as f:
        f.write(png_bytes(synced))
        f.flush()
        os.fsync(f.fileno())
    for seed in after:
        (img / f"c_{seed:05d}.png").write_bytes(png_bytes(seed))
    d.kill9()
    done = cut_power(spool, log, random.Random(7) if cut == "random" else None)
    assert done.unflushed_bytes > 0  # the records closed after the fsync were never flushed
    recover_and_verify(project, tmp_path, spool, range(3200, 3210), [synced], f"cut-{cut}")
    served = project_images(project)
    if cut == "worst":
        assert not any(f"/ds/img/c_{seed:05d}.png" in served for seed in after)
    assert "Traceback" not in (tmp_path / f"log-cut-{cut}-again").read_text()
