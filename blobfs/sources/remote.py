"""A project on a Supervisely instance, read through the REST API and ranged blob reads.

Listings (datasets, images) are fetched lazily per dataset (pages at once after the first)
and refreshed by the view after its TTL. Image bytes are ranges of their blob, fetched
through the shared block cache as the read pattern says (:mod:`blobfs.sources.remote_io`:
a random read fetches just its image, a walk grows a readahead window); plain (non-blob)
images are whole objects through the same cache. Annotation JSON is fetched in batches of
the SDK's size (``ANN_BATCH``): all of a dataset's at once when its ``ann/`` is first
listed or looked up, so the listing carries every file's size, or read ahead of a reader
walking ``ann/`` (:mod:`blobfs.sources.remote_anns`), and converted from the server's
subpixel coordinates to pixel coordinates exactly as the SDK's downloads do
(:mod:`blobfs.format.ann_coords`), so ``ann/*.json`` equals what ``sly.download`` writes.
``--prefetch`` warms all of it in the background.

Everything the server says is untrusted: names are validated like offsets entries, a
name that appears twice in a dataset is not served, a blob range outside its blob fails
with EIO on read, and implausible page counts are refused.
"""

from __future__ import annotations

import json
import logging
import operator
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from typing import Any, Protocol, assert_never

from blobfs import deadline
from blobfs.cache.blocks import BlockCache, CachedBlob, ReadPattern
from blobfs.errors import (
    AuthError,
    BlobfsError,
    NotFound,
    RemoteError,
)
from blobfs.layout import name_problem, names_fit
from blobfs.model import (
    AnnRef,
    BlobRef,
    BytesRef,
    DatasetRecord,
    FileRecord,
    LocalFileRef,
    RemoteImageRef,
)
from blobfs.problems import show
from blobfs.sly.api import RemoteDataset, RemoteImage, SuperviselyApi
from blobfs.sources.base import FolderEntries, FolderLoaders, Source
from blobfs.sources.compact import (
    BLOB,
    FOLDER,
    MTIME,
    EntrySource,
    FileTable,
    TableBuilder,
    building,
)
from blobfs.sources.readers import BytesReader, FailingReader, SliceReader
from blobfs.sources.remote_anns import AnnotationCache
from blobfs.sources.remote_io import DemandGate, PatternReader
from blobfs.transport.base import RangeReader

logger = logging.getLogger(__name__)

READAHEAD_MAX_BYTES = 32 << 20
#: Annotations one ``ann/`` listing fetches, at most; the rest are sized when looked up.
LISTING_ANNS_MAX = 100_000
#: Annotation JSON one ``ann/`` listing keeps in its entries, at most (beyond it, entries
#: are sized on lookup from the annotation cache, which may evict).
LISTING_ANN_BYTES = 128 << 20
#: Longest an ``ann/`` listing waits for its annotations (half the operation's time left
#: when that is less): a slow server gives a listing without some sizes, not a timeout.
LISTING_ANNS_WAIT_S = 10.0
#: A ``datasets.list`` answer sent ahead by :meth:`RemoteProjectSource.meta_json` is used
#: only this soon after it was asked for (a later listing asks again).
AHEAD_FRESH_S = 5.0


def iso_to_ns(text: str) -> int:
    """``2021-03-02T10:04:33.973Z`` -> ns since the epoch (0 when absent or odd)."""
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except (ValueError, TypeError):
        return 0


class Warming(Protocol):
    """What the source needs of ``--prefetch`` (:mod:`blobfs.sources.prefetch`, a layer
    above it): its progress for ``blobfs stats``, and a way to stop it at unmount."""

    def progress(self) -> dict[str, object]:
        """Counts so far (datasets, annotations, blob bytes) and the state."""
        ...

    def stop(self) -> None:
        """Ask the background walk to end; it stops at its next step."""
        ...


class RemoteProjectSource(Source):
    """One remote project; see the module docstring for what is fetched when."""

    def __init__(
        self,
        api: SuperviselyApi,
        project_id: int,
        cache: BlockCache,
        readahead: ReadPattern | None = None,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__(logger)
        self.api = api
        self.project_id = project_id
        self.cache = cache
        self.readahead = readahead
        #: Where a blob whose server ignores Range is downloaded whole (None: the temp dir).
        self.spill_dir = spill_dir
        self.gate = DemandGate()
        self.prefetcher: Warming | None = None
        self._blobs: dict[int, CachedBlob | str] = {}
        self._images: dict[int, CachedBlob] = {}
        self.anns = AnnotationCache(api)
        self._order: dict[int, array[int]] = {}
        self._refused: dict[tuple[str, ...], dict[str, str]] = {}
        self._side = ThreadPoolExecutor(1, thread_name_prefix="blobfs-ahead")
        #: (when, answer) of the ``datasets.list`` that :meth:`meta_json` sent ahead
        self._datasets_ahead: tuple[float, Future[list[RemoteDataset]]] | None = None
        #: dataset id -> its image count as ``datasets.list`` last gave it (a paging hint)
        self._counts: dict[int, int | None] = {}
        self._lock = threading.Lock()

    def is_immutable(self) -> bool:
        return False

    def meta_json(self) -> bytes | None:
        """The project meta; ``datasets.list`` goes out meanwhile, as the root listing asks
        for both one after the other (one round trip instead of two)."""
        left = deadline.remaining()
        until = None if left is None else time.monotonic() + left
        asked = self._side.submit(self._list_datasets, until)
        with self._lock:
            old, self._datasets_ahead = self._datasets_ahead, (time.monotonic(), asked)
        if old is not None:
            old[1].cancel()
        return json.dumps(self.api.project_meta(self.project_id)).encode()

    def _list_datasets(self, until: float | None) -> list[RemoteDataset]:
        """``datasets.list`` in the side thread, by the deadline of the listing that asked."""
        with deadline.within(None if until is None else max(until - time.monotonic(), 1e-3)):
            return self.api.datasets(self.project_id)

    def datasets(self) -> Sequence[DatasetRecord]:
        with self._lock:
            ahead, self._datasets_ahead = self._datasets_ahead, None
        remote: list[RemoteDataset] | None = None
        if ahead is not None and time.monotonic() - ahead[0] < AHEAD_FRESH_S:
            left = deadline.remaining()
            try:
                remote = ahead[1].result(None if left is None else max(left, 0.0))
            except FutureTimeout:
                raise deadline.expired("datasets.list") from None
            except (BlobfsError, CancelledError) as exc:
                logger.debug("datasets.list sent ahead failed (asked again): %s", exc)
        if remote is None:  # not asked ahead, failed, or so long ago it may be stale
            remote = self.api.datasets(self.project_id)
        with self._lock:
            self._counts = {d.id: d.images_count for d in remote}
        with self._problems.listing("datasets"):
            return self._datasets(remote)

    def _datasets(self, remote: Sequence[RemoteDataset]) -> list[DatasetRecord]:
        by_id = {d.id: d for d in remote}
        out: list[DatasetRecord] = []
        for d in remote:
            path: list[str] = []
            node: RemoteDataset | None = d
            seen: set[int] = set()
            while node is not None and node.id not in seen:
                seen.add(node.id)
                path.append(node.name)
                node = by_id.get(node.parent_id) if node.parent_id is not None else None
            bad = next((name_problem(n) for n in path if name_problem(n)), None)
            if node is not None or bad:
                self._problems.add(
                    f"project {self.project_id}",
                    f"dataset not served: {bad or 'parent chain loops'}",
                    f"{d.id} {show(d.name)}",
                )
                continue
            out.append(DatasetRecord(tuple(reversed(path)), d.id, iso_to_ns(d.updated_at)))
        return out

    def files(self, dataset: DatasetRecord) -> Sequence[FileRecord]:
        table = self._served(dataset)
        records: list[FileRecord] = []
        for rec, ann in zip(table.values(), self._ann_records(dataset, table), strict=True):
            records += (rec, ann)
        return records

    def _served(self, dataset: DatasetRecord) -> RemoteImageTable:
        """The ``img/`` table of a dataset, from one pass over ``images.list``.

        The parsed image list is dropped once the table is made: the table holds what a
        record needs (see :class:`RemoteImageTable`), and the annotation walker keeps the
        image ids alone (``_order``). Its per-image cost is most of a first ``ls`` of a
        large remote folder.
        """
        with building():  # many objects, no cycles: no collection meanwhile
            return self._served_now(dataset)

    def _served_now(self, dataset: DatasetRecord) -> RemoteImageTable:
        assert isinstance(dataset.key, int)
        with self._lock:
            expected = self._counts.get(dataset.key)
        images = self.api.images(dataset.key, expected)
        with self._problems.listing(("files", dataset.key)):
            return self._served_images(dataset, images)

    def _served_images(
        self, dataset: DatasetRecord, images: Sequence[RemoteImage]
    ) -> RemoteImageTable:
        assert isinstance(dataset.key, int)
        columns = _columns(images)
        refused: dict[str, str] = {}
        if not _all_servable(columns):
            served, refused = self._screen(dataset.key, images)
            columns = _columns(served)
            del served
        builder, versions = _image_rows(columns)
        del columns
        table, twice = builder.build(kind=RemoteImageTable)
        assert isinstance(table, RemoteImageTable) and not twice  # names made unique above
        table.versions = versions
        with self._lock:
            self._order[dataset.key] = table.ids()
            self._refused[dataset.path] = refused
        return table

    def _screen(
        self, dataset_key: int, images: Sequence[RemoteImage]
    ) -> tuple[list[RemoteImage], dict[str, str]]:
        """The images that can be served, and why each other one cannot (also reported):
        a bad name, a name given twice (neither is served), a bad blob range."""
        counts = Counter(img.name for img in images)
        served: list[RemoteImage] = []
        refused: dict[str, str] = {}
        for img in images:
            name = img.name
            problem = name_problem(name) or (
                "name appears more than once" if counts[name] > 1 else None
            )
            if problem is None and img.in_blob:
                start, end = img.offset_start, img.offset_end
                if start is None or end is None or start < 0 or end < start:
                    problem = "bad blob range"
            # a plain image's offsets mean nothing (and the bulk check ignores them too)
            ranged = (img.offset_end,) if img.in_blob else ()
            if problem is None and not _plausible((img.id, img.size, *ranged)):
                problem = "implausible id, size or offset"
            if problem is None:
                served.append(img)
                continue
            refused.setdefault(f"img/{name}", problem)
            self._problems.add(
                f"dataset {dataset_key}",
                f"image not served: {problem}",
                f"{img.id} {show(name)}",
            )
        return served, refused

    def _ann_records(self, dataset: DatasetRecord, table: RemoteImageTable) -> list[FileRecord]:
        """One ``ann/`` record per served image, sized on lookup (see :meth:`_ann_entries`);
        an entry's position is its image's in the table (the order of ``_order``)."""
        key = dataset.key
        assert isinstance(key, int)
        ids, mtimes = table.ids(), table.extra[MTIME].slice(0, len(table))
        return [
            FileRecord(f"ann/{name}.json", None, mtime, AnnRef(key, image_id, at))
            for at, (name, image_id, mtime) in enumerate(zip(table, ids, mtimes, strict=True))
        ]

    def listing(self, dataset: DatasetRecord) -> FolderLoaders:
        """``img/`` and ``ann/`` from one ``images.list`` (the folder filled first asks for
        it), ``ann/`` with its annotations fetched (see :meth:`_ann_entries`)."""
        shared = _SharedListing(lambda: self._served(dataset), ("img", "ann"))

        def img() -> FolderEntries:
            return shared.take("img")

        def ann() -> FolderEntries:
            return self._ann_entries(dataset, shared.take("ann"))

        return {"img": img, "ann": ann}

    def _ann_entries(self, dataset: DatasetRecord, table: RemoteImageTable) -> RemoteAnnTable:
        """``ann/`` entries whose annotation came in time hold its bytes (and so their size);
        the others (a batch that failed or is late, an annotation that cannot be served,
        beyond ``LISTING_ANNS_MAX`` or ``LISTING_ANN_BYTES``) stay sized on lookup, where a
        read asks again and gets any error first-hand.

        With sizes in the listing, readdirplus hands the kernel every file's attributes,
        and reading a file asks the server nothing: the requests are all made at once, at
        ``--concurrency``, instead of while a reader waits for its next file.
        """
        assert isinstance(dataset.key, int)
        ids = table.ids()
        left = deadline.remaining()
        wait_s = LISTING_ANNS_WAIT_S if left is None else min(LISTING_ANNS_WAIT_S, left / 2)
        with self.gate.demand():
            self.anns.fetch_all(dataset.key, ids[:LISTING_ANNS_MAX], wait_s)
        held: list[bytes | None] = []
        kept = 0
        for image_id in ids:
            data = self.anns.peek(image_id)
            if isinstance(data, bytes) and kept + len(data) <= LISTING_ANN_BYTES:
                kept += len(data)
                held.append(data)
            else:
                held.append(None)
        with building():
            return RemoteAnnTable.of(dataset.key, table, ids, held)

    def open(self, record: FileRecord) -> RangeReader:
        ref = record.ref
        match ref:
            case RemoteImageRef():
                member = ref.blob
                if member is None:  # an ordinary image, fetched whole
                    whole = BlobRef("", "", 0, ref.size)
                    return SliceReader(self.cache, self._plain_image(ref), whole)
                blob = self._blob(ref.blob_file_id, ref.download_id)
                if isinstance(blob, str):
                    return FailingReader(blob)
                if self.readahead is None:
                    return SliceReader(self.cache, blob, member)
                return PatternReader(self.cache, blob, member, self.readahead, self.gate)
            case AnnRef():
                return BytesReader(self.content(record))
            case BytesRef():
                return BytesReader(ref.data)
            case BlobRef() | LocalFileRef():
                raise self.foreign(record)
            case _:
                assert_never(ref)

    def content(self, record: FileRecord) -> bytes:
        ref = record.ref
        if isinstance(ref, bytes):
            return ref
        if not isinstance(ref, AnnRef):
            return super().content(record)
        data = self._annotation(ref)
        if data is None:
            raise NotFound(f"no annotation for image {ref.image_id}")
        if isinstance(data, str):
            raise RemoteError(data)
        return data

    def _annotation(self, ref: AnnRef) -> bytes | str | None:
        with self._lock:
            order = self._order.get(ref.dataset_id, array("q"))
        with self.gate.demand():
            return self.anns.get(ref.dataset_id, ref.image_id, ref.position, order)

    def cached_blob(self, img: RemoteImage) -> CachedBlob | str:
        """The blob an image lives in, as the cache sees it (or why it cannot be read)."""
        return self._blob(img.related_data_id, img.download_id)

    def _blob(self, key: int | None, download_id: str | None) -> CachedBlob | str:
        """The blob of Team Files id ``key`` (``download_id`` names it for downloads)."""
        assert key is not None and download_id is not None
        with self._lock:
            known = self._blobs.get(key)
        if known is not None:
            return known
        try:
            info = self.api.file_info(key)
            blob: CachedBlob | str = CachedBlob(
                f"tf{key}",
                info.version,
                info.size,
                self.api.blob_reader(self.project_id, download_id, info.size, info, self.spill_dir),
            )
        except AuthError:
            raise  # a refused token is EACCES for images as for annotations
        except RemoteError as exc:
            # EIO for this blob's images, with the reason in the log (a 404 here is a blob
            # gone from Team Files); not remembered: a later read retries.
            return f"blob {key}: {exc}"
        with self._lock:
            return self._blobs.setdefault(key, blob)

    def _plain_image(self, ref: RemoteImageRef) -> CachedBlob:
        with self._lock:
            known = self._images.get(ref.image_id)
            if known is None:
                reader = self.api.image_reader(ref.image_id, ref.size)
                known = CachedBlob(f"img{ref.image_id}", ref.version, ref.size, reader)
                self._images[ref.image_id] = known
            return known

    def changed(self) -> None:
        with self._lock:
            self._datasets_ahead = None  # asked before the change
        self.anns.clear()

    def refused(self, dataset: tuple[str, ...], relpath: str) -> str | None:
        with self._lock:
            return self._refused.get(dataset, {}).get(relpath)

    def stats(self) -> dict[str, object]:
        client = self.api.client
        return {
            "cache": self.cache.stats.as_dict(),
            "cache_bytes": self.cache.used_bytes,
            "http_requests": client.requests,
            "http_retries": client.retried,
            "readahead_window_bytes": self.readahead.largest_window() if self.readahead else 0,
            **self._io_stats(),
        }

    def _io_stats(self) -> dict[str, object]:
        """Read pattern, Range fallbacks, annotations and ``--prefetch`` progress."""
        with self._lock:
            readers = [b.reader for b in self._blobs.values() if isinstance(b, CachedBlob)]
        modes = [getattr(r, "mode", 0) for r in readers]
        out: dict[str, object] = {
            "random_reads": self.readahead.random_reads if self.readahead else 0,
            "sequential_reads": self.readahead.sequential_reads if self.readahead else 0,
            "range_fallback_blobs": {
                "file_storage": modes.count(1),
                "whole_download": modes.count(2),
            },
            "annotations_stored": self.anns.stored,
        }
        if self.prefetcher is not None:
            out["prefetch"] = self.prefetcher.progress()
        return out

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.stop()
        with self._lock:
            readers = [b.reader for b in self._blobs.values() if isinstance(b, CachedBlob)]
        for reader in readers:
            reader.close()
        self.anns.close()
        self._side.shutdown(wait=False, cancel_futures=True)
        self.cache.close()
        self.api.client.close()


#: Integers a table column holds (an id, size or offset beyond it is refused; an mtime
#: beyond it is taken as 0, like one that does not parse): any two differ by less than 2**63.
PLAUSIBLE = 1 << 62


def _plausible(values: Sequence[int | None]) -> bool:
    return all(v is None or -PLAUSIBLE <= v < PLAUSIBLE for v in values)


def _mtime(stamp: str) -> int:
    ns = iso_to_ns(stamp)
    return ns if -PLAUSIBLE <= ns < PLAUSIBLE else 0


#: The fields of images, one tuple per field (``RemoteImage`` order), one value per image.
ImageColumns = tuple[tuple[Any, ...], ...]


def _columns(images: Sequence[RemoteImage]) -> ImageColumns:
    """The images' fields as columns (one transposition in C)."""
    return tuple(zip(*images, strict=True)) if images else ((),) * len(RemoteImage._fields)


def _all_servable(columns: ImageColumns) -> bool:
    """Whether every image can be served (the usual listing), checked in bulk: good
    distinct names (see :func:`~blobfs.layout.name_problem`), all in blobs with
    well-formed ranges, or all plain. False sends the listing through the image-by-image
    screen, which says what is wrong."""
    ids, names, sizes, _, _, rels, _, starts, ends = columns
    if not names:
        return True
    if not _plausible((min(ids), max(ids), min(sizes), max(sizes))):
        return False
    if not names_fit(names) or len(set(names)) != len(names):
        return False
    if None in rels or None in starts:  # plain images: only if all are
        return all(r is None or s is None for r, s in zip(rels, starts, strict=True))
    if None in ends or min(starts) < 0 or not _plausible((max(ends),)):
        return False
    return all(map(operator.le, starts, ends))


def _image_rows(columns: ImageColumns) -> tuple[TableBuilder, bytes]:
    """A builder holding one row per image (column by column, without a Python step per
    image where the images allow), and the plain images' versions joined."""
    builder = TableBuilder("img/", RemoteImageTable.EXTRA)
    ids, names, plain_sizes, stamps, hashes, rels, downloads, starts, ends = columns
    count = len(ids)
    if not count:
        return builder, b""
    mtimes = {stamp: _mtime(stamp) for stamp in set(stamps)}
    keys: list[tuple[int | None, str | None]]
    if None not in rels and None not in starts:
        in_blob = [True] * count
        keys = list(zip(rels, downloads, strict=True))
    else:
        in_blob = [r is not None and s is not None for r, s in zip(rels, starts, strict=True)]
        keys = [
            (r, d) if b else (None, None) for r, d, b in zip(rels, downloads, in_blob, strict=True)
        ]
    where = {key: builder.source(RemoteImageTable.source_of(*key)) for key in dict.fromkeys(keys)}
    versions: list[bytes] = []
    if all(in_blob):
        offsets, sizes = list(starts), list(map(operator.sub, ends, starts))
        vat = vlen = [0] * count
    else:
        offsets, sizes, vat, vlen, held = [], [], [], [], 0
        for b, start, end, size, digest, stamp in zip(
            in_blob, starts, ends, plain_sizes, hashes, stamps, strict=True
        ):
            if b:
                offsets.append(start)
                sizes.append(end - start)
                vat.append(0)
                vlen.append(0)
                continue
            # a plain image is cached by its version: its hash or its update time
            version = (digest or stamp).encode("utf-8", "surrogatepass")
            offsets.append(0)
            sizes.append(size)
            vat.append(held)
            vlen.append(len(version))
            versions.append(version)
            held += len(version)
    builder.add_many(
        list(map(str.encode, names)),
        list(map(where.__getitem__, keys)),
        offsets,
        sizes,
        [list(ids), list(map(mtimes.__getitem__, stamps)), vat, vlen],
    )
    return builder, b"".join(versions)


class RemoteImageTable(FileTable):
    """A remote dataset's ``img/`` as a compact table: names in one buffer, and per image
    its blob range (``start``, ``size``) and the :data:`EXTRA` columns; records are made on
    demand, as a lookup or a read asks.

    Sources are the blobs (one per Team Files id and download id) and one for the plain
    images, fetched whole (:meth:`source_of`). A plain image's cache version (its hash, or
    its update time) is a slice of :attr:`versions` (``vat``, ``vlen``); an image in a blob
    needs none (its bytes are the blob's, versioned by the blob's own info), so a project
    of blobs stores no per-image string beyond its name.
    """

    EXTRA = ("id", MTIME, "vat", "vlen")
    #: the plain images' versions, each where its entry's ``vat``/``vlen`` say
    versions = b""

    @staticmethod
    def source_of(blob_file_id: int | None, download_id: str | None) -> EntrySource:
        """The entry source of images in blob ``blob_file_id`` (None: plain images). The
        download id is kept as JSON in ``version``, so that None and ``""`` stay apart."""
        if blob_file_id is None:
            return EntrySource(BLOB, "", "")
        return EntrySource(BLOB, str(blob_file_id), json.dumps(download_id))

    def record_at(self, i: int, name: str | None = None) -> FileRecord | None:
        name = self.name_at(i) if name is None else name
        source = self.sources[self._src[i]]
        extra = self.extra
        size, image_id, mtime = self._size[i], extra["id"][i], extra[MTIME][i]
        if source.key:
            start = self._start[i]
            member = BlobRef(f"tf{source.key}", "", start, start + size)
            download_id = json.loads(source.version)
            ref = RemoteImageRef(image_id, size, "", member, int(source.key), download_id)
        else:
            at = extra["vat"][i]
            version = self.versions[at : at + extra["vlen"][i]].decode("utf-8", "surrogatepass")
            ref = RemoteImageRef(image_id, size, version)
        return FileRecord(self.prefix + name, size, mtime, ref)

    def ids(self) -> array[int]:
        """Every entry's image id, in table order (what the annotation walker needs)."""
        ids = self.extra["id"]
        if ids.values is None:
            return array("q", [ids.base] * len(self))
        return array("q", map(ids.base.__add__, ids.values))


class RemoteAnnTable(FileTable):
    """A remote dataset's ``ann/`` as a compact table, one entry per served image (its
    name and ``.json``), made from its ``img/`` table.

    An entry whose annotation was fetched for the listing holds its bytes (:attr:`held`,
    by the image's row in ``img/``) and is listed with its size; the others are listed
    without one (a source of kind ``FOLDER``: sized on lookup) and read through the
    annotation cache. The ``row`` column is also the entry's position for reading ahead.
    """

    EXTRA = ("id", MTIME, "row")
    HELD = EntrySource(BLOB, "held")
    LATER = EntrySource(FOLDER, "later")
    dataset_id = 0
    held: Sequence[bytes | None] = ()

    @classmethod
    def of(
        cls,
        dataset_id: int,
        images: RemoteImageTable,
        ids: Sequence[int],
        held: Sequence[bytes | None],
    ) -> RemoteAnnTable:
        count = len(images)
        builder = TableBuilder("ann/", cls.EXTRA)
        sources = (builder.source(cls.LATER), builder.source(cls.HELD))
        builder.add_many(
            [raw + b".json" for raw, _, _, _ in images.raw_entries()],
            [sources[data is not None] for data in held],
            [0] * count,
            [0 if data is None else len(data) for data in held],
            [list(ids), list(images.extra[MTIME].slice(0, count)), list(range(count))],
        )
        table, _ = builder.build(kind=cls)
        assert isinstance(table, RemoteAnnTable)
        table.dataset_id, table.held = dataset_id, held
        return table

    def contents(self, lo: int, hi: int) -> Sequence[bytes | None] | None:
        """The fetched annotations of entries ``lo`` to ``hi`` (None where not held)."""
        held = self.held
        return [held[row] for row in self.extra["row"].slice(lo, hi)]

    def record_at(self, i: int, name: str | None = None) -> FileRecord | None:
        name = self.name_at(i) if name is None else name
        extra = self.extra
        row, mtime = extra["row"][i], extra[MTIME][i]
        data = self.held[row]
        if data is not None:
            return FileRecord(self.prefix + name, len(data), mtime, BytesRef(data))
        ref = AnnRef(self.dataset_id, extra["id"][i], row)
        return FileRecord(self.prefix + name, None, mtime, ref)


class _SharedListing:
    """One dataset's ``images.list`` as records, asked for once for all its folders.

    Each folder takes it once (per listing: a refresh makes a new one); once every folder
    has taken it, it is dropped. A failed call is not remembered: the next fill asks again.
    """

    def __init__(self, load: Callable[[], RemoteImageTable], parts: tuple[str, ...]) -> None:
        self._load = load
        self._waiting = set(parts)
        self._value: RemoteImageTable | None = None
        self._lock = threading.Lock()

    def take(self, part: str) -> RemoteImageTable:
        deadline.acquire(self._lock, "listing")
        try:
            value = self._value
            if value is None:
                value = self._load()
            self._waiting.discard(part)
            self._value = value if self._waiting else None
            return value
        finally:
            self._lock.release()
