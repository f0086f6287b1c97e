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
    """Where the bytes of a file live inside a blob (or a whole standalone object): the
    ref of a local blob image, and the range a reader of a remote blob serves.

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
class BytesRef:
    """A small file the view holds whole (``meta.json``, a statistics snapshot)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class LocalFileRef:
    """An ordinary file of a local project, by its path inside the project folder."""

    path: str


@dataclass(frozen=True, slots=True)
class RemoteImageRef:
    """An image of a remote project: a range of a Team Files blob, or a whole image.

    ``blob`` is the image's range of its blob (None for an ordinary image, fetched whole
    by ``image_id``); ``blob_file_id`` and ``download_id`` name that blob on the server.
    ``version`` changes whenever the image's bytes may have (its hash or update time).
    """

    image_id: int
    size: int
    version: str
    blob: BlobRef | None = None
    blob_file_id: int | None = None
    download_id: str | None = None


@dataclass(frozen=True, slots=True)
class AnnRef:
    """A remote annotation: the image it belongs to, in its dataset."""

    dataset_id: int
    image_id: int
    #: Where the image is in its dataset's listing (-1: unknown), for reading ahead.
    position: int = -1


#: Where a file's bytes come from, one type per kind of record. Code that serves records
#: ``match``-es on these types and ends with ``assert_never``, so a new kind cannot be
#: forgotten anywhere (mypy checks it).
Ref = BytesRef | LocalFileRef | BlobRef | RemoteImageRef | AnnRef


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file of the mounted tree, relative to its dataset folder (``img/a.jpg``).

    ``size`` is None when the source only learns it by fetching the content (remote
    annotations); the view then asks the source for the content to learn the size.
    ``ref`` says where the bytes are (see :data:`Ref`): a local blob's range
    (:class:`BlobRef`), a local file, a remote image or annotation, or bytes in memory.
    """

    relpath: str
    size: int | None
    mtime_ns: int
    ref: Ref


@dataclass(frozen=True, slots=True)
class DatasetRecord:
    """A dataset; ``path`` is its chain of names from the top (nested datasets)."""

    path: tuple[str, ...]
    key: object
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.path[-1]
