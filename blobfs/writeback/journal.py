"""The spool's write-ahead journal: one fdatasync per acknowledged small file.

Making a staged file durable the plain way costs two flushes of the file system's own
journal (fsync of the file, fsync of its folder after the rename), and every flush also
stalls the next file's creation behind it: ~450 us per file on our disks, more than the
SDK's whole blob upload per image. Here the bytes of a closed file are appended to this
journal instead, one record, and made durable with one ``fdatasync``. The journal file is
written with zeros before use, so those appends overwrite allocated blocks and the
``fdatasync`` never has metadata to commit (~190 us per file). The staged file itself is
linked into place without any flush; the journal is the durable copy until the next
checkpoint, when the spool syncs its file system once and starts a new generation.
A plain ``close()`` appends its record without the ``fdatasync`` (the spool then holds the
file in the record alone); such a record past the zeros simply extends the file.

Layout: a 4 KiB header (magic, generation, CRC), then records, each
``magic, kind, generation, len(path), len(path2), len(data), crc32`` and the three
payloads. Replay reads records of the header's generation in order and stops at the first
record that does not check out (a torn append, or zeros, or an older generation's
leftovers), so nothing after a crash is ever replayed half.

Every record is a *blind* operation (the full new bytes of a file, a removal, a move that
carries the moved bytes), so replaying it gives the same result whatever state the
staged folder was left in: replay is idempotent and needs no undo.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from blobfs.failpoints import note_journal_synced

HEADER_SIZE = 4096
_HEADER = struct.Struct("<8sQI")
_HEADER_MAGIC = b"BLOBFSJ\x01"
_RECORD = struct.Struct("<4sB3xQIIQI")
_RECORD_MAGIC = b"BJR1"
#: Zeros are written ahead of use in steps of this size (bounded write amplification).
SEGMENT = 16 * 1024 * 1024
#: Bytes of records before the spool must checkpoint (one syncfs) to retire them.
CAPACITY = 512 * 1024 * 1024


class Kind(IntEnum):
    WRITE = 1  # path's whole content is data
    REMOVE = 2  # path no longer exists
    MOVE = 3  # path2's whole content is data, path no longer exists


@dataclass(frozen=True)
class Record:
    kind: Kind
    path: str
    path2: str
    data: bytes


_KINDS = frozenset(k.value for k in Kind)


def _record_crc(head: bytes, p1: bytes, p2: bytes, data: bytes) -> int:
    """CRC-32 of a record: its header without the CRC field, then the three payloads
    (the header and the paths, a few dozen bytes, joined first: one call fewer each)."""
    return zlib.crc32(data, zlib.crc32(head[:-4] + p1 + p2))


class JournalFull(Exception):
    """The record does not fit before ``capacity``: checkpoint, then append again."""


class Journal:
    """Append-only log of blind spool operations, made durable one record at a time.

    Not thread-safe: the spool serialises appends and checkpoints under its lock.
    """

    def __init__(self, path: str | os.PathLike[str], capacity: int = CAPACITY) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._prepared = os.fstat(self._fd).st_size
        self._end = HEADER_SIZE
        generation = self._read_generation()
        if generation is None:
            self._prepare(HEADER_SIZE)
            self._write_header(1)
        else:
            self._generation = generation
        # what a new run finds is what the last one left on disk
        self._synced(self._prepared if generation is not None else HEADER_SIZE)

    def close(self) -> None:
        os.close(self._fd)

    @property
    def empty(self) -> bool:
        """True when no record was appended since the last reset (or replay)."""
        return self._end == HEADER_SIZE

    @property
    def used(self) -> int:
        return self._end - HEADER_SIZE

    # ---- writing ---------------------------------------------------------------------

    def append(
        self, kind: Kind, path: str, path2: str = "", data: bytes = b"", sync: bool = True
    ) -> int:
        """Append one record, durably unless ``sync`` is false; returns the offset of its
        data in the file (where the spool reads a file it holds only here). Raises
        ``JournalFull`` if it does not fit.

        Without ``sync`` the record is in the kernel's page cache only: a killed process
        keeps it, a power cut may not (nor anything after it: replay stops at the first
        record that does not check out, and the next synced append flushes it too).
        """
        p1, p2 = path.encode(), path2.encode()
        fields = (_RECORD_MAGIC, kind, self._generation, len(p1), len(p2), len(data))
        crc = _record_crc(_RECORD.pack(*fields, 0), p1, p2, data)
        # written as its parts (one pwritev): the file's bytes are not copied into a record
        parts = (_RECORD.pack(*fields, crc), p1, p2, data)
        size = _RECORD.size + len(p1) + len(p2) + len(data)
        end = self._end + size
        if end > self.capacity:
            raise JournalFull(f"{size} bytes do not fit in the journal")
        if end > self._prepared and sync:
            try:
                self._prepare(min(self.capacity, max(end, self._prepared + SEGMENT)))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                self._prepare(min(self.capacity, -(-end // 4096) * 4096))  # just this one
        written = os.pwritev(self._fd, parts, self._end)
        if written != size:
            raise OSError(f"journal {self.path}: short write ({written} of {size})")
        if end > self._prepared:
            # an unflushed record past the zeros extends the file: zeros written (and
            # synced) ahead are only worth their cost for a record that is flushed
            self._prepared = end
        if sync:
            os.fdatasync(self._fd)
        start = self._end + _RECORD.size + len(p1) + len(p2)
        self._end = end
        if sync:
            self._synced()
        return start

    def fits(self, path: str, data_size: int) -> bool:
        """Whether a record of ``path`` with ``data_size`` bytes fits before ``capacity``."""
        size = _RECORD.size + len(path.encode()) + data_size
        return self._end + size <= self.capacity

    @property
    def fd(self) -> int:
        """The journal file's descriptor, for reading a record's data back."""
        return self._fd

    def reset(self) -> None:
        """Start a new generation: every record so far is forgotten.

        Call only when the effects of all records are durable by other means (the spool
        syncs its file system first): the header flip is the single durable step that
        retires them, and an older generation's bytes left behind never replay again.
        """
        self._write_header(self._generation + 1)
        self._end = HEADER_SIZE
        self._synced()  # what lies past the header is an older generation's: never replayed

    def shrink(self, keep: int = HEADER_SIZE) -> None:
        """Give the zeroed space past ``keep`` bytes back to the file system (only while
        empty: right after ``reset``); appends prepare it again as they need it."""
        assert self.empty, "shrink only an empty journal"
        keep = max(HEADER_SIZE, keep)
        if self._prepared <= keep:
            return
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        self._prepared = keep
        self._synced()

    def flush(self) -> None:
        """Make every record appended so far durable (one ``fdatasync``)."""
        os.fdatasync(self._fd)
        self._synced()

    def synced(self) -> None:
        """The spool flushed the journal's file system (``syncfs``): every record so far
        is durable."""
        self._synced()

    def _synced(self, durable: int | None = None) -> None:
        """Tell the power-cut trials (``blobfs/failpoints.py``) how far the file is on
        disk: they drop what a power cut may drop, the bytes past this mark."""
        note_journal_synced(self.path, self._end if durable is None else durable, self._prepared)

    @property
    def prepared(self) -> int:
        """Bytes the journal file holds on disk (zeros included)."""
        return self._prepared

    def _prepare(self, size: int) -> None:
        """Write zeros up to ``size`` and make that allocation durable, ahead of appends.

        On a full file system the zeros written so far are given back (the journal never
        keeps space it cannot use) and the error raised: the spool then makes the file
        durable without the journal.
        """
        zeros = bytes(1024 * 1024)
        offset = self._prepared
        try:
            while offset < size:
                chunk = zeros[: min(len(zeros), size - offset)]
                offset += os.pwrite(self._fd, chunk, offset)
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self._prepared)
            raise
        self._prepared = offset
        self._synced()

    def _write_header(self, generation: int) -> None:
        head = _HEADER.pack(_HEADER_MAGIC, generation, 0)
        crc = zlib.crc32(head[:-4])
        os.pwrite(self._fd, head[:-4] + struct.pack("<I", crc), 0)
        os.fdatasync(self._fd)
        self._generation = generation

    def _read_generation(self) -> int | None:
        """The header's generation; None for a journal that never had a header."""
        raw = os.pread(self._fd, _HEADER.size, 0)
        if len(raw) < _HEADER.size or raw == bytes(len(raw)):
            # New, or cut off between its zeros and its first header: no record was ever
            # written (records come only after a durable header), so start afresh.
            return None
        magic, generation, crc = _HEADER.unpack(raw)
        if magic != _HEADER_MAGIC or zlib.crc32(raw[:-4]) != crc:
            raise OSError(f"journal {self.path}: header is damaged; refusing to guess")
        return int(generation)

    # ---- reading ---------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """The valid records of the current generation, in order; positions the end after
        the last one, so appends continue the journal rather than overwrite it."""
        offset = HEADER_SIZE
        self._end = offset
        while offset + _RECORD.size <= self._prepared:
            head = os.pread(self._fd, _RECORD.size, offset)
            magic, kind, generation, n1, n2, n3, crc = _RECORD.unpack(head)
            if magic != _RECORD_MAGIC or generation != self._generation:
                return
            end = offset + _RECORD.size + n1 + n2 + n3
            if kind not in _KINDS or end > self._prepared:
                return
            body = os.pread(self._fd, n1 + n2 + n3, offset + _RECORD.size)
            p1, p2, data = body[:n1], body[n1 : n1 + n2], body[n1 + n2 :]
            if _record_crc(head, p1, p2, data) != crc:
                return
            try:
                record = Record(Kind(kind), p1.decode(), p2.decode(), data)
            except UnicodeDecodeError:
                return
            offset = self._end = end
            yield record
