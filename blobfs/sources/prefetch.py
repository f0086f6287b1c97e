"""``--prefetch``: a remote project warmed in the background, demand reads first.

A layer over :class:`~blobfs.sources.remote.RemoteProjectSource` (it walks the source's
datasets, annotations and blobs the way a reader would), so it lives above the source
and the source knows it only as something with progress that can be stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from blobfs.cache.blocks import CachedBlob
from blobfs.cache.meta import DEFAULT_MAX_ENTRIES
from blobfs.errors import BlobfsError
from blobfs.sly.api import ANN_BATCH
from blobfs.sources.remote import RemoteProjectSource
from blobfs.sources.remote_io import DemandGate

logger = logging.getLogger(__name__)


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
