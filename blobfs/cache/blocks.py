"""A byte-budgeted LRU cache of blob blocks with single-flight fetches and run coalescing.

Every image read (local or remote) becomes a read of a byte range of some blob. The range
is cut into fixed-size blocks; cached blocks are served from memory, missing ones are
fetched with as few transport requests as possible (consecutive missing blocks form one
run, one request). Two threads that miss the same block cause one fetch: the second waits
for the first (single flight), which matters when a DataLoader's workers walk one blob.

Keys are ``(blob_key, version, block_no)``: a blob whose version changes (new ETag, new
mtime) never serves bytes cached from its old content.

Lock order: ``BlockCache._lock`` is the only lock here and is never held during I/O.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachetools import LRUCache

from blobfs import deadline
from blobfs.cache.disk import DiskBlockStore
from blobfs.cache.ranges import runs, to_blocks
from blobfs.errors import BlobfsError, CorruptData, InvalidInput
from blobfs.transport.base import RangeReader

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_MAX_RUN_BLOCKS = 16

BlockKey = tuple[str, str, int]


@dataclass(frozen=True, eq=False)
class CachedBlob:
    """A blob as the cache sees it: identity, version, size, and how to fetch its bytes."""

    key: str
    version: str
    size: int
    reader: RangeReader


@dataclass
class CacheStats:
    """Counters for ``blobfs stats`` and for tests that count requests."""

    hits: int = 0
    misses: int = 0
    waits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    prefetched_blocks: int = 0
    errors: int = 0
    disk_hits: int = 0
    disk_corrupt: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Flight:
    """A fetch in progress; waiters block on ``done`` and then take ``data`` or ``error``."""

    done: threading.Event = field(default_factory=threading.Event)
    data: bytes | None = None
    error: BaseException | None = None


class BlockCache:
    """LRU of blob blocks within ``max_bytes``, fetched through each blob's reader.

    Args:
        block_size: bytes per block; the unit of caching and of request alignment.
        max_bytes: memory budget for cached block bytes (at least one block).
        max_run_blocks: most blocks one transport request may fetch.
        prefetch_workers: threads for background readahead (0: no readahead).
        disk: optional persistent tier consulted before the transport.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_run_blocks: int = DEFAULT_MAX_RUN_BLOCKS,
        prefetch_workers: int = 0,
        disk: DiskBlockStore | None = None,
    ) -> None:
        if block_size <= 0 or max_bytes < block_size:
            raise InvalidInput("cache size must be at least one block")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.max_run_blocks = max(1, max_run_blocks)
        self.stats = CacheStats()
        self.disk = disk
        # INVARIANT: a key is never in both _lru and _inflight once _lock is released.
        self._lru: LRUCache[BlockKey, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._inflight: dict[BlockKey, _Flight] = {}
        self._lock = threading.Lock()
        self._pool = (
            ThreadPoolExecutor(prefetch_workers, thread_name_prefix="blobfs-prefetch")
            if prefetch_workers
            else None
        )

    @property
    def used_bytes(self) -> int:
        return int(self._lru.currsize)

    def read(self, blob: CachedBlob, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of ``blob``; the range must lie inside the blob."""
        if start < 0 or end > blob.size or start > end:
            raise CorruptData(
                f"range [{start}, {end}) lies outside blob {blob.key} "
                f"({blob.size} bytes): truncated blob or bad offsets"
            )
        bs = self.block_size
        first = start // bs
        if end > start and (end - 1) // bs == first:  # the common case: inside one block
            with self._lock:
                data = self._lru.get((blob.key, blob.version, first))
                if data is not None:
                    self.stats.hits += 1
            if data is not None:
                return data[start - first * bs : end - first * bs]
        blocks = to_blocks(start, end, bs)
        parts = self._get_blocks(blob, list(blocks))
        if len(parts) == 1:
            base = blocks.start * self.block_size
            return parts[0][start - base : end - base]
        joined = b"".join(parts)
        base = blocks.start * self.block_size
        return joined[start - base : end - base]

    def prefetch(self, blob: CachedBlob, start: int, end: int) -> None:
        """Fetch the blocks of ``[start, end)`` in the background; errors are only logged."""
        if self._pool is None:
            return
        end = min(end, blob.size)
        with self._lock:
            wanted = [
                b
                for b in to_blocks(start, end, self.block_size)
                if (blob.key, blob.version, b) not in self._lru
                and (blob.key, blob.version, b) not in self._inflight
            ]
        if wanted:
            self._pool.submit(self._prefetch_now, blob, wanted)

    def _prefetch_now(self, blob: CachedBlob, blocks: list[int]) -> None:
        try:
            self._get_blocks(blob, blocks, prefetch=True)
        except BlobfsError as exc:
            logger.info("readahead of %s failed (a later read retries): %s", blob.key, exc)

    def _get_blocks(
        self, blob: CachedBlob, blocks: list[int], prefetch: bool = False
    ) -> list[bytes]:
        found: dict[int, bytes] = {}
        waits: dict[int, _Flight] = {}
        mine: dict[int, _Flight] = {}
        with self._lock:
            for b in blocks:
                key = (blob.key, blob.version, b)
                data = self._lru.get(key)
                if data is not None:
                    found[b] = data
                elif key in self._inflight:
                    waits[b] = self._inflight[key]
                else:
                    mine[b] = self._inflight[key] = _Flight()
            if not prefetch:
                self.stats.hits += len(found)
                self.stats.misses += len(mine)
                self.stats.waits += len(waits)
        if mine:
            self._fetch(blob, sorted(mine), mine, found, prefetch)
        for b, flight in waits.items():
            deadline.wait(flight.done, f"{blob.key}: block {b} fetched by another reader")
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            found[b] = flight.data
        return [found[b] for b in blocks]

    def _fetch(
        self,
        blob: CachedBlob,
        todo: list[int],
        flights: dict[int, _Flight],
        found: dict[int, bytes],
        prefetch: bool,
    ) -> None:
        bs = self.block_size
        error: BaseException | None = None
        try:
            todo = self._from_disk(blob, todo, flights, found)
            for first, stop in runs(todo, self.max_run_blocks):
                begin, finish = first * bs, min(stop * bs, blob.size)
                data = blob.reader.read(begin, finish)
                if len(data) != finish - begin:  # the transport contract, checked once more
                    raise CorruptData(
                        f"{blob.key}: reader returned {len(data)} bytes for [{begin}, {finish})"
                    )
                with self._lock:
                    self.stats.fetches += 1
                    self.stats.fetched_bytes += len(data)
                    if prefetch:
                        self.stats.prefetched_blocks += stop - first
                for b in range(first, stop):
                    chunk = data[(b - first) * bs : (b - first + 1) * bs]
                    found[b] = chunk
                    self._complete(blob, b, flights.pop(b), chunk, None)
                    if self.disk is not None:
                        self.disk.put((blob.key, blob.version, b), chunk)
        except BaseException as exc:
            error = exc
            raise
        finally:
            for b, flight in flights.items():  # whatever was not fetched fails its waiters
                self._complete(blob, b, flight, None, error or RuntimeError("fetch abandoned"))

    def _from_disk(
        self,
        blob: CachedBlob,
        todo: list[int],
        flights: dict[int, _Flight],
        found: dict[int, bytes],
    ) -> list[int]:
        """Serve what the disk tier has; return the blocks still to fetch."""
        if self.disk is None:
            return todo
        rest = []
        for b in todo:
            expected = min((b + 1) * self.block_size, blob.size) - b * self.block_size
            data = self.disk.get((blob.key, blob.version, b), expected)
            if data is None:
                with self._lock:
                    self.stats.disk_corrupt = self.disk.corrupt_blocks
                rest.append(b)
                continue
            with self._lock:
                self.stats.disk_hits += 1
            found[b] = data
            self._complete(blob, b, flights.pop(b), data, None)
        return rest

    def _complete(
        self,
        blob: CachedBlob,
        block: int,
        flight: _Flight,
        data: bytes | None,
        error: BaseException | None,
    ) -> None:
        key = (blob.key, blob.version, block)
        with self._lock:
            self._inflight.pop(key, None)
            if data is not None:
                self._lru[key] = data
            else:
                self.stats.errors += 1
        flight.data, flight.error = data, error
        flight.done.set()

    def clear(self) -> None:
        """Drop every cached block (in-flight fetches finish and are kept)."""
        with self._lock:
            self._lru.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()


class SequentialReadahead:
    """Grow a readahead window while reads of one blob move forward, reset on a jump.

    Images are read one after another in blob order by scans and training epochs; each
    read then ends a little before the next one starts (tar headers sit between). A read
    that starts within ``max_gap`` after the previous end counts as sequential and doubles
    the window (up to ``max_window``); any other read resets it to zero.
    """

    def __init__(self, initial_window: int, max_window: int, max_gap: int = 64 << 10) -> None:
        self.initial_window = initial_window
        self.max_window = max_window
        self.max_gap = max_gap
        self._state: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def advise(self, key: str, start: int, end: int) -> int:
        """Record a read of ``[start, end)``; return how many bytes after ``end`` to prefetch."""
        with self._lock:
            last_end, window = self._state.get(key, (-1, 0))
            if last_end >= 0 and last_end - self.max_gap <= start <= last_end + self.max_gap:
                window = min(max(window * 2, self.initial_window), self.max_window)
            else:
                window = 0
            self._state[key] = (end, window)
            return window

    def largest_window(self) -> int:
        """The widest readahead window now (for ``blobfs stats``)."""
        with self._lock:
            return max((w for _, w in self._state.values()), default=0)

    def window(self, key: str) -> int:
        with self._lock:
            return self._state.get(key, (0, 0))[1]
