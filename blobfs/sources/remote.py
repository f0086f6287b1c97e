"""A project on a Supervisely instance, read through the REST API and ranged blob reads.

Listings (datasets, images) are fetched lazily per dataset (pages at once after the first)
and refreshed by the view after its TTL. Image bytes are ranges of their blob, fetched
through the shared block cache as the read pattern says (:mod:`blobfs.sources.remote_io`:
a random read fetches just its image, a walk grows a readahead window); plain (non-blob)
images are whole objects through the same cache. Annotation JSON is fetched 100 images
per request, read ahead of a reader walking ``ann/`` (:mod:`blobfs.sources.remote_anns`),
and converted from the server's subpixel coordinates to pixel coordinates exactly as the
SDK's downloads do (:mod:`blobfs.format.ann_coords`), so ``ann/*.json`` equals what
``sly.download`` writes. ``--prefetch`` warms all of it in the background.

Everything the server says is untrusted: names are validated like offsets entries, a
name that appears twice in a dataset is not served, a blob range outside its blob fails
with EIO on read, and implausible page counts are refused.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import assert_never

from blobfs.cache.blocks import BlockCache, CachedBlob, ReadPattern
from blobfs.errors import (
    AuthError,
    NotFound,
    RemoteError,
)
from blobfs.layout import name_problem
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
from blobfs.sources.base import Source
from blobfs.sources.readers import BytesReader, FailingReader, SliceReader
from blobfs.sources.remote_anns import AnnotationCache
from blobfs.sources.remote_io import DemandGate, PatternReader, Prefetcher
from blobfs.transport.base import RangeReader

logger = logging.getLogger(__name__)

READAHEAD_MAX_BYTES = 32 << 20


def iso_to_ns(text: str) -> int:
    """``2021-03-02T10:04:33.973Z`` -> ns since the epoch (0 when absent or odd)."""
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except (ValueError, TypeError):
        return 0


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
        self.prefetcher: Prefetcher | None = None
        self._blobs: dict[int, CachedBlob | str] = {}
        self._images: dict[int, CachedBlob] = {}
        self.anns = AnnotationCache(api)
        self._order: dict[int, list[int]] = {}
        self._refused: dict[tuple[str, ...], dict[str, str]] = {}
        self._lock = threading.Lock()

    def is_immutable(self) -> bool:
        return False

    def meta_json(self) -> bytes | None:
        return json.dumps(self.api.project_meta(self.project_id)).encode()

    def datasets(self) -> Sequence[DatasetRecord]:
        remote = self.api.datasets(self.project_id)
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
        assert isinstance(dataset.key, int)
        images = self.api.images(dataset.key)
        with self._problems.listing(("files", dataset.key)):
            return self._files(dataset, images)

    def _files(self, dataset: DatasetRecord, images: Sequence[RemoteImage]) -> list[FileRecord]:
        assert isinstance(dataset.key, int)
        counts: dict[str, int] = {}
        for img in images:
            counts[img.name] = counts.get(img.name, 0) + 1
        records: list[FileRecord] = []
        order: list[int] = []
        refused: dict[str, str] = {}
        for img in images:
            problem = name_problem(img.name) or (
                "name appears more than once" if counts[img.name] > 1 else None
            )
            rec = None if problem else self._image_record(img)
            if rec is None:
                refused.setdefault(f"img/{img.name}", problem or "bad blob range")
                self._problems.add(
                    f"dataset {dataset.key}",
                    f"image not served: {problem or 'bad blob range'}",
                    f"{img.id} {show(img.name)}",
                )
                continue
            mtime = iso_to_ns(img.updated_at)
            records.append(rec)
            records.append(
                FileRecord(
                    f"ann/{img.name}.json", None, mtime, AnnRef(dataset.key, img.id, len(order))
                )
            )
            order.append(img.id)
        with self._lock:
            self._order[dataset.key] = order
            self._refused[dataset.path] = refused
        return records

    def _image_record(self, img: RemoteImage) -> FileRecord | None:
        mtime = iso_to_ns(img.updated_at)
        version = img.hash or img.updated_at
        if img.in_blob:
            start, end = img.offset_start, img.offset_end
            if start is None or end is None or start < 0 or end < start:
                return None
            member = BlobRef(f"tf{img.related_data_id}", "", start, end)
            ref = RemoteImageRef(
                img.id, end - start, version, member, img.related_data_id, img.download_id
            )
            return FileRecord(f"img/{img.name}", end - start, mtime, ref)
        return FileRecord(
            f"img/{img.name}", img.size, mtime, RemoteImageRef(img.id, img.size, version)
        )

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
            order = self._order.get(ref.dataset_id, [])
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
        self.cache.close()
        self.api.client.close()
