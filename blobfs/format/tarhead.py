"""Ask the tar whether an offsets entry is one of its members.

An offsets file is only a claim about a tar; the tar is the ground truth. Every member's
data is preceded by its own 512-byte header (pax and GNU long-name headers come *before*
that header, never between it and the data), so one ``pread`` of the 512 bytes before an
entry's start shows whether the entry is a real member:

- the header checksum is valid (the unsigned or the signed sum, as tar readers accept);
- its type is a regular file (``0``, NUL or ``7``);
- its size field equals the entry's size (octal or GNU base-256);
- its name agrees with the entry's name: the last path component of the header's name
  (``prefix/name`` for POSIX ustar) equals the entry's name, or that name with every
  non-ASCII character as ``?`` (what pax writers store in the ustar field). When the
  100-byte name field is full, the name may have been cut (the whole name then lives in a
  pax or GNU header before it), so the part that is there must be the *start* of the
  entry's name; if the cut falls inside a folder part of the path (a ``/`` in the field
  but not a prefix of the name), nothing of the name is available and the checksum, type
  and size decide alone.

An entry pointing into a header, into another member's middle, or at a member of a
different size fails at least one of these, which is what lets blobfs serve the correct
member of an overlap or a duplicate instead of refusing both.

Images are often smaller than a header, so reading all 512 bytes at each image's first
read more than doubles the bytes read to serve it. :func:`fields_problem` decides from the
first :data:`FIELDS_END` bytes only (name, the numeric fields, the type), plus the
``prefix`` field in the rare case the name field alone cannot settle the name: the same
verdict as :func:`member_problem` except that the checksum, which covers the whole block,
is replaced by a structural test (every numeric field of that part is a well-formed
number, and the stored checksum is one the block could have).
"""

from __future__ import annotations

from collections.abc import Callable

from blobfs.model import BlobMember

BLOCK = 512
#: The part of a header :func:`fields_problem` reads: name, mode, uid, gid, size, mtime,
#: checksum and type.
FIELDS_END = 157
#: Where the ``magic`` to ``prefix`` fields lie (read only when the name needs them).
TAIL = (257, 500)
_NUMERIC = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148))
_REGULAR = (b"0", b"\0", b"7")
_POSIX_MAGIC = b"ustar\0"
_HIGH_BYTES = bytes(range(128, 256))

NO_HEADER = "no tar member starts there (no valid header before it)"
NOT_REGULAR = "the tar member there is not a regular file"
SIZE_DIFFERS = "the tar member there has another size"
NAME_DIFFERS = "the tar member there has another name"


def _number(field: bytes) -> int | None:
    """A tar numeric field: octal text, or GNU base-256 (high bit set); None if garbled."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def checksum_ok(header: bytes) -> bool:
    """True when the header's stored checksum matches its bytes (unsigned or signed sum)."""
    stored = _number(header[148:156])
    if stored is None:
        return False
    field = header[148:156]
    unsigned = sum(header) - sum(field) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    # the signed sum (old writers): every byte >= 128 counts 256 less
    rest = header[:148] + header[156:BLOCK]
    high = len(rest) - len(rest.translate(None, _HIGH_BYTES))
    return stored == unsigned - 256 * high


def _name_agrees_with(field: bytes, tail: Callable[[], bytes], name: str) -> bool:
    """Whether the name field (and, only if it matters, the magic-to-prefix part that
    ``tail()`` returns) agrees with ``name``."""
    cut = b"\0" not in field  # a full field may be the start of a longer name
    stored = field.split(b"\0", 1)[0]
    if not stored or (cut and b"/" not in stored):
        # only here can the ustar prefix change the verdict: it is the whole base name
        # when the name field is empty, and a "/" it adds settles a cut name
        rest = tail()
        if rest[: 263 - 257] == _POSIX_MAGIC:
            prefix = rest[345 - 257 :].split(b"\0", 1)[0]
            if prefix:
                stored = prefix + b"/" + stored
    base = stored.rsplit(b"/", 1)[-1]
    exact = name.encode("utf-8", "surrogateescape")
    if base == exact:
        return True
    forms = (exact, name.encode("ascii", "replace"))
    if base == forms[1]:
        return True
    if cut:
        if any(f.startswith(base) for f in forms):
            return True
        return b"/" in stored  # the cut fell inside a folder part: nothing to compare
    return False


def member_problem(header: bytes, member: BlobMember) -> str | None:
    """Why ``header`` (the 512 bytes before ``member.start``) is not ``member``'s, or None."""
    valid = len(header) == BLOCK and checksum_ok(header)
    return _problem(header, valid, lambda: header[TAIL[0] : TAIL[1]], member)


def _problem(head: bytes, valid: bool, tail: Callable[[], bytes], member: BlobMember) -> str | None:
    """The verdict once the header's validity is known (``head`` holds at least the
    first :data:`FIELDS_END` bytes)."""
    if member.start < BLOCK or not valid:
        return NO_HEADER
    if head[156:157] not in _REGULAR:
        return NOT_REGULAR
    if _number(head[124:136]) != member.size:
        return SIZE_DIFFERS
    if not _name_agrees_with(head[:100], tail, member.name):
        return NAME_DIFFERS
    return None


def _plausible(head: bytes) -> bool:
    """Whether the first :data:`FIELDS_END` bytes look like a tar header's: every numeric
    field well-formed, and a stored checksum the whole block could sum to."""
    if any(_number(head[a:b]) is None for a, b in _NUMERIC):
        return False
    field = head[148:156]
    if not field.split(b"\0", 1)[0].strip(b" ") or field[0] & 0x80:
        return False  # the checksum is always octal text, never empty
    stored = _number(field)
    if stored is None:
        return False
    known = sum(head) - sum(field) + 8 * 32
    # the unread bytes add 0 to 255 each (signed sums: -128 to 127 each, and each known
    # high byte may count 256 less)
    unread = BLOCK - FIELDS_END
    high = len(head) - len(head.translate(None, _HIGH_BYTES))
    return known - 256 * high - 128 * unread <= stored <= known + 255 * unread


def fields_problem(head: bytes, member: BlobMember, tail: Callable[[], bytes]) -> str | None:
    """Why the header before ``member.start`` is not ``member``'s, from its first
    :data:`FIELDS_END` bytes (``head``); ``tail()`` gives bytes 257-500 of the header when
    the name needs them. None when it is the member's."""
    return _problem(head, len(head) == FIELDS_END and _plausible(head), tail, member)
