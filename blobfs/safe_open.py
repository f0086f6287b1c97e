"""Open, list and create files of a local project without ever leaving its folder.

A project folder is untrusted input: any name in it may be a symlink to a file elsewhere on
the machine (readable through ``--allow-other`` by users who could not read it otherwise),
a FIFO whose ``open`` blocks a FUSE thread until someone writes to it, or a device that
never ends. So nothing of a project is opened by path. :class:`ProjectRoot` holds a
descriptor of the project folder and walks every relative path one component at a time
with ``openat(..., O_NOFOLLOW)``: a symlink anywhere on the path is refused, never
followed, and a ``..`` component cannot occur. A file is opened with ``O_NONBLOCK`` (a FIFO
cannot block the open) only after ``lstat`` shows a regular file, and ``fstat`` of the
descriptor must agree (a swap between the two is caught). Whole-file reads take a size
cap, so ``/dev/zero``-like inputs and oversized files are refused with a message instead
of exhausting memory.

Per-component ``openat`` was chosen over ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``:
it needs no ctypes, works on every kernel, and the walk is short (a dataset folder is
opened once per listing, not once per file).

The project folder itself is the path the user named, so it may be a symlink; everything
below it may not.
"""

from __future__ import annotations

import operator
import os
import stat
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import compress, islice
from pathlib import Path

from blobfs.errors import CorruptData, NotFound
from blobfs.transport.local import pread_exact

#: Caps on whole-file reads; each far above any real file of its kind.
MAX_META_JSON_BYTES = 64 << 20
MAX_ANN_JSON_BYTES = 256 << 20
MAX_OFFSETS_FILE_BYTES = 1 << 30

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Directory entries sorted at a time by :meth:`ProjectRoot.list_regular`.
LIST_CHUNK = 8192
_IS_FILE = operator.methodcaller("is_file", follow_symlinks=False)
_NAME = operator.attrgetter("name")


class UnsafeFile(CorruptData):
    """A project path that is a symlink, a special file, or larger than its cap (EIO).

    ``reason`` is the message without the path, for lines that already name the file.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def describe(mode: int) -> str:
    """What a non-regular file is, for messages: ``a symlink``, ``a FIFO`` ..."""
    for test, what in (
        (stat.S_ISLNK, "a symlink (not followed)"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _sort_entries(entries: list[os.DirEntry[str]], names: list[str], others: list[DirItem]) -> None:
    """The names of the regular files among ``entries`` go to ``names`` (each entry's type
    from its directory entry, in C-level passes: no Python code runs per file), the other
    entries ``lstat``-ed to ``others``; an entry that vanished meanwhile is left out."""
    try:
        regular = list(map(_IS_FILE, entries))
    except OSError:  # an entry of unknown type vanished or cannot be stat-ed: one by one
        regular = [_is_file(e) for e in entries]
    names += compress(map(_NAME, entries), regular)
    if len(regular) == regular.count(True):
        return
    for entry, is_file in zip(entries, regular, strict=True):
        if is_file is False:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished while listing
            others.append(DirItem(entry.name, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino))


def _is_file(entry: os.DirEntry[str]) -> bool | None:
    """Whether ``entry`` is a regular file; None when it vanished or cannot be told."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return None


def split_rel(rel: str | Sequence[str]) -> list[str]:
    """``"a/b/c"`` -> ``["a", "b", "c"]``; refuses ``.``, ``..`` and empty components."""
    parts = [p for p in rel.split("/") if p] if isinstance(rel, str) else list(rel)
    for p in parts:
        if p in (".", "..") or not p or "/" in p or "\0" in p:
            raise UnsafeFile(f"path component {p!r} is not allowed")
    return parts


@dataclass(frozen=True, slots=True)
class DirItem:
    """One entry of a listed folder, as ``lstat`` saw it (never followed)."""

    name: str
    mode: int
    size: int
    mtime_ns: int
    ino: int

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class ProjectRoot:
    """A project folder held open; every access below it is relative and never followed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.fd: int | None = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"project folder {self.path} does not exist") from exc
        except NotADirectoryError as exc:
            raise NotFound(f"project folder {self.path} is not a folder") from exc
        except OSError as exc:
            raise NotFound(f"project folder {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def where(self, rel: str | Sequence[str]) -> str:
        """The path for messages (never for opening)."""
        return str(self.path.joinpath(*split_rel(rel)))

    def _root_fd(self) -> int:
        if self.fd is None:
            raise CorruptData(f"project folder {self.path} is closed")
        return self.fd

    def _refusal(self, dfd: int, name: str, rel: Sequence[str], exc: OSError) -> Exception:
        """The error for a failed ``openat``: say what the thing is when it exists."""
        where = self.where(rel)
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"{where} does not exist")
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return CorruptData(f"{where}: {exc.strerror}")
        return UnsafeFile(f"{where} is {describe(st.st_mode)}; refused", describe(st.st_mode))

    def open_dir(self, rel: str | Sequence[str], create: bool = False) -> int:
        """A new descriptor of the folder ``rel`` (``""`` = the project); caller closes it.

        With ``create``, missing folders along the path are made (mode 0755 minus umask).
        """
        parts = split_rel(rel)
        # a new open of the project folder, not a ``dup`` of the kept descriptor: a dup
        # shares its directory position, so two listings of the project folder at once
        # (a request and the background index) would each see part of it, or nothing
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._root_fd())
        try:
            for i, name in enumerate(parts):
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise NotFound(f"{self.where(parts[: i + 1])} does not exist") from None
                    with suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                    try:
                        nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        raise self._refusal(fd, name, parts[: i + 1], exc) from None
                except OSError as exc:
                    raise self._refusal(fd, name, parts[: i + 1], exc) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def dir(self, rel: str | Sequence[str], create: bool = False) -> Iterator[int]:
        """``open_dir`` as a context manager."""
        fd = self.open_dir(rel, create)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_file(self, rel: str | Sequence[str]) -> int:
        """A read-only descriptor of the regular file ``rel``; anything else is refused."""
        parts = split_rel(rel)
        if not parts:
            raise UnsafeFile(f"{self.path} is a directory")
        with self.dir(parts[:-1]) as dfd:
            return self._open_regular_at(dfd, parts[-1], parts)

    def _open_regular_at(self, dfd: int, name: str, parts: Sequence[str]) -> int:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"{self.where(parts)} does not exist") from None
        except OSError as exc:
            raise CorruptData(f"{self.where(parts)}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # never open a FIFO or device at all
            raise UnsafeFile(
                f"{self.where(parts)} is {describe(st.st_mode)}; refused", describe(st.st_mode)
            )
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except OSError as exc:
            raise self._refusal(dfd, name, parts, exc) from None
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):  # swapped between lstat and open
            os.close(fd)
            raise UnsafeFile(
                f"{self.where(parts)} is {describe(fst.st_mode)}; refused", describe(fst.st_mode)
            )
        return fd

    def read_file(self, rel: str | Sequence[str], cap: int, what: str = "file") -> bytes:
        """The whole regular file ``rel``, refused when larger than ``cap`` bytes."""
        fd = self.open_file(rel)
        try:
            size = os.fstat(fd).st_size
            if size > cap:
                reason = f"{what} of {size} bytes is larger than the {cap >> 20} MiB allowed"
                raise UnsafeFile(f"{self.where(rel)}: {reason}; refused", reason)
            chunks: list[bytes] = []
            got = 0
            while got <= cap:  # the size may grow while reading: the cap still holds
                chunk = os.read(fd, min(1 << 20, cap + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got > cap:
                raise UnsafeFile(f"{self.where(rel)}: {what} grew past {cap >> 20} MiB; refused")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def list_dir(self, rel: str | Sequence[str]) -> list[DirItem]:
        """Every entry of the folder ``rel``, stat'ed without following; [] when missing.

        Raises:
            UnsafeFile: ``rel`` (or a folder on its way) is a symlink or not a folder.
        """
        try:
            fd = self.open_dir(rel)
        except NotFound:
            return []
        try:
            out: list[DirItem] = []
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished while listing
                    out.append(
                        DirItem(entry.name, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
                    )
            return out
        finally:
            os.close(fd)

    def list_regular(self, rel: str | Sequence[str]) -> tuple[list[str], list[DirItem]]:
        """The names of the folder's regular files, from its directory entries (no ``lstat``
        per file: a 250,000-file folder lists in a fraction of the time), and its other
        entries ``lstat``-ed, to say what they are; ([], []) when missing.

        Raises:
            UnsafeFile: ``rel`` (or a folder on its way) is a symlink or not a folder.
        """
        try:
            fd = self.open_dir(rel)
        except NotFound:
            return [], []
        names: list[str] = []
        others: list[DirItem] = []
        try:
            with os.scandir(fd) as it:
                while chunk := list(islice(it, LIST_CHUNK)):
                    _sort_entries(chunk, names, others)
        finally:
            os.close(fd)
        return names, others

    def lstat(self, rel: str | Sequence[str]) -> os.stat_result | None:
        """``lstat`` of ``rel`` reached without following; None when it does not exist."""
        parts = split_rel(rel)
        try:
            with self.dir(parts[:-1]) as dfd:
                return os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except (NotFound, FileNotFoundError):
            return None

    # ---- writing (writeback, pack) ---------------------------------------------------

    def write_atomic(self, rel: str | Sequence[str], data: bytes) -> None:
        """Write ``rel`` through a fsync'd temp file and a rename, all inside the project.

        The temp file is created with ``O_EXCL | O_NOFOLLOW`` in a folder reached without
        following, and ``rename`` replaces a symlink at the target rather than writing
        through it, so nothing outside the project is ever written.
        """
        parts = split_rel(rel)
        with self.dir(parts[:-1], create=True) as dfd:
            write_atomic_at(dfd, parts[-1], data)


def create_at(dfd: int, name: str) -> int:
    """A new file ``name`` in folder ``dfd`` for writing; refuses to reuse or follow anything."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o644, dir_fd=dfd)


def replace_at(dfd: int, src: str, dst: str) -> None:
    """Rename ``src`` over ``dst``, both in folder ``dfd``."""
    os.replace(src, dst, src_dir_fd=dfd, dst_dir_fd=dfd)


def write_atomic_at(dfd: int, name: str, data: bytes) -> None:
    """``data`` into ``name`` of folder ``dfd``: old or new content, never half."""
    tmp = f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    fd = create_at(dfd, tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dfd)
        raise
    os.close(fd)
    replace_at(dfd, tmp, name)


class ProjectFileReader:
    """Ranged ``pread`` of one regular file of a project, opened lazily and safely once."""

    def __init__(self, root: ProjectRoot, rel: str) -> None:
        self.root, self.rel = root, rel
        self._fd: int | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.root.where(self.rel)

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = self.root.open_file(self.rel)
                fd = self._fd
        return fd

    def read(self, start: int, end: int) -> bytes:
        return pread_exact(self._descriptor(), self.path, start, end)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
