"""WritebackOperations: the FUSE adapter of a writable mount (``--writeback``).

Imported only by a writeback mount: the read-only mount's adapter (:mod:`blobfs.fuse.ops`)
and everything below it load none of :mod:`blobfs.writeback`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from blobfs import deadline
from blobfs.fuse.compat import invalidate_path
from blobfs.fuse.ops import BlobfsOperations, counted_as, errno_boundary
from blobfs.layout import CONTROL_DIR
from blobfs.writeback.fs import WritebackFS
from blobfs.writeback.queue import Event, Settled, WritebackQueue

logger = logging.getLogger(__name__)


class WritebackOperations(BlobfsOperations):
    """The writable mount (``--writeback``): the read-only operations plus writes.

    ``open``/``flush`` are implemented here (unlike the read-only class) because a write
    handle must be committed before ``close()`` returns: the kernel sends ``flush``
    synchronously from ``close()``, and ``release`` only afterwards. ``flush`` also ends
    the handle, so ``release`` never reaches Python (see ``WritebackFS.close``).
    """

    #: The control files' contents are made when read (``writeback.json`` grows as files
    #: are staged): opened with ``direct_io`` (see ``BlobfsFUSE.open``).
    direct_io_prefix = CONTROL_DIR + "/"
    #: Staged files change size while written: the overlay's listing carries no
    #: attributes, so the kernel asks getattr (with its short timeout) for each name.
    serves_readdir_plus = False

    def __init__(
        self,
        view: WritebackFS,
        queue: WritebackQueue,
        on_ready: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
        timeout_s: float = deadline.DEFAULT_TIMEOUT_S,
        attr_timeout_s: float = 1.0,
    ) -> None:
        super().__init__(view, on_ready, on_exit, timeout_s=timeout_s)
        self.wview = view
        #: The mount's attribute timeout: how long the kernel may keep an answer's size.
        self.attr_timeout_s = attr_timeout_s
        # The paths whose attributes went to the kernel lately, in two sets that take
        # turns (see :meth:`_lately`).
        self._answered: set[str] = set()
        self._answered_before: set[str] = set()
        self._turned = time.monotonic()
        queue.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Settled):
            self.forget_cached(event.paths)

    def forget_cached(self, paths: Sequence[str]) -> None:
        """Drop the kernel's attributes of ``paths`` (imported annotations and meta now
        served from the project, whose copy may differ from the staged one in bytes and
        length); called by the writeback queue's thread, never inside a request.

        Only paths whose attributes were answered within the attribute timeout are
        told: the kernel holds no other's size. Nor does it hold their pages past an
        open (a writable mount has no ``kernel_cache``: each open drops them). So a copy
        whose files were written more than a moment before their batch was imported
        costs the queue's thread no notification per annotation, while the copy goes on.

        Imported images are never among them: each is imported byte for byte from the
        staged copy it was served from, so nothing the kernel holds of its bytes or size
        turns false."""
        started = time.monotonic()
        lately = self._lately(started)
        recent = [p for p in paths if any(p in answered for answered in lately)]
        dropped = sum(invalidate_path(path) for path in recent)
        logger.debug(
            "kernel caches of %d of %d imported files dropped (%d answered lately) in %.4f s",
            dropped,
            len(paths),
            len(recent),
            time.monotonic() - started,
        )

    def _answering(self, path: str) -> None:
        """``path``'s attributes go to the kernel now (see :meth:`forget_cached`)."""
        now = time.monotonic()
        if now - self._turned > self.attr_timeout_s:
            # what the newer set holds was answered before the timeout after the last
            # turn: older than the timeout by now, past twice the timeout since the turn
            old = now - self._turned > 2 * self.attr_timeout_s
            self._answered_before, self._answered = set() if old else self._answered, set()
            self._turned = now
        self._answered.add(path)

    def _lately(self, now: float) -> tuple[set[str], ...]:
        """The sets that may hold a path answered within the timeout before ``now``.

        A path is added to the newer set, after the sets turned if the newer one is
        older than the timeout: so it holds only answers given within the timeout after
        the last turn, and the older set only answers from before the last turn.
        """
        since = now - self._turned
        if since > 2 * self.attr_timeout_s:
            return ()
        if since > self.attr_timeout_s:
            return (self._answered,)
        return (self._answered, self._answered_before)

    def destroy(self, path: str) -> None:
        self.wview.commit_reopened()  # before the queue's last flush
        super().destroy(path)

    @counted_as("getattr")
    def find_attrs(self, path: str, fh: int | None) -> dict[str, int] | None:
        """See :meth:`BlobfsOperations.find_attrs`; with a write handle (libfuse asks for
        the attributes of each file it creates), that handle's file."""
        attrs = self.wview.find_attrs(path, fh)
        if attrs is not None:
            self._answering(path)
        return attrs

    @errno_boundary
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        attrs = self.wview.getattr(path)
        self._answering(path)
        return attrs

    @errno_boundary
    def create(self, path: str, mode: int, flags: int = 0) -> int:
        return self.wview.create(path)

    @errno_boundary
    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            return self.wview.open_write(path, truncate=bool(flags & os.O_TRUNC))
        return self.wview.open(path)

    @errno_boundary
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.wview.read(fh, offset, size, path)

    @errno_boundary
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.wview.write(fh, data, offset, path)

    @errno_boundary
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self.wview.truncate(path, length, fh)

    @errno_boundary
    def flush(self, path: str, fh: int) -> None:
        self.wview.close(fh)

    @errno_boundary
    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self.wview.fsync(path, fh)

    @errno_boundary
    def release(self, path: str, fh: int) -> None:
        self.wview.release(fh)

    # ``flush`` ended the handle (``WritebackFS.close``): libfuse answers the kernel's
    # release without calling into Python (mfusepy leaves out a callback marked so)
    release.libfuse_ignore = True  # type: ignore[attr-defined]

    @errno_boundary
    def unlink(self, path: str) -> None:
        self.wview.unlink(path)

    @errno_boundary
    def rename(self, old: str, new: str) -> None:
        self.wview.rename(old, new)
        self._answering(new)  # the kernel keeps the moved file's attributes, now at new

    @errno_boundary
    def mkdir(self, path: str, mode: int) -> None:
        self.wview.mkdir(path)

    @errno_boundary
    def rmdir(self, path: str) -> None:
        self.wview.rmdir(path)

    @errno_boundary
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        self.wview.utimens(path, times)

    @errno_boundary
    def chmod(self, path: str, mode: int) -> None:
        self.wview.chmod_or_chown(path)

    @errno_boundary
    def chown(self, path: str, uid: int, gid: int) -> None:
        self.wview.chmod_or_chown(path)
