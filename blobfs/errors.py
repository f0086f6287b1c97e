"""The blobfs exception tree and the one table that turns exceptions into errno values.

Every layer below the FUSE adapter raises these exceptions and never an ``OSError`` built by
hand, so the errno a program sees is decided in exactly one place (:func:`to_errno`), the
way mountpoint-s3 keeps one ``ToErrno`` table.

Tree::

    BlobfsError
    ├── NotFound            ENOENT  path or record does not exist
    ├── NotADirectory       ENOTDIR a path component is a file
    ├── IsADirectory        EISDIR  file operation on a directory
    ├── ReadOnly            EROFS   write on a read-only mount
    ├── NotPermitted        EPERM   change the mount refuses (rewrite an imported image)
    ├── Busy                EBUSY   file is being imported right now
    ├── AlreadyExists       EEXIST  name taken
    ├── NotEmpty            ENOTEMPTY rmdir of a folder with files in it
    ├── NoSpace             ENOSPC  the writeback spool's file system is full
    ├── InvalidInput        EINVAL  bad argument from a caller (CLI, config)
    ├── TimedOut            ETIMEDOUT the operation's deadline (``--timeout``) passed
    ├── OffsetsError        EIO     an offsets file that cannot be trusted
    ├── CorruptData         EIO     a blob that is shorter or other than its index says
    └── RemoteError         EIO     the server failed or sent something wrong
        ├── AuthError       EACCES  401/403 from the server
        ├── RemoteNotFound  EIO     404 for an object the listing named (a blob gone)
        └── RangeNotSatisfiable EIO 416, or a Content-Range that does not match
"""

from __future__ import annotations

import errno


class BlobfsError(Exception):
    """Base of every error blobfs raises on purpose."""

    errno_value: int = errno.EIO


class NotFound(BlobfsError):
    """The path or record does not exist."""

    errno_value = errno.ENOENT


class NotADirectory(BlobfsError):
    """A directory operation met a file."""

    errno_value = errno.ENOTDIR


class IsADirectory(BlobfsError):
    """A file operation met a directory."""

    errno_value = errno.EISDIR


class ReadOnly(BlobfsError):
    """A write on a mount (or a part of it) that is read-only."""

    errno_value = errno.EROFS


class NotPermitted(BlobfsError):
    """The mount refuses this change (e.g. rewriting an image already imported)."""

    errno_value = errno.EPERM


class Busy(BlobfsError):
    """The file is being imported right now."""

    errno_value = errno.EBUSY


class AlreadyExists(BlobfsError):
    """The name is taken."""

    errno_value = errno.EEXIST


class NotEmpty(BlobfsError):
    """A folder to remove still holds files."""

    errno_value = errno.ENOTEMPTY


class NoSpace(BlobfsError):
    """The writeback spool's file system is full."""

    errno_value = errno.ENOSPC


class InvalidInput(BlobfsError):
    """An argument or configuration value that cannot be used."""

    errno_value = errno.EINVAL


class TimedOut(BlobfsError):
    """The operation's deadline passed before the server answered (``--timeout``).

    Not a :class:`RemoteError`: code that turns a failed remote object into a per-file
    EIO must let a deadline through, so the program sees why its call failed.
    """

    errno_value = errno.ETIMEDOUT


class OffsetsError(BlobfsError):
    """An offsets file (``*_offsets.pkl``) that is hostile, truncated or malformed."""


class CorruptData(BlobfsError):
    """Blob bytes that do not match their index (truncated or missing blob)."""


class RemoteError(BlobfsError):
    """The server failed, or answered with something blobfs refuses to serve."""


class AuthError(RemoteError):
    """The server refused the token."""

    errno_value = errno.EACCES


class RemoteNotFound(RemoteError):
    """The server has no such object (HTTP 404).

    EIO, not ENOENT: the path exists in the mount (its listing named it), so a 404 behind
    it means the project is damaged on the server (e.g. its blob was deleted), which a
    program must see as an I/O error and the log must explain.
    """


class RangeNotSatisfiable(RemoteError):
    """A byte range outside the remote object, or a mismatching Content-Range."""


def to_errno(exc: BaseException) -> int:
    """Return the errno a program should see for ``exc``.

    Unknown exceptions are EIO: a bug must look like an I/O error to the caller (and be
    logged with its traceback by the caller of this function), never like EINVAL, which is
    what fusepy would otherwise report.
    """
    if isinstance(exc, BlobfsError):
        return exc.errno_value
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
