"""Open file handles: fh number -> what to read."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from blobfs.errors import NotFound
from blobfs.transport.base import RangeReader


@dataclass(frozen=True, slots=True)
class ReadHandle:
    """An open file: its reader and its size (reads are clipped to it)."""

    reader: RangeReader
    size: int
    path: str


class HandleTable:
    """Thread-safe map of fh numbers to handles; numbers are never reused while open."""

    def __init__(self) -> None:
        self._handles: dict[int, ReadHandle] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, handle: ReadHandle) -> int:
        with self._lock:
            fh = next(self._counter)
            self._handles[fh] = handle
            return fh

    def number(self) -> int:
        """A number no handle of this table has or will have, for a handle kept
        elsewhere (a file open for writing)."""
        return next(self._counter)  # one C call: atomic under the interpreter lock

    def get(self, fh: int) -> ReadHandle:
        try:
            return self._handles[fh]
        except KeyError:
            raise NotFound(f"no open file with handle {fh}") from None

    def remove(self, fh: int) -> ReadHandle | None:
        with self._lock:
            return self._handles.pop(fh, None)

    def __len__(self) -> int:
        return len(self._handles)
