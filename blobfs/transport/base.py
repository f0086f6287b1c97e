"""The contract every byte transport meets."""

from __future__ import annotations

from typing import Protocol


class RangeReader(Protocol):
    """Random access to the bytes of one object (a tar blob, a standalone image).

    ``read(start, end)`` returns exactly ``end - start`` bytes of the half-open range, or
    raises a :class:`blobfs.errors.BlobfsError`; a short answer is never returned, because a
    short read would be served to a program as if the file ended there.

    ``close()`` releases what the reader holds (a descriptor, a downloaded copy); the one
    who got the reader calls it once done, and it is safe to call twice. Readers that
    hold nothing of their own implement it as a no-op, so no caller needs to ask.
    """

    def read(self, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)``."""
        ...

    def close(self) -> None:
        """Release what this reader holds; reads after it may open it again or fail."""
        ...
