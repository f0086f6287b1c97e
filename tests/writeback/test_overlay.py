"""The writable overlay in-process (no kernel): what it refuses, with which error, and how
the queue's refusals and imports reach it (its events)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobfs.cache.blocks import BlockCache
from blobfs.errors import AlreadyExists, Busy
from blobfs.format.pack import ProjectPacker
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from blobfs.writeback.fs import WritebackFS
from blobfs.writeback.importer import LocalImporter
from blobfs.writeback.queue import WritebackQueue
from blobfs.writeback.spool import Spool
from blobfs.writeback.validate import Validator
from tests.support.sample import png_bytes


def writable(
    project: Path, spool: Spool, sync_close: bool = False
) -> tuple[WritebackFS, WritebackQueue]:
    """The writable layer over ``project`` with its queue, wired as the daemon wires them."""
    base = ProjectView(LocalProjectSource(project, BlockCache(1 << 16, 1 << 22)))
    queue = WritebackQueue(spool, LocalImporter(project), Validator(spool, base), delay_s=0)
    return WritebackFS(base, spool, queue, sync_close=sync_close), queue


class Overlay:
    """A writable layer over ``project`` with its queue."""

    def __init__(self, project: Path, spool_dir: Path) -> None:
        self.project = project
        self.spool = Spool(spool_dir)
        self.view, self.queue = writable(project, self.spool)

    def write(self, path: str, data: bytes) -> None:
        fh = self.view.create(path)
        self.view.write(fh, data, 0)
        self.view.release(fh)

    def close(self) -> None:
        self.queue.stop(drain=False)
        self.spool.close()


@pytest.fixture
def overlay(project: Path, tmp_path: Path) -> Iterator[Overlay]:
    o = Overlay(project, tmp_path / "spool")
    yield o
    o.close()


CAT = {"title": "person", "shape": "rectangle", "color": "#FF0000"}


def _ann(class_title: str) -> bytes:
    rect = {
        "classTitle": class_title,
        "geometryType": "rectangle",
        "tags": [],
        "points": {"exterior": [[1, 1], [5, 5]], "interior": []},
    }
    return json.dumps({"size": {"height": 32, "width": 32}, "objects": [rect]}).encode()


# ---- item: refusals retried (EBUSY and ENOTEMPTY: tests/behaviour/test_errnos.py) ------


def test_a_failed_import_leaves_nothing_busy(
    overlay: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay.write("/ds/img/new.png", png_bytes(51))

    def fail(*args: object) -> None:
        raise OSError("boom")  # a server error, a full disk: anything an import can meet

    monkeypatch.setattr(overlay.queue.importer, "import_batch", fail)
    overlay.queue.run_once(force=True)
    assert overlay.queue.status.last_error == "OSError: boom"
    overlay.view.unlink("/ds/img/new.png")  # not EBUSY: the import is over


def test_an_annotation_refused_for_unknown_classes_is_imported_once_meta_has_them(
    overlay: Overlay,
) -> None:
    overlay.write("/ds/ann/img_000001.png.json", _ann("person"))
    overlay.queue.run_once()
    assert (
        "unknown classes ['person']" in overlay.queue.status.failed["/ds/ann/img_000001.png.json"]
    )
    meta = json.loads(overlay.view.read_path("/meta.json", 0, 1 << 20))
    meta["classes"] = [CAT]
    overlay.write("/meta.json", json.dumps(meta).encode())
    overlay.queue.run_once()
    assert overlay.queue.status.failed == {}
    assert (overlay.project / "ds" / "ann" / "img_000001.png.json").read_bytes() == _ann("person")


def test_a_refusal_is_checked_again_on_flush(overlay: Overlay) -> None:
    """A fix made outside the mount (meta.json edited in the project) counts on flush."""
    overlay.write("/ds/ann/img_000002.png.json", _ann("person"))
    overlay.queue.run_once()
    assert overlay.queue.status.failed
    meta_path = overlay.project / "meta.json"
    meta = json.loads(meta_path.read_bytes())
    meta["classes"] = [CAT]
    meta_path.write_text(json.dumps(meta))
    overlay.queue.run_once(force=True)
    assert overlay.queue.status.failed == {}


# ---- item: one spool, one mount ----------------------------------------------------------


def _hold_in_another_process(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nprint('held', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_spool_in_use_by_another_process_is_refused_and_free_once_it_exits(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    holder = _hold_in_another_process(
        f"import sys; from blobfs.writeback.spool import Spool; s = Spool({str(spool)!r})"
    )
    try:
        with pytest.raises(Busy, match=rf"spool {spool} is in use .* \(pid {holder.pid}\)"):
            Spool(spool)
    finally:
        holder.kill()
        holder.wait()
    Spool(spool).close()  # a dead holder leaves no stale lock


def test_a_project_imported_into_by_another_process_is_refused(
    project: Path,
) -> None:
    holder = _hold_in_another_process(
        "import sys; from blobfs.writeback.importer import LocalImporter; "
        f"i = LocalImporter({str(project)!r})"
    )
    try:
        with pytest.raises(Busy, match="already mounted with --writeback"):
            LocalImporter(project)
    finally:
        holder.kill()
        holder.wait()


# ---- item: names the project holds unservably ---------------------------------------------


def duplicate_across_blobs(project: Path, tmp_path: Path, name: str) -> None:
    """Pack a second blob into ``ds`` holding ``name`` again: neither copy is served."""
    copy = tmp_path / "dup" / name
    copy.parent.mkdir()
    copy.write_bytes(png_bytes(99))
    ProjectPacker(project, "ds").pack([copy], check_existing=False)


def test_a_name_the_project_holds_twice_is_refused_at_create(project: Path, tmp_path: Path) -> None:
    duplicate_across_blobs(project, tmp_path, "img_000003.png")
    overlay = Overlay(project, tmp_path / "spool")
    try:
        assert "img_000003.png" not in overlay.view.readdir("/ds/img")
        reason = overlay.view.source.refused(("ds",), "img/img_000003.png")
        assert reason == "name appears more than once"
        with pytest.raises(AlreadyExists, match="not served"):
            overlay.view.create("/ds/img/img_000003.png")
        overlay.write("/ds/img/tmp.png", png_bytes(5))
        with pytest.raises(AlreadyExists):  # nor may a rename make one
            overlay.view.rename("/ds/img/tmp.png", "/ds/img/img_000003.png")
        overlay.write("/ds/img/img_000004.png.bak", png_bytes(6))  # other names are fine
    finally:
        overlay.close()


# ---- durability: close() like a local file system, fsync() and --sync-close durable -------


def _journal_paths(spool: Spool) -> list[str]:
    return [r.path for r in spool._journal.records()]


def test_close_stages_without_a_flush_and_fsync_makes_the_file_durable(
    overlay: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = overlay.view
    fh = view.create("/ds/img/closed.png")
    view.write(fh, png_bytes(1), 0)
    view.close(fh)  # close(): FUSE flush
    view.release(fh)
    # held: one journal record, not flushed, and no file of its own
    assert overlay.spool.read_bytes("/ds/img/closed.png") == png_bytes(1)
    assert not overlay.spool.staged_path("/ds/img/closed.png").exists()
    assert _journal_paths(overlay.spool) == ["/ds/img/closed.png"]
    fh = view.create("/ds/img/synced.png")
    view.write(fh, png_bytes(2), 0)
    view.fsync("/ds/img/synced.png", fh)
    assert _journal_paths(overlay.spool) == ["/ds/img/closed.png", "/ds/img/synced.png"]
    view.close(fh)  # nothing written since the fsync: nothing to do
    view.release(fh)
    assert _journal_paths(overlay.spool) == ["/ds/img/closed.png", "/ds/img/synced.png"]
    # fsync of a file not open for writing (``sync FILE`` opens it read-only): the spool
    # is flushed as a whole
    synced: list[bool] = []
    monkeypatch.setattr(overlay.spool, "sync", lambda: synced.append(True))
    view.fsync("/ds/img/closed.png", view.open("/ds/img/closed.png"))
    assert synced == [True]


def test_the_attributes_of_a_file_being_written_follow_its_writes_and_truncations(
    overlay: Overlay,
) -> None:
    """libfuse asks for a new file's attributes right after the create, and ``fstat`` asks
    again later: each answer is the file as written so far, in memory or spilled."""
    view = overlay.view
    path = "/ds/img/growing.png"
    fh = view.create(path)
    first = view.find_attrs(path, fh)
    assert first is not None and first["st_size"] == 0 and first["st_blocks"] == 0
    assert view.find_attrs(path, fh) == first  # asked again, nothing written: the same
    view.write(fh, b"x" * 1000, 0)
    grown = view.find_attrs(path, fh)
    assert grown is not None and grown["st_size"] == 1000 and grown["st_blocks"] == 2
    assert grown["st_mtime"] >= first["st_mtime"]
    view.truncate(path, 10, fh)
    assert (view.find_attrs(path, fh) or {})["st_size"] == 10
    big = 8 << 20  # past what is held in memory: the bytes go to a temp file
    view.write(fh, b"y", big)
    assert (view.find_attrs(path, fh) or {})["st_size"] == big + 1
    view.close(fh)
    view.release(fh)
    assert (view.find_attrs(path) or {})["st_size"] == big + 1


def test_a_flush_after_close_then_fsync_on_another_descriptor_is_durable(
    overlay: Overlay,
) -> None:
    """``dup``'d descriptors: close() of one commits plainly and ends the handle, fsync() of
    the other must still make the bytes durable although nothing was written in between."""
    view = overlay.view
    fh = view.create("/ds/img/dup.png")
    view.write(fh, png_bytes(3), 0)
    view.close(fh)
    assert _journal_paths(overlay.spool) == ["/ds/img/dup.png"]  # not flushed
    assert overlay.spool._unsynced
    view.fsync("/ds/img/dup.png", fh)
    assert not overlay.spool._unsynced  # the spool was made durable with it
    assert _journal_paths(overlay.spool) == ["/ds/img/dup.png"]


def test_a_closed_handle_the_kernel_still_uses_reads_and_writes_the_file(
    overlay: Overlay,
) -> None:
    """close() ends the handle, but the open file may live on (another descriptor, a
    mapping): a write through the old number reopens the file as committed, the next
    close() commits it; a read through it reads the file; release has nothing left."""
    view = overlay.view
    path = "/ds/img/late.png"
    fh = view.create(path)
    view.write(fh, b"abcd", 0)
    view.close(fh)
    assert view.read(fh, 0, 10, path) == b"abcd"
    assert view.write(fh, b"XY", 2, path) == 2
    assert view.read(fh, 0, 10, path) == b"abXY"  # the reopened writer's bytes
    assert overlay.spool.read_bytes(path) == b"abcd"  # not committed before its close
    view.close(fh)
    assert overlay.spool.read_bytes(path) == b"abXY"
    view.release(fh)  # the kernel's release: nothing left to do
    view.close(fh)  # a second close of an ended handle: nothing either
    view.write(fh, b"Z", 4, path)  # a mapping's page written back after the last close
    assert overlay.spool.read_bytes(path) == b"abXY"
    view.commit_reopened()  # blobfs flush, unmount
    assert overlay.spool.read_bytes(path) == b"abXYZ"
    reader = view.open(path)
    view.close(reader)
    assert view.read(reader, 1, 2, path) == b"bX"
    assert not view._writers


def test_a_write_racing_the_close_of_another_descriptor_is_not_lost(
    overlay: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close() that ends the handle while a write through it is in flight: the write
    lands in the file reopened as committed, and the next close() commits it."""
    view = overlay.view
    path = "/ds/img/race.png"
    fh = view.create(path)
    view.write(fh, b"1111", 0)
    handle = view._writers[fh]
    real = handle.scratch.write

    def write_then_close(data: bytes, offset: int) -> int:
        monkeypatch.setattr(handle.scratch, "write", real)
        written = real(data, offset)
        view.close(fh)  # the other descriptor's close(), between the write and its return
        return written

    monkeypatch.setattr(handle.scratch, "write", write_then_close)
    assert view.write(fh, b"22", 4, path) == 2
    view.close(fh)
    assert overlay.spool.read_bytes(path) == b"111122"


def test_with_sync_close_every_close_is_durable(project: Path, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    view, _queue = writable(project, spool, sync_close=True)
    try:
        fh = view.create("/ds/img/a.png")
        view.write(fh, png_bytes(4), 0)
        view.close(fh)
        view.release(fh)
        assert _journal_paths(spool) == ["/ds/img/a.png"]
        view.rename("/ds/img/a.png", "/ds/img/b.png")
        assert _journal_paths(spool) == ["/ds/img/a.png", "/ds/img/a.png"]
    finally:
        spool.close()


# ---- control files ----------------------------------------------------------------------


def test_reading_the_flush_file_only_waits_a_bounded_time_for_the_queue(
    overlay: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import runs on the queue's thread; a read of ``/.blobfs/flush`` asks for it and
    waits at most ``FLUSH_WAIT_S``, then says whether it is done and which ticket
    ``flush-<ticket>-<nonce>`` waits for (what ``blobfs flush`` loops on); each such name
    is answered once, with its exact size."""
    monkeypatch.setattr("blobfs.writeback.fs.FLUSH_WAIT_S", 0.2)
    monkeypatch.setenv("BLOBFS_FAILPOINT", "importing:sleep=1.0")
    overlay.write("/ds/img/slow.png", png_bytes(51))
    overlay.queue.start()
    started = time.monotonic()
    first = json.loads(overlay.view.read_path("/.blobfs/flush", 0, 1 << 20))
    assert time.monotonic() - started < 0.9
    assert first["done"] is False and first["ticket"] == 1
    answer, reads = first, 0
    deadline = time.monotonic() + 30
    while not answer["done"] and time.monotonic() < deadline:
        name = f"/.blobfs/flush-1-{reads}"
        reads += 1
        size = overlay.view.getattr(name)["st_size"]
        data = overlay.view.read_path(name, 0, 1 << 20)
        assert len(data) == size and overlay.view.read_path(name, 0, 1 << 20) == data
        answer = json.loads(data)
    assert answer["done"] is True and answer["pending"] == 0
    ticket = json.loads(overlay.view.read_path("/.blobfs/flush-new-a", 0, 1 << 20))["ticket"]
    assert ticket == 2
    assert overlay.view.read_path("/ds/img/slow.png", 0, 1 << 20) == png_bytes(51)


def test_stats_carry_the_writeback_section(overlay: Overlay) -> None:
    stats = json.loads(overlay.view.read_path("/.blobfs/stats-x.json", 0, 1 << 20))
    assert stats["writeback"]["pending"] == 0 and "uptime_s" in stats
    assert overlay.view.getattr("/.blobfs/stats-x.json")["st_size"] == len(
        overlay.view.read_path("/.blobfs/stats-x.json", 0, 1 << 20)
    )


def test_validating_annotations_reads_the_project_meta_once_per_pass(
    overlay: Overlay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a remote project each read of meta is a request: once per pass, not per file."""
    source = overlay.view.source
    real, calls = source.meta_json, []

    def counting() -> bytes | None:
        calls.append(1)
        return real()

    for i in range(5):
        overlay.write(f"/ds/ann/img_00000{i}.png.json", _ann("nobody"))
    monkeypatch.setattr(source, "meta_json", counting)
    overlay.queue.run_once()
    assert len(overlay.queue.status.failed) == 5
    assert len(calls) == 1
