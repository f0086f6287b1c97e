"""Plain records shared by the layers: no I/O here.

Sources describe a project with these records; the view turns them into a directory tree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlobMember:
    """One image inside a tar blob: the half-open byte range ``[start, end)``."""

    name: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where the bytes of a file live inside a blob (or a whole standalone object).

    ``blob_key`` names the blob for the cache, ``version`` changes whenever the blob's
    content may have changed (mtime/size/inode locally, ETag or update time remotely), so a
    re-uploaded blob never serves bytes cached from the old one.
    """

    blob_key: str
    version: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file of the mounted tree, relative to its dataset folder (``img/a.jpg``).

    ``size`` is None when the source only learns it by fetching the content (remote
    annotations); the view then asks the source for the content to learn the size.
    ``ref`` is source-specific: a :class:`BlobRef`, a local path, or a remote id.
    """

    relpath: str
    size: int | None
    mtime_ns: int
    ref: object


@dataclass(frozen=True, slots=True)
class DatasetRecord:
    """A dataset; ``path`` is its chain of names from the top (nested datasets)."""

    path: tuple[str, ...]
    key: object
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.path[-1]
