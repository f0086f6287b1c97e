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
import queue
import shutil
import threading
from collections.abc import Callable, Iterable
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

#: The ``stat`` fields :func:`fill_stat` sets directly, and the times, given in ns.
_STAT_FIELDS = frozenset(name for name, *_ in c_stat._fields_)
_TIMESPECS = {
    key: f"{key}spec"
    for key in ("st_atime", "st_mtime", "st_ctime")
    if f"{key}spec" in _STAT_FIELDS
}


def fill_stat(st: Any, attrs: dict[str, int], use_ns: bool = True) -> None:
    """mfusepy's ``set_st_attrs``: every answer with attributes fills a ``stat`` (each
    lookup, each create's getattr, each file of a listing). Here a field is set once,
    without asking the structure first whether it has it, and the times (the same for
    most files) are split into seconds and nanoseconds once."""
    if not use_ns:
        set_st_attrs(st, attrs, use_ns=False)
        return
    last: int | None = None
    parts: tuple[int, int] = (0, 0)
    for key, val in attrs.items():
        spec = _TIMESPECS.get(key)
        if spec is not None:
            if val != last:
                last, parts = val, divmod(int(val), 1_000_000_000)
            timespec = getattr(st, spec)
            timespec.tv_sec, timespec.tv_nsec = parts
        elif key in _STAT_FIELDS:
            setattr(st, key, val)


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
    #: Requests served by name; :class:`ContentPusher` adds what it handed the kernel.
    op_counts: dict[str, int]

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

    _pusher: ContentPusher | None = None

    def __init__(
        self,
        operations: ServedOperations,
        mountpoint: str,
        *args: Any,
        readdirplus_auto: bool = False,
        **kwargs: Any,
    ) -> None:
        #: Folders whose full listing was sent with attributes (see the class docstring).
        self._listed: set[str] = set()
        #: Leave the kernel its automatic choice (``--readdirplus auto``): attributes with
        #: a folder's first page and after lookups in it, names only otherwise.
        self.readdirplus_auto = readdirplus_auto
        #: Hands the kernel the content of listed files held in memory (see ``ContentPusher``).
        #: Not with ``use_ino``, where a file's inode number is not libfuse's node id, and
        #: only with ``kernel_cache``: without it each open drops the file's pages.
        self._pusher: ContentPusher | None = None
        if (
            FUSE_MAJOR >= 3
            and kwargs.get("kernel_cache")
            and not kwargs.get("use_ino")
            and not kwargs.get("direct_io")
        ):
            self._pusher = ContentPusher(mountpoint, operations.op_counts)
        super().__init__(operations, mountpoint, *args, **kwargs)

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
        fill_stat(buf.contents, attrs, self.use_ns)
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
        held: list[tuple[bytes, bytes]] = []
        # taken before the listing reads the tree: content an import replaces after this
        # point is followed by an invalidation, which makes the push of this page void
        generation = coherence.generation
        try:
            for item in self.served_ops.readdir_plus(decoded, index - 2):
                if isinstance(item, tuple):  # (name, attrs): a small folder, entry by entry
                    index = self._fill_pair(filler, buf, stp, item, index, names_only)
                else:  # files sharing all but their size: the hot path of a large folder
                    index = self._fill_run(filler, buf, stp, item, index, names_only, held)
                if index < 0:
                    return 0  # the reply buffer is full
            if flags & FUSE_READDIR_PLUS:
                self._listed.add(decoded)  # the whole listing went out with attributes
            return 0
        finally:
            if held and self._pusher is not None:
                self._pusher.push(path, held, generation)

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
            fill_stat(st, attrs, self.use_ns)
        index += 1
        if filler(buf, name.encode(self.encoding, self.errors), stp, index, entry_flags):
            return -1
        return index

    def _fill_run(
        self,
        filler: Any,
        buf: Any,
        stp: Any,
        run: ListingRun,
        index: int,
        names_only: bool,
        held: list[tuple[bytes, bytes]],
    ) -> int:
        """Hand libfuse a run of files: the shared fields are set once, and per entry only
        the size (the ``stat`` is copied by libfuse at each call). The next entry's
        index, or -1 when the buffer is full. Files listed with their attributes whose
        content the run holds are added to ``held`` as ``(name, content)``."""
        st = stp.contents
        ctypes.memset(stp, 0, ctypes.sizeof(st))
        if run.attrs is None or names_only:
            st.st_mode = S_IFREG
            for name in run.names:
                index += 1
                if filler(buf, name, stp, index, 0):
                    return -1
            return index
        fill_stat(st, run.attrs, self.use_ns)
        first, full = index, False
        for name, file_size in zip(run.names, run.sizes, strict=True):
            st.st_size = file_size
            st.st_blocks = (file_size + 511) >> 9
            index += 1
            if filler(buf, name, stp, index, FUSE_FILL_DIR_PLUS):
                full = True
                break
        if run.contents is not None:
            sent = index - first - full  # the entry that did not fit went out on no page
            held.extend(
                (name, data)
                for name, data in zip(run.names[:sent], run.contents[:sent], strict=True)
                if data is not None
            )
        return -1 if full else index


class _FuseBuf(ctypes.Structure):
    """libfuse 3's ``struct fuse_buf`` (``fuse_common.h``)."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class _FuseBufvec(ctypes.Structure):
    """libfuse 3's ``struct fuse_bufvec`` of one buffer (mfusepy's has a pointer where
    the header has an array)."""

    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", _FuseBuf * 1),
    ]


#: A page's files to push: the folder, ``(name, content)`` of each, the listing generation.
_PushJob = tuple[bytes, list[tuple[bytes, bytes]], int]


class CacheCoherence:
    """Orders what is handed to the kernel's page cache against what is taken out of it.

    The content a listing hands on (:class:`ContentPusher`) is read from the tree when the
    listing is served but stored in the kernel later, on another thread. An import that
    replaces a file in between (writeback, a refresh) invalidates the kernel's copy; a
    store after that invalidation would put the old bytes back, and a same-size
    annotation would then be read stale until its pages are dropped. So every
    invalidation bumps ``generation`` and notifies the kernel under ``lock``, and a push
    stores only while the generation its listing saw is still current, checked and
    stored under the same lock: a push either lands before the invalidation (which then
    drops it) or not at all.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: Bumped by each invalidation; a listing records the value it was served under.
        self.generation = 0

    def invalidate(self, notify: Callable[[], bool]) -> bool:
        """Bump the generation, then run ``notify`` (tell the kernel), under the lock."""
        with self.lock:
            self.generation += 1
            return notify()


#: The one coherence of this process's mount (one mount per process).
coherence = CacheCoherence()


class ContentPusher:
    """Stores the content of just-listed files in the kernel's page cache, so that
    reading them sends no request.

    A folder whose files the tree holds in memory (a remote ``ann/`` whose listing
    fetched every annotation) would otherwise cost one READ round trip per file read,
    most of a first pass over it. After a page of such a listing went out with
    attributes (so the kernel made its inodes), a thread of its own hands each file's
    bytes to the kernel (``fuse_lowlevel_notify_store``): what a READ would have
    answered, with the size the listing gave. libfuse's high-level API knows a file's
    node by path only; without ``use_ino`` the inode number the kernel reports is that
    node id, so the thread ``stat`` s the file through the mount to learn it (answered
    from the kernel's caches: the listing gave the attributes). A file whose size is not
    the content's length is left to its READ, and so is every file of a page listed
    before an invalidation (:class:`CacheCoherence`). It pushes only what the kernel
    keeps anyway once the files are read (their pages, ``kernel_cache``), earlier.

    Counts (in the operations' counts, so ``blobfs stats`` shows them): ``push_queued``
    files handed to this thread; of those, ``push`` stored, ``push_skipped`` left to
    their READ, ``push_stale`` dropped by an invalidation. All are settled when the
    three add up to ``push_queued``.
    """

    def __init__(
        self,
        mountpoint: str,
        counts: dict[str, int],
        cache: CacheCoherence = coherence,
        start: bool = True,
    ) -> None:
        self._root = os.fsencode(os.path.abspath(mountpoint))
        self.counts = counts
        self._cache = cache
        self._device: int | None = None
        #: Set when the thread cannot store anything (no libfuse handle, mount gone):
        #: from then on nothing is queued, so listed content is not kept forever.
        self._given_up = False
        self._jobs: queue.SimpleQueue[_PushJob] = queue.SimpleQueue()
        if start:
            threading.Thread(target=self._run, name="blobfs-push", daemon=True).start()

    def push(self, folder: bytes, files: list[tuple[bytes, bytes]], generation: int) -> None:
        """Queue ``(name, content)`` of files of ``folder`` (its path in the mount), listed
        under ``generation`` of the cache coherence."""
        self._count("push_queued", len(files))
        if self._given_up:
            self._count("push_skipped", len(files))
            return
        self._jobs.put((folder, files, generation))

    def _count(self, key: str, n: int = 1) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + n  # under the GIL, as the ops' counts

    def node_of(self, path: bytes, size: int) -> int | None:
        """The node id of the file at ``path`` in the mount when the kernel holds it with
        ``size`` bytes (what the content to store has), else None."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        if st.st_dev != self._device or st.st_size != size:
            return None  # a file elsewhere is never this mount's
        return st.st_ino

    def store_files(
        self,
        folder: bytes,
        files: list[tuple[bytes, bytes]],
        generation: int,
        store: Callable[[int, bytes], bool],
    ) -> None:
        """Hand each file's content to ``store`` (node id, bytes) unless an invalidation
        came after its listing; count what became of each."""
        base = self._root + folder + b"/"
        cache = self._cache
        for i, (name, data) in enumerate(files):
            node = self.node_of(base + name, len(data)) if data else None
            if node is None:
                self._count("push_skipped")
                continue
            with cache.lock:
                if cache.generation != generation:
                    self._count("push_stale", len(files) - i)
                    return
                done = store(node, data)
            self._count("push" if done else "push_skipped")

    def _run(self) -> None:
        import mfusepy

        first = self._jobs.get()  # the mount is being served: libfuse's handles exist
        lib = mfusepy._libfuse
        if _fuse is None:
            self._give_up(first)
            return
        get_session = lib.fuse_get_session
        get_session.argtypes, get_session.restype = [ctypes.c_void_p], ctypes.c_void_p
        notify_store = lib.fuse_lowlevel_notify_store
        notify_store.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint64,
            ctypes.c_int64,
            ctypes.POINTER(_FuseBufvec),
            ctypes.c_int,
        ]
        notify_store.restype = ctypes.c_int
        session = get_session(_fuse)
        vec = _FuseBufvec(count=1)
        one = vec.buf[0]
        vecp = ctypes.pointer(vec)
        try:
            self._device = os.stat(self._root).st_dev
        except OSError:
            self._give_up(first)
            return

        def store(node: int, data: bytes) -> bool:
            mem = ctypes.c_char_p(data)  # points into ``data``, alive for the call
            one.size, one.mem = len(data), ctypes.cast(mem, ctypes.c_void_p).value
            return int(notify_store(session, node, 0, vecp, 0)) == 0

        job: _PushJob | None = first
        while True:
            folder, files, generation = job or self._jobs.get()
            job = None
            self.store_files(folder, files, generation, store)

    def _give_up(self, first: _PushJob) -> None:
        """Stop taking jobs and drop ``first`` and the queued ones (counted as left to
        their READ)."""
        self._given_up = True
        job: _PushJob | None = first
        while job is not None:
            self._count("push_skipped", len(job[1]))
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                job = None


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
    fuse = _fuse
    # under the coherence lock, after the bump: no push of an older listing lands later
    return coherence.invalidate(lambda: int(fn(fuse, path.encode())) == 0)


__all__ = [
    "FUSE",
    "FUSE_MAJOR",
    "BlobfsFUSE",
    "CacheCoherence",
    "ContentPusher",
    "FuseOSError",
    "Operations",
    "invalidate_path",
]
