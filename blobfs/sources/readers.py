"""Readers the sources hand out: a window of a cached blob, or a reason it cannot be read."""

from __future__ import annotations

from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.errors import CorruptData
from blobfs.model import BlobRef
from blobfs.transport.local import FdPool


class SliceReader:
    """The bytes of one image: ``[ref.start, ref.end)`` of a blob, through the block cache."""

    def __init__(self, cache: BlockCache, blob: CachedBlob, ref: BlobRef) -> None:
        self._cache, self._blob, self._ref = cache, blob, ref

    def read(self, start: int, end: int) -> bytes:
        base = self._ref.start
        return self._cache.read(self._blob, base + start, base + end)

    def close(self) -> None:
        """Nothing to release: the blob's transport belongs to the source."""


class PreadReader:
    """The bytes of one image in a local blob: exactly its range, one ``pread`` per read.

    No block cache: the kernel's page cache already holds the tar, and reading whole
    blocks for a 400-byte image reads hundreds of times the bytes delivered when images
    are read in shuffled order.
    """

    def __init__(self, pool: FdPool, blob: str, ref: BlobRef) -> None:
        self._pool, self._blob, self._ref = pool, blob, ref

    def read(self, start: int, end: int) -> bytes:
        base = self._ref.start
        return self._pool.pread(self._blob, base + start, base + end)

    def close(self) -> None:
        """Nothing to release: descriptors are leased per read from the source's pool."""


class FailingReader:
    """Stands in for a blob that is missing or truncated: every read fails with why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def read(self, start: int, end: int) -> bytes:
        raise CorruptData(self.reason)

    def close(self) -> None:
        """Holds nothing."""


class BytesReader:
    """A reader over bytes already in memory (meta.json, fetched annotations)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self, start: int, end: int) -> bytes:
        return self._data[start:end]

    def close(self) -> None:
        """Holds nothing but the bytes."""
