"""Import shim: mfusepy (maintained fork) first, fusepy as a fallback, in one place.

It also picks the libfuse the process binds to (before mfusepy loads it): libfuse 3 when
it is installed and usable, because only libfuse 3 passes attributes with directory
listings (readdirplus), which saves the kernel one lookup round trip per file of a scan.
``FUSE_LIBRARY_PATH`` set by the user always wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from blobfs.view.tree import ListingRun


def _choose_libfuse() -> None:
    """Point mfusepy at libfuse 3 when this process can mount with it.

    Unprivileged mounts need libfuse 3's own helper (``fusermount3``); root mounts
    directly. Without either, mfusepy's default (libfuse 2 first) stays in force.
    """
    if os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("BLOBFS_LIBFUSE") == "2":
        return
    path = ctypes.util.find_library("fuse3")
    if path and (os.geteuid() == 0 or shutil.which("fusermount3")):
        os.environ["FUSE_LIBRARY_PATH"] = path


_choose_libfuse()

try:
    from mfusepy import FUSE, FuseOSError, Operations, c_stat, fuse_version_major, set_st_attrs
except ImportError:  # pragma: no cover - only on machines with the old fusepy
    from fuse import (  # type: ignore[no-redef,unused-ignore]
        FUSE,
        FuseOSError,
        Operations,
        c_stat,
        set_st_attrs,
    )

    fuse_version_major = 2

#: The major version of the libfuse this process is bound to (2 or 3).
FUSE_MAJOR: int = fuse_version_major

#: libfuse 3's readdir flag (the kernel asked for READDIRPLUS), filler flag (this entry
#: carries full attributes) and the capability that makes the kernel fall back to plain
#: READDIR after the first page unless lookups follow, from ``fuse.h``/``fuse_common.h``.
FUSE_READDIR_PLUS = 1
FUSE_FILL_DIR_PLUS = 2
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFMT = 0o170000


class ServedOperations(Protocol):
    """What :class:`BlobfsFUSE` asks of its operations object beyond fusepy's callbacks."""

    #: Files whose path starts with this open with ``direct_io`` (see ``BlobfsFUSE.open``).
    direct_io_prefix: str | None
    #: Whether listings go out through :meth:`readdir_plus`; when False, mfusepy's plain
    #: ``readdir`` serves names only.
    serves_readdir_plus: bool

    def find_attrs(self, path: str, fh: int | None) -> dict[str, int] | None:
        """``getattr``, with None for a missing path (see ``BlobfsFUSE.fgetattr``)."""
        ...

    def readdir_plus(
        self, path: str, start: int
    ) -> Iterable[tuple[str, dict[str, int] | None] | ListingRun]:
        """The listing from entry number ``start`` on: ``(name, stat fields or None)``
        pairs (None for an entry whose attributes need I/O to learn) and/or
        :class:`~blobfs.view.tree.ListingRun` s of files that share all fields but their
        size (names already encoded)."""
        ...


class BlobfsFUSE(FUSE):  # type: ignore[misc]
    """mfusepy's FUSE plus readdirplus on libfuse 3.

    mfusepy ignores the readdirplus request (its TODO), so every file of a listing costs
    the kernel a LOOKUP before it can be opened. Here, when the operations object
    ``serves_readdir_plus`` (:class:`ServedOperations`), each entry goes to libfuse's
    filler with its full ``stat``, ``FUSE_FILL_DIR_PLUS`` and a non-zero offset: only on
    that path does libfuse create the node, so that the kernel caches entry and
    attributes for their timeouts. The
    listing is served page by page (the offset is the index of the next entry), and the
    kernel is told to use READDIRPLUS for every page, not only the first.

    Once a folder's whole listing went out with attributes, later listings of it send
    names only: the kernel already holds those entries (for the entry timeout), and
    filling attributes again costs a stat per name here and a node lookup per name in
    libfuse (``os.listdir`` of 30,000 names on a warm mount: 190 ms -> 65 ms). An entry
    the kernel has dropped since (memory pressure) costs one LOOKUP. (The kernel's own
    listing cache would answer without any request, but libfuse before 3.16.1 drops the
    ``cache_readdir`` flag of the high-level API's opendir.)
    """

    def __init__(
        self,
        operations: ServedOperations,
        *args: Any,
        readdirplus_auto: bool = False,
        **kwargs: Any,
    ) -> None:
        #: Folders whose full listing was sent with attributes (see the class docstring).
        self._listed: set[str] = set()
        #: Leave the kernel its automatic choice (``--readdirplus auto``): attributes with
        #: a folder's first page and after lookups in it, names only otherwise.
        self.readdirplus_auto = readdirplus_auto
        super().__init__(operations, *args, **kwargs)

    @property
    def served_ops(self) -> ServedOperations:
        """The operations object, as this class uses it (mfusepy keeps it untyped)."""
        ops: ServedOperations = self.operations
        return ops

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Every callback: first keep this libfuse thread's Python thread state (see
        :func:`_keep_thread_state`)."""
        if not getattr(_thread_kept, "kept", False):
            _keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        """mfusepy's getattr (both libfuse versions call this), answering a missing path
        with ENOENT directly: a copy into the mount has every new name looked up twice
        before it is created, and the error otherwise travels up as an exception through
        the view, the errno boundary and mfusepy's generic error path."""
        if path is None or self.raw_fi:
            return int(super().fgetattr(path, buf, fip))
        fh = fip.contents.fh if fip else None
        attrs = self.served_ops.find_attrs(path.decode(self.encoding, self.errors), fh)
        if attrs is None:
            return -errno.ENOENT
        ctypes.memset(buf, 0, ctypes.sizeof(c_stat))
        set_st_attrs(buf.contents, attrs, use_ns=self.use_ns)
        return 0

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        """mfusepy's ``create`` without its per-call ``inspect.signature`` of the handler
        (4% of a ``cp -r`` into a writeback mount): ours takes ``(path, mode, flags)``."""
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        return 0

    def open(self, path: bytes, fip: Any) -> int:
        """mfusepy's ``open``, plus ``direct_io`` for the files the operations name in
        ``direct_io_prefix`` (files whose length is known only when read, like /proc's).

        Such a file announces a bound as its size and ends with a short read; through the
        page cache the kernel would take that short read as the file's new size, until
        the attribute timeout, and cut a longer answer read within it. With ``direct_io``
        every read goes to the daemon and the kernel neither clamps it to nor learns a size.
        """
        fi = fip.contents
        decoded = path.decode(self.encoding, self.errors)
        fi.fh = self.operations.open(decoded, fi.flags)
        prefix = self.served_ops.direct_io_prefix
        if prefix is not None and decoded.startswith(prefix):
            fi.direct_io = 1
        return 0

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        if conn and self.served_ops.serves_readdir_plus and not self.readdirplus_auto:
            conn.contents.want &= ~FUSE_CAP_READDIRPLUS_AUTO
        _remember_fuse()
        super().init_fuse_3(conn, config)

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        if not self.served_ops.serves_readdir_plus or path is None:
            return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
        filler = _keeping_the_gil(filler)
        st = c_stat()
        stp = ctypes.pointer(st)
        size = ctypes.sizeof(st)
        index = offset
        while index < 2:  # "." and "..": libfuse never looks these up
            ctypes.memset(stp, 0, size)
            st.st_mode = S_IFDIR
            if filler(buf, b"." * (index + 1), stp, index + 1, 0):
                return 0
            index += 1
        decoded = path.decode(self.encoding, self.errors)
        # names only when the kernel asked for a plain READDIR, or already holds them
        names_only = not flags & FUSE_READDIR_PLUS or decoded in self._listed
        for item in self.served_ops.readdir_plus(decoded, index - 2):
            if isinstance(item, tuple):  # (name, attrs): a small folder, entry by entry
                index = self._fill_pair(filler, buf, stp, item, index, names_only)
            else:  # files sharing all but their size: the hot path of a large folder
                index = self._fill_run(filler, buf, stp, item, index, names_only)
            if index < 0:
                return 0  # the reply buffer is full
        if flags & FUSE_READDIR_PLUS:
            self._listed.add(decoded)  # the whole listing went out with attributes
        return 0

    def _fill_pair(
        self,
        filler: Any,
        buf: Any,
        stp: Any,
        item: tuple[str, dict[str, int] | None],
        index: int,
        names_only: bool,
    ) -> int:
        """Hand libfuse one entry; the next entry's index, or -1 when the buffer is full."""
        name, attrs = item
        st = stp.contents
        ctypes.memset(stp, 0, ctypes.sizeof(st))
        if attrs is None or names_only:
            entry_flags = 0  # the kernel looks the rest up when (if) it needs it
            st.st_mode = S_IFREG if attrs is None else attrs["st_mode"] & S_IFMT
        else:
            entry_flags = FUSE_FILL_DIR_PLUS
            set_st_attrs(st, attrs, use_ns=self.use_ns)
        index += 1
        if filler(buf, name.encode(self.encoding, self.errors), stp, index, entry_flags):
            return -1
        return index

    def _fill_run(
        self, filler: Any, buf: Any, stp: Any, run: ListingRun, index: int, names_only: bool
    ) -> int:
        """Hand libfuse a run of files: the shared fields are set once, and per entry only
        the size (the ``stat`` is copied by libfuse at each call). The next entry's
        index, or -1 when the buffer is full."""
        st = stp.contents
        ctypes.memset(stp, 0, ctypes.sizeof(st))
        if run.attrs is None or names_only:
            st.st_mode = S_IFREG
            for name in run.names:
                index += 1
                if filler(buf, name, stp, index, 0):
                    return -1
            return index
        set_st_attrs(st, run.attrs, use_ns=self.use_ns)
        for name, file_size in zip(run.names, run.sizes, strict=True):
            st.st_size = file_size
            st.st_blocks = (file_size + 511) >> 9
            index += 1
            if filler(buf, name, stp, index, FUSE_FILL_DIR_PLUS):
                return -1
        return index


#: libfuse 3's ``fuse_fill_dir_t``, called without releasing the interpreter lock.
_FILL_DIR = ctypes.PYFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.POINTER(c_stat),
    ctypes.c_int64,
    ctypes.c_int,
)
_fillers: dict[int, Any] = {}


def _keeping_the_gil(filler: Any) -> Any:
    """libfuse's filler, called the way that keeps the interpreter lock.

    ctypes releases and retakes the GIL around every foreign call; a listing makes one
    call per entry, and with another thread runnable (the background index, other
    requests) each retake waits for it. libfuse's fillers only copy the entry into the
    reply (and add its node under libfuse's own lock, never held while Python runs), so
    they are called holding the GIL. A filler that is not a C function (tests) is kept.
    """
    if getattr(filler, "_flags_", None) is None:
        return filler
    address = ctypes.cast(filler, ctypes.c_void_p).value or 0
    fast = _fillers.get(address)
    if fast is None:
        fast = _fillers[address] = _FILL_DIR(address)
    return fast


_thread_kept = threading.local()


def _keep_thread_state() -> None:
    """Keep the Python thread state of the libfuse thread this runs on, for good.

    A libfuse worker thread is not a Python thread: ctypes makes a thread state for each
    callback on it and throws it away afterwards (with its frame stack, an mmap and
    munmap of 16 KiB each time). One more ``PyGILState_Ensure`` that is never released
    keeps it: the callbacks that follow on this thread reuse it (and still release the
    GIL when they return). A thread that libfuse ends leaves its state behind, a few KiB.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _thread_kept.kept = True


#: This process's ``struct fuse *`` once libfuse 3 is serving (one mount per process).
_fuse: int | None = None


def _remember_fuse() -> None:
    """Keep the running ``struct fuse *`` (libfuse hands it out only inside a request)."""
    global _fuse
    import mfusepy

    _fuse = mfusepy._libfuse.fuse_get_context().contents.fuse


def invalidate_path(path: str) -> bool:
    """Tell the kernel to drop the cached attributes and pages of ``path`` now.

    For files whose content changes under the mount (writeback imports replace an
    annotation or meta.json by the server's copy): without it the kernel keeps the old
    size for the attribute timeout and cuts a longer new content to it. libfuse 3's
    ``fuse_invalidate_path`` (a ``notify_inval_inode`` for the path's node); False where
    it is missing (libfuse 2) or the kernel never looked the path up (nothing cached).
    Call it from outside a FUSE request (the kernel answers it while holding the inode).
    """
    if _fuse is None or FUSE_MAJOR < 3:
        return False
    import mfusepy

    fn = mfusepy._libfuse.fuse_invalidate_path
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return int(fn(_fuse, path.encode())) == 0


__all__ = [
    "FUSE",
    "FUSE_MAJOR",
    "BlobfsFUSE",
    "FuseOSError",
    "Operations",
    "invalidate_path",
]
