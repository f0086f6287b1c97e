"""Unit specifications: offsets format, range arithmetic, the block cache, the errno table."""

from __future__ import annotations

import errno
import io
import os
import pickle
import pickletools
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.cache.ranges import runs, to_blocks
from blobfs.errors import (
    CorruptData,
    NotFound,
    NotPermitted,
    ReadOnly,
    RemoteError,
    to_errno,
)
from blobfs.format import offsets
from blobfs.format.offsets import dumps_batch, parse_offsets, reject_conflicts, write_offsets
from blobfs.layout import name_problem, names_fit
from blobfs.model import BlobMember

names = st.text(
    st.characters(blacklist_characters="/\\\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda n: n not in (".", ".."))
members = st.lists(
    st.builds(
        lambda n, s, length: BlobMember(n, s, s + length),
        names,
        st.integers(0, 2**40),
        st.integers(0, 2**20),
    ),
    max_size=30,
    unique_by=lambda m: m.name,
)


@given(members)
@example([BlobMember("a.png", 0, 0), BlobMember("big.png", 2**31, 2**33)])
def test_offsets_round_trip(items: list[BlobMember]) -> None:
    assert parse_offsets(dumps_batch(items), "x").members == items


any_names = st.one_of(
    st.text(max_size=8),
    st.text(st.characters(whitelist_categories=("Lo",)), min_size=60, max_size=70),
    st.sampled_from(["", ".", "..", "a/b", "a\\b", "a\0b", "\ud800", "x" * 256, "é" * 128]),
)
raw_entries = st.lists(
    st.tuples(any_names, st.integers(-3, 2**34), st.integers(-3, 2**34)), max_size=12
)


def _sdk_pickle(entries: list[tuple[str, int, int]]) -> bytes:
    """A batch as the SDK pickles it, names not checked (dumps_batch writes any str)."""
    out = [b"\x80\x02]q\x00("]
    for i, (name, start, end) in enumerate(entries):
        out.append(offsets._GLOBAL if i == 0 else offsets._GET_CLASS)
        out.append(b")\x81}(")
        raw = name.encode("utf-8", "surrogatepass")
        out += [offsets._KEYS[0], b"X" + len(raw).to_bytes(4, "little") + raw]
        out += [
            offsets._KEYS[1],
            offsets._op_int(start),
            offsets._KEYS[2],
            offsets._op_int(end),
            b"ub",
        ]
    out.append(b"e.")
    return b"".join(out)


#: Names near every rule's edge: forbidden characters, lone surrogates, long multi-byte.
edge_names = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", ".", "..", "a/b", "a\\b", "a\0b", "\udc80", "é" * 128, "é" * 127]),
    st.text(st.sampled_from("aé€𝄞"), min_size=60, max_size=260),
)


@given(st.lists(edge_names, max_size=6))
@settings(max_examples=400, deadline=None)
@example(["ok", "é" * 128])
@example(["a" * 255, "b"])
@example(["a" * 256])
def test_names_fit_says_yes_exactly_when_every_name_passes_name_problem(
    batch: list[str],
) -> None:
    assert names_fit(batch) == all(name_problem(n) is None for n in batch)


@given(st.lists(raw_entries, min_size=1, max_size=3), st.one_of(st.none(), st.integers(0, 2**34)))
@settings(max_examples=300, deadline=None)
def test_the_batch_fast_path_accepts_and_refuses_exactly_what_the_entry_checks_do(
    batches: list[list[tuple[str, int, int]]], blob_size: int | None
) -> None:
    data = b"".join(_sdk_pickle(b) for b in batches)
    fast = parse_offsets(data, "x", blob_size)
    original = offsets._plain_batch
    try:
        offsets._plain_batch = lambda batch, size: None  # type: ignore[assignment]
        slow = parse_offsets(data, "x", blob_size)
    finally:
        offsets._plain_batch = original  # type: ignore[assignment]
    assert fast.members == slow.members
    assert fast.problems.lines() == slow.problems.lines()


def test_a_parse_into_columns_gives_the_members() -> None:
    """The columns the project source indexes are what the members are, batch after
    batch, and a file refused whole gives none."""
    items = [
        BlobMember(f"n{i:05d}.png", 512 * (2 * i + 1), 512 * (2 * i + 1) + 9) for i in range(25)
    ]
    data = b"".join(dumps_batch(items[at : at + 10]) for at in range(0, 25, 10))
    columns = offsets.parse_offsets_columns(data, "x")
    assert columns.members() == items == parse_offsets(data, "x").members
    assert (columns.names, columns.starts) == ([m.name for m in items], [m.start for m in items])
    refused = offsets.parse_offsets_columns(data + b"\x80\x02cos\nsystem\n.", "x")
    assert len(refused) == 0 and refused.problems.lines()  # the whole file, as parse_offsets


_quick_names = ["q1", "q2", "q1q", "é.q", "x" * 256, "", "q/1", "\ud800"]
_quick_entries = st.lists(
    st.tuples(st.sampled_from(_quick_names), st.integers(-2, 50), st.integers(-2, 50)),
    max_size=6,
)


@given(
    st.lists(st.lists(_quick_entries, min_size=1, max_size=3), min_size=1, max_size=3),
    st.sampled_from(_quick_names),
)
@settings(max_examples=300, deadline=None)
def test_the_quick_entry_search_agrees_with_the_full_parse(
    files: list[list[list[tuple[str, int, int]]]], name: str
) -> None:
    """``find_entry`` (a stat before the index is built) answers only what the full parse
    of every file, with its conflict checks, serves: the same range, or nothing."""
    datas = [b"".join(_sdk_pickle(b) for b in batches) for batches in files]
    parsed = [parse_offsets(d, f"f{k}") for k, d in enumerate(datas)]
    served = [
        (k, m.start, m.end)
        for k, p in enumerate(parsed)
        for m in reject_conflicts(p.members, "x", check_overlaps=False).members
        if m.name == name
    ]
    all_names = [m.name for p in parsed for m in p.members]
    quick = offsets.find_entry(datas, name)
    if quick is not None:
        assert all_names.count(name) == 1 and served == [quick]
    elif served and all(name not in n for n in all_names if n != name) and name != "\ud800":
        # found alone and no other name holds its bytes: the search must find it
        raw_count = sum(d.count(name.encode()) for d in datas)
        assert raw_count != 1, (name, files)


def _count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches unpickled from now on, appended as they are."""
    loads: list[int] = []
    original = offsets.iter_raw_batches

    def counting(stream: io.BytesIO, limit: int | None = None):  # type: ignore[no-untyped-def]
        for batch in original(stream, limit):
            loads.append(len(batch))
            yield batch

    monkeypatch.setattr(offsets, "iter_raw_batches", counting)
    return loads


def test_the_quick_entry_search_reads_only_the_batch_that_holds_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in the last of many batches without unpickling the others (nor that batch:
    its first entry and the name's own); a seam guessed wrong (an integer whose bytes
    look like STOP then PROTO) is passed over for an earlier one."""
    monkeypatch.setattr(offsets, "BATCH_SIZE", 10)
    out = io.BytesIO()
    tricky = int.from_bytes(b"\x2e\x80\x02\x00", "little")  # ".\x80\x02" in a BININT
    items = [BlobMember(f"{i:04d}.png", i * 10, i * 10 + 5) for i in range(95)]
    items[93] = BlobMember("0093.png", tricky, tricky + 5)
    offsets.write_offsets(out, items)
    data = out.getvalue()
    loads = _count_batches(monkeypatch)
    assert offsets.find_entry([b"", data], "0091.png") == (1, 910, 915)
    assert loads == [2]  # the batch's first entry and the name's
    loads.clear()
    assert offsets.find_entry([data], "0094.png") == (0, 940, 945)
    assert offsets.find_entry([data], "0093.png") == (0, tricky, tricky + 5)
    assert offsets.find_entry([data, data], "0091.png") is None  # in two files
    assert offsets.find_entry([data], "009.png") is None  # not an entry
    assert offsets.find_entry([data], "0091.pn") is None  # inside a longer name


def test_offsets_files_are_written_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offsets, "BATCH_SIZE", 3)
    items = [BlobMember(f"{i}.png", i * 10, i * 10 + 5) for i in range(8)]
    out = io.BytesIO()
    write_offsets(out, items)
    raw = out.getvalue()
    assert raw.count(b"\x80\x02") == 3  # three pickles: 3 + 3 + 2
    assert parse_offsets(raw, "x").members == items


def test_the_sdk_reads_what_blobfs_writes_and_the_other_way(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sly_image_api = pytest.importorskip("supervisely.api.image_api")
    items = [BlobMember(f"img_{i}.png", 512 + 1024 * i, 900 + 1024 * i) for i in range(25)]
    path = tmp_path / "x_offsets.pkl"
    with open(path, "wb") as f:
        write_offsets(f, items)
    got = [
        m
        for batch in sly_image_api.BlobImageInfo.load_from_pickle_generator(str(path))
        for m in batch
    ]
    assert [(m.name, m.offset_start, m.offset_end) for m in got] == [
        (m.name, m.start, m.end) for m in items
    ]
    sdk_path = tmp_path / "sdk_offsets.pkl"
    sly_image_api.BlobImageInfo.dump_to_pickle(
        [sly_image_api.BlobImageInfo(m.name, m.start, m.end) for m in items], str(sdk_path)
    )
    assert offsets.read_offsets_file(str(sdk_path)).members == items


def test_blobfs_writes_the_opcodes_the_sdk_s_pickler_writes() -> None:
    """The same opcodes as ``pickle.dumps(protocol=2)`` of the SDK's objects, the class and
    the three keys by memo reference after their first use; only the memo puts nobody
    reads back (and so the numbers of the references) and the width of integers differ."""
    sly_image_api = pytest.importorskip("supervisely.api.image_api")
    items = [BlobMember(f"img_{i}.png", 512 + 1024 * i, 900 + 1024 * i) for i in range(5)]
    sdk = pickle.dumps(
        [sly_image_api.BlobImageInfo(m.name, m.start, m.end) for m in items], protocol=2
    )

    def shape(data: bytes) -> list[tuple[str, object]]:
        puts = {"BINPUT", "LONG_BINPUT", "MEMOIZE"}
        same = {"BININT1": "BININT", "BININT2": "BININT", "LONG_BINGET": "BINGET"}
        return [
            (same.get(op.name, op.name), None if op.name.endswith("BINGET") else arg)
            for op, arg, _ in pickletools.genops(data)
            if op.name not in puts
        ]

    ours = offsets.dumps_batch(items)
    assert shape(ours) == shape(sdk)
    assert ours.count(b"offset_start") == 1  # a reference in every entry after the first


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("exit 3",))


def test_a_pickle_that_calls_a_function_is_refused_before_it_runs() -> None:
    parsed = parse_offsets(pickle.dumps([_Evil()]), "evil")
    assert parsed.members == []
    assert "system is not allowed" in parsed.problems.lines()[0]


def test_conflicts_drop_both_sides() -> None:
    ms = [
        BlobMember("a", 0, 10),
        BlobMember("a", 20, 30),
        BlobMember("b", 40, 50),
        BlobMember("c", 45, 60),
        BlobMember("d", 70, 80),
    ]
    clean = reject_conflicts(ms, "x")
    assert [m.name for m in clean.members] == ["d"]
    assert clean.problems.total == 4


@given(st.integers(0, 10_000), st.integers(0, 5_000), st.integers(1, 4096))
def test_blocks_cover_exactly_the_range(start: int, length: int, block: int) -> None:
    blocks = to_blocks(start, start + length, block)
    if length == 0:
        assert len(blocks) == 0
        return
    assert blocks.start * block <= start < (blocks.start + 1) * block
    assert (blocks.stop - 1) * block < start + length <= blocks.stop * block


@given(st.lists(st.integers(0, 200), unique=True).map(sorted), st.integers(1, 8))
def test_runs_partition_sorted_blocks(blocks: list[int], max_run: int) -> None:
    out = runs(blocks, max_run)
    assert [b for first, stop in out for b in range(first, stop)] == blocks
    assert all(0 < stop - first <= max_run for first, stop in out)


class BytesReader:
    """A fake transport over bytes, counting requests (the fsspec ``letters_fetcher``)."""

    def __init__(self, data: bytes, gate: threading.Event | None = None) -> None:
        self.data, self.calls, self.gate = data, 0, gate
        self.lock = threading.Lock()

    def read(self, start: int, end: int) -> bytes:
        with self.lock:
            self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        return self.data[start:end]


@settings(max_examples=60)
@given(
    st.binary(min_size=1, max_size=5000),
    st.integers(1, 700),
    st.integers(1, 8),
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 2000)), max_size=20),
)
def test_any_read_equals_the_slice(
    data: bytes, block: int, budget_blocks: int, reads: list[tuple[int, int]]
) -> None:
    cache = BlockCache(block, block * budget_blocks, max_run_blocks=3)
    blob = CachedBlob("k", "v", len(data), BytesReader(data))
    for start, length in reads:
        start = min(start, len(data))
        end = min(start + length, len(data))
        assert cache.read(blob, start, end) == data[start:end]
    assert cache.used_bytes <= block * budget_blocks


def test_a_read_past_the_blob_is_corrupt_data() -> None:
    cache = BlockCache(16, 64)
    with pytest.raises(CorruptData):
        cache.read(CachedBlob("k", "v", 10, BytesReader(b"x" * 10)), 5, 11)


def test_two_readers_of_one_block_cause_one_fetch() -> None:
    gate = threading.Event()
    reader = BytesReader(bytes(range(256)) * 4, gate)
    cache = BlockCache(256, 4096)
    blob = CachedBlob("k", "v", 1024, reader)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.read(blob, 10, 20))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [reader.data[10:20]] * 4
    assert reader.calls == 1
    assert cache.stats.waits == 3


def test_consecutive_missing_blocks_are_fetched_in_runs() -> None:
    reader = BytesReader(b"z" * 10_000)
    cache = BlockCache(100, 100_000, max_run_blocks=4)
    cache.read(CachedBlob("k", "v", 10_000, reader), 0, 1000)  # 10 blocks -> runs of 4, 4, 2
    assert reader.calls == 3


def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    class Failing:
        calls = 0

        def read(self, start: int, end: int) -> bytes:
            Failing.calls += 1
            raise RemoteError("boom")

    cache = BlockCache(64, 640)
    blob = CachedBlob("k", "v", 640, Failing())
    for _ in range(2):
        with pytest.raises(RemoteError):
            cache.read(blob, 0, 10)
    assert Failing.calls == 2


def test_a_new_blob_version_never_serves_old_blocks() -> None:
    cache = BlockCache(64, 640)
    assert cache.read(CachedBlob("k", "v1", 64, BytesReader(b"a" * 64)), 0, 4) == b"aaaa"
    assert cache.read(CachedBlob("k", "v2", 64, BytesReader(b"b" * 64)), 0, 4) == b"bbbb"


def test_the_errno_table() -> None:
    assert to_errno(NotFound()) == errno.ENOENT
    assert to_errno(ReadOnly()) == errno.EROFS
    assert to_errno(NotPermitted()) == errno.EPERM
    assert to_errno(CorruptData()) == errno.EIO
    assert to_errno(RemoteError()) == errno.EIO
    assert to_errno(ValueError("bug")) == errno.EIO


def test_image_size_of_a_file_is_remembered_but_a_rewrite_is_parsed_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from blobfs.format.images import image_size_of_file
    from tests.support.sample import png_bytes

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(1, 20, 10))
    assert image_size_of_file(path, "a.png") == (20, 10)
    link = tmp_path / "batch-link.png"
    os.link(path, link)  # a batch's hard link: same file, same answer
    assert image_size_of_file(link, "a.png") == (20, 10)
    with open(path, "r+b") as f:  # rewritten in place: same inode, new bytes
        f.write(png_bytes(2, 7, 9))
        f.truncate()
    assert image_size_of_file(path, "a.png") == (7, 9)


def test_a_png_size_is_read_from_its_header_as_pillow_reads_it() -> None:
    from PIL import Image

    from blobfs.errors import InvalidInput
    from blobfs.format.images import image_size, png_size
    from tests.support.sample import png_bytes

    for seed, width, height in [(1, 36, 36), (2, 1, 1), (3, 640, 7), (4, 5, 480)]:
        data = png_bytes(seed, width, height)
        assert png_size(data[:33]) == Image.open(io.BytesIO(data)).size == (width, height)
        assert image_size(io.BytesIO(data), "a.png") == (width, height)
    data = png_bytes(5, 36, 36)
    torn = data[:20] + bytes([data[20] ^ 0xFF]) + data[21:]  # the IHDR's CRC no longer fits
    assert png_size(torn[:33]) is None  # Pillow decides, and refuses it
    with pytest.raises(InvalidInput):
        image_size(io.BytesIO(torn), "torn.png")
    assert png_size(data[:32]) is None and png_size(b"GIF89a" + data[6:33]) is None


@pytest.mark.parametrize(
    ("name", "size", "mtime"),
    [
        ("a.png", 0, 0),
        ("w_000001.png", 4096, 1_700_000_000),
        ("x" * 99, 8**11 - 1, 8**11 - 1),
        ("x" * 100, 5, 5),  # too long for the fast header: tarfile's
        ("été.png", 5, 5),  # not ASCII: tarfile's PAX header
        ("big.png", 8**11, 3),  # too large for 11 octal digits: tarfile's
    ],
)
def test_a_member_header_is_byte_for_byte_what_tarfile_writes(
    name: str, size: int, mtime: int
) -> None:
    import tarfile

    from blobfs.format.pack import member_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    assert member_header(name, size, mtime) == info.tobuf(
        tarfile.PAX_FORMAT, "utf-8", "surrogateescape"
    )


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_quick_entry_search_unpickles_one_entry_of_an_sdk_pickle(
    monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    """Batches as the SDK's own pickler writes them (memo references to the class and
    the keys, frames from protocol 4 on): a name is found by unpickling the batch's first
    entry and its own, never the batch, and agrees with the full parse."""
    import dataclasses
    import sys
    import types

    @dataclasses.dataclass
    class BlobImageInfo:
        name: str
        offset_start: int
        offset_end: int

    module = types.ModuleType(offsets.SDK_MODULE)
    BlobImageInfo.__module__ = offsets.SDK_MODULE
    BlobImageInfo.__qualname__ = offsets.SDK_CLASS
    module.BlobImageInfo = BlobImageInfo  # type: ignore[attr-defined]
    for part in ("supervisely", "supervisely.api"):
        monkeypatch.setitem(sys.modules, part, types.ModuleType(part))
    monkeypatch.setitem(sys.modules, offsets.SDK_MODULE, module)
    entries = [BlobImageInfo(f"{i:05d}.png", i * 700, i * 700 + 600) for i in range(6000)]
    # two batches, as the SDK appends them; the pickler's own APPENDS come per 1,000
    data = pickle.dumps(entries[:3000], protocol) + pickle.dumps(entries[3000:], protocol)
    parsed = {m.name: (m.start, m.end) for m in parse_offsets(data, "x").members}
    loads = _count_batches(monkeypatch)
    for i in (0, 1, 999, 1000, 2999, 3000, 3001, 4567, 5999):
        name = f"{i:05d}.png"
        assert offsets.find_entry([data], name) == (0, *parsed[name])
    assert max(loads) <= 2, loads


def test_a_pickle_cut_anywhere_is_refused_as_truncated() -> None:
    """Also where the cut falls right after a whole opcode: the unpickler then runs out
    of input exactly at the end of the stream, which must not pass for a clean end."""
    good = dumps_batch([BlobMember("never.png", 512, 600), BlobMember("b.png", 600, 700)])
    for cut in range(1, len(good)):
        with pytest.raises(offsets.OffsetsError):
            list(offsets.iter_raw_batches(io.BytesIO(good[:cut])))
    assert list(offsets.iter_raw_batches(io.BytesIO(good + good)))[1][1].offset_end == 700
