"""How a remote mount reads: image bytes sized by the access pattern, demand first.

:class:`PatternReader` asks :class:`~blobfs.cache.blocks.ReadPattern` whether a read is
random or continues a walk, and reads a span or blocks accordingly. :class:`DemandGate`
lets demand reads go first: while a program's read is waiting on the network, background
requests (``--prefetch``, :mod:`blobfs.sources.prefetch`) go out one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from blobfs.cache.blocks import BlockCache, CachedBlob, ReadPattern
from blobfs.model import BlobRef

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
