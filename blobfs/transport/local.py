"""Ranged reads of a local file with ``os.pread``, and a bounded pool of blob descriptors."""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from blobfs.errors import CorruptData, NotFound

logger = logging.getLogger(__name__)


class FileRangeReader:
    """``os.pread`` on a file opened lazily once and shared by all threads.

    pread carries its own offset, so one descriptor serves every reader thread without a
    lock around the reads; the lock only guards opening.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        fd = self._fd
        if fd is None:
            with self._lock:
                if self._fd is None:
                    try:
                        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError as exc:
                        raise NotFound(f"blob {self.path} is missing") from exc
                    except IsADirectoryError as exc:
                        raise CorruptData(f"blob {self.path} is a directory") from exc
                    except OSError as exc:
                        raise CorruptData(f"blob {self.path}: {exc.strerror}") from exc
                fd = self._fd
        return fd

    def read(self, start: int, end: int) -> bytes:
        return pread_exact(self._descriptor(), f"blob {self.path}", start, end)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


#: Descriptors kept open at most, whatever the limit allows (a training job reads a few
#: blobs at a time; reopening one costs microseconds).
MAX_POOL_FDS = 512
#: Fewest descriptors a pool keeps, even under a very low limit.
MIN_POOL_FDS = 4


def pool_capacity(limit: int | None = None) -> int:
    """How many blob descriptors to keep: half the soft ``RLIMIT_NOFILE``, at most 512.

    The other half is headroom for what else the daemon opens (``/dev/fuse``, the log,
    plain files being read, sockets, spool files).
    """
    if limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(MIN_POOL_FDS, min(limit // 2, MAX_POOL_FDS))


def open_regular(path: str) -> int:
    """Open a blob read-only: never through a symlink at its last component, never a FIFO
    or device (``O_NONBLOCK`` keeps a FIFO from blocking the open, ``fstat`` refuses it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptData(f"blob {path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(eq=False)
class _Slot:
    fd: int
    users: int = 0


class FdPool:
    """Descriptors of local blobs, opened on demand, at most ``capacity`` kept open.

    A project may have more tars than the process may open files (1,100 tars under the
    usual ``ulimit -n 1024``); a descriptor per blob held forever makes the reads beyond the
    limit fail for good. Here the least recently used idle descriptor is closed when the
    pool is full, and opened again when its blob is read again.

    A descriptor is closed only while no read uses it: a closed number can be reused by
    the next ``open`` of any file, so closing under a reader would make it read another
    file's bytes. Readers lease a slot; eviction skips leased ones (the pool may then hold
    a few more than ``capacity`` until they return, at most one per reading thread).

    Args:
        opener: opens a key (a blob's path) read-only and returns the descriptor; raises
            OSError or a :class:`BlobfsError`. The project source passes its safe opener.
        capacity: descriptors kept open at most (default :func:`pool_capacity`).
    """

    def __init__(self, opener: Callable[[str], int] = open_regular, capacity: int | None = None):
        self._opener = opener
        self.capacity = capacity if capacity is not None else pool_capacity()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self.opens = 0
        self.closes = 0
        self.reads = 0
        self.bytes_read = 0

    def pread(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of blob ``key``, exactly.

        Raises:
            CorruptData: the blob cannot be opened or read, or ends before ``end``.
        """
        slot = self._acquire(key)
        try:
            data = pread_exact(slot.fd, f"blob {key}", start, end)
        finally:
            self._release(slot)
        self.reads += 1  # under the GIL; a rare lost count is fine
        self.bytes_read += len(data)
        return data

    def _acquire(self, key: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                self._slots.move_to_end(key)
                slot.users += 1
                return slot
        fd = self._open(key)  # outside the lock: a slow open does not stall other blobs
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(fd)
                self.opens += 1
            else:  # another thread opened it meanwhile
                os.close(fd)
            slot.users += 1
            self._evict_idle()
            return slot

    def _open(self, key: str) -> int:
        for attempt in (0, 1):
            try:
                return self._opener(key)
            except FileNotFoundError as exc:
                raise CorruptData(f"blob {key} is missing") from exc
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and attempt == 0:
                    self._shrink()  # the process ran out: give back what is idle, retry
                    continue
                raise CorruptData(f"blob {key}: {exc.strerror}") from exc
        raise AssertionError("unreachable")

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users -= 1
            if len(self._slots) > self.capacity:
                self._evict_idle()

    def _evict_idle(self, keep: int | None = None) -> None:
        """Close least recently used idle descriptors until at most ``keep`` are open."""
        keep = self.capacity if keep is None else keep
        if len(self._slots) <= keep:
            return
        for key in [k for k, s in self._slots.items() if s.users == 0]:
            slot = self._slots.pop(key)
            os.close(slot.fd)
            self.closes += 1
            if len(self._slots) <= keep:
                return

    def _shrink(self) -> None:
        with self._lock:
            self._evict_idle(keep=0)

    @property
    def open_count(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        """Close every idle descriptor (at unmount; leased ones close on their release)."""
        self._shrink()

    def stats(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "open": len(self._slots),
            "opens": self.opens,
            "closes": self.closes,
            "reads": self.reads,
            "bytes_read": self.bytes_read,
        }


def pread_exact(fd: int, what: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``fd``, or :class:`CorruptData` naming ``what`` (a short
    read past the end is a truncated file, never fewer bytes served)."""
    want = end - start
    try:
        data = os.pread(fd, want, start)
        while len(data) < want:  # pread may return less before EOF on some filesystems
            more = os.pread(fd, want - len(data), start + len(data))
            if not more:
                raise CorruptData(
                    f"{what} is truncated: wanted bytes [{start}, {end}), "
                    f"file ends at {start + len(data)}"
                )
            data += more
    except IsADirectoryError as exc:
        raise CorruptData(f"{what} is a directory") from exc
    except OSError as exc:
        raise CorruptData(f"{what}: {exc.strerror}") from exc
    return data
