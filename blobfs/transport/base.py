"""The contract every byte transport meets."""

from __future__ import annotations

from typing import Protocol


class RangeReader(Protocol):
    """Random access to the bytes of one object (a tar blob, a standalone image).

    ``read(start, end)`` returns exactly ``end - start`` bytes of the half-open range, or
    raises a :class:`blobfs.errors.BlobfsError`; a short answer is never returned, because a
    short read would be served to a program as if the file ended there.
    """

    def read(self, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)``."""
        ...
