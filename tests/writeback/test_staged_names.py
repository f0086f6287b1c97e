"""The spool knows which names it has staged: a lookup of a name it never staged (each file
a program copies in is looked up twice before it exists) is answered without a system
call, and the answer stays true across every change of ``staged/``: large files linked in,
replaced, renamed and removed, folders made, moved and removed, held files given files by
a checkpoint, batches finished, and a restart that replays the journal.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from blobfs.writeback.spool import INLINE_MAX, Batch, Spool
from tests.support import harness
from tests.writeback.test_held import close, die

BIG = b"x" * (INLINE_MAX + 1)
CANDIDATES = [
    "/ds",
    "/ds/img",
    "/ds/ann",
    "/ds/img/a.png",
    "/ds/img/b.png",
    "/ds/img/big.png",
    "/ds/img/big2.png",
    "/ds/ann/a.png.json",
    "/new",
    "/new/img",
    "/new/img/big.png",
    "/moved",
    "/moved/img",
    "/moved/img/big.png",
]


def assert_true_to_disk(spool: Spool) -> None:
    """``stat`` of every candidate agrees with what is on disk and held."""
    files, dirs = spool.walk()
    there = set(files) | set(dirs)
    for path in CANDIDATES:
        assert (spool.stat(path) is not None) == (path in there), path


def test_a_name_never_staged_is_not_looked_up_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/big.png", BIG)
    with mock.patch("blobfs.writeback.spool.os.stat", side_effect=AssertionError("stat")):
        assert spool.stat("/ds/img/not-yet.png") is None
        assert spool.stat("/ds/ann/not-yet.png.json") is None
    assert spool.stat("/ds/img/big.png") is not None
    spool.close()


def test_names_in_another_form_are_looked_up_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/big.png", BIG)
    assert spool.stat("/ds//img/big.png") is not None
    assert spool.stat("/ds/img/./big.png") is not None
    assert spool.stat("/ds/img/../img/big.png") is not None
    spool.close()


def test_stat_stays_true_across_every_change_of_the_staged_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert_true_to_disk(spool)
    close(spool, "/ds/img/a.png", b"A")  # held
    close(spool, "/ds/img/big.png", BIG)  # linked in
    close(spool, "/ds/img/big.png", BIG + b"y", durable=True)  # replaced
    assert_true_to_disk(spool)
    spool.rename("/ds/img/big.png", "/ds/img/big2.png", durable=False)
    assert_true_to_disk(spool)
    spool.rename("/ds/img/big2.png", "/ds/img/big.png", durable=True)
    assert_true_to_disk(spool)
    spool.mkdir("/new")
    close(spool, "/new/img/big.png", BIG)
    assert_true_to_disk(spool)
    spool.rename("/new", "/moved")  # a folder takes its files along
    assert_true_to_disk(spool)
    spool.remove("/moved/img/big.png")
    spool.rmdir("/moved/img")
    assert_true_to_disk(spool)
    spool.checkpoint()  # held files get files of their own
    assert spool.stat("/ds/img/a.png") is not None
    assert_true_to_disk(spool)
    close(spool, "/ds/img/b.png", b"B")
    close(spool, "/ds/ann/a.png.json", b"{}")
    batch = spool.create_batch(
        Batch("b1", ["ds"], ["/ds/img/big.png", "/ds/img/b.png", "/ds/ann/a.png.json"], "s")
    )
    spool.finish_batch(batch)
    assert spool.stat("/ds/img/big.png") is None
    assert_true_to_disk(spool)
    close(spool, "/ds/img/big.png", BIG)  # staged again after its import
    assert spool.stat("/ds/img/big.png") is not None
    assert_true_to_disk(spool)
    spool.close()


def test_what_a_restart_replays_is_found(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/big.png", BIG)
    close(spool, "/ds/img/a.png", b"A")
    spool.rename("/ds/img/a.png", "/ds/img/b.png", durable=False)
    die(spool)
    again = Spool(tmp_path / "spool")  # the replay gives the held file a file
    assert again.stat("/ds/img/b.png") is not None
    assert again.stat("/ds/img/big.png") is not None
    assert again.stat("/ds/img/a.png") is None
    assert_true_to_disk(again)
    again.close()


@pytest.mark.fuse
def test_through_a_mount_names_come_and_go_with_their_files(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    mnt, spool = tmp_path / "mnt", tmp_path / "spool"
    d = mounts.start_writeback(project, mnt, spool, log=tmp_path / "log", delay_s=30)
    img = mnt / "ds" / "img"
    assert not (img / "big.png").exists()
    (img / "big.png").write_bytes(BIG)  # a file of its own in the spool, not held
    assert (img / "big.png").stat().st_size == len(BIG)
    (img / "big.png").unlink()
    assert not (img / "big.png").exists()
    (img / "big.png").write_bytes(BIG)
    (img / "big.png").rename(img / "kept.png")
    assert not (img / "big.png").exists()
    assert (img / "kept.png").stat().st_size == len(BIG)
    assert d.unmount() == 0  # not an image: refused, kept in the spool
    mounts.start_writeback(project, mnt, spool, log=tmp_path / "log2", delay_s=30)
    assert (img / "kept.png").stat().st_size == len(BIG)  # found by the listing at start
    assert not (img / "big.png").exists()
