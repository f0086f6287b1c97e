"""Ranged reads of a local file with ``os.pread``."""

from __future__ import annotations

import logging
import os
import threading

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
        fd = self._descriptor()
        want = end - start
        try:
            data = os.pread(fd, want, start)
        except IsADirectoryError as exc:
            raise CorruptData(f"blob {self.path} is a directory") from exc
        except OSError as exc:
            raise CorruptData(f"blob {self.path}: {exc.strerror}") from exc
        while len(data) < want:  # pread may return less before EOF on some filesystems
            more = os.pread(fd, want - len(data), start + len(data))
            if not more:
                raise CorruptData(
                    f"blob {self.path} is truncated: wanted bytes [{start}, {end}), "
                    f"file ends at {start + len(data)}"
                )
            data += more
        return data

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
