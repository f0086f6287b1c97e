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
    ) -> None:
        super().__init__(view, on_ready, on_exit, timeout_s=timeout_s)
        self.wview = view
        queue.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Settled):
            self.forget_cached(event.paths)

    def forget_cached(self, paths: Sequence[str]) -> None:
        """Drop the kernel's attributes and pages of ``paths`` (imported annotations and
        meta now served from the project, whose copy may differ from the staged one in
        bytes and length); called by the writeback queue's thread, never inside a request.

        Imported images are not among them: each is imported byte for byte from the
        staged copy it was served from, so nothing the kernel holds of its bytes or size
        turns false, and skipping them spares the queue's thread a notification per
        image while a copy goes on."""
        started = time.monotonic()
        dropped = sum(invalidate_path(path) for path in paths)
        logger.debug(
            "kernel caches of %d of %d imported files dropped in %.4f s",
            dropped,
            len(paths),
            time.monotonic() - started,
        )

    def destroy(self, path: str) -> None:
        self.wview.commit_reopened()  # before the queue's last flush
        super().destroy(path)

    @counted_as("getattr")
    def find_attrs(self, path: str, fh: int | None) -> dict[str, int] | None:
        """See :meth:`BlobfsOperations.find_attrs`; with a write handle (libfuse asks for
        the attributes of each file it creates), that handle's file."""
        return self.wview.find_attrs(path, fh)

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
