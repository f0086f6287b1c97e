"""A folder's entries in a few flat buffers instead of one Python object per file.

A million images held as records, nodes and dict entries cost about 1.5 KB each; a
:class:`FileTable` holds the same folder as

- every name, UTF-8 (``surrogateescape`` for names that are not), sorted bytewise and each
  followed by a NUL, in one ``bytes`` buffer, plus an ``array`` of where each name starts;
- per entry, the index of its *source* (which blob, or the folder itself), its start inside
  that blob and its size, each an ``array`` of the narrowest integer type its values fit
  (a column whose values are all equal is stored as that one value).

A lookup is a binary search over the names, so ``stat`` of one file never builds the
folder's listing; a listing pages through the buffers by entry index (readdirplus asks
from an index). Records are made on demand and never kept.

Entries of an ordinary folder (``ann/``, plain ``img/`` files) carry only their name: their
size and mtime are read by ``lstat`` when the file is looked up, so listing a folder of
250,000 annotations costs one directory scan, not 250,000 ``stat`` calls.

:meth:`FileTable.to_bytes` / :meth:`FileTable.from_bytes` are the on-disk form used by the
index cache. The bytes come from a cache file, which is untrusted input. ``from_bytes``
checks at once what a lookup relies on (sizes, the entry count, the column ranges, and the
stored start of every :data:`SAMPLE`-th name, which is all a lookup needs), and raises
:class:`ValueError` otherwise; the promises that need every name visited (sorted, distinct,
each a file name) are checked at the first use of the whole table (a listing), so that a
``stat`` right after a mount does not wait for a pass over a quarter of a million names.
A lookup of an unchecked table can only find an entry whose name is exactly the one asked
(a NUL ends every name), so it never serves another entry's bytes; if the later check
fails, the listing fails with :class:`~blobfs.errors.CorruptData` and the table's
``on_damaged`` hook runs (the project source forgets the cache file). Bytes the index
cache proves blobfs wrote (its MAC) are loaded ``trusted``: that pass over every name is
skipped, and so is finding where each name starts (the writer stores the starts; a
trusted loader takes them once they agree with the sampled starts and the names' end, an
untrusted one ignores them); the structural checks are not skipped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import operator
import os
import stat
import struct
import sys
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate, groupby, islice, repeat
from typing import Any

from blobfs.errors import CorruptData
from blobfs.model import BlobRef, FileRecord, LocalFileRef

#: Kinds of entry source.
BLOB = "blob"
FOLDER = "folder"
MAGIC = b"BLOBFSCT"
FORMAT = 2
NAME_MAX = 255
#: Names decoded at a time when a listing is paged through.
PAGE = 256
#: Entries of a listing's first run; each next run doubles, up to 4 pages. A listing
#: request takes what fits in the kernel's buffer (about 190 entries with attributes in
#: 32 KiB), so a request decodes few names it does not send.
RUN_FIRST = 64
#: One name in this many is kept as an object, to bisect in C (see ``index_of``).
SAMPLE = 32
_TYPECODES = ("B", "H", "I", "Q")
#: The extra column that, when a table has it, gives each entry its own mtime (a source's
#: ``mtime_ns`` is then not used): remote images each have their update time.
MTIME = "mtime"
_HEAD = struct.Struct("<8sII")


@dataclass(frozen=True, slots=True)
class EntrySource:
    """Where some entries' bytes live: a blob (``key`` is its stem) or a folder (its path).

    Blob entries take ``version`` and ``mtime_ns`` from here; folder entries are
    ``lstat``-ed by name when looked up.
    """

    kind: str
    key: str
    version: str = ""
    mtime_ns: int = 0


class _Column:
    """Integers stored in the narrowest array type that holds ``value - base``."""

    __slots__ = ("base", "length", "values")

    def __init__(self, base: int, values: array[int] | None, length: int) -> None:
        self.base, self.values, self.length = base, values, length

    @classmethod
    def of(cls, values: Sequence[int], bounds: tuple[int, int] | None = None) -> _Column:
        """The column of ``values`` (``bounds``: their min and max, when known)."""
        if not values:
            return cls(0, None, 0)
        lo, hi = bounds or (min(values), max(values))
        if lo == hi:
            return cls(lo, None, len(values))
        span = hi - lo
        code = next(c for c in _TYPECODES if span < 1 << (8 * array(c).itemsize))
        if lo >= 0 and hi < 1 << (8 * array(code).itemsize):
            # the values fit that type as they are: no shift (a pass in Python per value)
            return cls(0, array(code, values), len(values))
        return cls(lo, array(code, map((-lo).__add__, values)), len(values))

    def __getitem__(self, i: int) -> int:
        values = self.values
        return self.base if values is None else self.base + values[i]

    @property
    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.itemsize * len(self.values)

    def spec(self) -> list[Any]:
        return [self.base, "" if self.values is None else self.values.typecode, self.nbytes]

    def maximum(self) -> int:
        return self.base + (max(self.values) if self.values else 0)

    def slice(self, lo: int, hi: int) -> Sequence[int]:
        """Values ``lo`` to ``hi`` in one C-level step (a listing page's sizes)."""
        values, base = self.values, self.base
        if values is None:
            return [base] * (hi - lo)
        if base == 0:
            return values[lo:hi]
        return list(map(base.__add__, values[lo:hi]))


def encode_name(name: str) -> bytes:
    """A name as stored (and compared): UTF-8, undecodable bytes kept (``surrogateescape``)."""
    return name.encode("utf-8", "surrogateescape")


class FileTable(Mapping[str, FileRecord]):
    """The entries of one folder, compact; a read-only ``Mapping`` of name -> record.

    Args:
        prefix: what a record's ``relpath`` starts with (``"img/"``).
        sources: the blobs and folders the entries point into.
        names: each entry's encoded name followed by NUL, sorted bytewise, no duplicates.
        src, start, size: per entry, the index into ``sources``, the byte offset inside a
            blob, and the size (both 0 for folder entries).
        lstat: how a folder entry is stat-ed (``os.lstat`` by default; a source may pass
            a safer one that does not follow symlinks in any component).
        extra: more integer columns by name, one value per entry, for a source whose
            entries need more than a range of a blob (a remote image's id); a subclass's
            :meth:`record_at` reads them. :data:`MTIME` is understood here.
    """

    def __init__(
        self,
        prefix: str,
        sources: Sequence[EntrySource],
        names: bytes,
        src: _Column,
        start: _Column,
        size: _Column,
        lstat: Callable[[str], os.stat_result] = os.lstat,
        starts: array[int] | None = None,
        sampled: array[int] | None = None,
        extra: Mapping[str, _Column] | None = None,
        trusted: bool = False,
    ) -> None:
        self.prefix = prefix
        #: names loaded from disk that blobfs itself wrote (checked when it built them):
        #: the deferred check only finds where they start
        self._trusted = trusted
        self.extra: dict[str, _Column] = dict(extra or {})
        self._mtime = self.extra.get(MTIME)
        self.sources = tuple(sources)
        self._names = names
        if starts is None and sampled is None:
            starts = _starts_of(names.split(b"\0")[:-1], len(names))
        #: where name i starts: 0, then one past each NUL (``starts[count]`` = the end);
        #: None until the first use of the whole table when loaded from disk unchecked
        self._starts = starts
        # unchecked names (from disk): as many as the columns' entries, which the loader
        # has matched to the NULs (and the deferred check counts them again)
        self._count = len(starts) - 1 if starts is not None else src.length
        #: where every SAMPLE-th name starts (all a lookup needs)
        self._sampled = sampled if sampled is not None else _sampled_of(starts)
        self._check_lock = threading.Lock()
        #: called once when the deferred check of a table loaded from disk fails
        self.on_damaged: Callable[[str], None] | None = None
        # every SAMPLE-th name as bytes: bisect (in C) picks the block of SAMPLE entries
        # that may hold a name, then one bytes.find inside that block settles it. Made at
        # the first lookup, once the builder's short-lived objects are gone: made among
        # them, these few long-lived objects would pin their memory arenas.
        self._sample: list[bytes] | None = None
        self._src, self._start, self._size = src, start, size
        self.lstat = lstat

    # ---- Mapping -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        for i in range(0, self._count, PAGE):
            yield from self._decoded(i, min(self._count, i + PAGE))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.index_of(name) >= 0

    def __getitem__(self, name: str) -> FileRecord:
        i = self.index_of(name) if isinstance(name, str) else -1
        rec = self.record_at(i, name) if i >= 0 else None
        if rec is None:
            raise KeyError(name)
        return rec

    def get(self, name: str, default: Any = None) -> Any:
        """The record of ``name``, or ``default``; one binary search, one record made."""
        i = self.index_of(name) if isinstance(name, str) else -1
        rec = self.record_at(i, name) if i >= 0 else None
        return default if rec is None else rec

    def items(self) -> ItemsView[str, FileRecord]:
        return _TableItems(self)

    # a table is equal only to itself (Mapping would compare every entry) and hashable
    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    # ---- by index ----------------------------------------------------------------------

    def index_of(self, name: str) -> int:
        """The entry number of ``name``, or -1."""
        try:
            key = encode_name(name)
        except UnicodeEncodeError:
            return -1
        sample = self._sample
        if sample is None:
            sample = self._sample = self._make_sample()
        block = bisect_right(sample, key) - 1
        if block < 0:
            return -1
        sampled, names = self._sampled, self._names
        first = sampled[block]
        end = sampled[block + 1] if block + 1 < len(sampled) else len(names)
        if sample[block] == key:
            return block * SAMPLE
        # a name starts right after a NUL and ends at one: the match is a whole entry,
        # and the NULs before it in the block say which
        pos = names.find(b"\0" + key + b"\0", first, end)
        if pos < 0:
            return -1
        return block * SAMPLE + 1 + names.count(b"\0", first, pos)

    def _make_sample(self) -> list[bytes]:
        names = self._names
        return [names[at : names.index(b"\0", at)] for at in self._sampled]

    def _all_starts(self) -> array[int]:
        """Where every name starts; for a table loaded from disk, the deferred check of
        every name runs first (once).

        Raises:
            CorruptData: the names are not sorted, distinct file names.
        """
        starts = self._starts
        if starts is not None:
            return starts
        with self._check_lock:
            if self._starts is None:
                try:
                    with building():  # a quarter million short-lived names: no GC, trimmed
                        if self._trusted:
                            names = self._names
                            self._starts = _starts_of(names.split(b"\0")[:-1], len(names))
                        else:
                            self._starts = _check_names(self._names, self._count)
                except ValueError as exc:
                    hook, self.on_damaged = self.on_damaged, None
                    if hook is not None:
                        hook(str(exc))
                    raise CorruptData(f"index of {self.prefix} damaged: {exc}") from None
            return self._starts

    def check(self) -> None:
        """Run the deferred check of a table loaded from disk now (a listing calls it
        before it pages, so that it fails at once and not half way).

        Raises:
            CorruptData: the names are not sorted, distinct file names.
        """
        self._all_starts()

    def name_at(self, i: int) -> str:
        starts = self._all_starts()
        raw = self._names[starts[i] : starts[i + 1] - 1]
        return raw.decode("utf-8", "surrogateescape")

    def _decoded(self, lo: int, hi: int) -> list[str]:
        starts = self._all_starts()
        chunk = self._names[starts[lo] : starts[hi]]
        return chunk.decode("utf-8", "surrogateescape").split("\0")[: hi - lo]

    def record_at(self, i: int, name: str | None = None) -> FileRecord | None:
        """The record of entry ``i`` (None for a folder entry that is no regular file now)."""
        name = self.name_at(i) if name is None else name
        source = self.sources[self._src[i]]
        if source.kind == BLOB:
            start, size = self._start[i], self._size[i]
            ref = BlobRef(source.key, source.version, start, start + size)
            return FileRecord(self.prefix + name, size, self.mtime_at(i, source), ref)
        path = os.path.join(source.key, name)
        try:
            st = self.lstat(path)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return FileRecord(self.prefix + name, st.st_size, st.st_mtime_ns, LocalFileRef(path))

    def mtime_at(self, i: int, source: EntrySource) -> int:
        """Entry ``i``'s mtime: its own (the :data:`MTIME` column) or its source's."""
        column = self._mtime
        return source.mtime_ns if column is None else column[i]

    def entries_from(self, start: int) -> Iterator[tuple[str, int | None, int]]:
        """``(name, size, mtime_ns)`` from entry ``start`` on, without any I/O: the size is
        None for folder entries (known only once looked up)."""
        sources, src, size = self.sources, self._src, self._size
        for lo in range(max(0, start), self._count, PAGE):
            hi = min(self._count, lo + PAGE)
            for i, name in enumerate(self._decoded(lo, hi), lo):
                source = sources[src[i]]
                if source.kind == BLOB:
                    yield name, size[i], self.mtime_at(i, source)
                else:
                    yield name, None, 0

    def runs_from(self, start: int) -> Iterator[tuple[list[bytes], EntrySource, Sequence[int]]]:
        """The entries from ``start`` on as runs of consecutive entries of one source:
        ``(encoded names, their source, their sizes)``, without any I/O.

        The listing's hot path: names stay the bytes the kernel gets (no decode, no
        encode), sizes come as a slice of their column, and each run shares its source's
        mtime, so a caller fills the per-entry part of a ``stat`` only. Folder entries'
        sizes are 0 here (known only once looked up). With an :data:`MTIME` column, runs
        are split where the mtime changes, each run's source carrying its entries' mtime.
        """
        if self._mtime is None:
            yield from self._source_runs(start)
            return
        mtime = self._mtime
        at = max(0, start)
        for names, source, sizes in self._source_runs(start):
            n = len(names)
            if mtime.values is None:
                yield names, replace(source, mtime_ns=mtime.base), sizes
            else:
                k = 0
                for value, group in groupby(mtime.slice(at, at + n)):
                    m = sum(1 for _ in group)
                    yield names[k : k + m], replace(source, mtime_ns=value), sizes[k : k + m]
                    k += m
            at += n

    def _source_runs(self, start: int) -> Iterator[tuple[list[bytes], EntrySource, Sequence[int]]]:
        sources, src, size, starts = self.sources, self._src, self._size, self._all_starts()
        lo, step = max(0, start), RUN_FIRST
        while lo < self._count:
            hi = min(self._count, lo + step)
            names = self._names[starts[lo] : starts[hi] - 1].split(b"\0")
            if src.values is None:
                yield names, sources[src.base], size.slice(lo, hi)
            else:
                which = src.values[lo:hi]
                first = which[0]
                if which.count(first) == len(which):  # one source for the whole page
                    yield names, sources[src.base + first], size.slice(lo, hi)
                else:
                    at = 0
                    for value, group in groupby(which):
                        n = sum(1 for _ in group)
                        run_sizes = size.slice(lo + at, lo + at + n)
                        yield names[at : at + n], sources[src.base + value], run_sizes
                        at += n
            lo, step = hi, min(2 * step, PAGE * 4)

    def raw_entries(self) -> Iterator[tuple[bytes, int, int, int]]:
        """``(encoded name, source index, start, size)`` of every entry, in order."""
        names, starts = self._names, self._all_starts()
        for i in range(self._count):
            yield names[starts[i] : starts[i + 1] - 1], self._src[i], self._start[i], self._size[i]

    def contents(self, lo: int, hi: int) -> Sequence[bytes | None] | None:
        """The bytes of entries ``lo`` to ``hi`` that this table holds whole in memory (None
        for an entry it does not), or None when it holds none: what a listing may hand
        the kernel's page cache along with the entries (see ``BlobfsFUSE``). A table of
        ranges of blobs holds no bytes."""
        return None

    @property
    def nbytes(self) -> int:
        """Bytes held by this table's buffers (what it costs beyond a few objects)."""
        return (
            len(self._names)
            + (0 if self._starts is None else self._starts.itemsize * len(self._starts))
            + self._sampled.itemsize * len(self._sampled)
            + sys.getsizeof(self._sample or [])
            + sum(map(sys.getsizeof, self._sample or []))
            + self._src.nbytes
            + self._start.nbytes
            + self._size.nbytes
            + sum(c.nbytes for c in self.extra.values())
        )

    # ---- on disk -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """This table as bytes for :meth:`from_bytes` (the ``lstat`` hook is not kept).

        Raises:
            ValueError: the table has extra columns (remote listings, never cached on disk).
        """
        if self.extra:
            raise ValueError("a table with extra columns has no on-disk form")
        header = json.dumps(
            {
                "prefix": self.prefix,
                "byteorder": sys.byteorder,
                "count": self._count,
                "sources": [[s.kind, s.key, s.version, s.mtime_ns] for s in self.sources],
                "columns": [c.spec() for c in (self._src, self._start, self._size)],
                "sampled": self._sampled.typecode,
                "starts": self._starts is not None,
                "names": len(self._names),
            }
        ).encode()
        parts = [_HEAD.pack(MAGIC, FORMAT, len(header)), header]
        for column in (self._src, self._start, self._size):
            if column.values is not None:
                parts.append(column.values.tobytes())
        parts.append(self._sampled.tobytes())
        if self._starts is not None:
            # of use only to a loader that trusts the bytes (it then skips finding them)
            parts.append(self._starts.tobytes())
        parts.append(self._names)
        return b"".join(parts)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | memoryview,
        lstat: Callable[[str], os.stat_result] = os.lstat,
        trusted: bool = False,
    ) -> FileTable:
        """The table :meth:`to_bytes` wrote; what a lookup relies on is checked now, the
        rest of the names at the first use of the whole table (see the module's text).
        ``trusted`` (bytes blobfs itself wrote, proven by the index cache's MAC) skips
        that later check of every name; the sizes, counts and ranges are checked anyway.

        Raises:
            ValueError: the bytes are not a well-formed table (wrong magic or format,
                sizes that do not add up, a sampled start that is not where its name
                starts, source indexes out of range, negative offsets).
        """
        view = memoryview(data)  # parts copied once each, straight into their buffers
        prefix, count, sources, specs, names_len, sampled_code, with_starts, pos = _parse_header(
            view
        )
        columns = []
        for base, code, nbytes in specs:
            if code == "":
                if nbytes:
                    raise ValueError("bad column")
                columns.append(_Column(base, None, count))
                continue
            values = array(code)
            if nbytes != values.itemsize * count or pos + nbytes > len(view):
                raise ValueError("column size does not match the entry count")
            values.frombytes(view[pos : pos + nbytes])
            pos += nbytes
            columns.append(_Column(base, values, count))
        sampled = array(sampled_code)
        sampled_len = sampled.itemsize * -(-count // SAMPLE)
        starts_len = sampled.itemsize * (count + 1) if with_starts else 0
        if pos + sampled_len + starts_len + names_len != len(view):
            raise ValueError("names size does not match")
        sampled.frombytes(view[pos : pos + sampled_len])
        pos += sampled_len
        starts = None
        if with_starts and trusted:
            starts = array(sampled_code)
            starts.frombytes(view[pos : pos + starts_len])
        pos += starts_len
        names = bytes(view[pos:])
        if names.count(b"\0") != count or (count and not names.endswith(b"\0")):
            raise ValueError("name count does not match")
        _check_sampled(names, sampled, count)
        if starts is not None and (
            starts[0] != 0 or starts[-1] != len(names) or starts[:-1:SAMPLE] != sampled
        ):
            raise ValueError("the stored starts do not match the sampled starts")
        src, start, size = columns
        if count and src.maximum() >= len(sources):
            raise ValueError("source index out of range")
        return cls(
            prefix, sources, names, src, start, size, lstat, starts, sampled, trusted=trusted
        )


def _parse_header(
    data: memoryview,
) -> tuple[str, int, list[EntrySource], list[tuple[int, str, int]], int, str, bool, int]:
    """(prefix, count, sources, column specs, names length, type of the sampled starts,
    whether every name's start is stored too, where the columns start)."""
    if len(data) < _HEAD.size:
        raise ValueError("too short")
    magic, fmt, head_len = _HEAD.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT:
        raise ValueError("not a table of this format")
    pos = _HEAD.size + head_len
    try:
        header = json.loads(bytes(data[_HEAD.size : pos]))
        prefix, count, names_len = header["prefix"], header["count"], header["names"]
        sources = [EntrySource(str(k), str(p), str(v), int(m)) for k, p, v, m in header["sources"]]
        specs = [(b, c, n) for b, c, n in header["columns"]]
        order = header["byteorder"]
        sampled_code = header["sampled"]
        with_starts = header["starts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"bad header: {exc}") from None
    if order != sys.byteorder or not isinstance(prefix, str) or sampled_code not in ("I", "Q"):
        raise ValueError("bad header values")
    if not isinstance(with_starts, bool):
        raise ValueError("bad header values")
    if not all(isinstance(v, int) and v >= 0 for v in (count, names_len)):
        raise ValueError("bad header values")
    if any(s.kind not in (BLOB, FOLDER) for s in sources) or len(specs) != 3:
        raise ValueError("bad sources or columns")
    for base, code, nbytes in specs:
        ok = isinstance(base, int) and isinstance(nbytes, int) and base >= 0 and nbytes >= 0
        if not ok or code not in ("", *_TYPECODES):
            raise ValueError("bad column")
    return prefix, count, sources, specs, names_len, sampled_code, with_starts, pos


def _sampled_of(starts: array[int] | None) -> array[int]:
    """Every :data:`SAMPLE`-th start (the last one, the end, left out)."""
    assert starts is not None
    return array(starts.typecode, starts[: len(starts) - 1 : SAMPLE])


def _check_sampled(names: bytes, sampled: array[int], count: int) -> None:
    """ValueError unless ``sampled[k]`` is where name ``k * SAMPLE`` starts: the first at
    0, each right after a NUL, with exactly SAMPLE names (NULs) between two of them."""
    if len(sampled) != -(-count // SAMPLE) or (count and sampled[0] != 0):
        raise ValueError("sampled starts do not match the entry count")
    later = sampled[1:]
    # the byte before each later sampled start, taken in C: all of them NULs
    if later and (
        min(later) < 1
        or max(later) >= len(names)
        or bytes(map(names.__getitem__, map((-1).__add__, later))).count(0) != len(later)
    ):
        raise ValueError("a sampled start is not where a name starts")
    tally = names.count
    ends = [*islice(sampled, 1, None), len(names)]
    counts = list(map(tally, repeat(b"\0"), sampled, ends))
    if counts and (
        counts[-1] != count - SAMPLE * (len(sampled) - 1)
        or counts[:-1].count(SAMPLE) != len(counts) - 1
    ):
        raise ValueError("sampled starts are not every SAMPLE-th name")


def _starts_of(parts: Sequence[bytes], total: int) -> array[int]:
    """Where each of ``parts`` starts once each is followed by a NUL (and the end)."""
    return _starts_from(map(len, parts), total)


def _check_names(names: bytes, count: int) -> array[int]:
    """The start of every name, or ValueError unless ``names`` is ``count`` sorted,
    distinct file names each followed by NUL."""
    if names.count(b"\0") != count or (count and not names.endswith(b"\0")):
        raise ValueError("name count does not match")
    if b"/" in names:
        raise ValueError("a name contains '/'")
    parts = names.split(b"\0")
    parts.pop()  # what follows the last NUL (nothing): no copy of the list without it
    lengths = list(map(len, parts))  # once, for the longest name and for the starts
    if not all(parts):
        raise ValueError("a name is empty, '.' or '..'")
    if count and max(lengths) > NAME_MAX:
        raise ValueError("a name is too long")
    if not all(map(operator.lt, parts, islice(parts, 1, None))):
        raise ValueError("names are not sorted and distinct")
    # sorted: '.' and '..' would sit where bisection puts them (no pass over every name)
    if any(_holds(parts, odd) for odd in (b".", b"..")):
        raise ValueError("a name is empty, '.' or '..'")
    return _starts_from(lengths, len(names))


def _holds(ordered: list[bytes], name: bytes) -> bool:
    """Whether the sorted list ``ordered`` holds ``name`` (a binary search)."""
    at = bisect_left(ordered, name)
    return at < len(ordered) and ordered[at] == name


def _starts_from(lengths: Iterable[int], total: int) -> array[int]:
    """Where each name starts, given each one's length, once each is followed by a NUL
    (and the end)."""
    return array("I" if total < 1 << 32 else "Q", accumulate(map((1).__add__, lengths), initial=0))


class _TableItems(ItemsView[str, FileRecord]):
    """``items()`` of a table in one pass (a plain ItemsView would search every name)."""

    _mapping: FileTable

    def __iter__(self) -> Iterator[tuple[str, FileRecord]]:
        table = self._mapping
        for i, name in enumerate(table):
            rec = table.record_at(i, name)
            if rec is not None:
                yield name, rec


class TableBuilder:
    """Collect a folder's entries, then :meth:`build` its table.

    Names must be unique; :meth:`build` leaves every name that was added twice out (both
    entries: there is no telling which is right) and returns those names. ``extra`` names
    the table's extra columns (see :class:`FileTable`); :meth:`add` then takes one value
    of each, in that order.
    """

    def __init__(self, prefix: str, extra: Sequence[str] = ()) -> None:
        self.prefix = prefix
        self._extra: dict[str, list[int]] = {name: [] for name in extra}
        self.sources: list[EntrySource] = []
        self._index: dict[EntrySource, int] = {}
        self._names: list[bytes] = []
        self._src: list[int] = []
        self._start: list[int] = []
        self._size: list[int] = []

    def source(self, source: EntrySource) -> int:
        """The index of ``source`` (added on first use)."""
        at = self._index.get(source)
        if at is None:
            at = self._index[source] = len(self.sources)
            self.sources.append(source)
        return at

    def add(
        self, name: bytes, source: int, start: int = 0, size: int = 0, extra: Sequence[int] = ()
    ) -> None:
        if len(extra) != len(self._extra):
            raise ValueError("one value per extra column")
        self._names.append(name)
        self._src.append(source)
        self._start.append(start)
        self._size.append(size)
        for values, value in zip(self._extra.values(), extra, strict=True):
            values.append(value)

    def add_table(self, table: FileTable) -> None:
        """Every entry of ``table`` (sources remapped; tables without extra columns)."""
        if self._extra or table.extra:
            raise ValueError("tables with extra columns are not merged")
        remap = [self.source(s) for s in table.sources]
        for name, src, start, size in table.raw_entries():
            self.add(name, remap[src], start, size)

    def __len__(self) -> int:
        return len(self._names)

    def add_many(
        self,
        names: list[bytes],
        sources: list[int],
        starts: list[int],
        sizes: list[int],
        extra: Sequence[list[int]] = (),
    ) -> None:
        """Entries in bulk: the i-th of each list makes one entry (``extra``: one list per
        extra column, in their order)."""
        lengths = {len(names), len(sources), len(starts), len(sizes), *map(len, extra)}
        if len(lengths) > 1 or len(extra) != len(self._extra):
            raise ValueError("columns of different lengths")
        self._names.extend(names)
        self._src.extend(sources)
        self._start.extend(starts)
        self._size.extend(sizes)
        for values, more in zip(self._extra.values(), extra, strict=True):
            values.extend(more)

    def add_names(self, names: Iterable[bytes], source: int) -> None:
        """Entries with a name only (an ordinary folder's files), in bulk."""
        if self._extra:
            raise ValueError("entries of a table with extra columns need their values")
        before = len(self._names)
        self._names.extend(names)
        added = len(self._names) - before
        self._src.extend([source] * added)
        self._start.extend([0] * added)
        self._size.extend([0] * added)

    def build(
        self,
        lstat: Callable[[str], os.stat_result] = os.lstat,
        kind: type[FileTable] | None = None,
    ) -> tuple[FileTable, list[str]]:
        """The table (of class ``kind``, a :class:`FileTable` by default) and the names
        left out for being added twice."""
        names = self._names
        columns = [self._src, self._start, self._size, *self._extra.values()]
        bounds = list(map(_bounds, columns))  # each column's min and max, taken once
        in_order = all(map(operator.lt, names, islice(names, 1, None)))
        dup: set[int] = set()
        twice: set[bytes] = set()
        if in_order:  # offsets files often list names sorted: no sort, no reordering
            order: Sequence[int] = range(len(names))
            ordered = names
        elif all(lo == hi for lo, hi in bounds):
            # entries that differ only by name (an ordinary folder's): sort the names alone
            ordered = sorted(names)
            pace()
            # sorted, a name added twice sits next to itself: one C-level pass, no hashing
            if any(map(operator.eq, ordered, islice(ordered, 1, None))):
                pairs = zip(ordered, islice(ordered, 1, None), strict=False)
                twice = {a for a, b in pairs if a == b}
                ordered = [n for n in ordered if n not in twice]
            order = range(len(ordered))
        else:
            order = sorted(range(len(names)), key=names.__getitem__)
            pace()
            ordered = [names[i] for i in order]
        if not isinstance(order, range) and len(set(ordered)) != len(ordered):
            for k, (a, b) in enumerate(zip(ordered, islice(ordered, 1, None), strict=False)):
                if a == b:
                    dup.update((order[k], order[k + 1]))
            order = [i for i in order if i not in dup]
            ordered = [names[i] for i in order]
        pace()
        joined = b"\0".join(ordered) + b"\0" if ordered else b""
        table = (kind or FileTable)(
            self.prefix,
            self.sources,
            joined,
            _column_in(self._src, bounds[0], order),
            _column_in(self._start, bounds[1], order),
            _column_in(self._size, bounds[2], order),
            lstat,
            _starts_of(ordered, len(joined)),
            None,
            {
                name: _column_in(values, limits, order)
                for name, values, limits in zip(self._extra, columns[3:], bounds[3:], strict=True)
            },
        )
        duplicates = sorted(
            {n.decode("utf-8", "surrogateescape") for n in twice.union(map(names.__getitem__, dup))}
        )
        return table, duplicates


def sorted_table(
    prefix: str,
    sources: Sequence[EntrySource],
    names: list[str],
    columns: tuple[list[int] | int, list[int] | int, list[int] | int],
    ordered: bool | None = None,
    lstat: Callable[[str], os.stat_result] = os.lstat,
) -> FileTable | None:
    """The table of entries given as columns (the i-th name, source index, start and size
    make one entry; a column given as one number holds it for every entry) when the
    names are ASCII and strictly ascending, as offsets files
    usually list them; None otherwise (the caller then goes through a
    :class:`TableBuilder`). ``ordered``: what the caller found of the names' order itself
    (None: found here); ``lstat`` as for :class:`FileTable`.

    The same table a builder makes, without a bytes object per name: for ASCII text the
    order of the characters is the order of the bytes, and each name's length is its
    length encoded, so the names are joined and encoded once and nothing is sorted.
    """
    if any(not isinstance(c, int) and len(c) != len(names) for c in columns):
        raise ValueError("columns of different lengths")
    if not names:
        return None
    joined = "\0".join(names)
    if not joined.isascii() or joined.count("\0") != len(names) - 1:
        return None  # a NUL inside a name would split it in two
    if ordered is None:
        ordered = all(map(operator.lt, names, islice(names, 1, None)))
    if not ordered:
        return None
    buffer = joined.encode("ascii") + b"\0"
    src, start, size = (
        _Column(c, None, len(names))
        if isinstance(c, int)
        else _column_in(c, _bounds(c), range(len(c)))
        for c in columns
    )
    starts = _starts_from(map(len, names), len(buffer))
    return FileTable(prefix, sources, buffer, src, start, size, lstat, starts)


def _bounds(values: list[int]) -> tuple[int, int]:
    """The least and the greatest of ``values``; (0, 0) when there are none."""
    return (min(values), max(values)) if values else (0, 0)


def _column_in(values: list[int], bounds: tuple[int, int], order: Sequence[int]) -> _Column:
    """The column of ``values`` (whose :func:`_bounds` are ``bounds``) taken in ``order``
    (a constant one without reordering)."""
    if values and bounds[0] == bounds[1]:
        return _Column(values[0], None, len(order))
    if isinstance(order, range) and order == range(len(values)):
        column = _Column.of(values, bounds)
    else:
        column = _Column.of([values[i] for i in order], bounds)
    pace()
    return column


_pacing = threading.local()


def pace() -> None:
    """A point where a background build may pause for requests (see :func:`paced`)."""
    hook: Callable[[], None] | None = getattr(_pacing, "hook", None)
    if hook is not None:
        hook()


@contextlib.contextmanager
def paced(hook: Callable[[], None]) -> Iterator[None]:
    """Builds made by this thread inside the block call ``hook`` now and then.

    An index built in the background (the mount's preload) shares the interpreter with
    the requests: while it runs, each request that gives up the interpreter lock (every
    FUSE round trip does) waits up to a switch interval to get it back, so a listing of
    1,300 pages would wait seconds. The hook lets the build step aside while requests
    are being served.
    """
    _pacing.hook = hook
    try:
        yield
    finally:
        _pacing.hook = None


def table_of(prefix: str, entries: Iterable[tuple[str, EntrySource, int, int]]) -> FileTable:
    """A table of ``(name, source, start, size)`` entries (tests and small folders)."""
    builder = TableBuilder(prefix)
    for name, source, start, size in entries:
        builder.add(encode_name(name), builder.source(source), start, size)
    return builder.build()[0]


_building = 0
_building_lock = threading.Lock()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Around building an index: no cyclic GC meanwhile, and memory handed back after.

    Parsing an offsets file makes hundreds of thousands of short-lived objects with no
    cycles among them; each generational collection meanwhile walks every live object,
    for nothing. Once the last build ends, the freed heap is returned to the system
    (glibc keeps it otherwise, and the daemon's resident size would stay at its peak).
    """
    global _building
    with _building_lock:
        _building += 1
        if _building == 1:
            gc.disable()
    try:
        yield
    finally:
        with _building_lock:
            _building -= 1
            last = _building == 0
            if last:
                gc.enable()
        if last and _TRIM is not None:
            _TRIM(0)
