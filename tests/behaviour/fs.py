"""A small file-system protocol the behaviour suite is written against, and its two
adapters: in-process (the FUSE operations object, no kernel) and a real mount (``os``
calls on a mounted path).

Every call raises :class:`OSError` with the errno a program would see. The in-process
adapter drives :class:`~blobfs.fuse.ops.BlobfsOperations` (or the writeback one), which is
the errno boundary, so a test that passes on both says the boundary decides the errno and
the kernel only carries it. Where the kernel itself takes part in a call (walking a path
one component at a time, choosing ``create`` or ``open`` for ``O_CREAT``, treating ENOSYS
from ``open`` as "no open needed"), the in-process adapter does what the kernel does, and
no more; where the kernel answers without asking the daemon at all (a write on a ``ro``
mount), the in-process adapter cannot tell, and the test says so in its ``only_on`` mark.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from blobfs.fuse.compat import FuseOSError
from blobfs.fuse.ops import BlobfsOperations

#: The kernel asks for at most this much per read request (FUSE's default max_read).
READ_CHUNK = 128 << 10


@dataclass(frozen=True)
class Stat:
    """The part of ``stat`` the suite looks at."""

    mode: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


class FS(Protocol):
    """What a program does to a mount; paths are absolute inside the mount (``/ds/img/a``)."""

    kind: str  #: ``"inprocess"`` or ``"mount"``

    def stat(self, path: str) -> Stat: ...

    def listdir(self, path: str) -> list[str]: ...

    def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """``size`` bytes from ``offset`` (to the end when None): open, pread, close."""
        ...

    def open_write(self, path: str, truncate: bool = True) -> int:
        """``open(path, O_WRONLY | O_CREAT [| O_TRUNC])``: a handle for write/fsync/close."""
        ...

    def write(self, fd: int, data: bytes, offset: int = 0) -> int: ...

    def fsync(self, fd: int) -> None: ...

    def close(self, fd: int) -> None: ...

    def unlink(self, path: str) -> None: ...

    def rename(self, old: str, new: str) -> None: ...

    def mkdir(self, path: str) -> None: ...

    def rmdir(self, path: str) -> None: ...

    def chmod(self, path: str, mode: int) -> None: ...

    def truncate(self, path: str, length: int) -> None: ...


def write_file(fs: FS, path: str, data: bytes, fsync: bool = False) -> None:
    """``open(O_CREAT | O_TRUNC)``, write, [fsync], close: what ``cp`` does."""
    fd = fs.open_write(path)
    try:
        fs.write(fd, data, 0)
        if fsync:
            fs.fsync(fd)
    except BaseException:
        with suppress(OSError):
            fs.close(fd)
        raise
    fs.close(fd)


def errno_of(call: Any, *args: Any) -> int:
    """The errno ``call(*args)`` fails with, 0 when it succeeds."""
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    return 0


# ---- a real mount ------------------------------------------------------------------------


class MountFS:
    """``os`` calls on a mounted folder: what every program does."""

    kind = "mount"

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self._fds: set[int] = set()

    def _p(self, path: str) -> str:
        return os.path.join(self.mnt, path.lstrip("/"))

    def stat(self, path: str) -> Stat:
        st = os.stat(self._p(path))
        return Stat(st.st_mode, st.st_size, st.st_mtime_ns)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._p(path))

    def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        fd = os.open(self._p(path), os.O_RDONLY)
        try:
            out = bytearray()
            while size is None or len(out) < size:
                want = READ_CHUNK if size is None else min(READ_CHUNK, size - len(out))
                chunk = os.pread(fd, want, offset + len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        finally:
            os.close(fd)

    def open_write(self, path: str, truncate: bool = True) -> int:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        fd = os.open(self._p(path), flags, 0o644)
        self._fds.add(fd)
        return fd

    def write(self, fd: int, data: bytes, offset: int = 0) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        self._fds.discard(fd)
        os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._p(old), self._p(new))

    def mkdir(self, path: str) -> None:
        os.mkdir(self._p(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def truncate(self, path: str, length: int) -> None:
        os.truncate(self._p(path), length)


# ---- in-process: the FUSE operations object, no kernel -------------------------------------


@dataclass
class _Handle:
    path: str
    fh: int


class InProcessFS:
    """The FUSE operations object called as libfuse calls it, no kernel in between."""

    kind = "inprocess"

    def __init__(self, ops: BlobfsOperations) -> None:
        self.ops = ops
        self._handles: dict[int, _Handle] = {}
        self._next = 1000

    @staticmethod
    def _errno(exc: FuseOSError, path: str) -> OSError:
        code = exc.errno or errno.EIO
        return OSError(code, os.strerror(code), path)

    def _call(self, path: str, name: str, *args: Any) -> Any:
        method = getattr(self.ops, name)
        try:
            return method(*args)
        except FuseOSError as exc:
            raise self._errno(exc, path) from None

    def _walk(self, path: str) -> None:
        """The kernel looks up each folder on the way: a file there is ENOTDIR."""
        parts = [p for p in path.split("/") if p]
        for n in range(1, len(parts)):
            prefix = "/" + "/".join(parts[:n])
            attrs = self._call(prefix, "getattr", prefix, None)
            if not stat.S_ISDIR(attrs["st_mode"]):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)

    def _attrs(self, path: str) -> dict[str, int]:
        self._walk(path)
        attrs: dict[str, int] = self._call(path, "getattr", path, None)
        return attrs

    def stat(self, path: str) -> Stat:
        attrs = self._attrs(path)
        mtime = attrs.get("st_mtime", 0)
        mtime_ns = mtime if mtime > 1 << 40 else int(mtime * 1e9)
        return Stat(attrs["st_mode"], attrs.get("st_size", 0), mtime_ns)

    def listdir(self, path: str) -> list[str]:
        self._walk(path)
        names = self._call(path, "readdir", path, 0)
        return [n if isinstance(n, str) else n[0] for n in names if n not in (".", "..")]

    def _open(self, path: str, flags: int) -> int:
        """``open``; ENOSYS from a read-only mount's ``open`` is the kernel's no-open mode
        (no handle, no release)."""
        try:
            return int(self.ops.open(path, flags) or 0)
        except FuseOSError as exc:
            if exc.errno == errno.ENOSYS:
                return -1
            raise self._errno(exc, path) from None

    def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        attrs = self._attrs(path)
        if stat.S_ISDIR(attrs["st_mode"]):  # the kernel opens it; read asks the tree
            self._call(path, "read", path, size or READ_CHUNK, offset, 0)
        fh = self._open(path, os.O_RDONLY)
        try:
            end = attrs.get("st_size", 0) if size is None else offset + size
            out = bytearray()
            while offset + len(out) < end:
                want = min(READ_CHUNK, end - offset - len(out))
                chunk = self._call(path, "read", path, want, offset + len(out), max(fh, 0))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        finally:
            if fh >= 0:
                self._call(path, "release", path, fh)

    def open_write(self, path: str, truncate: bool = True) -> int:
        self._walk(path)
        try:
            self.ops.getattr(path, None)
            exists = True
        except FuseOSError as exc:
            if exc.errno != errno.ENOENT:
                raise self._errno(exc, path) from None
            exists = False
        if exists:
            flags = os.O_WRONLY | (os.O_TRUNC if truncate else 0)
            fh = self._open(path, flags)
            if fh < 0:  # a read-only mount's open: the kernel's ro flag answers first
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        else:
            fh = int(self._call(path, "create", path, 0o100644, os.O_WRONLY | os.O_CREAT))
        self._next += 1
        self._handles[self._next] = _Handle(path, fh)
        return self._next

    def write(self, fd: int, data: bytes, offset: int = 0) -> int:
        h = self._handles[fd]
        return int(self._call(h.path, "write", h.path, data, offset, h.fh))

    def fsync(self, fd: int) -> None:
        h = self._handles[fd]
        self._call(h.path, "fsync", h.path, 0, h.fh)

    def close(self, fd: int) -> None:
        """``close()``: FUSE ``flush`` (its error is close's), then ``release``."""
        h = self._handles.pop(fd)
        try:
            self._call(h.path, "flush", h.path, h.fh)
        finally:
            self._call(h.path, "release", h.path, h.fh)

    def unlink(self, path: str) -> None:
        self._attrs(path)
        self._call(path, "unlink", path)

    def rename(self, old: str, new: str) -> None:
        self._attrs(old)
        self._walk(new)
        self._call(old, "rename", old, new)

    def mkdir(self, path: str) -> None:
        self._walk(path)
        if errno_of(self.ops.getattr, path, None) == 0:  # the kernel finds it first
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        self._call(path, "mkdir", path, 0o755)

    def rmdir(self, path: str) -> None:
        if not stat.S_ISDIR(self._attrs(path)["st_mode"]):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        self._call(path, "rmdir", path)

    def chmod(self, path: str, mode: int) -> None:
        self._attrs(path)
        self._call(path, "chmod", path, mode)

    def truncate(self, path: str, length: int) -> None:
        self._attrs(path)
        self._call(path, "truncate", path, length, None)


def wait_until(check: Any, timeout_s: float = 10.0) -> bool:
    """Poll ``check()`` until it is true or time runs out; its last answer."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return bool(check())
        time.sleep(0.01)
    return True
