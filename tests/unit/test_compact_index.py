"""The compact folder index against a dict of records, its on-disk form, and its cache.

A :class:`FileTable` must answer exactly what a ``dict`` of the same records answers:
every lookup, every miss, the listing order (bytewise by UTF-8 name) and every page of
it; and bytes read back from a cache file are trusted only when every promise holds.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blobfs.cache.index_store import IndexStore
from blobfs.errors import CorruptData
from blobfs.model import BlobRef, FileRecord, LocalFileRef
from blobfs.sources.compact import (
    BLOB,
    FOLDER,
    EntrySource,
    FileTable,
    TableBuilder,
    _Column,
    encode_name,
    sorted_table,
    table_of,
)
from blobfs.sources.project_dir import _Entries

BLOBS = [EntrySource(BLOB, f"blob{i}", f"v{i}", 1_700_000_000_000_000_000 + i) for i in range(3)]


def _valid(name: str) -> bool:
    raw = encode_name(name)
    return name not in ("", ".", "..") and len(raw) <= 255 and b"/" not in raw and b"\0" not in raw


# names as a directory scan yields them: any bytes but '/' and NUL, undecodable bytes
# carried as surrogates; plus plain text with non-ASCII letters and 255-byte names
scanned = st.binary(min_size=1, max_size=64).map(lambda b: b.decode("utf-8", "surrogateescape"))
texts = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=85
)
long_names = st.integers(1, 255).map(lambda n: "x" * n)
names = st.one_of(scanned, texts, long_names).filter(_valid)
entries = st.dictionaries(
    names,
    st.tuples(st.integers(0, 2), st.integers(0, 2**40), st.integers(0, 2**31)),
    max_size=120,
)


def model_record(name: str, src: int, start: int, size: int) -> FileRecord:
    blob = BLOBS[src]
    return FileRecord(
        f"img/{name}", size, blob.mtime_ns, BlobRef(blob.key, blob.version, start, start + size)
    )


def build(model: dict[str, tuple[int, int, int]]) -> FileTable:
    return table_of("img/", ((n, BLOBS[s], a, z) for n, (s, a, z) in model.items()))


@settings(max_examples=150, deadline=None)
@given(entries, st.lists(names, max_size=20))
@example({"b.png": (0, 512, 10), "a.png": (1, 0, 0), "é.png": (2, 2**40, 7)}, ["c.png", "a"])
def test_a_table_answers_like_a_dict(
    model: dict[str, tuple[int, int, int]], others: list[str]
) -> None:
    table = build(model)
    for candidate in (build(model), FileTable.from_bytes(table.to_bytes())):
        assert len(candidate) == len(model)
        order = sorted(model, key=encode_name)
        assert list(candidate) == order  # bytewise by UTF-8, what binary search needs
        for name, (src, start, size) in model.items():
            assert candidate.get(name) == model_record(name, src, start, size)
            assert name in candidate
        for other in others:
            if other not in model:
                assert candidate.get(other) is None and other not in candidate
                with pytest.raises(KeyError):
                    candidate[other]
        assert dict(candidate.items()) == {n: model_record(n, *v) for n, v in model.items()}
        for k in (0, 1, len(order) // 2, len(order)):
            page = list(candidate.entries_from(k))
            assert [n for n, _, _ in page] == order[k:]
            assert [s for _, s, _ in page] == [model[n][2] for n in order[k:]]


@settings(max_examples=150, deadline=None)
@given(entries)
@example({"a.png": (0, 512, 10), "b.png": (0, 1024, 10), "c.png": (0, 2048, 10)})
@example({"a": (1, 5, 5), "é": (2, 0, 0)})
def test_a_sorted_table_is_the_table_a_builder_makes(
    model: dict[str, tuple[int, int, int]],
) -> None:
    """Names already in order and ASCII make their table without a builder, byte for
    byte the builder's; any other names are left to the builder (None)."""
    for order in (sorted(model), sorted(model, reverse=True)):
        src, start, size = ([model[n][k] for n in order] for k in range(3))
        columns = (src, start, size)
        quick = sorted_table("img/", BLOBS, order, columns)
        if not (order and order == sorted(order) and all(n.isascii() for n in order)):
            assert quick is None
            continue
        assert quick is not None
        builder = TableBuilder("img/")
        for source in BLOBS:
            builder.source(source)
        builder.add_many([encode_name(n) for n in order], *columns)
        assert quick.to_bytes() == builder.build()[0].to_bytes()
        assert list(quick) == order and quick.get(order[0]) == model_record(
            order[0], *model[order[0]]
        )


def flat_runs(table: FileTable, start: int) -> list[tuple[bytes, EntrySource, int]]:
    """Every entry of ``table.runs_from(start)``; each run must hold one source only."""
    out: list[tuple[bytes, EntrySource, int]] = []
    for names, source, sizes in table.runs_from(start):
        assert len(names) == len(sizes) > 0
        out.extend((n, source, z) for n, z in zip(names, sizes, strict=True))
    return out


@settings(max_examples=100, deadline=None)
@given(entries, st.integers(0, 130))
def test_runs_list_the_same_entries_as_the_records(
    model: dict[str, tuple[int, int, int]], start: int
) -> None:
    """The listing's hot path (runs of one source, names as stored) says exactly what
    the records say, from any entry on."""
    table = build(model)
    order = sorted(model, key=encode_name)[start:]
    assert flat_runs(table, start) == [
        (encode_name(n), BLOBS[model[n][0]], model[n][2]) for n in order
    ]


def test_runs_split_where_the_source_changes_and_page_the_rest() -> None:
    """Thousands of entries whose source changes every 700, read from every kind of start."""
    model = {f"n{i:05d}": ((i // 700) % 3, i * 1024, i % 500) for i in range(5000)}
    table = build(model)
    order = sorted(model)
    for start in (0, 1, 255, 256, 699, 700, 4999, 5000, 6000):
        got = flat_runs(table, start)
        assert [n.decode() for n, _, _ in got] == order[start:]
        assert [(s, z) for _, s, z in got] == [
            (BLOBS[model[n][0]], model[n][2]) for n in order[start:]
        ]
    # one source and one size for all: the columns are constants
    same = build({f"n{i:05d}": (1, 0, 42) for i in range(600)})
    assert flat_runs(same, 0) == [(f"n{i:05d}".encode(), BLOBS[1], 42) for i in range(600)]


def test_lookups_hit_every_block_edge() -> None:
    """Names at, before and after each bisect sample point (one in 32 entries)."""
    model = {f"n{i:05d}": (0, i * 1024, i) for i in range(1000)}
    table = build(model)
    for i in range(1000):
        assert table.index_of(f"n{i:05d}") == i
        assert table.index_of(f"n{i:05d}x") == -1  # a longer name sorts just after
        assert table.index_of(f"n{i:04d}") == -1  # a prefix of ten entries
    assert table.index_of("") == -1 and table.index_of("a") == -1 and table.index_of("z") == -1
    assert table.get("\ud800") is None  # not encodable: no file has that name


def test_names_added_twice_are_left_out_both() -> None:
    builder = TableBuilder("img/")
    src = builder.source(BLOBS[0])
    for name, start in (("a", 0), ("b", 10), ("a", 20), ("c", 30)):
        builder.add(encode_name(name), src, start, 5)
    table, duplicates = builder.build()
    assert list(table) == ["b", "c"] and duplicates == ["a"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "é", "x" * 255, "\udcff", "a.json"]), max_size=12))
def test_an_ordinary_folder_is_sorted_by_name_and_repeats_left_out(listed: list[str]) -> None:
    """Entries with a name only (a folder's files, in directory order) are sorted as
    their encoded bytes, and a name listed twice is left out (both), as any table's."""
    folder = EntrySource(FOLDER, "/f")
    builder = TableBuilder("ann/")
    builder.add_names([encode_name(n) for n in listed], builder.source(folder))
    table, duplicates = builder.build()
    once = [n for n in set(listed) if listed.count(n) == 1]
    assert list(table) == sorted(once, key=encode_name)
    assert duplicates == sorted(n for n in set(listed) if listed.count(n) > 1)
    assert [table.index_of(n) for n in list(table)] == list(range(len(table)))


def test_columns_take_the_narrowest_type() -> None:
    """A 250,000-entry folder of small images in three blobs costs a few bytes per entry
    beyond its names (the figure that keeps a million images within a budget)."""
    n = 250_000
    table = table_of(
        "img/",
        (
            (f"small-image-{i:07d}.png", BLOBS[i * 3 // n], 512 + i * 1024, 200 + i % 400)
            for i in range(n)
        ),
    )
    names = sum(len(f"small-image-{i:07d}.png") + 1 for i in range(n))
    # offset 4 + source 1 + start 4 + size 2, and one name in 32 as an object to bisect
    assert table.nbytes - names <= 14 * n


def test_folder_entries_are_stat_ed_when_looked_up(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    (tmp_path / "b.json").write_bytes(b"[1, 2]")
    folder = EntrySource(FOLDER, str(tmp_path))
    table = table_of("ann/", ((n, folder, 0, 0) for n in ("a.json", "b.json", "gone.json")))
    rec = table.get("b.json")
    assert rec == FileRecord(
        "ann/b.json",
        6,
        (tmp_path / "b.json").stat().st_mtime_ns,
        LocalFileRef(str(tmp_path / "b.json")),
    )
    assert table.get("gone.json") is None  # listed once, removed since
    assert [s for _, s, _ in table.entries_from(0)] == [None, None, None]  # no I/O to list
    (tmp_path / "a.json").unlink()
    (tmp_path / "a.json").symlink_to(tmp_path / "b.json")
    assert table.get("a.json") is None  # only regular files, never through a symlink


def _payload() -> bytes:
    return build({"a.png": (0, 512, 10), "b.png": (1, 1024, 20), "c.png": (2, 0, 0)}).to_bytes()


def _mutate(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1 :]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_bytes_are_refused_or_stay_well_formed(data: st.DataObject) -> None:
    """Any one changed byte gives ValueError at load, or CorruptData at the first
    listing, or a table whose promises hold; lookups made before the listing found only
    entries the listing then shows under the same name."""
    raw = _payload()
    at = data.draw(st.integers(0, len(raw) - 1))
    value = data.draw(st.integers(0, 255))
    try:
        table = FileTable.from_bytes(_mutate(raw, at, value))
    except ValueError:
        return
    asked = {n: table.index_of(n) for n in ("a.png", "b.png", "c.png", "a.pn", "d.png")}
    try:
        names = list(table)
    except CorruptData:
        return
    assert names == sorted(set(names), key=encode_name)
    for i, name in enumerate(names):
        assert table.index_of(name) == i and table.get(name) is not None
    for name, i in asked.items():
        assert i == (names.index(name) if name in names else -1)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # names cut short
        lambda b: b + b"x\0",  # one name too many
        lambda b: b.replace(b"BLOBFSCT", b"BLOBFSXX"),
        lambda b: b.replace(b'"byteorder": "little"', b'"byteorder": "big!!!"'),
        lambda b: b.replace(b'"sampled": "I"', b'"sampled": "d"'),
        lambda b: b"",
    ],
)
def test_a_malformed_table_is_refused_at_load(damage: object) -> None:
    assert callable(damage)
    with pytest.raises(ValueError):
        FileTable.from_bytes(damage(_payload()))


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b.replace(b"b.png\0", b"a.png\0"),  # a duplicate
        lambda b: b.replace(b"c.png\0", b"a.pn/\0"),  # unsorted, and a slash
        lambda b: b.replace(b"b.png\0", b"..\0").replace(b'"names": 18', b'"names": 15'),
    ],
)
def test_names_that_break_a_promise_fail_the_first_listing_and_report_once(
    damage: Callable[[bytes], bytes],
) -> None:
    """What needs every name visited is checked at the first listing, not at load (a
    ``stat`` right after a mount must not wait for it); the damage is reported once."""
    table = FileTable.from_bytes(damage(_payload()))
    reports: list[str] = []
    table.on_damaged = reports.append
    assert table.index_of("a.png") == 0  # found by its exact name
    for _ in range(2):
        with pytest.raises(CorruptData):
            list(table)
    assert len(reports) == 1


@pytest.mark.parametrize("odd", [b".", b".."])
def test_a_dot_name_in_sorted_place_is_refused_from_disk(odd: bytes) -> None:
    """'.' and '..' sort before every ordinary name: in that place the names are in
    order and distinct, and still no listing may serve them."""
    shorter = 5 - len(odd)
    bad = FileTable.from_bytes(
        _payload()
        .replace(b"a.png\0", odd + b"\0")
        .replace(b'"names": 18', f'"names": {18 - shorter}'.encode())
    )
    with pytest.raises(CorruptData):
        list(bad)


def test_a_name_longer_than_name_max_is_refused_from_disk() -> None:
    ok = table_of("img/", [("x" * 255, BLOBS[0], 0, 1)]).to_bytes()
    FileTable.from_bytes(ok)
    bad = FileTable.from_bytes(
        ok.replace(b"x" * 255 + b"\0", b"x" * 256 + b"\0").replace(b'"names": 256', b'"names": 257')
    )
    with pytest.raises(CorruptData):
        list(bad)


def test_a_trusted_table_lists_the_same_without_the_check_of_every_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes the index cache proves blobfs wrote are loaded ``trusted``: the listing and
    every lookup are those of the table written, and no name is checked again; the
    structural checks still refuse bytes whose sizes do not add up."""
    from blobfs.sources import compact

    table = build({f"{i:05d}.png": (i % 3, i * 1024, 10) for i in range(1000)})
    data = table.to_bytes()

    def no_check(names: bytes, count: int) -> Any:
        raise AssertionError("a trusted table's names were checked")

    monkeypatch.setattr(compact, "_check_names", no_check)
    loaded = FileTable.from_bytes(data, trusted=True)
    assert loaded._starts is not None  # stored: not even found again
    assert list(loaded.items()) == list(table.items())
    assert [loaded.index_of(n) for n in table] == list(range(1000))
    with pytest.raises(ValueError):
        FileTable.from_bytes(data[:-1], trusted=True)
    names_at = len(data) - len(table._names)
    for at in (names_at - 4 * 1001, names_at - 4, names_at - 4 * 1001 + 4 * 32):
        with pytest.raises(ValueError):  # a stored start off the sampled ones, or the end
            FileTable.from_bytes(_mutate(data, at, data[at] ^ 1), trusted=True)
    with pytest.raises(AssertionError):
        list(FileTable.from_bytes(data))  # untrusted: checked


def test_a_loaded_table_answers_a_lookup_before_any_name_is_checked() -> None:
    """A lookup right after load reads only the sampled starts: the whole-table check
    (and the start of every name) is left for the first listing."""
    table = build({f"{i:05d}.png": (0, i * 1024, 10) for i in range(1000)})
    loaded = FileTable.from_bytes(table.to_bytes())
    assert loaded._starts is None
    for i in (0, 1, 31, 32, 33, 999):
        assert loaded.index_of(f"{i:05d}.png") == i
    assert loaded.index_of("00999.pn") == -1 and loaded.index_of("1000.png") == -1
    assert loaded._starts is None
    assert list(loaded) == list(table) and loaded._starts is not None


# ---- the store -----------------------------------------------------------------------


def test_the_store_returns_a_payload_only_for_its_key(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "idx")
    assert stat.S_IMODE((tmp_path / "idx").stat().st_mode) == 0o700
    store.save("/p/ds", b"key-1", b"payload")
    assert store.load("/p/ds", b"key-1") == b"payload"
    assert store.load("/p/ds", b"key-2") is None  # the input changed: rebuild
    assert store.load("/p/other", b"key-1") is None
    (file,) = (tmp_path / "idx").glob("*.idx")
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert IndexStore(tmp_path / "idx").load("/p/ds", b"key-1") == b"payload"  # next mount


def test_a_damaged_or_foreign_cache_file_is_a_miss(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "idx")
    store.save("/p/ds", b"key", b"payload" * 100)
    (file,) = (tmp_path / "idx").glob("*.idx")
    raw = file.read_bytes()
    for at in (0, 9, 30, len(raw) // 2, len(raw) - 1):
        file.write_bytes(_mutate(raw, at, raw[at] ^ 0x40))
        assert store.load("/p/ds", b"key") is None
    file.write_bytes(raw[:-5])
    assert store.load("/p/ds", b"key") is None
    file.unlink()
    outside = tmp_path / "outside"
    outside.write_bytes(raw)
    file.symlink_to(outside)
    assert store.load("/p/ds", b"key") is None  # never through a symlink


def test_a_file_the_store_wrote_is_trusted_and_one_without_its_mac_is_not(
    tmp_path: Path,
) -> None:
    """The MAC under the folder's secret proves blobfs wrote a file: trusted. The same
    payload with a checksum that holds but no MAC (a forger has no secret) is loaded
    untrusted (its reader checks every name); a flipped byte anywhere is a miss."""
    from blobfs.cache import index_store

    store = IndexStore(tmp_path / "idx")
    store.save("/p/ds", b"key", b"payload" * 100)
    assert store.load_checked("/p/ds", b"key") == (b"payload" * 100, True)
    (file,) = (tmp_path / "idx").glob("*.idx")
    raw = file.read_bytes()
    _, key_len, payload_len, mac_len = index_store._HEAD.unpack_from(raw)
    assert mac_len == 32
    for at in (0, 9, 30, 40, len(raw) // 2, len(raw) - 40, len(raw) - 1):
        file.write_bytes(_mutate(raw, at, raw[at] ^ 0x01))
        assert store.load_checked("/p/ds", b"key") is None
    head = index_store._HEAD.pack(index_store.MAGIC, key_len, payload_len, 0)
    payload = b"payload" * 100
    forged = head + b"key" + payload + index_store._digest(b"key", payload)
    file.write_bytes(forged)
    assert store.load_checked("/p/ds", b"key") == (b"payload" * 100, False)
    file.write_bytes(forged[:-1] + bytes([forged[-1] ^ 1]))  # its checksum fails
    assert store.load_checked("/p/ds", b"key") is None


def test_the_stores_secret_is_private_made_once_and_replaced_when_unusable(
    tmp_path: Path,
) -> None:
    """The secret is a 0600 file of 32 random bytes, kept across opens; a short, foreign
    or symlinked one is replaced, which turns the files of the old one into misses."""
    folder = tmp_path / "idx"
    store = IndexStore(folder)
    secret = folder / "key"
    first = secret.read_bytes()
    assert len(first) == 32 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    store.save("/p/ds", b"key", b"payload")
    assert IndexStore(folder).load_checked("/p/ds", b"key") == (b"payload", True)
    assert secret.read_bytes() == first
    spoilers: list[Callable[[], None]] = [
        lambda: secret.write_bytes(first[:-1]),  # short
        lambda: secret.chmod(0o644),  # others may read it
        lambda: (secret.unlink(), secret.symlink_to(tmp_path / "elsewhere")),  # type: ignore[func-returns-value]
        secret.unlink,  # missing
    ]
    (tmp_path / "elsewhere").write_bytes(first)
    for spoil in spoilers:
        IndexStore(folder).save("/p/ds", b"key", b"payload")
        before = secret.read_bytes()
        spoil()
        again = IndexStore(folder)
        assert not secret.is_symlink() and stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert len(secret.read_bytes()) == 32 and secret.read_bytes() != before
        assert again.load_checked("/p/ds", b"key") is None  # made under the old secret


def test_a_folder_others_can_write_is_not_used(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    folder.chmod(0o777)
    store = IndexStore(folder)
    store.save("/p/ds", b"key", b"payload")
    assert not store.usable and list(folder.iterdir()) == []
    assert store.load("/p/ds", b"key") is None


def test_files_unused_for_a_month_are_pruned(tmp_path: Path) -> None:
    store = IndexStore(tmp_path / "idx")
    store.save("/old", b"k", b"p")
    store.save("/new", b"k", b"p")
    old = store._path("/old")
    month_ago = time.time() - 31 * 24 * 3600
    os.utime(old, (month_ago, month_ago))
    IndexStore(tmp_path / "idx")
    assert not old.exists() and store._path("/new").exists()


spans = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(["s0", "s1"]),
        st.integers(0, 40),
        st.integers(0, 10),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(spans)
@example([("a", "s0", 0, 5), ("b", "s0", 5, 5), ("c", "s0", 10, 0), ("d", "s0", 10, 3)])
@example([("a", "s0", 0, 5), ("b", "s0", 4, 3)])  # in order, but the second starts early
@example([("a", "s0", 0, 10), ("b", "s0", 5, 0), ("c", "s0", 10, 2)])  # an empty one inside
def test_the_bulk_conflict_check_agrees_with_the_entry_by_entry_one(
    entries_: list[tuple[str, str, int, int]],
) -> None:
    """A listing skips the entry-by-entry conflict search when the bulk check finds no
    repeated name and no overlap within a blob: it must never miss one (checked against
    every pair)."""
    from blobfs.format.offsets import conflicting
    from blobfs.model import BlobMember

    found = [(BlobMember(n, a, a + z), stem, "x") for n, stem, a, z in entries_]
    by_stem: dict[str, list[int]] = {}
    for i, (_, stem, _) in enumerate(found):
        by_stem.setdefault(stem, []).append(i)
    members = [m for m, _, _ in found]
    clean = not conflicting(members, check_overlaps=False) and not any(
        conflicting([members[i] for i in idxs]) for idxs in by_stem.values()
    )
    pairs = [(i, j) for i in range(len(found)) for j in range(i + 1, len(found))]
    repeated = any(members[i].name == members[j].name for i, j in pairs)
    overlapping = any(
        found[i][1] == found[j][1]
        and members[i].size > 0
        and members[j].size > 0
        and members[i].start < members[j].end
        and members[j].start < members[i].end
        for i, j in pairs
    )
    assert clean == (not repeated and not overlapping)
    # the listing's own check, on the columns of the same entries
    entries = _Entries.of([(m, stem) for m, stem, _ in found])
    assert entries.members() == members and entries.per_entry(["x"] * len(entries.runs)) == [
        "x"
    ] * len(members)
    assert entries.in_doubt() == (repeated or overlapping)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), max_size=20), st.integers(0, 2**34))
@example([70_000, 70_100], 0)  # fits 4 bytes as they are, 1 byte shifted
@example([200, 300], 0)  # fits 2 bytes as they are and shifted: stored as they are
def test_a_column_reads_back_every_value_in_the_narrowest_type(
    values: list[int], offset: int
) -> None:
    """A column stores its values in the narrowest type their span needs, shifted by their
    minimum only when the values do not fit that type as they are."""
    values = [v + offset for v in values]
    column = _Column.of(values)
    assert [column[i] for i in range(len(values))] == values
    if values and min(values) != max(values):
        span = max(values) - min(values)
        assert column.values is not None
        assert column.values.itemsize == min(s for s in (1, 2, 4, 8) if span < 1 << (8 * s))
        assert list(column.slice(0, len(values))) == values
