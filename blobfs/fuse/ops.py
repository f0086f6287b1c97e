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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from blobfs import deadline
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
    TimedOut,
    to_errno,
)
from blobfs.fuse.compat import FuseOSError, Operations
from blobfs.view.tree import ListingRun, ProjectView

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
#: How long a timed-out read's range fails again at once (the kernel's own repeat).
RETRY_AFTER_TIMEOUT_S = 0.25
#: A failure repeating within this many seconds is counted, not logged again.
LOG_WINDOW_S = 10.0


def errno_boundary(func: F) -> F:
    """Map any exception of a FUSE operation to the errno the caller sees, and log why.

    Each operation runs under the mount's deadline (:mod:`blobfs.deadline`).
    """
    return _boundary(func, func.__name__)


def counted_as(name: str) -> Callable[[F], F]:
    """:func:`errno_boundary`, with the calls counted under the FUSE operation ``name``
    (a fast path of an operation is still that operation in the statistics)."""
    return lambda func: _boundary(func, name)


def _boundary(func: F, name: str) -> F:
    call_within = deadline.call_within

    @functools.wraps(func)
    def wrapper(self: BlobfsOperations, *args: Any) -> Any:
        counts = self.counts
        counts[name] = counts.get(name, 0) + 1  # under the GIL; a rare lost count is fine
        try:
            # every operation ends within --timeout
            return call_within(self.timeout_s, func, self, *args)
        except FuseOSError:
            raise
        except NotFound:
            raise FuseOSError(to_errno(NotFound())) from None
        except REFUSALS as exc:  # the caller's request, answered as designed
            logger.info("%s %s refused: %s", name, args[0] if args else "", exc)
            raise FuseOSError(to_errno(exc)) from None
        except BlobfsError as exc:
            where = args[0] if args else ""
            # a problem the source already logged (aggregated) is not logged per request;
            # others repeating within LOG_WINDOW_S are counted and logged once
            if getattr(exc, "reported", False):
                logger.debug("%s %s: %s", name, where, exc)
            else:
                log_now, held = self.recent_failures.to_log(name, where, str(exc))
                if log_now:
                    more = f" (and {held} more times since)" if held else ""
                    logger.error("%s %s: %s%s", name, where, exc, more)
            raise FuseOSError(to_errno(exc)) from None
        except Exception as exc:
            logger.exception("%s %s failed unexpectedly", name, args[0] if args else "")
            raise FuseOSError(to_errno(exc)) from None

    return wrapper  # type: ignore[return-value]


class RecentFailures:
    """What failed a moment ago: to answer the kernel's immediate repeat of a timed-out
    read at once, and to log a failure that repeats once per window with a count.

    After a failed read the kernel asks again right away for the same pages (readahead
    first, then the page the program waits for). A read that timed out would then cost a
    second deadline, so a read inside a range that timed out less than ``retry_after_s``
    ago fails with ETIMEDOUT at once; any other failure is tried again (it was quick).
    A failure with the same operation, path and message as one logged less than
    ``log_window_s`` ago is counted instead of logged, and the count goes with the next
    line logged for it.
    """

    def __init__(
        self,
        retry_after_s: float = RETRY_AFTER_TIMEOUT_S,
        log_window_s: float = LOG_WINDOW_S,
        max_entries: int = 1024,
    ) -> None:
        self.retry_after_s = retry_after_s
        self.log_window_s = log_window_s
        self.max_entries = max_entries
        self._timeouts: dict[str, tuple[float, int, int]] = {}
        self._logged: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def timed_out(self, path: str, start: int, end: int) -> bool:
        """Whether ``[start, end)`` of ``path`` lies in a read that just timed out."""
        with self._lock:
            found = self._timeouts.get(path)
        if found is None:
            return False
        at, lo, hi = found
        return lo <= start and end <= hi and time.monotonic() - at <= self.retry_after_s

    def note_timeout(self, path: str, start: int, end: int) -> None:
        with self._lock:
            self._timeouts.pop(path, None)
            self._timeouts[path] = (time.monotonic(), start, end)
            _trim(self._timeouts, self.max_entries)

    def to_log(self, op: str, path: str, message: str) -> tuple[bool, int]:
        """``(log it now, how many times it was held back before)``."""
        key = (op, path, message)
        now = time.monotonic()
        with self._lock:
            at, held = self._logged.get(key, (0.0, 0))
            if at and now - at <= self.log_window_s:
                self._logged[key] = (at, held + 1)
                return False, 0
            self._logged.pop(key, None)
            self._logged[key] = (now, 0)
            _trim(self._logged, self.max_entries)
            return True, held


def _trim(items: dict[Any, Any], most: int) -> None:
    while len(items) > most:
        items.pop(next(iter(items)))


class TreeView(Protocol):
    """What the adapter asks of the tree it serves: the read-only
    :class:`~blobfs.view.tree.ProjectView`, or the writable layer wrapping it."""

    @property
    def op_counts(self) -> dict[str, int]: ...

    def getattr(self, path: str) -> dict[str, int]: ...

    def find_attrs(self, path: str) -> dict[str, int] | None: ...

    def readdir(self, path: str) -> Sequence[str]: ...

    def readdir_runs(
        self, path: str, start: int = 0
    ) -> Iterator[ListingRun | tuple[str, dict[str, int] | None]]: ...

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
    #: See :class:`~blobfs.fuse.compat.ServedOperations`.
    direct_io_prefix: str | None = None
    serves_readdir_plus = True

    def __init__(
        self,
        view: TreeView | ProjectView,
        on_ready: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        no_open: bool = True,
        timeout_s: float = deadline.DEFAULT_TIMEOUT_S,
    ) -> None:
        self.view = view
        #: The view's count of requests served, by operation (the same dict, kept here:
        #: every operation adds to it).
        self.counts = view.op_counts
        #: Deadline of each operation (``--timeout``); see :mod:`blobfs.deadline`.
        self.timeout_s = timeout_s
        self.recent_failures = RecentFailures()
        #: Set once libfuse tore the mount down after serving it (destroy was called).
        self.served = False
        self._on_ready = on_ready
        self._on_exit = on_exit
        if not no_open:
            # mfusepy then leaves libfuse's default open in place
            self.open = None  # type: ignore[method-assign,assignment]

    @property
    def op_counts(self) -> dict[str, int]:
        """The view's count of requests served, by operation."""
        return self.view.op_counts

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

    @counted_as("getattr")
    def find_attrs(self, path: str, fh: int | None) -> dict[str, int] | None:
        """``getattr`` as :class:`~blobfs.fuse.compat.BlobfsFUSE` calls it: None for a
        missing path instead of an error. Every file a copy creates is first looked up
        (twice: ``cp`` checks, then the kernel's exclusive create checks again), and
        raising through the layers for each answer costs more than the answer."""
        return self.view.find_attrs(path)

    @errno_boundary
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.view.readdir(path)]

    @errno_boundary
    def readdir_plus(
        self, path: str, start: int
    ) -> Iterator[ListingRun | tuple[str, dict[str, int] | None]]:
        """Listing with attributes, for libfuse 3's readdirplus (see ``BlobfsFUSE``): a
        large folder as runs of files sharing their attributes but the size, when the
        tree offers them."""
        return self.view.readdir_runs(path, start)

    @errno_boundary
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if self.recent_failures.timed_out(path, offset, offset + size):
            logger.debug("read %s: timed out a moment ago; fails again at once", path)
            raise FuseOSError(errno.ETIMEDOUT)
        try:
            return self.view.read_path(path, offset, size)
        except TimedOut:
            self.recent_failures.note_timeout(path, offset, offset + size)
            raise

    @errno_boundary
    def statfs(self, path: str) -> dict[str, int]:
        return self.view.statfs()
