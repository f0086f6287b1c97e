"""A remote dataset's ``img/`` table against a dict reference model of its records.

The table made from an ``images.list`` must answer what a dict of one record per served
image answers: every lookup and miss, the listing (bytewise by name) with each entry's
size and mtime, the image ids the annotation walker follows, and the ``ann/`` records;
refused names (hostile, twice, bad ranges) are in neither.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from blobfs.cache.blocks import BlockCache
from blobfs.layout import name_problem
from blobfs.model import AnnRef, BlobRef, BytesRef, DatasetRecord, FileRecord, RemoteImageRef
from blobfs.sly.api import RemoteImage, SuperviselyApi
from blobfs.sources.compact import encode_name
from blobfs.sources.remote import RemoteImageTable, RemoteProjectSource, iso_to_ns

DATASET = DatasetRecord(("ds",), 9, 0)
STAMPS = [
    "2026-11-01T10:00:00.000Z",
    "2026-11-01T10:00:00.001Z",
    "2021-03-02T10:04:33.973Z",
    "",
    "9999-12-31T23:59:59.999Z",
    "0001-01-01T00:00:00.000Z",
]
BIG = 1 << 62


class _Client:
    requests = retried = 0

    def close(self) -> None:
        pass


def _source() -> RemoteProjectSource:
    return RemoteProjectSource(SuperviselyApi(_Client()), 1, BlockCache(1 << 20))  # type: ignore[arg-type]


names = st.one_of(
    st.sampled_from(["a.png", "b.png", "a", "a.b", "..", ".", "", "x/y", "é.jpg", "\ud800"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=6),
    st.text(alphabet="ab", min_size=300, max_size=300),
)
images = st.builds(
    lambda id_, name, size, stamp, digest, rel, dl, start, length: RemoteImage(
        id_,
        name,
        size,
        STAMPS[stamp],
        digest,
        rel,
        dl,
        start,
        None if start is None or length is None else start + length,
    ),
    st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([BIG - 1, BIG, -BIG - 1, 2**70])),
    names,
    st.one_of(st.integers(0, 2**33), st.sampled_from([BIG, -1])),
    st.integers(0, len(STAMPS) - 1),
    st.one_of(st.none(), st.text(max_size=5)),
    st.one_of(st.none(), st.sampled_from([5, 6, 2**40])),
    st.one_of(st.none(), st.sampled_from(["", "dl5", "dl\ud800"])),
    st.one_of(st.none(), st.integers(-3, 2**34), st.just(BIG - 2)),
    st.one_of(st.none(), st.integers(-3, 2**20)),
)


def _reference(listed: list[RemoteImage]) -> dict[str, FileRecord]:
    """What the dict-of-records listing served: one record per image whose name is good
    and unique and whose blob range is well-formed."""
    counts = Counter(img.name for img in listed)
    out: dict[str, FileRecord] = {}
    for img in listed:
        if name_problem(img.name) or counts[img.name] > 1:
            continue
        ranged = (img.offset_end,) if img.in_blob else ()  # a plain image has no range
        if not all(v is None or -BIG <= v < BIG for v in (img.id, img.size, *ranged)):
            continue
        mtime = iso_to_ns(img.updated_at)
        mtime = mtime if -BIG <= mtime < BIG else 0
        ref: RemoteImageRef
        if img.in_blob:
            start, end = img.offset_start, img.offset_end
            if start is None or end is None or start < 0 or end < start:
                continue
            member = BlobRef(f"tf{img.related_data_id}", "", start, end)
            ref = RemoteImageRef(
                img.id, end - start, "", member, img.related_data_id, img.download_id
            )
        else:
            ref = RemoteImageRef(img.id, img.size, img.hash or img.updated_at)
        out[img.name] = FileRecord(f"img/{img.name}", ref.size, mtime, ref)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(images, max_size=60))
@example([RemoteImage(1, "a.png", 3, STAMPS[0], "h", None, None, None, None)])
@example(  # a plain image's offsets are not a range: whatever they say, it is served
    [RemoteImage(0, "a.png", 0, STAMPS[0], None, None, None, BIG - 2, BIG)]
)
@example(  # values a column cannot hold: refused (ids, sizes) or taken as 0 (times)
    [
        RemoteImage(0, "a.png", 3, STAMPS[4], "h", None, None, None, None),
        RemoteImage(2**70, "b.png", 3, STAMPS[5], "h", None, None, None, None),
        RemoteImage(2, "c.png", 2**70, STAMPS[0], "h", None, None, None, None),
    ]
)
def test_table_answers_as_the_reference_dict(listed: list[RemoteImage]) -> None:
    source = _source()
    try:
        table = source._served_images(DATASET, listed)
        want = _reference(listed)
        assert isinstance(table, RemoteImageTable)
        assert len(table) == len(want)
        order = sorted(want, key=encode_name)
        assert list(table) == order
        for name, rec in want.items():
            assert name in table
            assert table[name] == rec
            assert table.get(name) == rec
        for img in listed:
            if img.name not in want:
                assert table.get(img.name) is None
                assert img.name not in table
        assert table.get("not there") is None or "not there" in want
        # the listing's runs: names, sizes and mtimes in order
        got = []
        for run_names, src, sizes in table.runs_from(0):
            got += [
                (n.decode(), size, src.mtime_ns) for n, size in zip(run_names, sizes, strict=True)
            ]
        assert got == [(n, want[n].size, want[n].mtime_ns) for n in order]
        assert list(table.entries_from(0)) == got
        # what the annotation walker follows, and the ann/ records
        assert list(source._order[9]) == [want[n].ref.image_id for n in order]  # type: ignore[union-attr]
        anns = source._ann_records(DATASET, table)
        assert [(a.relpath, a.mtime_ns, a.ref) for a in anns] == [
            (f"ann/{n}.json", want[n].mtime_ns, AnnRef(9, want[n].ref.image_id, at))  # type: ignore[union-attr]
            for at, n in enumerate(order)
        ]
        # ann/: entries whose annotation is stored hold it, the others are sized on lookup
        stored = {want[n].ref.image_id: b"{}" * (at % 3) for at, n in enumerate(order) if at % 2}  # type: ignore[union-attr]
        for image_id, data in stored.items():
            source.anns._anns.put(image_id, data)
        source.api.annotations = lambda dataset_id, ids: {}  # type: ignore[method-assign]
        ann_table = source._ann_entries(DATASET, table)
        ann_want = {
            f"{a.relpath[4:]}": a
            if not isinstance(a.ref, AnnRef) or a.ref.image_id not in stored
            else FileRecord(
                a.relpath, len(stored[a.ref.image_id]), a.mtime_ns, BytesRef(stored[a.ref.image_id])
            )
            for a in anns
        }
        assert len(ann_table) == len(ann_want)
        assert list(ann_table) == sorted(ann_want, key=encode_name)
        assert dict(ann_table.items()) == ann_want
        for name, rec in ann_want.items():
            assert ann_table.get(name) == rec
        listed_sizes = {n: size for n, size, _ in ann_table.entries_from(0)}
        assert listed_sizes == {n: r.size for n, r in ann_want.items()}
        for rel in {f"img/{img.name}" for img in listed if img.name not in want}:
            assert source.refused(DATASET.path, rel) is not None
    finally:
        source.close()


def test_blob_images_store_no_string_per_image() -> None:
    """A dataset of blob images keeps names and integer columns only."""
    listed = [
        RemoteImage(
            100 + i, f"{i:05d}.png", 0, STAMPS[i % 2], "h" * 44, 5, "dl5", 10 * i, 10 * i + 7
        )
        for i in range(2000)
    ]
    source = _source()
    try:
        table = source._served_images(DATASET, listed)
        assert table.versions == b""
        assert all(c.values is None for k, c in table.extra.items() if k in ("vat", "vlen"))
        rec: Any = table["01999.png"]
        assert rec.ref.blob == BlobRef("tf5", "", 19990, 19997) and rec.ref.download_id == "dl5"
        assert table.nbytes < 2000 * 30  # names of 10 bytes, the rest a few bytes each
    finally:
        source.close()
