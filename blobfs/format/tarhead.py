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
"""

from __future__ import annotations

from blobfs.model import BlobMember

BLOCK = 512
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


def _name_agrees(header: bytes, name: str) -> bool:
    field = header[:100]
    cut = b"\0" not in field  # a full field may be the start of a longer name
    stored = field.split(b"\0", 1)[0]
    if header[257:263] == _POSIX_MAGIC:
        prefix = header[345:500].split(b"\0", 1)[0]
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
    if member.start < BLOCK or len(header) != BLOCK or not checksum_ok(header):
        return NO_HEADER
    if header[156:157] not in _REGULAR:
        return NOT_REGULAR
    if _number(header[124:136]) != member.size:
        return SIZE_DIFFERS
    if not _name_agrees(header, member.name):
        return NAME_DIFFERS
    return None
