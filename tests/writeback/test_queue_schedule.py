"""When the writeback queue runs a pass: never per file, always when something is due."""

from __future__ import annotations

from pathlib import Path

from blobfs.writeback.queue import WritebackQueue
from blobfs.writeback.spool import Batch, Spool
from tests.helpers import stage_held


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoImport:
    def import_batch(self, spool: Spool, batch: Batch) -> None:
        raise AssertionError("nothing is imported in these tests")


def make_queue(tmp_path: Path, clock: Clock) -> WritebackQueue:
    return WritebackQueue(
        Spool(tmp_path / "spool"),
        NoImport(),
        lambda view_path: None,
        delay_s=5.0,
        blob_size=10_000,
        clock=clock,
    )


def test_staging_files_does_not_start_passes_until_the_quiet_period_ends(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue._dirty = False  # the start-up pass is done
    for _ in range(100):
        queue.staged(50)
        clock.now += 0.01
        assert not queue._due()
    assert queue.status.pending == 100 and queue.status.pending_bytes == 5000
    clock.now += 4.9
    assert not queue._due()  # 4.9 s after the last write
    clock.now += 0.1
    assert queue._due()


def test_a_blob_worth_of_staged_bytes_is_due_at_once(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue._dirty = False
    queue.staged(9_999)
    assert not queue._due()
    queue.staged(1)
    assert queue._due()


def test_flush_stop_and_the_first_pass_are_always_due(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    clock.now += 5.0
    assert queue._due()  # what an earlier run left in the spool
    queue._dirty = False
    assert not queue._due()
    queue._force = 1
    assert queue._due()
    queue._force = 0
    queue._stopping = True
    assert queue._due()


def test_a_failed_import_is_due_again_after_its_backoff(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue._dirty = False
    queue._failures, queue._retry_at = 1, clock.now + 2.0
    assert not queue._due()
    clock.now += 2.0
    assert queue._due()


class Recorder:
    """An importer that only remembers what each batch held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        self.batches.append(sorted(batch.files))


def stage(spool: Spool, view_path: str, data: bytes = b"x") -> None:
    stage_held(spool, view_path, data)


def one_pass(queue: WritebackQueue) -> None:
    """A pass as the queue's thread runs it, with its counting before and after."""
    with queue._cond:
        queue._begin_pass()
    queue.run_once()
    with queue._cond:
        queue._end_pass()


def test_while_writes_go_on_images_with_their_annotation_are_imported_by_count(
    tmp_path: Path,
) -> None:
    """``batch_files`` staged files seal a batch before the quiet period ends; it takes
    the images whose annotation is staged too, with those annotations. An image without
    one waits (it would get an empty annotation, then its own), and so does everything
    while fewer than ``batch_files`` such files are staged."""
    clock = Clock()
    recorder = Recorder()
    spool = Spool(tmp_path / "spool")
    queue = WritebackQueue(
        spool, recorder, lambda view_path: None, delay_s=5.0, blob_size=1 << 30, clock=clock
    )
    queue.batch_files = 4
    for name in ("a", "b", "c"):
        stage(spool, f"/ds/img/{name}.png")
        queue.staged(1, f"/ds/img/{name}.png")
    stage(spool, "/ds/ann/a.png.json")
    queue.staged(1, "/ds/ann/a.png.json")
    assert queue._due()  # three images and an annotation (counted twice: it makes a pair)
    one_pass(queue)
    assert recorder.batches == []  # one image with its annotation: two files of four
    assert queue._short == 2  # they count towards the next pass
    stage(spool, "/ds/ann/b.png.json")
    queue.staged(1, "/ds/ann/b.png.json")
    assert queue._due()
    one_pass(queue)
    assert recorder.batches == [
        ["/ds/ann/a.png.json", "/ds/ann/b.png.json", "/ds/img/a.png", "/ds/img/b.png"]
    ]
    queue.run_once(force=True)  # a flush takes the image without an annotation
    assert recorder.batches[1:] == [["/ds/img/c.png"]]
    spool.close()
