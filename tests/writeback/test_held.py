"""Held files: small files whose only copy is a journal record (or their batch's data file).

A plain ``close()`` appends the file to the journal without a flush and creates no file;
these tests play what a ``kill -9`` leaves (the journal as the kernel holds it, no clean
close) at each point of a held file's life: replay, a torn append, a batch formed from
held files, a checkpoint while it imports, a file re-written meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from blobfs.failpoints import POWER_CUT_ENV
from blobfs.writeback.journal import HEADER_SIZE
from blobfs.writeback.spool import Batch, Spool


def close(spool: Spool, view_path: str, data: bytes, durable: bool = False) -> None:
    """open/write/close through the spool as the writable view does it."""
    scratch = spool.scratch()
    try:
        scratch.write(data, 0)
        spool.commit_scratch(scratch, view_path, durable=durable)
    finally:
        scratch.close()


def die(spool: Spool) -> None:
    """The daemon is gone: no clean close, so no checkpoint."""
    spool.stop_pool()
    spool._journal.close()


def state(spool: Spool) -> dict[str, bytes]:
    files, _ = spool.walk()
    return {p: spool.read_bytes(p) for p in sorted(files)}


def batch_of(spool: Spool, files: list[str]) -> Batch:
    return spool.create_batch(Batch("b1", ["ds"], files, "stem"))


def test_held_files_have_no_file_and_are_replayed_after_a_kill(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/a.png", b"A")
    close(spool, "/ds/img/b.png", b"B")
    close(spool, "/ds/img/c.png", b"C", durable=True)
    spool.rename("/ds/img/b.png", "/ds/img/b2.png", durable=False)
    spool.remove("/ds/img/c.png", durable=False)
    close(spool, "/ds/img/a.png", b"A2")
    assert not any(p.is_file() for p in (tmp_path / "spool" / "staged").rglob("*"))
    assert sorted(spool.listdir("/ds/img")) == ["a.png", "b2.png"]
    assert spool.read("/ds/img/a.png", 1, 5) == b"2"
    expected = {"/ds/img/a.png": b"A2", "/ds/img/b2.png": b"B"}
    assert state(spool) == expected
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == expected
    again.close()


def test_a_torn_append_is_never_replayed(tmp_path: Path) -> None:
    """A record cut short (the process died in its ``pwrite``, or a power cut kept part of
    its pages) was never acknowledged: replay stops before it."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/a.png", b"first")
    close(spool, "/ds/img/b.png", b"second" * 100)
    end = spool._journal._end
    die(spool)
    with open(tmp_path / "spool" / "journal", "r+b") as f:
        f.seek(end - 300)
        f.write(bytes(300))  # the tail of b's record never reached the file
    again = Spool(tmp_path / "spool")
    assert state(again) == {"/ds/img/a.png": b"first"}
    again.close()


def test_a_batch_of_held_files_is_imported_once_whatever_the_kill(tmp_path: Path) -> None:
    """The batch copies held files into its data file; killed before it finished, the next
    run serves them from there, and once finished no replay brings them back."""
    spool = Spool(tmp_path / "spool")
    for i in range(5):
        close(spool, f"/ds/img/{i}.png", bytes([i]) * 10)
    batch = batch_of(spool, [f"/ds/img/{i}.png" for i in range(5)])
    assert spool.batch_bytes(batch, "/ds/img/3.png") == bytes([3]) * 10
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == {f"/ds/img/{i}.png": bytes([i]) * 10 for i in range(5)}
    (pending,) = again.open_batches()
    assert again.batch_bytes(pending, "/ds/img/4.png") == bytes([4]) * 10
    assert len(again.finish_batch(pending)) == 5
    assert state(again) == {}
    die(again)
    third = Spool(tmp_path / "spool")
    assert state(third) == {}
    assert third.open_batches() == []
    third.close()


def test_killed_while_a_batch_imports_imports_once(tmp_path: Path) -> None:
    """The journal still holds the batch's records: replay gives them staged files again,
    and finishing the batch removes those that are still the batch's bytes."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/a.png", b"A")
    close(spool, "/ds/img/b.png", b"B")
    batch_of(spool, ["/ds/img/a.png", "/ds/img/b.png"])
    die(spool)
    again = Spool(tmp_path / "spool")
    assert (tmp_path / "spool" / "staged" / "ds" / "img" / "a.png").read_bytes() == b"A"
    (pending,) = again.open_batches()
    assert sorted(again.finish_batch(pending)) == ["/ds/img/a.png", "/ds/img/b.png"]
    assert state(again) == {}
    again.close()


def test_a_batch_leaves_the_other_held_files_held_and_stays_gone_once_done(
    tmp_path: Path,
) -> None:
    """Forming a batch retires no record: a checkpoint would give every other held file a
    file of its own, which while a copy goes on is most of what it wrote. Finishing the
    batch journals its removals, so a replay after a kill brings none of it back."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/in.png", b"batch")
    close(spool, "/ds/img/out.png", b"still held")
    batch = batch_of(spool, ["/ds/img/in.png"])
    staged = tmp_path / "spool" / "staged" / "ds" / "img"
    assert not (staged / "out.png").exists()
    assert sorted(spool.finish_batch(batch)) == ["/ds/img/in.png"]
    close(spool, "/ds/img/in.png", b"written again")  # after the batch: a new file
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == {"/ds/img/in.png": b"written again", "/ds/img/out.png": b"still held"}
    assert again.open_batches() == []
    again.close()


def test_a_batch_finished_on_a_full_journal_stays_gone(tmp_path: Path) -> None:
    """No room for the removal records: the finish checkpoints instead, which retires
    every record, and the other held files get files of their own."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/in.png", b"batch")
    close(spool, "/ds/img/out.png", b"still held")
    batch = batch_of(spool, ["/ds/img/in.png"])
    spool._journal.capacity = spool._journal._end  # the next record does not fit
    assert sorted(spool.finish_batch(batch)) == ["/ds/img/in.png"]
    assert spool._journal.empty
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == {"/ds/img/out.png": b"still held"}
    again.close()


def test_a_checkpoint_while_a_batch_imports_keeps_both(tmp_path: Path) -> None:
    """A full journal (or a durable operation) checkpoints while a batch imports: files
    held in the journal get their own files, the batch keeps its data file."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/in.png", b"batch")
    batch = batch_of(spool, ["/ds/img/in.png"])
    close(spool, "/ds/img/later.png", b"later")
    spool.checkpoint()
    staged = tmp_path / "spool" / "staged" / "ds" / "img"
    assert (staged / "later.png").read_bytes() == b"later"
    assert not (staged / "in.png").exists()
    assert spool.batch_bytes(batch, "/ds/img/in.png") == b"batch"
    assert spool.finish_batch(batch) == {"/ds/img/in.png": 5}
    assert state(spool) == {"/ds/img/later.png": b"later"}
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == {"/ds/img/later.png": b"later"}
    again.close()


def test_a_file_rewritten_while_its_batch_imports_keeps_the_batchs_snapshot(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/p.png", b"v1")
    batch = batch_of(spool, ["/ds/img/p.png"])
    close(spool, "/ds/img/p.png", b"v2")
    assert spool.read_bytes("/ds/img/p.png") == b"v2"
    assert spool.batch_bytes(batch, "/ds/img/p.png") == b"v1"
    assert spool.finish_batch(batch) == {}  # v2 is not imported yet: it stays
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == {"/ds/img/p.png": b"v2"}
    again.close()


def test_a_plain_close_over_a_file_of_its_own_is_not_held(tmp_path: Path) -> None:
    """The staged file may be durable and an unflushed record not: replacing it stays a
    file operation, so a power cut cannot leave neither version."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/a.png", b"v1")
    spool.checkpoint()  # a.png has its own file now
    close(spool, "/ds/img/a.png", b"v2")
    assert (tmp_path / "spool" / "staged" / "ds" / "img" / "a.png").read_bytes() == b"v2"
    assert spool._journal.empty
    close(spool, "/ds/img/a.png", b"v3", durable=True)  # a flushed record may replace it
    assert not (tmp_path / "spool" / "staged" / "ds" / "img" / "a.png").exists()
    assert spool.read_bytes("/ds/img/a.png") == b"v3"
    spool.close()
    assert os.path.getsize(tmp_path / "spool" / "journal") >= HEADER_SIZE


def test_a_full_journal_checkpoints_and_keeps_holding(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", journal_capacity=HEADER_SIZE + 2000)
    for i in range(6):
        close(spool, f"/ds/img/{i}.png", bytes([i]) * 500)
    staged = tmp_path / "spool" / "staged" / "ds" / "img"
    assert (staged / "0.png").read_bytes() == bytes([0]) * 500  # given a file at the checkpoint
    assert not (staged / "5.png").exists()  # held in the new generation
    die(spool)
    again = Spool(tmp_path / "spool")
    assert state(again) == {f"/ds/img/{i}.png": bytes([i]) * 500 for i in range(6)}
    again.close()


def test_a_finished_batch_syncs_its_removals_before_it_is_retired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imported staged files are removed, and their folder synced, before the batch stops
    being one to finish: after a power cut either the batch is still there (and finishes
    again) or the files are gone, never imported files with no batch to say so."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/a.png", b"A")
    close(spool, "/ds/img/b.png", b"B")
    spool.checkpoint()  # the two get files of their own: not held any more
    staged = tmp_path / "spool" / "staged" / "ds" / "img"
    assert (staged / "a.png").is_file()
    batch = batch_of(spool, ["/ds/img/a.png", "/ds/img/b.png"])
    assert not batch.held
    log = tmp_path / "synced.log"
    monkeypatch.setenv(POWER_CUT_ENV, str(log))
    assert sorted(spool.finish_batch(batch)) == ["/ds/img/a.png", "/ds/img/b.png"]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    synced = [(i, d, names) for i, e in enumerate(events) for d, names in e.get("dirs", {}).items()]
    (staged_at,) = [i for i, d, names in synced if d == str(staged) and not names]
    retired_at = [
        i
        for i, d, names in synced
        if d == str(tmp_path / "spool" / "batches") and batch.id not in names
    ]
    assert retired_at and staged_at < retired_at[0]
    spool.close()


@pytest.mark.parametrize("in_kernel", [True, False], ids=["copy_file_range", "read-write"])
def test_a_batch_copies_its_held_files_run_by_run_and_serves_each_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_kernel: bool
) -> None:
    """Sealing copies runs of the journal (the records' headers between held files too),
    in the kernel where it can and by read and write where it cannot; each file is then
    its own bytes, whatever was closed between them or was re-written since."""
    if not in_kernel:

        def refuse(*args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")  # what an older kernel may say

        monkeypatch.setattr(os, "copy_file_range", refuse)
    spool = Spool(tmp_path / "spool")
    for i in range(50):
        close(spool, f"/ds/img/{i}.png", bytes([i]) * (100 + 37 * i))
        close(spool, f"/other/img/{i}.png", b"not in the batch" * i)
    close(spool, "/ds/img/7.png", b"re-written")
    files = [f"/ds/img/{i}.png" for i in range(50)]
    batch = batch_of(spool, files)
    expected = {p: bytes([i]) * (100 + 37 * i) for i, p in enumerate(files)}
    expected["/ds/img/7.png"] = b"re-written"
    assert {p: spool.batch_bytes(batch, p) for p in files} == expected
    die(spool)
    again = Spool(tmp_path / "spool")
    (pending,) = again.open_batches()
    assert {p: again.batch_bytes(pending, p) for p in files} == expected
    again.close()


def test_batches_are_found_while_a_finished_one_is_being_removed(tmp_path: Path) -> None:
    """A finished batch's folder is removed in the background; looking for batches to
    finish meanwhile neither trips over it (it may vanish at any moment) nor takes it for
    a batch, and a leftover of a removal cut short is removed by a later look."""
    spool = Spool(tmp_path / "spool")
    close(spool, "/ds/img/a.png", b"A")
    done = batch_of(spool, ["/ds/img/a.png"])
    spool.finish_batch(done)
    close(spool, "/ds/img/b.png", b"B")
    waiting = batch_of(spool, ["/ds/img/b.png"])
    for _ in range(200):  # looks that may race the removal thread
        assert [b.id for b in spool.open_batches()] == [waiting.id]
    leftover = tmp_path / "spool" / "batches" / ".done-cut-short"
    leftover.mkdir()
    (leftover / "data").write_bytes(b"x")
    for thread in spool._removals:
        thread.join()
    assert [b.id for b in spool.open_batches()] == [waiting.id]
    assert not leftover.exists()
    spool.close()
