"""How a remote mount reads: image bytes sized by the access pattern, and ``--prefetch``.

:class:`PatternReader` asks :class:`~blobfs.cache.blocks.ReadPattern` whether a read is
random or continues a walk, and reads a span or blocks accordingly. :class:`Prefetcher`
warms a whole project in the background (listings, annotations, every blob's blocks into
the cache) at full concurrency, but lets demand reads go first: while a program's read is
waiting on the network, background requests go out one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from blobfs.cache.blocks import BlockCache, CachedBlob, ReadPattern
from blobfs.cache.meta import DEFAULT_MAX_ENTRIES
from blobfs.errors import BlobfsError
from blobfs.model import BlobRef
from blobfs.sly.api import ANN_BATCH

if TYPE_CHECKING:
    from blobfs.sources.remote import RemoteProjectSource

logger = logging.getLogger(__name__)

#: Longest a background request waits for demand reads to finish before it goes anyway.
YIELD_MAX_S = 0.2


class DemandGate:
    """Counts demand reads in flight; background work takes turns while there are any."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._demand = 0
        self._turn = threading.Lock()

    @contextmanager
    def demand(self) -> Iterator[None]:
        with self._cond:
            self._demand += 1
        try:
            yield
        finally:
            with self._cond:
                self._demand -= 1
                if not self._demand:
                    self._cond.notify_all()

    @contextmanager
    def background(self) -> Iterator[None]:
        """Run one background request: at once when no demand read waits, else one at a
        time (after waiting up to ``YIELD_MAX_S`` for the demand to drain)."""
        with self._cond:
            if self._demand:
                self._cond.wait_for(lambda: not self._demand, YIELD_MAX_S)
            busy = self._demand > 0
        if not busy:
            yield
            return
        with self._turn:
            yield


class PatternReader:
    """The bytes of one blob member, fetched as the read pattern says (remote blobs)."""

    def __init__(
        self,
        cache: BlockCache,
        blob: CachedBlob,
        ref: BlobRef,
        pattern: ReadPattern,
        gate: DemandGate | None = None,
    ) -> None:
        self._cache, self._blob, self._ref, self._pattern = cache, blob, ref, pattern
        self._gate = gate

    def read(self, start: int, end: int) -> bytes:
        lo, hi = self._ref.start + start, self._ref.start + end
        if self._gate is None:
            return self._read(lo, hi)
        with self._gate.demand():
            return self._read(lo, hi)

    def close(self) -> None:
        """Nothing to release: the blob's transport belongs to the source."""

    def _read(self, lo: int, hi: int) -> bytes:
        ref, blob = self._ref, self._blob
        plan = self._pattern.plan(blob.key, lo, hi, ref.start, ref.end, blob.size)
        if not plan.blocks:
            return self._cache.read_span(blob, lo, hi, min(plan.fetch_end, blob.size))
        data = self._cache.cached(blob, lo, hi)
        if data is None:
            data = self._cache.read(blob, lo, hi)
        self._cache.prefetch(blob, hi, plan.prefetch_end)
        return data


class Prefetcher:
    """``--prefetch``: every dataset's listing and annotations, then every blob, once.

    Blobs go into the disk cache when there is one (``--cache-dir``), else into memory
    only as far as the memory budget allows (more would evict what was fetched before).
    Annotations are kept in memory, up to the annotation cache's size.
    """

    def __init__(self, source: RemoteProjectSource, gate: DemandGate) -> None:
        self.source = source
        self.gate = gate
        self.concurrency = source.api.concurrency
        self._lock = threading.Lock()
        self._progress: dict[str, object] = {
            "state": "waiting",
            "datasets": 0,
            "datasets_done": 0,
            "anns": 0,
            "anns_done": 0,
            "blobs": 0,
            "blob_bytes": 0,
            "blob_bytes_done": 0,
            "errors": 0,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blobfs-prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def progress(self) -> dict[str, object]:
        with self._lock:
            return dict(self._progress)

    def _add(self, key: str, n: int) -> None:
        with self._lock:
            value = self._progress[key]
            assert isinstance(value, int)
            self._progress[key] = value + n

    def _set(self, key: str, value: object) -> None:
        with self._lock:
            self._progress[key] = value

    def _run(self) -> None:
        started = time.monotonic()
        self._set("state", "running")
        try:
            blobs = self._listings_and_anns()
            self._blobs(blobs)
        except BlobfsError as exc:
            logger.warning("prefetch stopped: %s", exc)
            self._set("state", f"failed: {exc}")
            return
        except Exception:  # a background thread must say why it ended, not vanish
            logger.exception("prefetch failed")
            self._set("state", "failed (see the log)")
            return
        self._set("state", "stopped" if self._stop.is_set() else "done")
        self._set("seconds", round(time.monotonic() - started, 3))
        logger.info("prefetch %s in %.1f s", self.progress()["state"], time.monotonic() - started)

    def _listings_and_anns(self) -> list[CachedBlob]:
        src = self.source
        with self.gate.background():
            datasets = src.api.datasets(src.project_id)
        self._set("datasets", len(datasets))
        blobs: dict[str, CachedBlob] = {}
        room = DEFAULT_MAX_ENTRIES
        for ds in datasets:
            if self._stop.is_set():
                break
            with self.gate.background():
                images = src.api.images(ds.id, ds.images_count)
            ids = [img.id for img in images]
            take = ids[: max(0, room)]
            room -= len(take)
            self._add("anns", len(take))
            step = src.api.ann_concurrency * ANN_BATCH
            for i in range(0, len(take), step):
                if self._stop.is_set():
                    break
                with self.gate.background():
                    src.anns.prefetch(ds.id, take[i : i + step])
                self._add("anns_done", len(take[i : i + step]))
            for img in images:
                if img.in_blob and img.related_data_id is not None:
                    key = f"tf{img.related_data_id}"
                    if key not in blobs:
                        blob = src.cached_blob(img)
                        if isinstance(blob, str):
                            logger.info("prefetch skips %s", blob)
                            self._add("errors", 1)
                        else:
                            blobs[key] = blob
            self._add("datasets_done", 1)
        return list(blobs.values())

    def _blobs(self, blobs: list[CachedBlob]) -> None:
        cache = self.source.cache
        budget = cache.disk.max_bytes if cache.disk is not None else cache.max_bytes * 3 // 4
        chosen, total = [], 0
        for blob in blobs:
            if total + blob.size > budget:
                logger.warning(
                    "prefetch: %s and later blobs do not fit the %s cache (%d MB); "
                    "they are read on demand",
                    blob.key,
                    "disk" if cache.disk is not None else "memory (use --cache-dir)",
                    budget >> 20,
                )
                break
            chosen.append(blob)
            total += blob.size
        self._set("blobs", len(chosen))
        self._set("blob_bytes", total)
        step = cache.block_size * cache.max_run_blocks
        jobs = [
            (blob, start, min(start + step, blob.size))
            for blob in chosen
            for start in range(0, blob.size, step)
        ]
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="blobfs-warm") as pool:
            for _ in pool.map(self._warm, jobs):
                pass

    def _warm(self, job: tuple[CachedBlob, int, int]) -> None:
        blob, start, end = job
        if self._stop.is_set():
            return
        try:
            with self.gate.background():
                self.source.cache.warm(blob, start, end)
        except BlobfsError as exc:
            logger.info("prefetch of %s [%d, %d) failed: %s", blob.key, start, end, exc)
            self._add("errors", 1)
            return
        self._add("blob_bytes_done", end - start)


def start_prefetch(source: RemoteProjectSource) -> Callable[[], dict[str, object]]:
    """Start warming ``source`` in the background; returns its progress getter."""
    prefetcher = Prefetcher(source, source.gate)
    source.prefetcher = prefetcher
    prefetcher.start()
    return prefetcher.progress
