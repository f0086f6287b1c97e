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

import bisect
import logging
import threading
from collections.abc import Callable
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
BlobId = tuple[str, str]


def _span_key(blob: CachedBlob, start: int) -> BlockKey:
    """The disk tier's key for a span: found again only by a read planned the same way
    (same start and length), which a rerun of the same epoch is."""
    return (f"{blob.key}#span", blob.version, start)


class _Lru(LRUCache[BlockKey, bytes]):
    """An LRU that tells its owner which keys it evicts (to keep the span index true)."""

    def __init__(self, maxsize: int, on_evict: Callable[[BlockKey], None]) -> None:
        super().__init__(maxsize=maxsize, getsizeof=len)
        self._on_evict = on_evict

    def popitem(self) -> tuple[BlockKey, bytes]:
        key, value = super().popitem()
        self._on_evict(key)
        return key, value


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
    span_fetches: int = 0
    span_hits: int = 0

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
        # Block keys have block numbers >= 0; a span [start, end) is kept under the key
        # (blob, version, -1 - start), and _spans[(blob, version)] lists the starts (sorted)
        # and ends of the spans in _lru (updated on every insert and eviction).
        self._lru: LRUCache[BlockKey, bytes] = _Lru(max_bytes, self._evicted)
        self._inflight: dict[BlockKey, _Flight] = {}
        self._spans: dict[BlobId, tuple[list[int], dict[int, int]]] = {}
        self._span_flights: dict[BlobId, list[tuple[int, int, _Flight]]] = {}
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
        bs = self.block_size
        with self._lock:
            wanted = [
                b
                for b in to_blocks(start, end, bs)
                if (blob.key, blob.version, b) not in self._lru
                and (blob.key, blob.version, b) not in self._inflight
                and not self._in_span_locked(blob, max(start, b * bs), min((b + 1) * bs, end))
            ]
        if wanted:
            self._pool.submit(self._prefetch_now, blob, wanted)

    def warm(self, blob: CachedBlob, start: int, end: int) -> None:
        """Fetch the blocks of ``[start, end)`` now, in this thread (``--prefetch``); they
        land in memory and in the disk tier. Errors are raised."""
        end = min(end, blob.size)
        self._get_blocks(blob, list(to_blocks(start, end, self.block_size)), prefetch=True)

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
            self._spans.clear()

    # ---- spans: exact ranges for random reads ------------------------------------------

    def read_span(self, blob: CachedBlob, start: int, end: int, fetch_end: int) -> bytes:
        """Bytes ``[start, end)`` of ``blob`` without filling whole blocks.

        Served from cached blocks or a cached span when one holds the range; otherwise
        ``[start, fetch_end)`` is fetched with one request and kept as a span (a random
        read of a 400-byte image then costs about 400 bytes, not a block). A read that
        falls inside a span another thread is fetching waits for it (single flight).
        """
        if start < 0 or end > blob.size or start > end or fetch_end > blob.size:
            raise CorruptData(
                f"range [{start}, {end}) lies outside blob {blob.key} "
                f"({blob.size} bytes): truncated blob or bad offsets"
            )
        if start == end:
            return b""
        fetch_end = max(fetch_end, end)
        ident = (blob.key, blob.version)
        while True:
            with self._lock:
                data = self._cached_locked(blob, start, end)
                if data is not None:
                    self.stats.hits += 1
                    self.stats.span_hits += 1
                    return data
                flight = self._span_flight_locked(ident, start, end)
                if flight is None:
                    span_start, mine = start, _Flight()
                    self._span_flights.setdefault(ident, []).append((start, fetch_end, mine))
                    self.stats.misses += 1
                    break
                self.stats.waits += 1
            flight[2].done.wait()
            if flight[2].error is not None:
                raise flight[2].error
            assert flight[2].data is not None
            return flight[2].data[start - flight[0] : end - flight[0]]
        try:
            fetched = self._fetch_span(blob, span_start, fetch_end)
            mine.data = fetched
        except BaseException as exc:
            mine.error = exc
            with self._lock:
                self.stats.errors += 1
            raise
        finally:
            with self._lock:
                flights = self._span_flights.get(ident, [])
                flights[:] = [f for f in flights if f[2] is not mine]
                if not flights:
                    self._span_flights.pop(ident, None)
            mine.done.set()
        return fetched[start - span_start : end - span_start]

    def cached(self, blob: CachedBlob, start: int, end: int) -> bytes | None:
        """``[start, end)`` if cached blocks or a cached span hold it, else None (no I/O)."""
        with self._lock:
            data = self._cached_locked(blob, start, end)
            if data is not None:
                self.stats.hits += 1
            return data

    def _in_span_locked(self, blob: CachedBlob, start: int, end: int) -> bool:
        """Whether one cached span holds ``[start, end)`` (lock held; LRU order untouched)."""
        index = self._spans.get((blob.key, blob.version))
        if index is None:
            return False
        starts, ends = index
        i = bisect.bisect_right(starts, start) - 1
        return any(ends[starts[j]] >= end for j in range(i, max(i - 3, -1), -1))

    def _fetch_span(self, blob: CachedBlob, start: int, end: int) -> bytes:
        """``[start, end)`` from the disk tier or with one request, then kept as a span."""
        fetched = self._span_from_disk(blob, start, end)
        if fetched is not None:
            return fetched
        fetched = blob.reader.read(start, end)
        if len(fetched) != end - start:
            raise CorruptData(
                f"{blob.key}: reader returned {len(fetched)} bytes for [{start}, {end})"
            )
        with self._lock:
            self.stats.fetches += 1
            self.stats.span_fetches += 1
            self.stats.fetched_bytes += len(fetched)
            self._put_span_locked((blob.key, blob.version), start, fetched)
        if self.disk is not None:
            self.disk.put(_span_key(blob, start), fetched)
        return fetched

    def _cached_locked(self, blob: CachedBlob, start: int, end: int) -> bytes | None:
        """``[start, end)`` from cached blocks or one cached span, or None (lock held)."""
        bs = self.block_size
        blocks = to_blocks(start, end, bs)
        parts = []
        for b in blocks:
            part = self._lru.get((blob.key, blob.version, b))
            if part is None:
                break
            parts.append(part)
        else:
            base = blocks.start * bs
            return b"".join(parts)[start - base : end - base]
        index = self._spans.get((blob.key, blob.version))
        if index is None:
            return None
        starts, ends = index
        i = bisect.bisect_right(starts, start) - 1
        for j in range(i, max(i - 3, -1), -1):  # spans may overlap: look at a few before
            first = starts[j]
            if ends[first] >= end:
                data = self._lru.get((blob.key, blob.version, -1 - first))
                if data is not None:
                    return data[start - first : end - first]
        return None

    def _span_flight_locked(
        self, ident: BlobId, start: int, end: int
    ) -> tuple[int, int, _Flight] | None:
        for flight in self._span_flights.get(ident, ()):
            if flight[0] <= start and end <= flight[1]:
                return flight
        return None

    def _put_span_locked(self, ident: BlobId, start: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        known = self._spans.get(ident)
        if known is not None and known[1].get(start, -1) >= start + len(data):
            return  # a span at least as long is already kept
        # Stored first: the insert may evict spans (even this key's older, shorter bytes),
        # and the index below must describe what is left.
        self._lru[(ident[0], ident[1], -1 - start)] = data
        starts, ends = self._spans.setdefault(ident, ([], {}))
        if start not in ends:
            bisect.insort(starts, start)
        ends[start] = start + len(data)

    def _evicted(self, key: BlockKey) -> None:
        """Called by the LRU (with ``_lock`` held) for every key it evicts."""
        if key[2] >= 0:
            return
        ident, start = (key[0], key[1]), -1 - key[2]
        index = self._spans.get(ident)
        if index is None:
            return
        starts, ends = index
        if ends.pop(start, None) is not None:
            i = bisect.bisect_left(starts, start)
            if i < len(starts) and starts[i] == start:
                del starts[i]
        if not starts:
            del self._spans[ident]

    def _span_from_disk(self, blob: CachedBlob, start: int, end: int) -> bytes | None:
        """``[start, end)`` when the disk tier holds every block of it (they are then kept
        in memory too), else None."""
        if self.disk is None:
            return None
        span = self.disk.get(_span_key(blob, start), end - start)
        if span is not None:
            with self._lock:
                self.stats.disk_hits += 1
                self._put_span_locked((blob.key, blob.version), start, span)
            return span
        bs = self.block_size
        blocks = to_blocks(start, end, bs)
        parts = []
        for b in blocks:
            expected = min((b + 1) * bs, blob.size) - b * bs
            data = self.disk.get((blob.key, blob.version, b), expected)
            if data is None:
                return None
            parts.append(data)
        with self._lock:
            self.stats.disk_hits += len(parts)
            for b, data in zip(blocks, parts, strict=True):
                key = (blob.key, blob.version, b)
                if key not in self._inflight:
                    self._lru[key] = data
        base = blocks.start * bs
        return b"".join(parts)[start - base : end - base]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How to serve one read: a span ``[start, fetch_end)``, or blocks plus readahead."""

    blocks: bool
    fetch_end: int = 0
    prefetch_end: int = 0


@dataclass(slots=True)
class _Stream:
    """One reader's walk through a blob: where it ended, its window, the member it is in."""

    last_end: int
    window: int
    member: int
    crossed: bool = False


class ReadPattern:
    """Random or sequential, per blob and per reader: how much each remote read fetches.

    Each blob keeps a few streams (the last end offset of each recent walk), so several
    readers walking one blob (DataLoader workers) are told apart without knowing who
    reads. A read that starts within ``max_gap`` of a stream's end continues it and
    doubles its window (from ``initial_window`` up to ``max_window``); any other read is
    random and starts a new stream.

    - A random read fetches just its image: the member from the read on, at most
      ``member_cap`` bytes when the read starts the member (programs read images whole)
      or ``random_span`` bytes inside one, kept as a span. A shuffled epoch then fetches
      about what it delivers.
    - A sequential read inside one member fetches a span of its window, never past the
      member's end (a large image read in pieces does not pull its neighbours).
    - Once a stream has crossed into the next member and its window reached a block,
      the reads go through blocks with background readahead of the window: a scan in
      blob order is served as before, from few large requests.
    """

    def __init__(
        self,
        block_size: int,
        max_window: int,
        initial_window: int = 16 << 10,
        max_gap: int = 4 << 10,
        member_cap: int = 1 << 20,
        random_span: int = 64 << 10,
        max_streams: int = 8,
    ) -> None:
        self.block_size = block_size
        self.max_window = max(max_window, block_size)
        self.initial_window = initial_window
        self.max_gap = max_gap
        self.member_cap = member_cap
        self.random_span = random_span
        self.max_streams = max_streams
        self._state: dict[str, list[_Stream]] = {}
        self._lock = threading.Lock()
        self.random_reads = 0
        self.sequential_reads = 0

    def plan(
        self, key: str, start: int, end: int, member_start: int, member_end: int, size: int
    ) -> ReadPlan:
        """Record a read of ``[start, end)`` inside member ``[member_start, member_end)``
        of a blob of ``size`` bytes; return how to serve it."""
        with self._lock:
            streams = self._state.setdefault(key, [])
            found = None
            for i, s in enumerate(streams):
                if s.last_end - self.max_gap <= start <= s.last_end + self.max_gap:
                    found = streams.pop(i)
                    break
            if found is None and member_start <= self.max_gap:
                # The blob's first member: as a kernel does for a read at offset 0, take it
                # for the start of a scan. A shuffled epoch lands here once per blob, so
                # what it fetches is kept to 1/64 of the blob (and at most a block).
                self.sequential_reads += 1
                ahead = min(self.block_size, max(self.initial_window * 4, size // 64))
                streams.insert(0, _Stream(end, ahead, member_start, True))
                del streams[self.max_streams :]
                if ahead >= self.block_size:
                    return ReadPlan(True, prefetch_end=end)
                return ReadPlan(False, min(size, max(end, start + ahead)))
            if found is None:
                self.random_reads += 1
                streams.insert(0, _Stream(end, 0, member_start))
                del streams[self.max_streams :]
                cap = self.member_cap if start <= member_start else self.random_span
                return ReadPlan(False, min(member_end, max(end, start + cap)))
            self.sequential_reads += 1
            streams.insert(0, found)
            found.window = min(max(found.window * 2, self.initial_window), self.max_window)
            if member_start != found.member:
                found.crossed, found.member = True, member_start
            found.last_end = max(found.last_end, end)
            if found.crossed and found.window >= self.block_size:
                return ReadPlan(True, prefetch_end=min(size, end + found.window))
            limit = size if found.crossed else member_end
            return ReadPlan(False, min(limit, max(end, end + found.window)))

    def largest_window(self) -> int:
        """The widest window now (for ``blobfs stats``)."""
        with self._lock:
            return max((s.window for ss in self._state.values() for s in ss), default=0)
