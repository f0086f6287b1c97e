"""The spool's journal: what was acknowledged survives the loss of everything not flushed.

A ``kill -9`` leaves the kernel's page cache intact, so it cannot show whether the journal
works; these tests play the worse case, a power cut: the staged folder is put back to any
state the disk may hold after one (the last checkpoint, plus any prefix of the operations
since, with torn file contents) and a new spool must rebuild exactly what was acknowledged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobfs.writeback import spool as spool_module
from blobfs.writeback.journal import HEADER_SIZE, Journal, JournalFull, Kind, Record
from blobfs.writeback.spool import Spool

# ---- the journal file -----------------------------------------------------------------


def test_records_are_read_back_in_order_after_reopening(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.append(Kind.WRITE, "/ds/img/a.png", data=b"A" * 100)
    j.append(Kind.MOVE, "/ds/img/a.png", "/ds/img/b.png", b"A" * 100)
    j.append(Kind.REMOVE, "/ds/img/c.png")
    j.close()
    again = Journal(tmp_path / "j")
    assert list(again.records()) == [
        Record(Kind.WRITE, "/ds/img/a.png", "", b"A" * 100),
        Record(Kind.MOVE, "/ds/img/a.png", "/ds/img/b.png", b"A" * 100),
        Record(Kind.REMOVE, "/ds/img/c.png", "", b""),
    ]
    assert not again.empty  # appends continue after the replayed records


@pytest.mark.parametrize("damage", ["flipped byte", "torn tail"])
def test_a_damaged_last_record_is_dropped_and_the_ones_before_it_kept(
    tmp_path: Path, damage: str
) -> None:
    j = Journal(tmp_path / "j")
    j.append(Kind.WRITE, "/a", data=b"first")
    end_of_first = HEADER_SIZE + j.used
    j.append(Kind.WRITE, "/b", data=b"second" * 50)
    j.close()
    with open(tmp_path / "j", "r+b") as f:
        if damage == "flipped byte":
            f.seek(end_of_first + 60)
            byte = f.read(1)
            f.seek(end_of_first + 60)
            f.write(bytes([byte[0] ^ 1]))
        else:
            f.seek(end_of_first + 100)
            f.write(bytes(200))
    assert [r.path for r in Journal(tmp_path / "j").records()] == ["/a"]


def test_records_of_an_older_generation_never_replay(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    for name in "abc":
        j.append(Kind.WRITE, f"/{name}", data=name.encode() * 1000)
    j.reset()  # their bytes stay in the file, behind the new generation's records
    j.append(Kind.REMOVE, "/d")
    j.close()
    assert [r.path for r in Journal(tmp_path / "j").records()] == ["/d"]


def test_a_damaged_header_is_refused_not_guessed(tmp_path: Path) -> None:
    Journal(tmp_path / "j").close()
    with open(tmp_path / "j", "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(OSError, match="header is damaged"):
        Journal(tmp_path / "j")


def test_a_journal_cut_off_before_its_first_header_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / "j").write_bytes(bytes(HEADER_SIZE))  # zeros written, header not yet
    j = Journal(tmp_path / "j")
    assert list(j.records()) == []
    j.append(Kind.WRITE, "/a", data=b"x")
    assert [r.path for r in Journal(tmp_path / "j").records()] == ["/a"]


def test_a_full_journal_refuses_the_record_until_reset(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", capacity=HEADER_SIZE + 1000)
    j.append(Kind.WRITE, "/a", data=bytes(600))
    with pytest.raises(JournalFull):
        j.append(Kind.WRITE, "/b", data=bytes(600))
    j.reset()
    j.append(Kind.WRITE, "/b", data=bytes(600))
    assert [r.path for r in j.records()] == ["/b"]


# ---- the spool over a power cut ---------------------------------------------------------


def stage(spool: Spool, view_path: str, data: bytes, durable: bool = True) -> None:
    """What a program's open/write/fsync/close does through the writable view (without
    ``durable``: open/write/close with the default durability)."""
    fd, tmp = spool.new_temp()
    try:
        os.write(fd, data)
        spool.commit(fd, tmp, view_path, durable=durable)
    finally:
        spool.drop_temp(fd, tmp)


def die(spool: Spool) -> None:
    """The daemon is gone: no clean close, so no checkpoint."""
    spool.stop_pool()
    spool._journal.close()


def staged_state(spool: Spool) -> dict[str, bytes]:
    files, _ = spool.walk()
    return {p: spool.read_bytes(p) for p in files}


def put_back(spool_root: Path, state: dict[str, bytes]) -> None:
    """The staged folder as the disk holds it after the power cut."""
    staged = spool_root / "staged"
    shutil.rmtree(staged)
    staged.mkdir()
    for path, data in state.items():
        target = staged / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def cut_power(
    spool: Spool,
    root: Path,
    states: list[dict[str, bytes]],
    checkpoints: list[int],
    torn: set[str],
    crash_at: int,
) -> None:
    """The daemon dies and the staged folder is put back as a disk may hold it after a
    power cut: the last checkpoint's state plus any prefix (``crash_at``) of what came
    after it, and a file touched after the checkpoint (in ``torn``) may have lost its
    bytes."""
    floor = checkpoints[-1] if checkpoints else 0
    on_disk = dict(states[floor + crash_at % (len(states) - floor)])
    for path in torn & on_disk.keys():
        if on_disk[path] != states[floor].get(path):
            on_disk[path] = b""
    die(spool)
    put_back(root, on_disk)


NAMES = [f"/ds/img/{n}.png" for n in "abcde"] + ["/new/img/f.png", "/meta.json"]
operation = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.binary(min_size=0, max_size=300)),
    st.tuples(st.just("remove"), st.sampled_from(NAMES), st.just(b"")),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(operation, min_size=1, max_size=25),
    crash_at=st.integers(min_value=0),
    torn=st.sets(st.sampled_from(NAMES)),
)
def test_after_a_power_cut_the_spool_rebuilds_exactly_what_was_acknowledged(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    ops: list[tuple[str, str, object]],
    crash_at: int,
    torn: set[str],
) -> None:
    root = tmp_path_factory.mktemp("spool")
    checkpoints: list[int] = []  # index of the last operation whose effects a checkpoint holds
    real_syncfs = spool_module.syncfs
    done = 0

    def counting_syncfs(path: str | os.PathLike[str]) -> None:
        real_syncfs(path)
        checkpoints.append(done)

    monkeypatch.setattr(spool_module, "syncfs", counting_syncfs)
    spool = Spool(root, journal_capacity=HEADER_SIZE + 2000)  # small: checkpoints happen
    states = [staged_state(spool)]
    for kind, path, arg in ops:
        existing = spool.staged_path(path).is_file()
        if kind == "write":
            assert isinstance(arg, bytes)
            stage(spool, path, arg)
        elif kind == "remove" and existing:
            spool.remove(path)
        elif kind == "rename" and existing and arg != path:
            assert isinstance(arg, str)
            spool.rename(path, arg)
        done += 1
        states.append(staged_state(spool))
    acknowledged = states[-1]

    cut_power(spool, root, states, checkpoints, torn, crash_at)

    assert staged_state(Spool(root)) == acknowledged


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(st.tuples(operation, st.booleans()), min_size=1, max_size=25),
    crash_at=st.integers(min_value=0),
    torn=st.sets(st.sampled_from(NAMES)),
)
def test_with_the_default_durability_a_power_cut_keeps_every_fsynced_file(
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    ops: list[tuple[tuple[str, str, object], bool]],
    crash_at: int,
    torn: set[str],
) -> None:
    """Plain ``close()``, ``rename`` and ``unlink`` (no flush, like a local file system)
    mixed with durable ones (``fsync``): after a power cut, every path whose last change
    was durable holds exactly what was acknowledged; a path last changed plainly holds one
    of its versions, nothing (lost) or a torn copy, as ext4 would give."""
    root = tmp_path_factory.mktemp("spool")
    checkpoints: list[int] = []
    real_syncfs = spool_module.syncfs
    done = 0

    def counting_syncfs(path: str | os.PathLike[str]) -> None:
        real_syncfs(path)
        checkpoints.append(done)

    monkeypatch.setattr(spool_module, "syncfs", counting_syncfs)
    spool = Spool(root, journal_capacity=HEADER_SIZE + 2000)
    states = [staged_state(spool)]
    last_durable: dict[str, bool] = {}
    seen: dict[str, set[bytes]] = {name: {b""} for name in NAMES}
    for (kind, path, arg), durable in ops:
        existing = spool.staged_path(path).is_file()
        if kind == "write":
            assert isinstance(arg, bytes)
            stage(spool, path, arg, durable=durable)
            last_durable[path] = durable
        elif kind == "remove" and existing:
            spool.remove(path, durable=durable)
            last_durable[path] = durable
        elif kind == "rename" and existing and arg != path:
            assert isinstance(arg, str)
            spool.rename(path, arg, durable=durable)
            last_durable[path] = last_durable[arg] = durable
        done += 1
        states.append(staged_state(spool))
        for name, data in states[-1].items():
            seen[name].add(data)
    acknowledged = states[-1]

    cut_power(spool, root, states, checkpoints, torn, crash_at)

    rebuilt = staged_state(Spool(root))
    for name in NAMES:
        if last_durable.get(name, True):  # durable, or untouched
            assert rebuilt.get(name) == acknowledged.get(name), name
        else:
            assert name not in rebuilt or rebuilt[name] in seen[name], name


def test_a_plain_close_is_held_in_the_journal_without_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default ``close()`` costs no flush and creates no file: the bytes are one
    journal record in the page cache; a durable commit flushes its record."""
    spool = Spool(tmp_path / "spool")
    flushes: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushes.append(fd), real(fd))[1])
    stage(spool, "/ds/img/a.png", b"closed", durable=False)
    assert flushes == []
    assert not spool.staged_path("/ds/img/a.png").exists()
    assert spool.read_bytes("/ds/img/a.png") == b"closed"
    stage(spool, "/ds/img/b.png", b"fsynced", durable=True)
    assert len(flushes) == 1
    assert [r.path for r in spool._journal.records()] == ["/ds/img/a.png", "/ds/img/b.png"]
    spool.close()


def test_a_plain_close_after_a_journaled_one_is_not_undone_by_replay(tmp_path: Path) -> None:
    """``kill -9`` after fsync(v1) then close(v2) of the same name: replaying the journal's
    v1 must not bring the older bytes back over v2."""
    spool = Spool(tmp_path / "spool")
    stage(spool, "/ds/img/a.png", b"v1", durable=True)
    stage(spool, "/ds/img/a.png", b"v2", durable=False)
    spool.rename("/ds/img/a.png", "/ds/img/b.png", durable=False)
    stage(spool, "/ds/img/a.png", b"v3", durable=False)
    die(spool)  # the kernel keeps what the staged folder holds
    assert staged_state(Spool(tmp_path / "spool")) == {
        "/ds/img/a.png": b"v3",
        "/ds/img/b.png": b"v2",
    }


def test_a_sync_makes_plain_closes_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(spool_module, "syncfs", lambda path: calls.append(str(path)))
    spool = Spool(tmp_path / "spool")
    spool.sync()  # a fresh spool may hold a killed daemon's plain closes: flushed
    spool.sync()  # nothing new since: no flush
    stage(spool, "/ds/img/a.png", b"x", durable=False)
    spool.sync()
    assert len(calls) == 2
    spool.close()


def test_a_large_file_after_a_small_one_of_the_same_name_is_not_undone_by_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file is made durable directly, not through the journal; the journal's older
    record for the same name must be retired first, or replay would bring the old bytes
    back over the new ones."""
    monkeypatch.setattr(spool_module, "INLINE_MAX", 10)
    spool = Spool(tmp_path / "spool")
    stage(spool, "/ds/img/a.png", b"small")
    stage(spool, "/ds/img/a.png", b"large" * 10)
    die(spool)
    assert staged_state(Spool(tmp_path / "spool")) == {"/ds/img/a.png": b"large" * 10}


def test_a_clean_close_leaves_nothing_to_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stage(spool, "/ds/img/a.png", b"x" * 100)
    spool.close()
    assert list(Journal(tmp_path / "spool" / "journal").records()) == []
    assert staged_state(Spool(tmp_path / "spool")) == {"/ds/img/a.png": b"x" * 100}


def test_a_writer_committing_after_another_replaced_its_file_stages_its_own_bytes(
    tmp_path: Path,
) -> None:
    """The last close wins, also when the first writer's file was renamed into place by an
    earlier fsync and then replaced by a second program before the first one closed."""
    spool = Spool(tmp_path / "spool")
    fd, tmp = spool.new_temp()
    try:
        os.write(fd, b"A1")
        spool.commit(fd, tmp, "/ds/img/p.png")  # fsync(): renamed into staged/
        stage(spool, "/ds/img/p.png", b"B")  # another program writes the same name
        os.pwrite(fd, b"A2-longer", 0)
        spool.commit(fd, tmp, "/ds/img/p.png")  # close(): staged as a copy
    finally:
        spool.drop_temp(fd, tmp)
    assert staged_state(spool) == {"/ds/img/p.png": b"A2-longer"}
    die(spool)
    assert staged_state(Spool(tmp_path / "spool")) == {"/ds/img/p.png": b"A2-longer"}
