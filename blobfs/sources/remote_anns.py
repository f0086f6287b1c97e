"""Annotations of a remote project: fetched in batches, ahead of a reader that walks them.

A program reading ``ann/`` reads the files in listing order, one after another; at tens of
milliseconds per request, one batch at a time would make it wait at every batch's first file.
So a read that continues a walk (its image comes after the last one read, within a batch)
keeps the next ``ahead`` batches in flight in the background, and a read that finds its
batch in flight waits for that request instead of sending its own. A read elsewhere (a
shuffled epoch reading one annotation per image) fetches only its own batch.

Listing a dataset's ``ann/`` asks for all of its annotations at once (:meth:`AnnotationCache.
fetch_all`): a file's size is its converted JSON's length, so a listing that carries sizes
must have the JSON, and with it every read of a file is answered from memory.

Batches already asked for are remembered by image id until their answer is stored, so no
annotation is asked for twice at once. A background batch that fails is forgotten: the
reader that needs it asks again itself and gets the error (or the answer) first-hand.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from blobfs.cache.meta import LockedLru
from blobfs.errors import BlobfsError
from blobfs.format.ann_coords import AnnotationFormatError, to_pixel
from blobfs.sly.api import ANN_BATCH, SuperviselyApi

logger = logging.getLogger(__name__)


class AnnotationCache:
    """Annotation JSON by image id (bytes, or the reason it cannot be served)."""

    def __init__(self, api: SuperviselyApi, ahead_batches: int | None = None) -> None:
        self.api = api
        self.ahead_batches = api.ann_concurrency if ahead_batches is None else ahead_batches
        self._anns: LockedLru[int, bytes | str] = LockedLru()
        self._lock = threading.Lock()
        self._inflight: dict[int, Future[None]] = {}
        # dataset id -> (position of the last image read, positions below this are asked for)
        self._walks: dict[int, tuple[int, int]] = {}
        self._pool = ThreadPoolExecutor(
            max(1, api.ann_concurrency), thread_name_prefix="blobfs-anns"
        )
        self.stored = 0
        # bumped by clear(): an answer fetched before it is not stored after it
        self._generation = 0

    def get(
        self, dataset_id: int, image_id: int, at: int, order: Sequence[int]
    ) -> bytes | str | None:
        """The annotation of ``image_id``, at position ``at`` of ``order`` (the dataset's
        image ids in listing order), fetching its batch if needed; None if the server has
        none for it."""
        if not 0 <= at < len(order) or order[at] != image_id:
            order, at = [image_id], 0
        walking = self._advance(dataset_id, at)
        data = self._anns.get(image_id)
        if data is None:
            data = self._wait_inflight(image_id)
        if data is None:
            batch = self._plan(order, at)
            if image_id not in batch:
                batch.insert(0, image_id)
            self._fetch(dataset_id, batch)
            data = self._anns.get(image_id)
        if walking:
            self._read_ahead(dataset_id, order, at)
        return data

    def _advance(self, dataset_id: int, at: int) -> bool:
        """Record a read at position ``at``; whether it continues a walk.

        A read of the position read last continues the walk too: the mount asks for one
        file's content more than once (its size, then its bytes), and starting the walk
        over there would make every next read rescan the batches already ahead.
        """
        with self._lock:
            last, upto = self._walks.get(dataset_id, (-(1 << 60), 0))
            walking = last <= at <= last + ANN_BATCH
            self._walks[dataset_id] = (at, upto if walking else at)
            return walking

    def _wait_inflight(self, image_id: int) -> bytes | str | None:
        with self._lock:
            future = self._inflight.get(image_id)
        if future is None:
            return None
        try:
            future.result()
        except BlobfsError:
            return None  # asked again by the caller, which then sees the error itself
        return self._anns.get(image_id)

    def _plan(self, order: Sequence[int], at: int) -> list[int]:
        """Up to one batch of ids from position ``at`` on that are neither stored nor asked for."""
        with self._lock:
            busy = self._inflight
            return [
                i for i in order[at : at + 4 * ANN_BATCH] if i not in self._anns and i not in busy
            ][:ANN_BATCH]

    def _read_ahead(self, dataset_id: int, order: Sequence[int], at: int) -> None:
        """Keep about ``ahead_batches`` batches after ``at`` stored or in flight.

        A new batch is sent once less than ``ahead_batches - 1`` batches are ahead, so
        batches stay whole (topping up per read would send batches of one image).
        """
        if self.ahead_batches <= 0:
            return
        low_water = at + 1 + max(0, self.ahead_batches - 1) * ANN_BATCH
        while True:
            with self._lock:
                last, upto = self._walks.get(dataset_id, (at, at))
                start = max(upto, at + 1)
                while start < len(order) and start < low_water and self._known(order[start]):
                    start += 1
                if start >= low_water or start >= len(order):
                    self._walks[dataset_id] = (last, start)
                    return
                stop = min(len(order), start + ANN_BATCH)
                self._walks[dataset_id] = (last, stop)
                batch = [i for i in order[start:stop] if not self._known(i)]
                future: Future[None] = Future()
                for i in batch:
                    self._inflight[i] = future
            self._pool.submit(self._background, dataset_id, batch, future)

    def _known(self, image_id: int) -> bool:
        """Stored or asked for (``_lock`` held)."""
        return image_id in self._inflight or image_id in self._anns

    def _background(self, dataset_id: int, batch: list[int], future: Future[None]) -> None:
        try:
            self._fetch_store(dataset_id, batch)
        except BlobfsError as exc:
            logger.info("annotations read ahead failed (a read asks again): %s", exc)
            self._finish(batch, future, exc)
        except BaseException as exc:  # never leave a waiter hanging
            self._finish(batch, future, exc)
            raise
        else:
            self._finish(batch, future, None)

    def _fetch(self, dataset_id: int, batch: list[int]) -> None:
        """Fetch ``batch`` now in this thread, registered so others wait for it."""
        future: Future[None] = Future()
        with self._lock:
            for i in batch:
                self._inflight.setdefault(i, future)
        try:
            self._fetch_store(dataset_id, batch)
        except BaseException as exc:
            self._finish(batch, future, exc)
            raise
        self._finish(batch, future, None)

    def _finish(self, batch: list[int], future: Future[None], error: BaseException | None) -> None:
        with self._lock:
            for i in batch:
                if self._inflight.get(i) is future:
                    del self._inflight[i]
            if not self._inflight:  # a dict keeps the room of its largest size
                self._inflight = {}
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def clear(self) -> None:
        """Forget every annotation (the server's changed: a writeback import replaced some)."""
        with self._lock:
            self._generation += 1
            self._anns.clear()

    def _fetch_store(self, dataset_id: int, image_ids: list[int]) -> None:
        with self._lock:
            generation = self._generation
        anns = self.api.annotations(dataset_id, image_ids)
        with self._lock:
            if generation != self._generation:
                return  # asked before a clear(): may be older than what the server has now
        self._store(anns)

    def _store(self, anns: dict[int, Any]) -> None:
        with self._lock:
            self.stored += len(anns)
        for image_id, ann in anns.items():
            try:
                self._anns.put(image_id, json.dumps(to_pixel(ann)).encode())
            except AnnotationFormatError as exc:
                # Remembered like a good answer: asking again would get the same JSON.
                reason = f"annotation of image {image_id}: {exc}"
                logger.warning("%s; its ann file fails with EIO", reason)
                self._anns.put(image_id, reason)

    def prefetch(self, dataset_id: int, image_ids: Sequence[int]) -> int:
        """Fetch every annotation of ``image_ids`` not stored yet (concurrent batches, in
        the caller's thread); returns how many were fetched."""
        with self._lock:
            todo = [i for i in image_ids if i not in self._anns and i not in self._inflight]
        if todo:
            self._fetch_store(dataset_id, todo)
        return len(todo)

    def fetch_all(self, dataset_id: int, image_ids: Sequence[int], wait_s: float) -> None:
        """Ask for every annotation of ``image_ids`` not stored or asked for yet, in batches
        at most ``ann_concurrency`` in flight (the pool's size), and wait up to ``wait_s`` for
        them and for those already on their way.

        A batch still out when the wait ends goes on in the background and is stored when
        it arrives; a batch that fails is forgotten (see the module docstring). Either way
        the caller then finds in :meth:`peek` what arrived in time.
        """
        with self._lock:
            waits = {self._inflight[i] for i in image_ids if i in self._inflight}
            todo = [i for i in image_ids if not self._known(i)]
            batches: list[tuple[list[int], Future[None]]] = []
            for start in range(0, len(todo), ANN_BATCH):
                batch, future = todo[start : start + ANN_BATCH], Future[None]()
                for i in batch:
                    self._inflight[i] = future
                batches.append((batch, future))
        for batch, future in batches:
            self._pool.submit(self._background, dataset_id, batch, future)
            waits.add(future)
        if waits:
            wait(waits, timeout=max(0.0, wait_s))

    def peek(self, image_id: int) -> bytes | str | None:
        """The stored annotation (or why it cannot be served); None when not stored."""
        return self._anns.get(image_id)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._anns

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
