"""BlobfsOperations: a thin FUSE adapter over :class:`blobfs.view.tree.ProjectView`.

Every operation is a few lines that call the view; the one decorator :func:`errno_boundary`
turns exceptions into errno values through :func:`blobfs.errors.to_errno` (unknown
exceptions become EIO with a logged traceback, never fusepy's default EINVAL).

Round trips are the cost of a FUSE file system with many small files, not bytes: this
class deliberately implements neither ``open`` nor ``release`` nor ``flush`` for the
read-only tree, so libfuse answers those itself without entering Python, and ``read``
finds its file by path (the kernel keeps the data in its page cache via ``kernel_cache``).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from blobfs.errors import (
    AlreadyExists,
    BlobfsError,
    Busy,
    InvalidInput,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    ReadOnly,
    to_errno,
)
from blobfs.fuse.compat import FuseOSError, Operations
from blobfs.view.tree import ProjectView

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
REFUSALS = (
    NotPermitted,
    ReadOnly,
    AlreadyExists,
    InvalidInput,
    Busy,
    IsADirectory,
    NotADirectory,
    NotEmpty,
)


def errno_boundary(func: F) -> F:
    """Map any exception of a FUSE operation to the errno the caller sees, and log why."""

    name = func.__name__

    @functools.wraps(func)
    def wrapper(self: BlobfsOperations, *args: Any) -> Any:
        counts = self.view.op_counts
        counts[name] = counts.get(name, 0) + 1  # under the GIL; a rare lost count is fine
        try:
            return func(self, *args)
        except FuseOSError:
            raise
        except NotFound:
            raise FuseOSError(to_errno(NotFound())) from None
        except REFUSALS as exc:  # the caller's request, answered as designed
            logger.info("%s %s refused: %s", func.__name__, args[0] if args else "", exc)
            raise FuseOSError(to_errno(exc)) from None
        except BlobfsError as exc:
            logger.error("%s %s: %s", func.__name__, args[0] if args else "", exc)
            raise FuseOSError(to_errno(exc)) from None
        except Exception as exc:
            logger.exception("%s %s failed unexpectedly", func.__name__, args[0] if args else "")
            raise FuseOSError(to_errno(exc)) from None

    return wrapper  # type: ignore[return-value]


class TreeView(Protocol):
    """What the adapter asks of the tree it serves: the read-only
    :class:`~blobfs.view.tree.ProjectView`, or the writable layer wrapping it."""

    @property
    def op_counts(self) -> dict[str, int]: ...

    def getattr(self, path: str) -> dict[str, int]: ...

    def readdir(self, path: str) -> Sequence[str]: ...

    def readdir_attrs(
        self, path: str, start: int = 0
    ) -> Iterator[tuple[str, dict[str, int] | None]]: ...

    def read_path(self, path: str, offset: int, size: int) -> bytes: ...

    def statfs(self) -> dict[str, int]: ...


class BlobfsOperations(Operations):  # type: ignore[misc]
    """The read-only mount: lookups, listings and reads by path.

    With ``no_open`` (the default), ``open`` answers ENOSYS once: the kernel then stops
    sending open and release for files at all (its "no-open" mode, Linux >= 3.14, which
    needs no libfuse support) and keeps each file's page cache across opens. That removes
    two round trips per file; measured on 30,000 small files it halves a warm scan.
    """

    use_ns = True

    def __init__(
        self,
        view: TreeView | ProjectView,
        on_ready: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        no_open: bool = True,
    ) -> None:
        self.view = view
        #: Set once libfuse tore the mount down after serving it (destroy was called).
        self.served = False
        self._on_ready = on_ready
        self._on_exit = on_exit
        if not no_open:
            # mfusepy then leaves libfuse's default open in place
            self.open = None  # type: ignore[method-assign,assignment]

    def open(self, path: str, flags: int) -> int:
        """Tell the kernel to stop sending opens (see the class docstring)."""
        raise FuseOSError(errno.ENOSYS)

    def init(self, path: str) -> None:
        """Called by libfuse once the mount is live: the moment to report readiness."""
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        self.served = True
        if self._on_exit is not None:
            self._on_exit()

    @errno_boundary
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return self.view.getattr(path)

    @errno_boundary
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.view.readdir(path)]

    @errno_boundary
    def readdir_plus(self, path: str, start: int) -> Iterator[tuple[str, dict[str, int] | None]]:
        """Listing with attributes, for libfuse 3's readdirplus (see ``BlobfsFUSE``)."""
        return self.view.readdir_attrs(path, start)

    @errno_boundary
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.view.read_path(path, offset, size)

    @errno_boundary
    def statfs(self, path: str) -> dict[str, int]:
        return self.view.statfs()
