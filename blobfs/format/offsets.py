"""Offsets files (``<stem>_offsets.pkl``): read, validate and write them without the SDK.

The SDK writes an offsets file as a sequence of pickles appended one after another, each a
``list`` of ``supervisely.api.image_api.BlobImageInfo`` dataclass objects (``name``,
``offset_start``, ``offset_end``; end exclusive). Pickles are code, so this module never
hands one to an unrestricted unpickler: :class:`_OffsetsUnpickler` resolves exactly one
global, the ``BlobImageInfo`` class path, to an inert local stand-in, and refuses every
other global (``os.system``, ``builtins.eval``, ``copyreg`` tricks ...) before anything runs.
The SDK's own allow-list also admits builtins such as ``bytes``; blobfs admits none, since
a real offsets file never names them (lists, dicts, str and int have their own opcodes).

Writing goes through a tiny hand-made protocol-2 opcode stream, because the standard
pickler insists on importing the class it names, and blobfs must not import the SDK.
"""

from __future__ import annotations

import io
import logging
import operator
import pickle
import pickletools
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from pathlib import Path
from typing import IO, Any

from blobfs.errors import BlobfsError, OffsetsError
from blobfs.layout import NAME_MAX, name_problem, names_fit
from blobfs.model import BlobMember
from blobfs.problems import Problems, show
from blobfs.safe_open import MAX_OFFSETS_FILE_BYTES, ProjectRoot

logger = logging.getLogger(__name__)

OFFSETS_SUFFIX = "_offsets.pkl"
SDK_MODULE = "supervisely.api.image_api"
SDK_CLASS = "BlobImageInfo"
#: The SDK's ``OFFSETS_PKL_BATCH_SIZE``: one pickled list per this many entries.
BATCH_SIZE = 10_000


class _BlobImageInfoStub:
    """Inert stand-in for the SDK's dataclass: it only stores what a pickle gives it.

    It has no ``__setstate__``, so the C unpickler puts the state dict of an SDK entry
    straight into the instance's ``__dict__`` (a Python ``__setstate__`` call per entry was
    most of the parse). Arguments of a REDUCE land in ``args``; anything else a hostile
    pickle sets is just an attribute nobody reads.
    """

    def __init__(self, *args: Any) -> None:
        self.args = args


class _OffsetsUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable global is the stand-in for ``BlobImageInfo``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (SDK_MODULE, SDK_CLASS):
            return _BlobImageInfoStub
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an offsets file")


#: A real entry takes at least this many bytes of pickle (name, two ints, opcodes); a
#: file with more entries than its size allows is made of references to one object (a
#: "reference bomb") and is refused before its entries cost memory.
MIN_ENTRY_BYTES = 16

# Causes, fixed strings so that problems aggregate by (file, cause).
FILE_REFUSED = "file refused"
NOT_AN_ENTRY = "not a BlobImageInfo entry"
NOT_INTEGERS = "offsets are not integers"
BAD_RANGE = "bad range (negative, or end before start)"
PAST_BLOB = "range ends past the blob"
DUPLICATE = "name appears more than once (none of them served)"
OVERLAP = "range overlaps another entry of the blob (none of them served)"


@dataclass
class OffsetsIndex:
    """The valid members of one or more offsets files, plus what was refused and why."""

    members: list[BlobMember] = field(default_factory=list)
    problems: Problems = field(default_factory=Problems)


def _entry_fields(obj: Any) -> tuple[Any, Any, Any]:
    """Pull (name, start, end) out of a stand-in object or a REST-style dict."""
    if isinstance(obj, _BlobImageInfoStub):
        state = vars(obj)  # BUILD's dict state (or its slots part) lands here
        if "name" in state:
            return state.get("name"), state.get("offset_start"), state.get("offset_end")
        args = state.get("args")  # the class called with (name, start, end)
        if isinstance(args, tuple) and len(args) == 3:
            return args[0], args[1], args[2]
        raise ValueError("BlobImageInfo without name/offset_start/offset_end")
    if isinstance(obj, dict):
        if "sourceBlob" in obj and isinstance(obj["sourceBlob"], dict):
            blob = obj["sourceBlob"]
            return obj.get("title"), blob.get("offsetStart"), blob.get("offsetEnd")
        return obj.get("name"), obj.get("offset_start"), obj.get("offset_end")
    raise ValueError(f"{type(obj).__name__} where a BlobImageInfo belongs")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _range_problem(start: object, end: object, blob_size: int | None) -> str | None:
    if not (_is_int(start) and _is_int(end)):
        return NOT_INTEGERS
    assert isinstance(start, int) and isinstance(end, int)
    if start < 0 or end < start:
        return BAD_RANGE
    if blob_size is not None and end > blob_size:
        return PAST_BLOB
    return None


_STATE = operator.attrgetter("__dict__")
_NAME_OF = operator.itemgetter("name")
_START_OF = operator.itemgetter("offset_start")
_END_OF = operator.itemgetter("offset_end")


@dataclass
class OffsetsColumns:
    """The valid entries of an offsets file as three parallel lists (the i-th of each is
    one entry), plus what was refused and why: what the project source indexes, without
    an object per entry."""

    names: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    problems: Problems = field(default_factory=Problems)

    def __len__(self) -> int:
        return len(self.names)

    def members(self) -> list[BlobMember]:
        """The entries as :class:`BlobMember` objects."""
        return list(map(BlobMember, self.names, self.starts, self.ends))


def _plain_batch(
    batch: list[Any], blob_size: int | None
) -> tuple[list[str], list[int], list[int]] | None:
    """``(names, starts, ends)`` of a batch in which every entry is a plain, valid SDK
    entry, or None.

    This is the common case, checked a batch at a time in C-level passes (no Python code
    runs per entry): exact types, ranges, and the names all at once
    (:func:`~blobfs.layout.names_fit`). Any doubt returns None
    and the caller goes entry by entry with its messages; so the answer is always the one
    :func:`name_problem` and :func:`_range_problem` would give.
    """
    if not batch:
        return [], [], []
    if set(map(type, batch)) != {_BlobImageInfoStub}:
        return None
    states = list(map(_STATE, batch))
    try:  # attributes beyond these three are ignored here as entry by entry
        names = list(map(_NAME_OF, states))
        starts = list(map(_START_OF, states))
        ends = list(map(_END_OF, states))
    except KeyError:
        return None
    if set(map(type, names)) != {str} or set(map(type, starts)) | set(map(type, ends)) != {int}:
        return None
    if min(starts) < 0 or not all(map(operator.le, starts, ends)):
        return None
    if blob_size is not None and max(ends) > blob_size:
        return None
    if not names_fit(names):
        return None
    return names, starts, ends


def iter_raw_batches(stream: IO[bytes], limit: int | None = None) -> Iterator[list[Any]]:
    """Yield the entry objects of an offsets stream, one list per pickle, until EOF.

    Raises:
        OffsetsError: the stream holds a forbidden global, is truncated, is not a pickle,
            or holds more than ``limit`` entries.
    """
    seen = 0
    while True:
        start = stream.tell()
        try:
            data = _OffsetsUnpickler(stream).load()  # fresh memo per pickle, as the SDK
        except EOFError:
            # Clean only between pickles: a pickle cut right after a whole opcode ends
            # with this same error once every byte of it was consumed.
            if stream.tell() != start or stream.read(1):
                raise OffsetsError("truncated pickle") from None
            return
        except OffsetsError:
            raise
        except Exception as exc:  # any unpickling failure is bad input, never a crash
            raise OffsetsError(f"not a valid offsets pickle: {_why(exc)}") from exc
        batch = data if isinstance(data, list) else [data]
        seen += len(batch)
        if limit is not None and seen > limit:
            raise OffsetsError(
                f"more entries than a file of its size can hold (over {limit}); "
                "references to one object?"
            )
        yield batch


def iter_raw_entries(stream: IO[bytes], limit: int | None = None) -> Iterator[Any]:
    """Yield every entry object of an offsets stream, pickle after pickle, until EOF.

    Raises:
        OffsetsError: as :func:`iter_raw_batches`.
    """
    for batch in iter_raw_batches(stream, limit):
        yield from batch


def _why(exc: BaseException) -> str:
    """An exception as a short message; its text may quote hostile input."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def parse_offsets(
    data: bytes, source: str, blob_size: int | None = None, index: OffsetsIndex | None = None
) -> OffsetsIndex:
    """Parse and validate one offsets file's bytes into ``index`` (a new one by default).

    A bad entry is counted in ``index.problems`` (by cause, with the first few names) and
    left out; a file that cannot be parsed at all, for *any* reason (hostile, truncated,
    a reference bomb, a name no message can print, an exception nobody foresaw), adds one
    problem and no members, so the other files and images of the dataset still serve.
    Duplicates and overlaps are resolved later by :func:`reject_conflicts`, once every
    offsets file of a dataset is in.
    """
    index = index if index is not None else OffsetsIndex()
    columns = parse_offsets_columns(data, source, blob_size)
    index.problems.merge(columns.problems)
    index.members.extend(columns.members())
    return index


def parse_offsets_columns(data: bytes, source: str, blob_size: int | None = None) -> OffsetsColumns:
    """:func:`parse_offsets` as columns (the project source's index takes them as they
    are), same checks and problems."""
    out = OffsetsColumns()
    names: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    found = Problems()
    try:
        limit = len(data) // MIN_ENTRY_BYTES + 1
        for batch in iter_raw_batches(io.BytesIO(data), limit):
            fast = _plain_batch(batch, blob_size)
            if fast is not None:
                names.extend(fast[0])
                starts.extend(fast[1])
                ends.extend(fast[2])
            else:
                _slow_batch(batch, source, blob_size, found, (names, starts, ends))
    except OffsetsError as exc:
        out.problems.add(source, FILE_REFUSED, str(exc)[:300])
        return out
    except Exception as exc:  # hostile input must never take more than its own file down
        out.problems.add(source, FILE_REFUSED, _why(exc))
        return out
    out.problems.merge(found)
    out.names, out.starts, out.ends = names, starts, ends
    return out


def _slow_batch(
    batch: list[Any],
    source: str,
    blob_size: int | None,
    found: Problems,
    into: tuple[list[str], list[int], list[int]],
) -> None:
    """A batch entry by entry: the valid entries go ``into`` the columns, each refused
    one into ``found`` with its cause."""
    names, starts, ends = into
    for obj in batch:
        try:
            name, start, end = _entry_fields(obj)
        except ValueError as exc:
            found.add(source, NOT_AN_ENTRY, str(exc)[:80])
            continue
        reason = name_problem(name) or _range_problem(start, end, blob_size)
        if reason:
            found.add(source, reason, f"{show(name)} [{show(start)}, {show(end)})")
            continue
        names.append(name)
        starts.append(start)
        ends.append(end)


#: An offsets file's bytes, as :func:`find_entry` searches them.
Buffer = bytes | bytearray
#: Where a batch may start: the STOP ending the one before, then PROTO.
_BATCH_SEAM = b".\x80"
_SEAMS_TRIED = 8


def find_entry(files: Sequence[Buffer], name: str) -> tuple[int, int, int] | None:
    """``(file number, start, end)`` of the one entry called ``name`` in the offsets files
    ``files`` of a dataset, found without parsing them; None when in any doubt.

    A quick answer for a lookup before the dataset's index is built: ``name``'s bytes
    must occur exactly once in all the files (any way a pickle stores a string holds its
    UTF-8 bytes, so a second entry of that name, or a longer name containing it, makes a
    second occurrence), and only the batch (one pickle) holding them is unpickled: it
    starts after the nearest STOP-then-PROTO before them, and if that guess is wrong (an
    integer's bytes may look like one) the file's batches are read from the start up to
    it. Usually not even that batch: only its first entry (which defines what later
    entries refer to) and the entry itself (:func:`_entry_alone`). The entry passes the
    same checks as in :func:`parse_offsets` (fields, name, range; not the blob's size,
    which the caller knows). What this cannot see is the
    rest of the file (a batch, or another entry of its own batch, that makes the whole
    file refused) and repeats that a
    hostile pickle stores as references to one string: so a caller may answer a
    ``stat`` from it, never serve bytes from it.
    """
    if name_problem(name) is not None:
        return None
    raw = name.encode("utf-8")
    hits = []
    for which, data in enumerate(files):
        at = data.find(raw)
        if at >= 0:
            if data.find(raw, at + 1) >= 0:
                return None
            hits.append((which, at))
    if len(hits) != 1:
        return None
    which, at = hits[0]
    data = files[which]
    found = _entry_alone(data, at, name)
    if found is None:
        begin = next(_batch_starts(data, at))  # the likeliest start, else 0
        found = _entry_in_batch(data, begin, at, name)
        if found is None and begin:
            found = _entry_in_batch(data, 0, at, name)
    return None if found is None else (which, *found)


#: Opcodes of one entry after a batch's first, as the SDK's pickler (protocols 2 to 5) and
#: :func:`dumps_batch` write it; memo puts may follow any of them.
_MEMO_PUTS = frozenset({"BINPUT", "LONG_BINPUT", "MEMOIZE"})
_REFS = frozenset({"BINGET", "LONG_BINGET"})
_STRINGS = frozenset({"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
_ITEMS = _REFS | _STRINGS | frozenset({"BININT", "BININT1", "BININT2", "LONG1"})
_ENTRY_SHAPE = (_REFS, "EMPTY_TUPLE", "NEWOBJ", "EMPTY_DICT", "MARK", *[_ITEMS] * 6, "SETITEMS")
#: How far before its name an entry may start (class, tuple, object, dict, mark, a key,
#: with memo puts), and after the name's bytes end (two keys, two integers, memo puts).
_BEFORE_NAME = 48
_AFTER_NAME = 96
#: Opcodes a batch's first entry may take (the class's global and its module's strings).
_FIRST_OPS = 40


def _entry_alone(data: Buffer, at: int, name: str) -> tuple[int, int] | None:
    """``(start, end)`` of ``name``, unpickling only the batch's first entry and the entry
    holding offset ``at``: None when the batch is not laid out as the SDK writes it.

    The batch's first entry defines the memo (the class, the keys) that later entries
    refer to; the entry of ``name`` is found by decoding opcodes forward from a few
    candidate starts just before ``at``, and must be exactly one SDK-shaped entry. The
    two, followed by APPENDS and STOP, make a small pickle that the restricted unpickler
    reads; its last entry is then what the whole batch's parse would have made of it.
    """
    try:
        first = None
        for begin in _batch_starts(data, at):
            first = _first_entry(data, begin)
            if first is not None:
                break
        if first is None:
            return None
        head, head_end = first
        tail: bytes | None = b""
        if at >= head_end:
            tail = _entry_bytes(data, max(head_end, at - _BEFORE_NAME), at, name)
        if tail is None:
            return None
        batch = next(iter_raw_batches(io.BytesIO(head + tail + b"e."), 64))
        fields = _entry_fields(batch[-1])
    except Exception:  # any trouble: the batch's parse decides
        return None
    if fields[0] != name or _range_problem(fields[1], fields[2], None) is not None:
        return None
    return fields[1], fields[2]


def _batch_starts(data: Buffer, at: int) -> Iterator[int]:
    """Where the batch holding offset ``at`` may start, nearest first: after each of the
    nearest STOP-then-PROTO seams (an integer's bytes may look like one), then 0."""
    seam = data.rfind(_BATCH_SEAM, 0, at)
    for _ in range(_SEAMS_TRIED):
        if seam < 0:
            break
        if data[seam + 2 : seam + 3] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            yield seam + 1
        seam = data.rfind(_BATCH_SEAM, 0, seam)
    yield 0


def _first_entry(data: Buffer, begin: int) -> tuple[bytes, int] | None:
    """The opcodes from ``begin`` up to the end of the batch's first entry (its BUILD),
    without FRAME opcodes (they would announce more bytes than are kept), and where
    that entry ends; None unless the batch opens as a list of entries (PROTO,
    EMPTY_LIST, MARK)."""
    window = bytes(data[begin : begin + 4 * NAME_MAX + 512])
    kept: list[bytes] = []
    seen: list[str] = []
    ops = pickletools.genops(io.BytesIO(window))
    last_pos, last_name = 0, ""
    for count, (op, _, at) in enumerate(ops):
        pos = at or 0
        if count:
            if last_name != "FRAME":
                kept.append(window[last_pos:pos])
            if last_name == "BUILD":
                return b"".join(kept), begin + pos
        if count > _FIRST_OPS:
            return None
        last_pos, last_name = pos, op.name
        if op.name not in _MEMO_PUTS and op.name != "FRAME":
            seen.append(op.name)
        if seen[:3] not in (["PROTO"], ["PROTO", "EMPTY_LIST"], ["PROTO", "EMPTY_LIST", "MARK"]):
            return None
    return None


def _entry_bytes(data: Buffer, lowest: int, at: int, name: str) -> bytes | None:
    """The opcodes of the one SDK-shaped entry, starting at or after ``lowest``, whose
    name is the string at ``at`` (BUILD included); None when no start fits."""
    window_end = at + len(name.encode("utf-8")) + _AFTER_NAME
    for start in range(at - 1, lowest - 1, -1):
        if data[start] not in b"hj":  # BINGET / LONG_BINGET of the class
            continue
        end = _entry_end(bytes(data[start:window_end]), name)
        if end is not None:
            return bytes(data[start : start + end])
    return None


def _entry_end(window: bytes, name: str) -> int | None:
    """Where the entry that ``window`` starts with ends, if it has the shape
    :data:`_ENTRY_SHAPE` (then BUILD) and ``name`` as one of its strings."""
    step, named = 0, False
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(window)):
            if step and op.name in _MEMO_PUTS:
                continue
            if step == len(_ENTRY_SHAPE):
                return (pos or 0) + 1 if op.name == "BUILD" and named else None
            want = _ENTRY_SHAPE[step]
            if op.name != want and op.name not in want:
                return None
            named = named or (op.name in _STRINGS and arg == name)
            step += 1
    except Exception:  # a truncated or unknown opcode: not an entry
        return None
    return None


def _entry_in_batch(data: Buffer, begin: int, at: int, name: str) -> tuple[int, int] | None:
    """``(start, end)`` of ``name`` in the first batch from ``begin`` on that holds offset
    ``at``, if it is a valid entry there; None otherwise (or on any trouble)."""
    stream = io.BytesIO(data)
    try:
        stream.seek(begin)
        limit = (len(data) - begin) // MIN_ENTRY_BYTES + 1
        for batch in iter_raw_batches(stream, limit):
            if stream.tell() <= at:
                continue  # this batch ends before the name's bytes
            for obj in batch:
                try:
                    fields = _entry_fields(obj)
                except ValueError:
                    continue
                if fields[0] == name:
                    _, start, end = fields
                    if _range_problem(start, end, None) is not None:
                        return None
                    return start, end
            return None
    except Exception:  # any trouble: the full parse decides (and reports)
        return None
    return None


def reject_conflicts(
    members: Sequence[BlobMember], source: str, check_overlaps: bool = True
) -> OffsetsIndex:
    """Drop every member whose name repeats, or whose range overlaps another's.

    Both sides of a conflict are dropped: with two candidates there is no way to know which
    bytes are right, and serving the wrong ones is the one thing blobfs must never do.
    (Locally the tar can tell: see :mod:`blobfs.format.tarhead`, consulted before this.)
    ``members`` must all belong to one blob when overlaps are checked; across the blobs of
    a dataset only names can conflict (``check_overlaps=False``).
    """
    result = OffsetsIndex()
    bad = conflicting(members, check_overlaps)
    if not bad:
        result.members = list(members)
        return result
    counts = Counter(m.name for m in members)
    for i in sorted(bad):
        m = members[i]
        result.problems.add(source, DUPLICATE if counts[m.name] > 1 else OVERLAP, show(m.name))
    result.members = [m for i, m in enumerate(members) if i not in bad]
    return result


def conflicting(members: Sequence[BlobMember], check_overlaps: bool = True) -> set[int]:
    """Indexes of members whose name repeats or (``check_overlaps``) whose range overlaps.

    Conflicts are rare, so each check first asks in C-level passes whether there is any
    (a set of the names; :func:`_any_overlap`) and only then finds which.
    """
    names = [m.name for m in members]
    bad: set[int] = set()
    if len(set(names)) != len(names):
        counts = Counter(names)
        bad = {i for i, n in enumerate(names) if counts[n] > 1}
    if check_overlaps and _any_overlap(members):
        starts = [m.start for m in members]
        ends = [m.end for m in members]
        order = sorted(
            (i for i in range(len(members)) if ends[i] > starts[i]), key=starts.__getitem__
        )
        reach, reach_i = -1, -1
        for i in order:
            if starts[i] < reach:
                bad.update((i, reach_i))
            if ends[i] > reach:
                reach, reach_i = ends[i], i
    return bad


_START = operator.attrgetter("start")
_END = operator.attrgetter("end")


def _any_overlap(members: Sequence[BlobMember]) -> bool:
    """Whether two non-empty ranges of ``members`` overlap (see :func:`ranges_overlap`)."""
    return ranges_overlap(list(map(_START, members)), list(map(_END, members)))


def ranges_overlap(starts: Sequence[int], ends: Sequence[int]) -> bool:
    """Whether two non-empty ranges ``[starts[i], ends[i])`` overlap: in start order,
    some range starts before the furthest end of those before it.

    Offsets files list a tar's members in tar order, so first: if each range ends where
    or before the next one starts, the ranges are in order and disjoint (no sort needed).
    """
    if all(map(operator.le, ends, islice(starts, 1, None))):
        return False
    spans = sorted((s, e) for s, e in zip(starts, ends, strict=True) if e > s)
    reach = accumulate((end for _, end in spans), max)
    return not all(map(operator.le, reach, (start for start, _ in islice(spans, 1, None))))


def read_offsets_file(path: str, blob_size: int | None = None) -> OffsetsIndex:
    """Read, validate and de-conflict one offsets file from disk (never through a symlink)."""
    where = Path(path)
    try:
        root = ProjectRoot(where.parent)
        try:
            data = root.read_file(where.name, MAX_OFFSETS_FILE_BYTES, "offsets file")
        finally:
            root.close()
    except BlobfsError as exc:
        index = OffsetsIndex()
        index.problems.add(path, FILE_REFUSED, str(exc))
        return index
    except OSError as exc:
        index = OffsetsIndex()
        index.problems.add(path, FILE_REFUSED, f"cannot read: {exc.strerror}")
        return index
    parsed = parse_offsets(data, path, blob_size)
    clean = reject_conflicts(parsed.members, path)
    parsed.problems.merge(clean.problems)
    clean.problems = parsed.problems
    return clean


# ---- writing -------------------------------------------------------------------------


def _op_unicode(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _op_int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


_GLOBAL = b"c" + f"{SDK_MODULE}\n{SDK_CLASS}\n".encode() + b"q\x01"  # GLOBAL + BINPUT 1
_GET_CLASS = b"h\x01"  # BINGET 1
_KEYS = (_op_unicode("name"), _op_unicode("offset_start"), _op_unicode("offset_end"))
#: The keys the first time (each followed by BINPUT 2, 3, 4) and after it (BINGET 2, 3, 4).
_KEYS_PUT = tuple(key + b"q" + bytes([2 + i]) for i, key in enumerate(_KEYS))
_KEYS_GET = tuple(b"h" + bytes([2 + i]) for i in range(len(_KEYS)))


def dumps_batch(members: Sequence[BlobMember]) -> bytes:
    """Return one pickle of ``list[BlobImageInfo]`` exactly as the SDK reader expects.

    The opcodes are those ``pickle.dumps(list_of_dataclasses, protocol=2)`` emits for the
    SDK class (GLOBAL class, then per item EMPTY_TUPLE NEWOBJ, a state dict and BUILD),
    with the pickler's memo references for what repeats (the class, the three keys, which
    are one string each in every entry's ``__dict__``) and without the memo entries
    nobody reads back. Spelling the keys out in every entry instead would make the file
    much larger and every reader decode them again.
    """
    out = [b"\x80\x02", b"]q\x00", b"("]  # PROTO 2, EMPTY_LIST + BINPUT 0, MARK
    for i, m in enumerate(members):
        keys = _KEYS_PUT if i == 0 else _KEYS_GET
        out.append(_GLOBAL if i == 0 else _GET_CLASS)
        out.append(b")\x81}(")  # EMPTY_TUPLE NEWOBJ EMPTY_DICT MARK
        out += [keys[0], _op_unicode(m.name), keys[1], _op_int(m.start), keys[2], _op_int(m.end)]
        out.append(b"ub")  # SETITEMS BUILD
    out.append(b"e.")  # APPENDS STOP
    return b"".join(out)


def write_offsets(stream: IO[bytes], members: Iterable[BlobMember]) -> None:
    """Write ``members`` as a sequence of pickled batches of :data:`BATCH_SIZE`."""
    batch: list[BlobMember] = []
    for m in members:
        batch.append(m)
        if len(batch) == BATCH_SIZE:
            stream.write(dumps_batch(batch))
            batch = []
    if batch:
        stream.write(dumps_batch(batch))
