"""Write tar blobs and their offsets files: the writer behind ``blobfs pack`` and writeback.

The tar is written header by header (``tarfile.TarInfo.tobuf``) rather than through
``TarFile.addfile`` so that the data offset of each member is known exactly while writing,
without reading the archive back. The result is an ordinary POSIX tar that ``tar``,
``tarfile`` and the SDK's ``get_file_offsets_batch_generator`` agree on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from blobfs.errors import InvalidInput
from blobfs.failpoints import failpoint, note_dir_synced
from blobfs.format.images import image_size
from blobfs.format.offsets import OFFSETS_SUFFIX, write_offsets
from blobfs.layout import name_problem
from blobfs.model import BlobMember
from blobfs.safe_open import ProjectRoot, create_at, replace_at, split_rel, write_atomic_at

logger = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
DEFAULT_BLOB_SIZE = 1 << 30
COPY_CHUNK = 1 << 20
EMPTY_META = {
    "classes": [],
    "tags": [],
    "projectSettings": {
        "multiView": {"enabled": False, "tagName": None, "tagId": None, "isSynced": False}
    },
}


@dataclass(frozen=True)
class InlineFile:
    """An image to pack given by its bytes: writeback holds small files as records, with
    no file of their own. ``name`` is what a path's basename would be."""

    name: str
    data: bytes
    mtime: float

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.data)


def open_source(source: Path | InlineFile) -> tuple[IO[bytes], int, float]:
    """``(stream, size, mtime)`` of an image to pack, a file or an :class:`InlineFile`."""
    if isinstance(source, InlineFile):
        return source.open(), len(source.data), source.mtime
    stream = open(source, "rb")  # noqa: SIM115 (the caller closes it)
    st = os.fstat(stream.fileno())
    return stream, st.st_size, st.st_mtime


def empty_annotation(width: int, height: int) -> dict[str, object]:
    """The JSON the SDK writes for an image with no labels (``sly.Annotation(...).to_json()``)."""
    return {
        "description": "",
        "size": {"height": height, "width": width},
        "tags": [],
        "objects": [],
        "customBigData": {},
    }


#: The fields of a member's ustar header after its name, mode, owner and size that are
#: the same for every member blobfs writes (mode 0644, owner 0, a regular file).
_USTAR_MODE_OWNER = b"0000644\x000000000\x000000000\x00"
_USTAR_TAIL = (
    b"0"  # typeflag: a regular file
    + b"\x00" * 100  # linkname
    + b"ustar\x0000"
    + b"\x00" * 247  # uname, gname, devmajor, devminor (none: not a device), prefix, pad
)
_USTAR_TAIL_SUM = sum(_USTAR_TAIL) + 8 * 0x20  # the checksum field counts as spaces
_MAX_OCTAL_11 = 8**11


def member_header(name: str, size: int, mtime: int) -> bytes:
    """The tar header of a regular file ``name``: byte for byte what ``tarfile`` writes
    (``TarInfo.tobuf`` in PAX format, mode 0644).

    A plain ASCII name that fits the ustar field takes a plain ustar header, built here
    directly (``tobuf`` spends most of packing a small image on checking whether it needs
    a PAX header); anything else goes through ``tarfile``.
    """
    if (
        len(name) < 100
        and name.isascii()
        and 0 <= size < _MAX_OCTAL_11
        and 0 <= mtime < _MAX_OCTAL_11
    ):
        head = (
            name.encode().ljust(100, b"\x00")
            + _USTAR_MODE_OWNER
            + b"%011o\x00%011o\x00" % (size, mtime)
        )
        checksum = sum(head) + _USTAR_TAIL_SUM
        return head + b"%06o\x00 " % checksum + _USTAR_TAIL
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class TarBlobWriter:
    """Append regular files to a tar stream and remember each one's data range."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._pos = 0
        self.members: list[BlobMember] = []

    @property
    def size(self) -> int:
        return self._pos

    def add(self, name: str, source: IO[bytes], size: int, mtime: float) -> BlobMember:
        """Copy ``size`` bytes of ``source`` in as member ``name``; returns its data range."""
        self._write(member_header(name, size, int(mtime)))
        start = self._pos
        remaining = size
        while remaining:
            chunk = source.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise InvalidInput(f"{name}: file shrank while being packed")
            self._write(chunk)
            remaining -= len(chunk)
        self._write(b"\0" * (-size % BLOCK))
        member = BlobMember(name, start, start + size)
        self.members.append(member)
        return member

    def close(self) -> None:
        """Write the end-of-archive blocks, padded to a whole record like ``tarfile``."""
        self._write(b"\0" * (2 * BLOCK))
        self._write(b"\0" * (-self._pos % RECORD))

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._pos += len(data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'd temp file and rename: old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no half-written temp files
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    note_dir_synced(path)


def finish_tar(writer: TarBlobWriter, stream: IO[bytes], tmp: Path, final: Path) -> None:
    """End the tar written to ``tmp`` (a spool file) and move it to ``final``, durably.

    Whatever records the blob afterwards (a manifest saying ``packed``) may then rely on
    the tar being whole after a power cut, never torn. Tars inside a project (``blobfs
    pack``, local writeback) are sealed the same way (:func:`seal_tar`) and renamed through
    the project's descriptor instead, so no symlink there is followed.
    """
    seal_tar(writer, stream)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def seal_tar(writer: TarBlobWriter, stream: IO[bytes]) -> None:
    """End the tar and make its bytes durable (before it is renamed into place)."""
    writer.close()
    stream.flush()
    os.fsync(stream.fileno())
    stream.close()


@dataclass
class PackResult:
    """What a pack run added to the project."""

    blobs: list[Path] = field(default_factory=list)
    images: int = 0
    bytes: int = 0


def new_blob_stem(dataset: str) -> str:
    """A blob stem unique in the project and readable in listings."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)[:40]
    return f"{safe}_{time.strftime('%Y%m%d%H%M%S')}_{uuid.uuid4().hex[:8]}"


class ProjectPacker:
    """Pack image files into one dataset of a local blob project, splitting at ``blob_size``.

    Memory stays constant in the number of bytes: each image is streamed into the tar; only
    the (name, range) entries of the current blob are held until its offsets file is written.
    The tar and the offsets file are complete and fsync'd before the annotation files are
    renamed into place, so a reader never sees an offsets entry without its bytes.
    """

    def __init__(
        self,
        project_dir: Path,
        dataset: str,
        blob_size: int = DEFAULT_BLOB_SIZE,
        dataset_dir: Path | None = None,
    ) -> None:
        if name_problem(dataset):
            raise InvalidInput(f"dataset name {dataset!r}: {name_problem(dataset)}")
        self.project_dir = project_dir
        self.dataset_dir = dataset_dir or project_dir / dataset
        self.dataset = dataset
        self.blob_size = blob_size

    def prepare(self) -> set[str]:
        """Create the layout (meta.json, blob/, dataset/ann) and return names already present.

        Everything is created through :class:`ProjectRoot`: a symlinked ``blob/``, ``ann/``
        or dataset folder is refused (:class:`UnsafeFile`), never written through.
        """
        self.project_dir.mkdir(parents=True, exist_ok=True)
        root = ProjectRoot(self.project_dir)
        try:
            rel = self._dataset_rel()
            with root.dir("blob", create=True), root.dir(f"{rel}/ann", create=True):
                pass
            if root.lstat("meta.json") is None:
                root.write_atomic("meta.json", json.dumps(EMPTY_META).encode())
            existing = {
                e.name[: -len(".json")]
                for e in root.list_dir(f"{rel}/ann")
                if e.name.endswith(".json")
            }
            existing.update(e.name for e in root.list_dir(f"{rel}/img"))
        finally:
            root.close()
        return existing

    def _dataset_rel(self) -> str:
        try:
            rel = self.dataset_dir.relative_to(self.project_dir)
        except ValueError:
            raise InvalidInput(f"{self.dataset_dir} is not inside {self.project_dir}") from None
        return "/".join(split_rel(str(rel)))

    def pack(
        self,
        files: Iterable[Path | InlineFile],
        progress: Callable[[int], None] | None = None,
        ann_for: Callable[[Path | InlineFile, int, int], bytes] | None = None,
        stem: str | None = None,
        check_existing: bool = True,
    ) -> PackResult:
        """Pack ``files`` (each named by its basename) into new blobs of this dataset.

        Args:
            files: image files; each becomes ``img/<basename>``.
            progress: called with 1 per packed image.
            ann_for: annotation bytes for (file, width, height); default an empty one.
            stem: blob stem of the first blob (writeback names its batch's blob up front,
                so a rerun after a crash can tell whether the blob already landed).
            check_existing: refuse names already in the dataset (writeback checks itself).
        """
        existing = self.prepare()
        if not check_existing:
            existing = set()
        first_stem = stem
        result = PackResult()
        writer: TarBlobWriter | None = None
        stream: IO[bytes] | None = None
        anns: list[tuple[str, bytes]] = []
        stem = ""
        for path in files:
            name = path.name
            problem = name_problem(name)
            if problem:
                raise InvalidInput(f"{path}: {problem}")
            if name in existing:
                raise InvalidInput(f"{name}: an image of that name is already in {self.dataset}")
            existing.add(name)
            src, size, mtime = open_source(path)
            if writer is not None and writer.size + size + 2 * BLOCK > self.blob_size:
                self._finish(stem, writer, stream, anns, result)
                writer = None
            if writer is None:
                stem = first_stem or new_blob_stem(self.dataset)
                first_stem = None
                stream = self._create("blob", f".{stem}.tar.tmp")
                writer = TarBlobWriter(stream)
                anns = []
            with src:
                width, height = image_size(src, name)
                src.seek(0)
                writer.add(name, src, size, mtime)
            ann = (
                ann_for(path, width, height)
                if ann_for
                else json.dumps(empty_annotation(width, height)).encode()
            )
            anns.append((name, ann))
            result.images += 1
            result.bytes += size
            if progress:
                progress(1)
        if writer is not None:
            self._finish(stem, writer, stream, anns, result)
        return result

    def _finish(
        self,
        stem: str,
        writer: TarBlobWriter,
        stream: IO[bytes] | None,
        anns: list[tuple[str, bytes]],
        result: PackResult,
    ) -> None:
        assert stream is not None
        seal_tar(writer, stream)  # the tar is whole before anything names it
        root = ProjectRoot(self.project_dir)
        try:
            rel = self._dataset_rel()
            final = self.project_dir / "blob" / f"{stem}.tar"
            with root.dir("blob") as blob_dir:
                replace_at(blob_dir, f".{stem}.tar.tmp", final.name)
                os.fsync(blob_dir)
            failpoint("pack-after-tar")
            with root.dir(f"{rel}/ann") as ann_dir:
                for name, data in anns:
                    write_atomic_at(ann_dir, f"{name}.json", data)
            failpoint("pack-after-anns")
            with root.dir(rel) as ds_dir:
                tmp = f".{stem}{OFFSETS_SUFFIX}.tmp"
                with suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=ds_dir)
                with os.fdopen(create_at(ds_dir, tmp), "wb") as f:
                    write_offsets(f, writer.members)
                    f.flush()
                    os.fsync(f.fileno())
                replace_at(ds_dir, tmp, f"{stem}{OFFSETS_SUFFIX}")
                os.fsync(ds_dir)
        finally:
            root.close()
        result.blobs.append(final)
        logger.info("packed %d images (%d bytes) into %s", len(writer.members), writer.size, final)

    def _create(self, folder: str, name: str) -> IO[bytes]:
        """A new file in ``folder`` of the project (a stale one of a crashed run replaced)."""
        root = ProjectRoot(self.project_dir)
        try:
            with root.dir(folder) as dfd:
                with suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
                return os.fdopen(create_at(dfd, name), "wb")
        finally:
            root.close()
