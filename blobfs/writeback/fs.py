"""WritebackFS: a writable overlay that wraps the read-only project view (``--writeback``).

The read-only :class:`~blobfs.view.tree.ProjectView` stays as it is and knows nothing of
writes; this layer sits on top of it (as a union mount's upper layer sits on a lower one)
and answers every call the FUSE adapter makes: a path staged in the spool (or being
written) is served from the spool, anything else from the view below. The spool keeps the
files and their naming; the queue imports them and tells this layer what happened through
events (:class:`~blobfs.writeback.queue.Importing`, ``Imported``); validation lives in
:mod:`blobfs.writeback.validate`.

New files are written to private temp files in the spool and committed on
``flush``/``fsync``. ``close()`` (FUSE ``flush``) also ends the handle: the kernel's
``release`` that follows needs no work here (see :meth:`WritebackFS.close`). As on a
local file system, ``close()`` leaves the bytes in the spool's files (they survive a crash
of the daemon) and ``fsync()`` makes them survive a power cut; with ``sync_close`` every
``close()`` is durable too.

What may be written (everything else is refused, see docs/writeback.md):
``/meta.json``; ``/<ds>/img/<name>`` and ``/<ds>/ann/<name>.json`` of existing or new
datasets (nested ones too); new top-level datasets with ``mkdir``. Annotations and meta may
replace imported ones; images may not (EPERM), nor may imported files be renamed or removed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from blobfs.errors import (
    AlreadyExists,
    Busy,
    InvalidInput,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
)
from blobfs.layout import (
    ANN_DIR,
    ANN_SUFFIX,
    CONTROL_DIR,
    DATASETS_DIR,
    IMG_DIR,
    META_PATH,
    RESERVED_NAMES,
    DatasetPath,
    dataset_folder,
    dataset_view_path,
    name_problem,
    split_path,
)
from blobfs.model import FileRecord
from blobfs.sources.base import Source
from blobfs.sources.readers import BytesReader
from blobfs.transport.local import FileRangeReader
from blobfs.view.handles import ReadHandle
from blobfs.view.tree import DIR_MODE, FILE_MODE, DirNode, ProjectView
from blobfs.writeback.queue import Event, Imported, Importing, WritebackQueue
from blobfs.writeback.spool import Scratch, Spool

logger = logging.getLogger(__name__)

STAGED_FILE_MODE = stat.S_IFREG | 0o644
STAGED_DIR_MODE = stat.S_IFDIR | 0o755
CONTROL_FLUSH = f"{CONTROL_DIR}/flush"
CONTROL_STATUS = f"{CONTROL_DIR}/writeback.json"
#: ``/.blobfs/flush-<ticket>-<nonce>`` waits (a bounded time) for that flush,
#: ``flush-new-<nonce>`` asks for one first; see ``_control``.
CONTROL_FLUSH_WAIT = f"{CONTROL_DIR}/flush-"
CONTROL_SIZE = 1 << 20
_CONTROL_PREFIX = CONTROL_DIR + "/"
#: How long one read of a flush control file may wait for the flush: the FUSE thread only
#: waits (the queue's thread does the work), and never for longer than this.
FLUSH_WAIT_S = 1.0
MAX_SNAPSHOTS = 64
#: How long a dataset found to exist is taken to exist without looking again, for the
#: files written into it (unless this layer changed the datasets meanwhile).
DATASET_SEEN_S = 1.0
#: Folders whose parse (dataset and kind) is remembered; more clear the memo.
MAX_FOLDERS_SEEN = 1024


@dataclass(eq=False)
class WriteHandle:
    """A file open for writing: its bytes in memory or a spool temp file (``Scratch``),
    committed to ``path`` on flush."""

    scratch: Scratch
    path: str
    dirty: bool = True
    #: The first error a write (or truncate) of this handle met: the file is then never
    #: committed, and close()/fsync() report the error (a program that checks only
    #: close() still learns of it).
    failed: Exception | None = None
    committed: bool = False  # a version of this handle reached the spool (fsync)
    synced: bool = False  # what was last committed is durable (fsync, or sync_close)
    #: The ``stat`` fields last answered for this handle, until it is written or cut:
    #: libfuse asks for them right after each create, and again on ``fstat``.
    attrs: dict[str, int] | None = None


class WritebackFS:
    """The overlay over ``project``; see the module docstring."""

    def __init__(
        self,
        project: ProjectView,
        spool: Spool,
        queue: WritebackQueue,
        sync_close: bool = False,
    ) -> None:
        self.project = project
        self.spool = spool
        self.queue = queue
        self.sync_close = sync_close
        self._writers: dict[int, WriteHandle] = {}
        #: Writers opened again after their close() (see :meth:`_reopened`): no release
        #: reaches this layer, so what no later close() or fsync() commits is committed
        #: by ``blobfs flush`` and at unmount (:meth:`commit_reopened`).
        self._reopened_fhs: set[int] = set()
        self._wlock = threading.RLock()
        self._importing: frozenset[str] = frozenset()
        self._snapshots: dict[str, bytes] = {}
        self._snap_lock = threading.Lock()
        # A file copied in is looked up twice as missing (``cp``'s check, then the
        # kernel's exclusive create), then created, and the create's checks look its
        # dataset and name up again: what the first answer found is kept for the next
        # ones, as long as nothing changed in between. Every change this layer makes (a
        # writer added, a commit, a removal, a rename, a folder, an import) takes a new
        # generation from ``_bumps``, and a memo holds only for the generation it was
        # made in. A change from the server's side shows at the same time as before: the
        # kernel itself keeps a missing name for the negative timeout.
        self._bumps = itertools.count(1)
        self._generation = 0
        #: The datasets' generation: changed by mkdir, rmdir and imports only.
        self._layout = 0
        #: The last path found missing, and in which generation.
        self._absent: tuple[str, int] | None = None
        #: Folders parsed by :func:`dataset_folder` (dataset and kind, or None).
        self._folders_seen: dict[str, tuple[DatasetPath, str] | None] = {}
        #: The last dataset found to exist: (its names, the datasets' generation, when).
        self._dataset_seen: tuple[DatasetPath, int, float] | None = None
        queue.subscribe(self._on_event)

    def _changed(self, layout: bool = False) -> None:
        """Something this layer serves changed: memos of earlier answers no longer hold."""
        self._generation = next(self._bumps)
        if layout:
            self._layout = self._generation

    # ---- what the FUSE adapter and the daemon read of the layer below ----------------

    @property
    def source(self) -> Source:
        return self.project.source

    @property
    def op_counts(self) -> dict[str, int]:
        return self.project.op_counts

    def walk_files(self) -> list[tuple[str, FileRecord]]:
        return self.project.walk_files()

    # ---- lookups through the overlay ---------------------------------------------------

    def _open_writer(self, path: str) -> WriteHandle | None:
        if not self._writers:  # the usual case between a copy's files
            return None
        for handle in list(self._writers.values()):  # other threads add and remove
            if handle.path == path:
                return handle
        return None

    def _control(self, path: str) -> bytes | None:
        """Contents of the control files under ``/.blobfs`` (None for other paths).

        ``flush`` asks the queue for a flush and waits for it at most ``FLUSH_WAIT_S``
        (the work runs on the queue's thread, never on this one); its JSON says whether
        it is ``done`` and, if not, the ``ticket`` to wait for again. The names
        ``flush-new-<nonce>`` (ask, then wait) and ``flush-<ticket>-<nonce>`` (wait) are
        answered once per name with their exact size, like the statistics files: the
        kernel keeps a file's size and pages, so a repeated read of one name could show
        the end of an older, longer answer.
        """
        if path.startswith(CONTROL_FLUSH):  # a flush request, or a wait for one
            self.commit_reopened()
        if path == CONTROL_FLUSH:
            return self._flush_answer(self.queue.request_flush())
        if path.startswith(CONTROL_FLUSH_WAIT):
            ticket, _, nonce = path[len(CONTROL_FLUSH_WAIT) :].partition("-")
            if not nonce or "/" in nonce or not (ticket == "new" or ticket.isdigit()):
                return None
            name = path[len(CONTROL_DIR) + 1 :]
            return self._snapshot(
                name,
                lambda: self._flush_answer(
                    self.queue.request_flush() if ticket == "new" else int(ticket)
                ),
            )
        if path == CONTROL_STATUS:
            return _json_bytes(self.queue.status.as_dict())
        name = path[len(CONTROL_DIR) + 1 :]
        if "/" not in name and name.startswith("stats") and name.endswith(".json"):
            return self._snapshot(name, self._stats)
        return None

    def _flush_answer(self, ticket: int) -> bytes:
        done = self.queue.wait_flushed(ticket, FLUSH_WAIT_S)
        return _json_bytes({**self.queue.status.as_dict(), "ticket": ticket, "done": done})

    def _stats(self) -> bytes:
        """``blobfs stats`` of the view below plus writeback."""
        stats = {**self.project.stats(), "writeback": self.queue.status.as_dict()}
        return (json.dumps(stats, indent=1, default=str) + "\n").encode()

    def _snapshot(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The content of control file ``name``, made at its first lookup and fixed
        afterwards (the kernel caches a file's size, so each ask uses a fresh name)."""
        with self._snap_lock:
            data = self._snapshots.get(name)
        if data is None:
            data = make()  # not under the lock: a flush answer may wait a second
            with self._snap_lock:
                data = self._snapshots.setdefault(name, data)
                while len(self._snapshots) > MAX_SNAPSHOTS:
                    self._snapshots.pop(next(iter(self._snapshots)))
        return data

    def getattr(self, path: str) -> dict[str, int]:
        attrs = self.find_attrs(path)
        if attrs is None:
            raise NotFound(path)
        return attrs

    def find_attrs(self, path: str, fh: int | None = None) -> dict[str, int] | None:
        """``stat`` fields of ``path``, or None when nothing is there; with the handle
        ``fh`` of a file open for writing (``fstat``, and libfuse's own getattr after
        each create), that file's, without looking for it among the open writers."""
        handle = self._writers.get(fh) if fh is not None else None
        if handle is not None:
            attrs = handle.attrs
            if attrs is None:
                attrs = handle.attrs = self._scratch_attrs(handle.scratch)
            return attrs
        generation = self._generation
        if self._absent == (path, generation):
            return None
        found = self._find_attrs(path)
        if found is None:
            self._absent = (path, generation)
        return found

    def _find_attrs(self, path: str) -> dict[str, int] | None:
        if path == CONTROL_DIR:
            return {**self._attrs(os.stat(self.spool.root)), "st_mode": DIR_MODE, "st_nlink": 2}
        if path.startswith(_CONTROL_PREFIX):
            return self._control_attrs(path)
        writer = self._open_writer(path)
        if writer is not None:
            return self._attrs(writer.scratch.stat())
        if self._implicit_dir(path) and self.project.lookup(path) is None:
            ds = self.spool.stat("/" + split_path(path)[0])
            assert ds is not None
            return {**self._attrs(ds), "st_mode": STAGED_DIR_MODE, "st_nlink": 2}
        st = self.spool.stat(path) if path != "/" else None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                if isinstance(self.project.lookup(path), DirNode):
                    return self._writable_attrs(path, self.project.getattr(path))
                return {**self._attrs(st), "st_mode": STAGED_DIR_MODE, "st_nlink": 2}
            return self._attrs(st)
        attrs = self.project.find_attrs(path)
        return None if attrs is None else self._writable_attrs(path, attrs)

    def _control_attrs(self, path: str) -> dict[str, int]:
        if path in (CONTROL_FLUSH, CONTROL_STATUS):
            # The real length is known only when read: announce a bound; the short read
            # that follows is the end of file (no kernel_cache here).
            return {
                **self._attrs(os.stat(self.spool.root)),
                "st_mode": stat.S_IFREG | 0o444,
                "st_size": CONTROL_SIZE,
            }
        data = self._control(path)
        if data is None:
            raise NotFound(path)
        now = time.time_ns()
        attrs = self._attrs(os.stat(self.spool.root))
        return {**attrs, "st_mode": FILE_MODE, "st_size": len(data), "st_mtime": now}

    @staticmethod
    def _writable_attrs(path: str, attrs: dict[str, int]) -> dict[str, int]:
        """The project's own entries as this mount allows them to change."""
        if stat.S_ISDIR(attrs["st_mode"]):
            attrs["st_mode"] = STAGED_DIR_MODE
        elif path == META_PATH or f"/{ANN_DIR}/" in path:
            attrs["st_mode"] = STAGED_FILE_MODE  # annotations and meta may be replaced
        return attrs

    def _scratch_attrs(self, scratch: Scratch) -> dict[str, int]:
        """The attributes of a file being written; bytes still in memory are described
        without making a ``stat_result`` first (every create asks for them)."""
        if not scratch.in_memory:
            return self._attrs(scratch.stat())
        attrs = self.project.size_attrs(scratch.size(), scratch.mtime_ns)
        attrs["st_mode"] = STAGED_FILE_MODE
        return attrs

    def _attrs(self, st: os.stat_result) -> dict[str, int]:
        return {
            "st_mode": STAGED_FILE_MODE,
            "st_nlink": 1,
            "st_size": st.st_size,
            "st_blocks": (st.st_size + 511) // 512,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
            "st_atime": st.st_atime_ns,
            "st_uid": self.project.uid,
            "st_gid": self.project.gid,
        }

    def readdir(self, path: str) -> Sequence[str]:
        names: dict[str, None] = {}
        base = self.project.lookup(path)
        implicit = self._implicit_dir(path)
        staged_dir = self.spool.is_dir(path)
        if isinstance(base, DirNode):
            names.update(dict.fromkeys(self.project.readdir(path)))
        elif base is not None:
            raise NotADirectory(path)
        elif not staged_dir and not implicit:
            raise NotFound(path)
        if staged_dir:
            names.update(dict.fromkeys(self.spool.listdir(path)))
        prefix = path.rstrip("/") + "/"
        for handle in list(self._writers.values()):
            if handle.path.startswith(prefix) and "/" not in handle.path[len(prefix) :]:
                names[handle.path[len(prefix) :]] = None
        if self._is_new_dataset(path):
            names.update({IMG_DIR: None, ANN_DIR: None})
        return list(names)

    def readdir_runs(
        self, path: str, start: int = 0
    ) -> Iterator[tuple[str, dict[str, int] | None]]:
        """Names without attributes: staged files change size while written, so the
        kernel asks ``getattr`` (with its short timeout) for each."""
        for name in list(self.readdir(path))[start:]:
            yield name, None

    def _implicit_dir(self, path: str) -> bool:
        """``/<new dataset>/img`` and ``/ann`` exist as soon as the dataset does."""
        if path.count("/") != 2:  # most paths asked for are files, further down
            return False
        parts = split_path(path)
        return (
            len(parts) == 2
            and parts[1] in (IMG_DIR, ANN_DIR)
            and self._is_new_dataset("/" + parts[0])
        )

    def _is_new_dataset(self, path: str) -> bool:
        return len(split_path(path)) == 1 and self.spool.is_dir(path)

    def read_path(self, path: str, offset: int, size: int) -> bytes:
        control = self._control(path) if path.startswith(_CONTROL_PREFIX) else None
        if control is not None:
            return control[offset : offset + size]
        st = self.spool.stat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return self.spool.read(path, offset, size)
        return self.project.read_path(path, offset, size)

    def statfs(self) -> dict[str, int]:
        st = os.statvfs(self.spool.root)
        return {
            "f_bsize": st.f_bsize,
            "f_frsize": st.f_frsize,
            "f_blocks": st.f_blocks,
            "f_bfree": st.f_bfree,
            "f_bavail": st.f_bavail,
            "f_files": st.f_files,
            "f_ffree": st.f_ffree,
            "f_namemax": 255,
        }

    # ---- what may be written -------------------------------------------------------

    def _dataset_known(self, names: DatasetPath) -> bool:
        """:meth:`_dataset_exists`, remembered for a moment for the dataset last found."""
        seen = self._dataset_seen
        now = time.monotonic()
        if (
            seen is not None
            and seen[0] == names
            and seen[1] == self._layout
            and now - seen[2] < DATASET_SEEN_S
        ):
            return True
        layout = self._layout
        if not self._dataset_exists(names):
            return False
        self._dataset_seen = (names, layout, now)
        return True

    def _dataset_exists(self, names: tuple[str, ...]) -> bool:
        path = dataset_view_path(names)
        return isinstance(self.project.lookup(path), DirNode) or self.spool.is_dir(path)

    def _check_writable(self, path: str) -> None:
        if path == META_PATH:
            return
        absent = self._absent == (path, self._generation)  # looked up a moment ago
        folder, _, name = path.rpartition("/")
        seen = self._folders_seen
        if folder in seen:
            where = seen[folder]
        else:
            where = dataset_folder(folder)
            if len(seen) >= MAX_FOLDERS_SEEN:
                seen.clear()
            seen[folder] = where
        if where is None or not name:
            raise NotPermitted(
                f"{path}: only /meta.json, <dataset>/img/ and <dataset>/ann/ files can be written"
            )
        dataset, kind = where
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"{path}: {problem}")
        if not self._dataset_known(dataset):
            raise NotFound(f"{path}: no dataset {'/'.join(dataset)}")
        if kind == ANN_DIR and not name.endswith(ANN_SUFFIX):
            raise NotPermitted(f"{path}: annotations are <image name>.json files")
        if kind == IMG_DIR and not absent and self._in_project(path):
            raise NotPermitted(f"{path}: an imported image cannot be changed")
        if kind == IMG_DIR:  # the lookup above listed the dataset: its refusals are known
            refused = self.source.refused(dataset, f"{IMG_DIR}/{name}")
            if refused is not None:
                raise AlreadyExists(
                    f"{path}: the project already has an entry of that name that is not "
                    f"served ({refused}); an import could never be served either"
                )
        if path in self._importing:
            raise Busy(f"{path}: being imported right now")

    def _in_project(self, path: str) -> bool:
        node = self.project.lookup(path)
        return node is not None and not isinstance(node, DirNode)

    # ---- write operations ----------------------------------------------------------

    def create(self, path: str) -> int:
        """Create (or truncate) ``path`` for writing; returns a handle number."""
        self._check_writable(path)
        return self._add_writer(WriteHandle(self.spool.scratch(), path))

    def open_write(self, path: str, truncate: bool) -> int:
        """Open an existing file for writing: its bytes are copied unless truncating."""
        return self._add_writer(self._writer_of(path, truncate))

    def _writer_of(self, path: str, truncate: bool) -> WriteHandle:
        """A new write handle on ``path``, holding its current bytes unless truncating."""
        self._check_writable(path)
        scratch = self.spool.scratch()
        if not truncate:
            staged = self.spool.stat(path)
            if staged is not None and stat.S_ISREG(staged.st_mode):
                with self.spool.open_file(path) as src:
                    offset = 0
                    while chunk := src.read(1 << 20):
                        offset += scratch.write(chunk, offset)
            elif self._in_project(path):
                rec = self.project.get(path)
                assert isinstance(rec, FileRecord)
                scratch.write(self.project.read_path(path, 0, self.project.size_of(rec)), 0)
        return WriteHandle(scratch, path, dirty=truncate)

    def _add_writer(self, handle: WriteHandle) -> int:
        # the number only, from the view's handles: a writer's reads go to its bytes
        fh = self.project.handles.number()
        with self._wlock:
            self._writers[fh] = handle
        self._changed()
        return fh

    def open(self, path: str) -> int:
        """Open for reading: a control file, a staged file or the project's own."""
        control = self._control(path) if path.startswith(_CONTROL_PREFIX) else None
        if control is not None:
            return self.project.handles.add(ReadHandle(BytesReader(control), len(control), path))
        st = self.spool.stat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            held = self.spool.held_bytes(path)
            reader = (
                FileRangeReader(self.spool.file_path(path)) if held is None else BytesReader(held)
            )
            return self.project.handles.add(ReadHandle(reader, st.st_size, path))
        return self.project.open(path)

    def write(self, fh: int, data: bytes, offset: int, path: str | None = None) -> int:
        """Write into the handle ``fh`` of ``path``; a handle that a ``close()`` of
        another descriptor of the same open file ended (a ``dup``, or a close racing
        this write) is opened again on the file as committed (:meth:`_reopened`)."""
        handle = self._writers.get(fh)
        if handle is None:
            handle = self._reopened(fh, path)
        handle.dirty = True
        handle.attrs = None
        if handle.failed is not None:
            raise handle.failed
        try:
            written = handle.scratch.write(data, offset)
        except OSError as exc:
            if path is not None and self._writers.get(fh) is not handle:
                return self.write(fh, data, offset, path)  # ended while writing: again
            raise self._fail(handle, exc) from None
        if path is not None and self._writers.get(fh) is not handle:
            # ended while writing: the commit may have missed these bytes, write them
            # again into the file as committed (same bytes, same place)
            return self.write(fh, data, offset, path)
        return written

    def _reopened(self, fh: int, path: str | None) -> WriteHandle:
        """The writer of ``fh`` after a ``close()`` ended it while the open file lives on
        (another descriptor, a shared mapping): a new one on ``path`` as committed, under
        the same number (numbers are never reused), committed by the next ``close()`` or
        ``fsync()`` like any writer."""
        if path is None:
            raise InvalidInput(f"handle {fh} is not open for writing")
        with self._wlock:
            handle = self._writers.get(fh)
            if handle is None:
                handle = self._writers[fh] = self._writer_of(path, truncate=False)
                self._reopened_fhs.add(fh)
        return handle

    def commit_reopened(self) -> None:
        """Commit and end the writers opened again after their close() that nothing has
        committed since (pages of a shared mapping written back after its descriptor was
        closed): on ``blobfs flush`` and at unmount."""
        with self._wlock:
            fhs, self._reopened_fhs = self._reopened_fhs, set()
        for fh in fhs:
            try:
                self.close(fh)
            except Exception:  # its error was returned by the write that met it
                logger.warning("a file written after its close() was not committed", exc_info=True)

    def _fail(self, handle: WriteHandle, exc: OSError) -> Exception:
        """A write of ``handle`` failed (no space, I/O error): its file will never be
        imported. A version it committed earlier (fsync) is removed too: the program was
        told the file is incomplete. Returns the error to raise, now and on close."""
        if handle.failed is None:
            handle.failed = (
                NoSpace(f"{handle.path}: no space left in the spool ({self.spool.root})")
                if exc.errno == errno.ENOSPC
                else exc
            )
            logger.warning("%s: write failed (%s); not imported", handle.path, exc.strerror)
            if handle.committed:
                with contextlib.suppress(OSError):
                    self.spool.remove(handle.path)
        return handle.failed

    def read(self, fh: int, offset: int, size: int, path: str | None = None) -> bytes:
        """Read through the handle ``fh``; once a ``close()`` ended it (the kernel reads a
        mapping after its descriptor is closed), from ``path`` as it is now."""
        handle = self._writers.get(fh)
        if handle is not None:
            return handle.scratch.read(size, offset)
        try:
            return self.project.read(fh, offset, size)
        except NotFound:
            if path is None:
                raise
        if path.startswith(_CONTROL_PREFIX):
            return b""  # an answer is made once per open: an ended one has no more
        return self.read_path(path, offset, size)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None and fh in self._writers:
            handle = self._writers[fh]
        elif self._open_writer(path) is not None:  # open(O_TRUNC) arrives as open + truncate
            for handle in list(self._writers.values()):
                if handle.path == path:
                    handle.scratch.truncate(length)
                    handle.dirty, handle.attrs = True, None
            return
        else:
            handle = self._writer(self.open_write(path, truncate=False))
            try:
                handle.scratch.truncate(length)
                handle.dirty = True
                self.commit(self._fh_of(handle), durable=self.sync_close)
            finally:
                self.release(self._fh_of(handle))
            return
        handle.attrs = None
        try:
            handle.scratch.truncate(length)
        except OSError as exc:
            raise self._fail(handle, exc) from None
        handle.dirty = True

    def _fh_of(self, handle: WriteHandle) -> int:
        return next(fh for fh, h in list(self._writers.items()) if h is handle)

    def _writer(self, fh: int) -> WriteHandle:
        handle = self._writers.get(fh)
        if handle is None:
            raise InvalidInput(f"handle {fh} is not open for writing")
        return handle

    def close(self, fh: int) -> None:
        """``close()`` (FUSE ``flush``): what was written is staged (durable only with
        ``sync_close``, its error raised), and the handle ends, reader or writer.

        The kernel's ``release`` comes only after ``close()`` has returned, on another
        libfuse thread while the program already sends its next request; in Python that
        is one more callback per file, competing for the interpreter lock with the next
        file's lookup. So the handle's work ends here and ``release`` is left to libfuse.
        The kernel may still use the number after this (another descriptor of the same
        open file, a mapping written back or read later): a write then opens the file
        again (:meth:`_reopened`), a read reads the path, a ``fstat`` looks the path up.
        """
        handle = self._writers.get(fh)
        if handle is None:  # a reader, or a writer a close of another descriptor ended
            self.release(fh)
            self._reopened_fhs.discard(fh)
            return
        try:
            self.commit(fh, durable=self.sync_close)
        finally:
            self._end_writer(fh, handle)  # the commit just made (or failed): not again
            if self._reopened_fhs:
                self._reopened_fhs.discard(fh)

    def fsync(self, path: str, fh: int | None) -> None:
        """``fsync()``/``fdatasync()``: what ``path`` holds survives a power cut on return.

        The kernel sends it on any handle (``sync FILE`` opens the file read-only): a
        handle not open for writing makes the whole spool durable (one checkpoint).
        """
        if fh is not None and fh in self._writers:
            self.commit(fh, durable=True)
        elif self.spool.stat(path) is not None:
            self.spool.sync()

    def commit(self, fh: int, durable: bool = True) -> None:
        """Stage what was written (flush, fsync, release), durably if asked; raises the
        error of a failed write instead (the file is not committed)."""
        handle = self._writers.get(fh)
        if handle is None:
            return
        if handle.failed is not None:
            raise handle.failed
        if not handle.dirty and (handle.synced or not durable):
            return
        try:
            size = self.spool.commit_scratch(handle.scratch, handle.path, durable=durable)
        except OSError as exc:  # e.g. no space even for the durable rename path
            raise self._fail(handle, exc) from None
        self._changed()
        was_dirty = handle.dirty
        handle.dirty = False
        handle.committed = True
        handle.synced = durable
        logger.debug("staged %s%s", handle.path, " durably" if durable else "")
        if was_dirty:
            self.queue.staged(size, handle.path)

    def release(self, fh: int) -> None:
        with self._wlock:
            handle = self._writers.get(fh)
            if handle is not None:
                try:
                    if handle.failed is None:  # close() already reported a failure
                        self.commit(fh, durable=self.sync_close)
                finally:
                    self._end_writer(fh, handle)
        if handle is None:
            self.project.release(fh)

    def _end_writer(self, fh: int, handle: WriteHandle) -> None:
        with self._wlock:
            self._writers.pop(fh, None)
        handle.scratch.close()

    def unlink(self, path: str) -> None:
        if self.spool.stat(path) is None:
            if self.project.lookup(path) is not None:
                raise NotPermitted(f"{path}: imported files cannot be removed")
            raise NotFound(path)
        if path in self._importing:
            raise Busy(f"{path}: being imported right now")
        self.spool.remove(path, durable=self.sync_close)
        self._changed()

    def rename(self, old: str, new: str) -> None:
        if self.spool.stat(old) is None:
            if self.project.lookup(old) is not None:
                raise NotPermitted(f"{old}: imported files cannot be renamed")
            raise NotFound(old)
        self._check_writable(new)
        if old in self._importing:
            raise Busy(f"{old}: being imported right now")
        self.spool.rename(old, new, durable=self.sync_close)
        self._changed(layout=True)  # a folder may have moved
        for handle in list(self._writers.values()):
            if handle.path == old:
                handle.path = new
        self.queue.staged(0, new)

    def mkdir(self, path: str) -> None:
        parts = split_path(path)
        if self.project.lookup(path) is not None or self.spool.stat(path) is not None:
            raise AlreadyExists(path)
        if (len(parts) == 3 and parts[1] == DATASETS_DIR) or len(parts) != 1:
            raise NotPermitted(f"{path}: only new top-level datasets can be made")
        problem = name_problem(parts[0])
        if problem or parts[0] in RESERVED_NAMES:
            raise InvalidInput(f"{path}: {problem or 'reserved name'}")
        self.spool.mkdir(path)
        self._changed(layout=True)

    def rmdir(self, path: str) -> None:
        """Remove a new dataset that holds no files (its ``img/`` and ``ann/`` always show,
        so they do not count); ENOTEMPTY otherwise, like any file system."""
        if self.project.lookup(path) is not None:
            raise NotPermitted(f"{path}: imported datasets cannot be removed")
        if self._implicit_dir(path):
            raise NotPermitted(f"{path}: a dataset always has img/ and ann/")
        if not self.spool.is_dir(path):
            raise NotFound(path)
        if set(self.readdir(path)) != {IMG_DIR, ANN_DIR} or any(
            self.readdir(f"{path}/{sub}") for sub in (IMG_DIR, ANN_DIR)
        ):
            raise NotEmpty(f"{path}: not empty")
        try:
            for sub in (IMG_DIR, ANN_DIR):
                if self.spool.is_dir(f"{path}/{sub}"):
                    self.spool.rmdir(f"{path}/{sub}")
            self.spool.rmdir(path)
            self._changed(layout=True)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:  # a file staged meanwhile
                raise NotEmpty(f"{path}: not empty") from None
            raise

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        if (
            not self.spool.utime(path, times)
            and self._open_writer(path) is None
            and self.project.lookup(path) is None
        ):
            raise NotFound(path)

    def chmod_or_chown(self, path: str) -> None:
        """Accepted and ignored on staged files (``cp -a``, rsync); refused on imported ones."""
        if self.spool.stat(path) is None and self._open_writer(path) is None:
            if self.project.lookup(path) is None:
                raise NotFound(path)
            raise NotPermitted(f"{path}: imported files keep their mode")

    # ---- what the queue tells this layer ---------------------------------------------

    def _on_event(self, event: Event) -> None:
        self._changed(layout=True)
        if isinstance(event, Importing):
            self._importing = frozenset(event.paths)  # changes to them are EBUSY meanwhile
        elif isinstance(event, Imported):
            # imported files show from the project itself, as they are there now
            self.project.forget(event.batch.dataset)


def _json_bytes(data: dict[str, object]) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()
