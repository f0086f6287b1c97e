"""The spool: staged files on disk, made durable through a write-ahead journal.

Layout::

    spool/journal                    small closed files, removals, moves (``journal.py``)
    spool/tmp/                       large files being written, unnamed (O_TMPFILE) where
                                     the file system allows, else tmp/<random> (lost on
                                     crash: never acknowledged)
    spool/staged/<view path>         committed files that have a file of their own
    spool/staged/<dataset>/          a dataset made with mkdir
    spool/batches/<id>/manifest.json a batch being imported (written atomically)
    spool/batches/<id>/files/<view path>  hard links to the staged files of the batch
    spool/batches/<id>/data          the bytes of the batch's held files, one after another

A small file (up to ``INLINE_MAX``) is written in memory and, when closed, *held*: its
bytes are one journal record and no file is created for it. A plain commit (``close()`` by
default) appends the record without a flush: it is in the kernel's page cache, so a daemon
killed at any moment keeps it, and the next checkpoint makes it durable. A durable one
(``fsync()``, or every ``close()`` with ``--sync-close``) appends it with one
``fdatasync``. A larger file is written to a temp file and linked to its staged name
(durably: fsync, rename, fsync of its folder). A change to a path the journal holds goes
through the journal too (a replay would otherwise bring the older record back over it).

A *checkpoint* gives every file held in the journal a staged file of its own, syncs the
spool's file system once and starts a new journal generation, which retires every record.
It runs when the journal is full, before a durable operation the journal cannot carry on a
path it holds and at a clean close. A batch is formed from held files by copying their
bytes into the batch's one ``data`` file (the files it holds from then on, until the
import is done; their records stay, and a ``REMOVE`` record each retires them once it is
done), and from other staged files by hard links; so a
file re-written while its batch imports keeps the batch's snapshot, and packing reads one
file per batch instead of one per image. On start-up the journal is replayed over
``staged/`` (a held file gets its own file there) and checkpointed; the held files of
unfinished batches are served from their ``data`` file.

Invariant: a held path has no staged file, and every record of the current generation
that writes a path (``WRITE``, the target of a ``MOVE``) belongs to a path that is held, or
was superseded by a later record. So a replay never recreates a file a batch imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import json
import logging
import os
import queue
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

from blobfs.errors import Busy, CorruptData
from blobfs.failpoints import note_tree_synced
from blobfs.format.pack import InlineFile, fsync_dir, open_source, write_atomic
from blobfs.transport.local import pread_exact
from blobfs.writeback import journal
from blobfs.writeback.journal import Journal, JournalFull, Kind, Record

logger = logging.getLogger(__name__)

#: Files up to this size are made durable as one journal record (they are written twice:
#: journal and staged file); larger ones by fsync + rename + fsync of the folder.
INLINE_MAX = 1024 * 1024
#: Bytes all open small files may hold in memory before new writes spill to temp files.
SCRATCH_MEMORY = 64 * 1024 * 1024
#: Free space a spool keeps before it holds more files in the journal. A held file is
#: copied once more when its batch forms (or it gets a file of its own at a checkpoint),
#: so files are held only while half the free space past this covers them all; beyond
#: that each gets its own file, which needs no second copy (a nearly full spool works as
#: before, and its batches still form).
HOLD_RESERVE = 64 * 1024 * 1024
#: Empty temp files created ahead of use (see ``Spool.new_temp``).
POOL_SIZE = 64
#: A staged file's link in flight (made, then renamed over its name): never a staged file.
_COMMIT_SUFFIX = ".commit"
#: A finished batch's folder, renamed out of the way and removed in the background (its
#: thousands of links cost a flush as much as the import's requests).
_RETIRED_PREFIX = ".done-"

_libc = ctypes.CDLL(None, use_errno=True)
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
T = TypeVar("T")


def syncfs(path: str | os.PathLike[str]) -> None:
    """Write back everything dirty on the file system holding ``path`` (one flush)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def link_fd(fd: int, target: str) -> None:
    """Give the open file ``fd`` (unnamed or not) the name ``target``:
    ``linkat(fd, "", AT_FDCWD, target, AT_EMPTY_PATH)``, which needs
    ``CAP_DAC_READ_SEARCH`` (root), else ``/proc/self/fd/<fd>`` followed."""
    if _libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(target), _AT_EMPTY_PATH) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EPERM, errno.EINVAL):
        raise OSError(err, os.strerror(err), target)
    os.link(f"/proc/self/fd/{fd}", target)  # ENOENT here too: the folder is missing


def _unnamed_temps_work(folder: str) -> bool:
    """Whether ``folder``'s file system makes unnamed files (``O_TMPFILE``) that
    :func:`link_fd` can link into place later."""
    if not _O_TMPFILE:
        return False
    try:
        fd = os.open(folder, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:  # e.g. EOPNOTSUPP, or EISDIR from a kernel that does not know the flag
        return False
    probe = os.path.join(folder, f".probe-{uuid.uuid4().hex}")
    try:
        link_fd(fd, probe)
        os.unlink(probe)
        return True
    except OSError:  # neither privilege nor a /proc whose links resolve here
        return False
    finally:
        os.close(fd)


def lock_spool(root: Path) -> int:
    """Lock ``root/lock`` for this process's lifetime (the fd returned holds it).

    A POSIX record lock (``fcntl``): the kernel drops it when the process dies however it
    dies, so a crashed mount never leaves a stale lock, and it belongs to the process, so
    a test may open a spool again in-process as a restarted daemon would.
    """
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise Busy(
            f"spool {root} is in use by another writeback mount (pid {holder}): unmount "
            "that one first, or give this mount its own --spool-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_project(project: Path) -> int:
    """Lock a local project folder against a second writeback mount (with another spool):
    both would import into it. ``flock`` on the folder itself writes nothing into it."""
    fd = os.open(project, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise
        raise Busy(
            f"{project} is already mounted with --writeback (by another process): "
            "unmount that one first"
        ) from None
    return fd


def _read_all(fd: int, size: int) -> bytes:
    parts, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    """A held file's bytes; a short or failed read is the spool's I/O error (``EIO``,
    what every caller of the spool handles), not the project's corrupt data."""
    try:
        return pread_exact(fd, "a held file in the spool", offset, offset + size)
    except CorruptData as exc:
        raise OSError(errno.EIO, f"spool: {exc}") from None


#: The longest run of a journal a batch's seal copies at once, and the widest gap between
#: two held files (their records' headers, mostly) that it copies with them.
_COPY_WINDOW = 8 << 20
_COPY_GAP = 4096


def _held_runs(held: dict[str, Held]) -> list[tuple[int, int, int, list[tuple[str, Held]]]]:
    """The held files grouped into runs ``(fd, start, end, [(view path, entry)])`` of
    their files that lie close together, in the order they lie there (the journal keeps
    them in the order they were closed). A copy holds thousands of small files next to one
    another: copying a run at a time, gaps and all, costs a few calls instead of a read and
    a write of each, which is what sealing a batch of them otherwise spends its time on."""
    order = sorted(held.items(), key=lambda item: (item[1].fd, item[1].offset))
    runs: list[tuple[int, int, int, list[tuple[str, Held]]]] = []
    for view_path, entry in order:
        stop = entry.offset + entry.size
        if runs:
            fd, start, end, members = runs[-1]
            if (
                fd == entry.fd
                and entry.offset - end <= _COPY_GAP
                and max(end, stop) - start <= _COPY_WINDOW
            ):
                runs[-1] = (fd, start, max(end, stop), members)
                members.append((view_path, entry))
                continue
        runs.append((entry.fd, entry.offset, stop, [(view_path, entry)]))
    return runs


def _copy_range(src: int, dst: int, start: int, size: int, to: int) -> None:
    """Bytes ``[start, start + size)`` of ``src`` to offset ``to`` of ``dst``, in the kernel
    when it can (``copy_file_range``), else by a read and a write; a short source is the
    spool's I/O error, like any short read of a held file."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, start + done, to + done)
            if n == 0:
                break  # past the end of src: the read below reports it
            done += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    if done < size:
        data = _pread_exact(src, size - done, start + done)
        view = memoryview(data)
        while view:
            view = view[os.pwrite(dst, view, to + done) :]
            done = size - len(view)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _file_stat(size: int, mtime_ns: int) -> os.stat_result:
    """The ``stat`` of a held file (it has no inode of its own)."""
    seconds = mtime_ns // 1_000_000_000
    return os.stat_result(
        (stat.S_IFREG | 0o600, 0, 0, 1, os.getuid(), os.getgid(), size, seconds, seconds, seconds),
        {
            "st_atime": mtime_ns / 1e9,
            "st_mtime": mtime_ns / 1e9,
            "st_ctime": mtime_ns / 1e9,
            "st_atime_ns": mtime_ns,
            "st_mtime_ns": mtime_ns,
            "st_ctime_ns": mtime_ns,
        },
    )


class Held(NamedTuple):
    """A small committed file with no file of its own: its bytes are at ``offset`` in
    ``fd``, a journal record's data (``batch`` None) or the batch's ``data`` file. (A
    named tuple: one is made per small file closed, at a third of a frozen dataclass's
    cost.)"""

    fd: int
    offset: int
    size: int
    mtime_ns: int
    batch: str | None = None


class Scratch:
    """What a program writes before it closes: in memory while small (a file that ends up
    held is never created on disk), spilled to a spool temp file when it grows past
    ``INLINE_MAX`` or the spool's memory budget (``SCRATCH_MEMORY``) is spent."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._buf: bytearray | None = bytearray()
        self.fd: int | None = None
        self.tmp_path: str | None = None
        self.mtime_ns = time.time_ns()

    @property
    def in_memory(self) -> bool:
        return self._buf is not None

    def data(self) -> bytes:
        assert self._buf is not None
        return bytes(self._buf)

    def size(self) -> int:
        if self._buf is not None:
            return len(self._buf)
        assert self.fd is not None
        return os.fstat(self.fd).st_size

    def stat(self) -> os.stat_result:
        if self._buf is not None:
            return _file_stat(len(self._buf), self.mtime_ns)
        assert self.fd is not None
        return os.fstat(self.fd)

    def write(self, data: bytes, offset: int) -> int:
        buf = self._buf
        if buf is not None:
            end = offset + len(data)
            # a file that cannot be held goes to its temp file at once (so that a full
            # spool fails the write, not only the close)
            if (
                end <= INLINE_MAX
                and self._spool._room_to_hold(0)
                and self._spool._reserve(end - len(buf))
            ):
                if offset > len(buf):
                    buf.extend(bytes(offset - len(buf)))
                buf[offset:end] = data
                self.mtime_ns = time.time_ns()
                return len(data)
            self._spill()
        assert self.fd is not None
        return os.pwrite(self.fd, data, offset)

    def read(self, size: int, offset: int) -> bytes:
        if self._buf is not None:
            return bytes(self._buf[offset : offset + size])
        assert self.fd is not None
        return os.pread(self.fd, size, offset)

    def truncate(self, length: int) -> None:
        buf = self._buf
        if buf is not None:
            if length <= len(buf):
                self._spool._reserve(length - len(buf))
                del buf[length:]
                self.mtime_ns = time.time_ns()
                return
            if length <= INLINE_MAX and self._spool._reserve(length - len(buf)):
                buf.extend(bytes(length - len(buf)))
                self.mtime_ns = time.time_ns()
                return
            self._spill()
        assert self.fd is not None
        os.ftruncate(self.fd, length)

    def file(self) -> tuple[int, str | None]:
        """The temp file holding these bytes (made now if they were in memory)."""
        if self._buf is not None:
            self._spill()
        assert self.fd is not None
        return self.fd, self.tmp_path

    def _spill(self) -> None:
        buf = self._buf
        assert buf is not None
        fd, tmp_path = self._spool.new_temp()
        try:
            if buf:
                os.pwrite(fd, buf, 0)
        except BaseException:
            self._spool.drop_temp(fd, tmp_path)
            raise
        self.fd, self.tmp_path = fd, tmp_path
        self._spool._reserve(-len(buf))
        self._buf = None

    def close(self) -> None:
        if self._buf is not None:
            self._spool._reserve(-len(self._buf))
            self._buf = None
        elif self.fd is not None:
            self._spool.drop_temp(self.fd, self.tmp_path)
            self.fd = None


#: Fields of a batch's manifest that do not change once saved (see ``_manifest_bytes``).
_SET_ONCE = frozenset({"files", "held", "members"})


@dataclass
class Batch:
    """One import unit: the files of one dataset, packed into one blob."""

    id: str
    dataset: list[str]
    files: list[str]
    stem: str
    state: str = "new"
    team_file_id: int | None = None
    image_ids: dict[str, int] = field(default_factory=dict)
    members: list[list[object]] = field(default_factory=list)
    #: held files of the batch: view path -> [offset in ``data``, size, mtime_ns]
    held: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # field by field: dataclasses.asdict deep-copies every member list (0.3 s a save
        # for a batch of 30,000 images, and a batch is saved at every step)
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Spool:
    """Durable staging area for one mount source (see the module docstring)."""

    def __init__(
        self, root: str | os.PathLike[str], journal_capacity: int = journal.CAPACITY
    ) -> None:
        self.root = Path(root)
        new = not self.root.is_dir()
        if not new:  # what a new mount finds is on disk (power-cut trials)
            note_tree_synced(self.root)
        for sub in ("tmp", "staged", "batches"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        # first of all: a second mount must not replay, stage into or import from a spool
        # that a live mount is using (its batches would be imported twice)
        self._lock_fd = lock_spool(self.root)
        self.tmp = self.root / "tmp"
        self.staged = self.root / "staged"
        self.staged_str = str(self.staged)
        self._folders: set[str] = set()  # staged folders known to exist (commit's memo)
        self.batches_dir = self.root / "batches"
        self._lock = threading.RLock()
        self._journal = Journal(self.root / "journal", journal_capacity)
        # The journal's own name, and the spool's folders, must survive a power cut before
        # any record in it is acknowledged as durable: an fsync'd file's record is not
        # enough while the journal's directory entry may be lost with the page cache.
        fsync_dir(self.root)
        if new:
            fsync_dir(self.root.parent)
        self._journaled: set[str] = set()  # view paths the journal's records touch
        self._held: dict[str, Held] = {}
        self._held_dirs: dict[str, set[str]] = {}  # folder view path -> names held in it
        self._containers: dict[str, int] = {}  # batch id -> its open ``data`` file
        #: batch id -> field -> (the value, its JSON): see :meth:`_manifest_bytes`
        self._encoded: dict[str, dict[str, tuple[object, int, str]]] = {}
        self._scratch_bytes = 0
        self._held_bytes = 0  # bytes of the files held in the journal
        self._room = 0  # bytes that may still be held before free space is looked up again
        self._scratch_lock = threading.Lock()
        # plain changes since the last syncfs; true at start: a killed daemon's plain
        # commits may still be only in the page cache
        self._unsynced = True
        self.tmp_str = str(self.tmp)
        self._unnamed = _unnamed_temps_work(self.tmp_str)
        self._pool: queue.Queue[tuple[int, str | None]] = queue.Queue(maxsize=POOL_SIZE)
        self._pool_thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._removals: list[threading.Thread] = []
        #: View paths that may have a file or folder of their own under ``staged/`` (a
        #: superset: a name is added before it is made and dropped, under ``_lock``, after
        #: it is removed). A name outside it is not staged, and ``stat`` says so without a
        #: system call: each file a program copies in is looked up twice while it is not
        #: there, and a missing name costs the kernel a search of its folder. None until
        #: the recovery's changes are listed.
        self._names: set[str] | None = None
        self._recover()
        self._list_names()

    def _recover(self) -> None:
        """Drop unacknowledged partial writes, replay the journal, checkpoint."""
        dropped = 0
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                dropped += path.stat().st_size > 0  # empty ones are the pool's, unused
            path.unlink(missing_ok=True)
        for path in self.staged.rglob(f".*{_COMMIT_SUFFIX}"):
            path.unlink(missing_ok=True)
        if dropped:
            logger.info("spool %s: dropped %d unacknowledged partial writes", self.root, dropped)
        replayed = 0
        for record in self._journal.records():
            self._replay(record)
            replayed += 1
        if replayed:
            self.checkpoint()
            logger.info("spool %s: replayed %d journal records", self.root, replayed)
        self._hold_unfinished_batches()

    def _hold_unfinished_batches(self) -> None:
        """Serve the held files of batches an earlier run left (they are in the batch's
        ``data`` file only), unless the path has a staged file again (a replayed copy or
        a newer version)."""
        for folder in self.batches_dir.iterdir():
            manifest = folder / "manifest.json"
            if folder.name.startswith(_RETIRED_PREFIX) or not manifest.is_file():
                continue  # open_batches removes them
            try:
                batch = Batch(**json.loads(manifest.read_bytes()))
                if not batch.held:
                    continue
                fd = os.open(folder / "data", os.O_RDONLY | os.O_CLOEXEC)
            except (OSError, ValueError, TypeError) as exc:
                logger.error("spool %s: batch %s cannot be read: %s", self.root, folder.name, exc)
                continue
            self._containers[batch.id] = fd
            for view_path, (offset, size, mtime_ns) in batch.held.items():
                if view_path not in self._held and not os.path.lexists(self.file_path(view_path)):
                    self._ensure_folder(view_path)
                    self._set_held(view_path, Held(fd, offset, size, mtime_ns, batch.id))

    def _list_names(self) -> None:
        """List ``staged/`` into ``_names`` (at start, and after a folder moved)."""
        names = {"/"}
        files, dirs = self._walk_disk()
        names.update(files)
        names.update(dirs)
        self._names = names

    def _note(self, final: str) -> None:
        """``final`` (a path under ``staged/``) is about to be made: add it and the
        folders above it to ``_names``."""
        names = self._names
        if names is None:
            return
        root = self.staged_str
        while final.startswith(root) and len(final) > len(root) and final[len(root)] == "/":
            view_path = final[len(root) :]
            if view_path in names:
                return
            names.add(view_path)
            final = os.path.dirname(final)

    def _not_staged(self, view_path: str) -> bool:
        """Whether ``view_path`` surely has no file or folder under ``staged/`` (False:
        it may have; a path not in the form FUSE sends is looked up on disk)."""
        names = self._names
        return (
            names is not None
            and view_path not in names
            and view_path[:1] == "/"
            and "//" not in view_path
            and "/." not in view_path
            and view_path[-1:] != "/"
        )

    def _forget_name(self, view_path: str) -> None:
        """``view_path`` was removed from ``staged/`` (``_lock`` held)."""
        if self._names is not None:
            self._names.discard(view_path)

    def _replay(self, record: Record) -> None:
        """Apply one blind journal record to ``staged/`` (idempotent, see journal.py)."""
        if record.kind is Kind.REMOVE:
            self._staged_file(record.path).unlink(missing_ok=True)
            return
        target = self._staged_file(record.path2 if record.kind is Kind.MOVE else record.path)
        if target.is_dir():  # cannot happen: the operation checks first; never fail start-up
            logger.error("journal: %s is a folder now; record skipped", target)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / uuid.uuid4().hex
        tmp.write_bytes(record.data)
        os.replace(tmp, target)
        if record.kind is Kind.MOVE:
            self._staged_file(record.path).unlink(missing_ok=True)

    def _staged_file(self, view_path: str) -> Path:
        """``staged_path`` for a path read back from the journal: refuses to leave staged/."""
        path = self.staged_path(view_path)
        if ".." in Path(view_path).parts or not path.is_relative_to(self.staged):
            raise OSError(f"journal names a path outside the spool: {view_path!r}")
        return path

    def checkpoint(self) -> None:
        """Give every file held in the journal a file of its own, make ``staged/`` durable
        as it is and retire the journal's records."""
        with self._lock:
            if self._journal.empty and not self._unsynced:
                return  # every journaled path has a record: nothing to retire
            self._materialise()
            self._syncfs()
            if self._journal.empty:
                return
            self._journal.reset()
            self._journaled.clear()
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize < self._journal.prepared:  # the disk is filling
                self._journal.shrink()

    def _materialise(self) -> None:
        """Write each file held in the journal to its staged name (no flush: the caller
        syncs), before the records that hold it are retired. Files held by a batch stay
        in its ``data`` file."""
        for view_path, held in list(self._held.items()):
            if held.batch is not None:
                continue
            data = _pread_exact(held.fd, held.size, held.offset)
            final = self.file_path(view_path)
            self._note(final)
            try:
                try:
                    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:  # never expected (held paths have no staged file)
                    tmp = os.path.join(self.tmp_str, uuid.uuid4().hex)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    os.replace(tmp, final)
                try:
                    _write_all(fd, data)
                    os.utime(fd, ns=(held.mtime_ns, held.mtime_ns))
                finally:
                    os.close(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(final)  # still held: the record is kept
                raise
            self._unhold(view_path)

    def _syncfs(self) -> None:
        """One ``syncfs`` of the spool's file system: everything in it is durable now,
        the journal's unflushed records too (the power-cut trials are told so)."""
        syncfs(self.root)
        self._unsynced = False
        note_tree_synced(self.root)
        self._journal.synced()

    def sync(self) -> None:
        """Make everything staged so far survive a power cut (``fsync`` of a file that is
        not open for writing, ``blobfs flush``): one ``syncfs``, which flushes the
        journal's unflushed records with the rest. The records stay: a held file lives
        in them."""
        with self._lock:
            if self._unsynced:
                self._syncfs()

    def _journal_touches(self, paths: Iterable[str], tree: bool = False) -> bool:
        """Whether a replay could touch any of ``paths`` (with ``tree``, anything below
        them too)."""
        for path in paths:
            prefix = path.rstrip("/") + "/"
            if path in self._journaled or (
                tree and any(p.startswith(prefix) for p in self._journaled)
            ):
                return True
        return False

    def _checkpoint_if_journaled(self, paths: Iterable[str], tree: bool = False) -> None:
        """Checkpoint when a replay could touch any of ``paths``: the durable operation
        that follows must not be undone by an older record."""
        if self._journal_touches(paths, tree):
            self.checkpoint()

    def _log(
        self, kind: Kind, path: str, path2: str = "", data: bytes = b"", sync: bool = True
    ) -> int | None:
        """Append a record, durably unless ``sync`` is false; returns the offset of its
        data in the journal.

        None when it cannot be appended: the journal is full and a checkpoint (which
        gives held files their own files and changes what the caller found) would be
        needed first, or the file system has no room even after the journal gave its
        space back. The caller then checkpoints (if it must) and makes its change without
        the journal (fsync, rename, fsync of the folder), which needs no extra space.
        """
        try:
            offset = self._journal.append(kind, path, path2, data, sync=sync)
        except JournalFull:
            return None
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            with contextlib.suppress(OSError):  # e.g. no room to materialise held files
                self.reclaim()
            return None
        self._journaled.add(path)
        if path2:
            self._journaled.add(path2)
        if not sync:
            self._unsynced = True
        return offset

    def _set_held(self, view_path: str, held: Held) -> None:
        self._unhold(view_path)
        folder, _, name = view_path.rpartition("/")
        self._held[view_path] = held
        self._held_dirs.setdefault(folder or "/", set()).add(name)
        if held.batch is None:
            self._held_bytes += held.size

    def _room_to_hold(self, size: int) -> bool:
        """Whether a file of ``size`` bytes may be held (see ``HOLD_RESERVE``); the free
        space is looked up again only once the last answer's room is used up."""
        self._room -= size
        if self._room < 0:
            st = os.statvfs(self.root)
            free = st.f_bavail * st.f_frsize - HOLD_RESERVE
            self._room = min(free // 2 - self._held_bytes, 32 << 20) - size
        return self._room >= 0

    def _unhold(self, view_path: str) -> Held | None:
        held = self._held.pop(view_path, None)
        if held is not None:
            if held.batch is None:
                self._held_bytes -= held.size
            folder, _, name = view_path.rpartition("/")
            names = self._held_dirs.get(folder or "/")
            if names is not None:
                names.discard(name)
                if not names:
                    del self._held_dirs[folder or "/"]
        return held

    def _held_under(self, view_path: str) -> bool:
        """Whether any file below the folder ``view_path`` is held."""
        folder = view_path.rstrip("/") or "/"
        prefix = folder.rstrip("/") + "/"
        return any(f == folder or f.startswith(prefix) for f in self._held_dirs)

    def _reserve(self, size: int) -> bool:
        """Take (or, negative, give back) ``size`` bytes of the memory budget for files
        being written; False when it is spent."""
        with self._scratch_lock:
            if size > 0 and self._scratch_bytes + size > SCRATCH_MEMORY:
                return False
            self._scratch_bytes += size
            return True

    def reclaim(self, keep: int = journal.HEADER_SIZE) -> None:
        """Checkpoint and give the journal's zeroed space past ``keep`` bytes back to the
        file system: what a full spool does before it fails (the journal is the one thing
        here that holds space it does not need yet), and a clean unmount."""
        with self._lock:
            if not self._journal.empty or self._unsynced:
                self._materialise()
                self._syncfs()
                self._journal.reset()
                self._journaled.clear()
            if self._journal.prepared > keep:
                self._journal.shrink(keep)
                logger.info("spool %s: journal space given back", self.root)

    def _retry_on_enospc(self, step: Callable[[], T]) -> T:
        """Run ``step``; if the file system is full, reclaim the journal's space and run it
        once more (so an import can start on a full spool and free it)."""
        try:
            return step()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self.reclaim()
            return step()

    # ---- staging ---------------------------------------------------------------------

    def staged_path(self, view_path: str) -> Path:
        """Where the staged copy of ``view_path`` lives (for the spool's own layers:
        queue, importers; the overlay goes through the methods below)."""
        return self.staged / view_path.lstrip("/")

    def stat(self, view_path: str) -> os.stat_result | None:
        """The staged (or held) file or folder at ``view_path``, or None."""
        held = self._held.get(view_path)
        if held is not None:
            return _file_stat(held.size, held.mtime_ns)
        if self._not_staged(view_path):
            return None
        try:
            return os.stat(self.file_path(view_path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def is_dir(self, view_path: str) -> bool:
        st = self.stat(view_path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def listdir(self, view_path: str) -> list[str]:
        """Names staged in the folder ``view_path`` (none when it is not staged), without
        the spool's own in-flight files."""
        try:
            names = os.listdir(self.file_path(view_path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        with self._lock:
            held = sorted(self._held_dirs.get(view_path.rstrip("/") or "/", ()))
        return [n for n in names if not n.endswith(_COMMIT_SUFFIX)] + held

    def file_path(self, view_path: str) -> str:
        """Where the staged file ``view_path`` has its own file (a plain string: the queue
        asks for thousands per pass); a held file has none (see :meth:`held_bytes`).

        A view path as FUSE sends it (one leading slash) is appended as it is: every
        lookup of a new name and every commit makes one, and ``os.path.join`` costs
        several times the concatenation."""
        if view_path.startswith("/") and not view_path.startswith("//"):
            return self.staged_str + view_path
        return os.path.join(self.staged_str, view_path.lstrip("/"))

    def held_bytes(self, view_path: str) -> bytes | None:
        """The bytes of ``view_path`` if it is held (no file of its own), else None."""
        with self._lock:  # a batch's data file is closed under it
            held = self._held.get(view_path)
            return None if held is None else _pread_exact(held.fd, held.size, held.offset)

    def read_bytes(self, view_path: str) -> bytes:
        data = self.held_bytes(view_path)
        return self.staged_path(view_path).read_bytes() if data is None else data

    def open_file(self, view_path: str) -> IO[bytes]:
        """The staged file ``view_path`` to read as a stream (validation reads headers)."""
        data = self.held_bytes(view_path)
        return open(self.file_path(view_path), "rb") if data is None else io.BytesIO(data)

    def read(self, view_path: str, offset: int, size: int) -> bytes:
        data = self.held_bytes(view_path)
        if data is not None:
            return data[offset : offset + size]
        with open(self.file_path(view_path), "rb") as f:
            return os.pread(f.fileno(), size, offset)

    def utime(self, view_path: str, times_ns: tuple[int, int] | None) -> bool:
        """Set the staged file's times; False when nothing is staged there."""
        with self._lock:
            held = self._held.get(view_path)
            if held is not None:  # in memory only, as a plain utime is not durable
                mtime = times_ns[1] if times_ns else time.time_ns()
                self._held[view_path] = Held(held.fd, held.offset, held.size, mtime, held.batch)
                return True
        path = self.staged_path(view_path)
        if not path.exists():
            return False
        os.utime(path, ns=times_ns) if times_ns else os.utime(path)
        return True

    def new_temp(self) -> tuple[int, str | None]:
        """An empty private temp file for a new write: ``(fd, path)``; give it back with
        :meth:`drop_temp`.

        Unnamed where the file system can (``O_TMPFILE``, path None): the commit then links
        the descriptor straight to its staged name and the close has nothing to remove,
        two directory operations fewer per file than a named temp file (a rename and an
        unlink, each a wait behind a busy ext4's journal). Taken from a small pool that a
        background thread keeps filled: creating a file waits behind that journal too
        (80-280 us measured), and a ``cp -r`` would pay it in the middle of its
        ``open()``. Pooled files are empty and unacknowledged: a crash drops them (an
        unnamed one with its descriptor, a named one with the rest of ``tmp/``).
        """
        if self._pool_thread is None:
            with self._lock:
                if self._pool_thread is None:
                    self._pool_thread = threading.Thread(
                        target=self._fill_pool, name="blobfs-spool-pool", daemon=True
                    )
                    self._pool_thread.start()
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return self._create_temp()

    def _create_temp(self) -> tuple[int, str | None]:
        if self._unnamed:
            return os.open(self.tmp_str, _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600), None
        path = os.path.join(self.tmp_str, uuid.uuid4().hex)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, path

    def drop_temp(self, fd: int, tmp_path: str | None) -> None:
        """Close a temp file of :meth:`new_temp` (its staged link, if any, stays)."""
        os.close(fd)
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)

    def _fill_pool(self) -> None:
        while not self._closed.is_set():
            try:
                item = self._create_temp()
            except OSError as exc:  # e.g. no space: new_temp will report it inline
                logger.debug("spool pool: %s", exc)
                self._closed.wait(1.0)
                continue
            while True:
                try:
                    self._pool.put(item, timeout=0.5)
                    break
                except queue.Full:
                    if self._closed.is_set():
                        self._discard_temp(item)
                        return

    def _discard_temp(self, item: tuple[int, str | None]) -> None:
        self.drop_temp(*item)

    def stop_pool(self) -> None:
        """Stop the pool's thread and remove its files."""
        self._closed.set()
        if self._pool_thread is not None:
            self._pool_thread.join(5)
        while True:
            try:
                self._discard_temp(self._pool.get_nowait())
            except queue.Empty:
                break

    def close(self) -> None:
        """Stop the pool and retire the journal with a checkpoint, so that a clean unmount
        leaves nothing to replay."""
        self.stop_pool()
        for thread in self._removals:
            thread.join()
        self.reclaim(keep=journal.HEADER_SIZE + journal.SEGMENT)  # no more held unmounted
        self._journal.close()
        for fd in self._containers.values():
            os.close(fd)
        self._containers.clear()
        os.close(self._lock_fd)  # releases the lock

    def scratch(self) -> Scratch:
        """Where a new write goes until it is committed (see :class:`Scratch`)."""
        return Scratch(self)

    def commit_scratch(self, scratch: Scratch, view_path: str, durable: bool = True) -> int:
        """Make what ``scratch`` holds the staged content of ``view_path``; its size."""
        if scratch.in_memory:
            data = scratch.data()
            if self._hold(data, view_path, durable, scratch.mtime_ns):
                return len(data)
        fd, tmp_path = scratch.file()
        return self.commit(fd, tmp_path, view_path, durable)

    def commit(self, fd: int, tmp_path: str | None, view_path: str, durable: bool = True) -> int:
        """Make the temp file (``tmp_path``, None: unnamed) the staged content of
        ``view_path``; returns its size. A small one is held (one journal record), a
        larger one linked to its staged name (one link for a new name, a link and a
        rename to replace one; durably: fsync first, fsync of the folder after)."""
        size = os.fstat(fd).st_size
        if size <= INLINE_MAX and self._hold(
            _read_all(fd, size), view_path, durable, os.fstat(fd).st_mtime_ns
        ):
            return size
        if not durable:
            with self._lock:
                if not self._journal_touches([view_path]):
                    self._unsynced = True
                    self._link_staged(fd, tmp_path, view_path, durable=False)
                    self._unhold(view_path)  # a batch's copy: the batch keeps its own
                    return size
            # the journal holds an older version: replay must not bring it back over this
        os.fsync(fd)
        with self._lock:
            self._checkpoint_if_journaled([view_path])
            self._link_staged(fd, tmp_path, view_path, durable=True)
            self._unhold(view_path)
        return size

    def _ensure_folder(self, view_path: str) -> None:
        """The staged folder of ``view_path`` exists (memoized: once per folder)."""
        folder = os.path.dirname(self.file_path(view_path))
        if folder not in self._folders:
            self._note(folder)
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)

    def _hold(self, data: bytes, view_path: str, durable: bool, mtime_ns: int) -> bool:
        """Commit the small file ``data`` as a journal record, with no file of its own
        (no ``fdatasync`` unless ``durable``); False when it must get a file instead.

        A plain commit over a file that has its own staged file takes the file path: the
        record may not survive a power cut, the staged file's removal might (a file
        once fsync'd would be gone). A durable one removes the staged file after its
        record is on disk.
        """
        final = self.file_path(view_path)
        with self._lock:
            if not self._journal.empty and not self._journal.fits(view_path, len(data)):
                self.checkpoint()  # a full journal: held files get files, records retire
            replaces = (
                view_path not in self._held
                and not self._not_staged(view_path)
                and os.path.lexists(final)
            )
            if replaces and (not durable or os.path.isdir(final)):
                return False
            if not self._room_to_hold(len(data)):
                return False
            folder = final.rpartition("/")[0]  # _ensure_folder's, with the path made above
            if folder not in self._folders:
                self._note(folder)
                os.makedirs(folder, exist_ok=True)
                self._folders.add(folder)
            offset = self._log(Kind.WRITE, view_path, data=data, sync=durable)
            if offset is None:
                return False  # the journal is full, or the disk: give it a file
            self._set_held(view_path, Held(self._journal.fd, offset, len(data), mtime_ns))
            if replaces:
                os.unlink(final)
                self._forget_name(view_path)
        return True

    def _link_staged(self, fd: int, tmp_path: str | None, view_path: str, durable: bool) -> None:
        """Give the temp file its staged name: a new name is one link (the name appears
        with the whole file); an existing one is replaced by a link and a rename."""
        final = os.path.join(self.staged_str, view_path.lstrip("/"))
        folder = os.path.dirname(final)
        source: str | int = tmp_path if tmp_path is not None else fd
        if folder not in self._folders:
            self._note(folder)
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        try:
            self._link(source, final, folder)
        except FileExistsError:
            st = os.stat(final)
            if not stat.S_ISDIR(st.st_mode) and st.st_ino == os.fstat(fd).st_ino:
                return  # committed before and written in place since: nothing to link
            link = os.path.join(
                folder, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}{_COMMIT_SUFFIX}"
            )
            try:
                self._link(source, link, folder)
            except OSError as exc:
                # an unnamed file whose only name was replaced meanwhile (by another
                # writer) has no name left and cannot be linked again: stage a copy
                if not isinstance(source, int) or exc.errno not in (errno.ENOENT, errno.EXDEV):
                    raise
                copy, _ = self._create_temp()
                try:
                    os.pwrite(copy, _read_all(fd, os.fstat(fd).st_size), 0)
                    self._link(copy, link, folder)
                finally:
                    os.close(copy)
            try:
                os.replace(link, final)
            except OSError:
                os.unlink(link)
                raise
        if durable:
            fsync_dir(folder)

    def _link(self, source: str | int, target: str, folder: str) -> None:
        """Link ``source`` (a path, or the descriptor of an unnamed file) to ``target``."""

        if not target.endswith(_COMMIT_SUFFIX):  # a commit's own link is renamed at once
            self._note(target)

        def link() -> None:
            if isinstance(source, int):
                link_fd(source, target)
            else:
                os.link(source, target)

        try:
            link()
        except FileNotFoundError:  # the folder was removed (rmdir) since it was memoized
            self._folders.discard(folder)
            self._note(folder)
            os.makedirs(folder, exist_ok=True)
            link()
        except NotADirectoryError:
            self._folders.discard(folder)
            raise

    def mkdir(self, view_path: str) -> None:
        path = self.staged_path(view_path)
        with self._lock:  # not while a moved folder has ``_names`` listed again
            self._note(str(path))
            path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)

    def rmdir(self, view_path: str) -> None:
        """Remove an empty staged folder, durably (after a checkpoint if a replay could
        otherwise bring files back into it)."""
        path = self.staged_path(view_path)
        with self._lock:
            if self._held_under(view_path):
                raise OSError(errno.ENOTEMPTY, "holds files", view_path)
            self._checkpoint_if_journaled([view_path], tree=True)
            path.rmdir()
            self._forget_name(view_path)
            self._folders.clear()
            fsync_dir(path.parent)

    def remove(self, view_path: str, durable: bool = True) -> None:
        path = self.staged_path(view_path)
        with self._lock:
            if view_path in self._held:
                if self._log(Kind.REMOVE, view_path, sync=durable) is not None:
                    self._unhold(view_path)
                    return
                self.checkpoint()  # it gets a file of its own, removed below
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", view_path)
            if not durable and not self._journal_touches([view_path]):
                self._unsynced = True
                path.unlink()
                self._forget_name(view_path)
                return
            if self._log(Kind.REMOVE, view_path, sync=durable) is not None:
                path.unlink()
                self._forget_name(view_path)
                return
            self._checkpoint_if_journaled([view_path])
            path.unlink()
            self._forget_name(view_path)
            fsync_dir(path.parent)

    def rename(self, old: str, new: str, durable: bool = True) -> None:
        source, target = self.staged_path(old), self.staged_path(new)
        with self._lock:
            held = self._held.get(old)
            if held is not None:
                if self._move_held(old, new, held, durable):
                    return
                self.checkpoint()  # no room in the journal: both get files, moved below
            st = os.lstat(source)
            if target.is_dir() and not stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", new)
            self._note(str(target))
            target.parent.mkdir(parents=True, exist_ok=True)
            if not durable and not self._journal_touches([old, new], tree=True):
                self._unsynced = True
                os.replace(source, target)
                self._moved(old, stat.S_ISDIR(st.st_mode))
                self._unhold(new)
                self._folders.clear()
                return
            if not stat.S_ISDIR(st.st_mode) and st.st_size <= INLINE_MAX:
                data = source.read_bytes()
                offset = self._log(Kind.MOVE, old, new, data)
                if offset is not None:  # the target is held from the record: see below
                    self._set_held(new, Held(self._journal.fd, offset, len(data), st.st_mtime_ns))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target)
                    os.unlink(source)
                    self._forget_name(old)
                    self._forget_name(new)
                    return
            if stat.S_ISDIR(st.st_mode) and self._held_under(old):
                self.checkpoint()  # the held files below move with the folder
            self._checkpoint_if_journaled([old, new], tree=True)
            self._unhold(new)
            os.replace(source, target)
            self._moved(old, stat.S_ISDIR(st.st_mode))
            fsync_dir(target.parent)
            fsync_dir(source.parent)
            self._folders.clear()  # a moved folder takes memoized subfolders with it

    def _moved(self, old: str, folder: bool) -> None:
        """``old`` was renamed on disk (``_lock`` held): a file's old name is gone; a
        folder takes every name below it along, so ``staged/`` is listed again."""
        if folder:
            self._list_names()
        else:
            self._forget_name(old)

    def _move_held(self, old: str, new: str, held: Held, durable: bool) -> bool:
        """Rename the held file ``old``: a ``MOVE`` record carrying its bytes, and ``new``
        is held from it. False when the journal cannot take the record.

        Over a file with its own staged file the record is flushed even for a plain
        rename: that file's removal may reach the disk before an unflushed record, and a
        power cut would then leave neither name (a rename is all or nothing).
        """
        target = self.file_path(new)
        replaces = new not in self._held and os.path.lexists(target)
        if replaces and os.path.isdir(target):
            raise IsADirectoryError(errno.EISDIR, "is a folder", new)
        data = _pread_exact(held.fd, held.size, held.offset)
        self._ensure_folder(new)
        offset = self._log(Kind.MOVE, old, new, data, sync=durable or replaces)
        if offset is None:
            return False
        self._unhold(old)
        self._set_held(new, Held(self._journal.fd, offset, len(data), held.mtime_ns))
        if replaces:
            os.unlink(target)
        return True

    def walk(self) -> tuple[list[str], list[str]]:
        """All staged files and dirs as view paths (``/ds/img/a.png``), dirs first."""
        files, dirs = self._walk_disk()
        with self._lock:
            files.extend(self._held)
        return files, dirs

    def _walk_disk(self) -> tuple[list[str], list[str]]:
        """The files and folders under ``staged/`` as view paths (no held files)."""
        files: list[str] = []
        dirs: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.staged):
            rel = os.path.relpath(dirpath, self.staged)
            prefix = "" if rel == "." else "/" + rel
            dirs.extend(f"{prefix}/{d}" for d in dirnames)
            files.extend(f"{prefix}/{f}" for f in filenames if not f.endswith(_COMMIT_SUFFIX))
        return files, dirs

    # ---- batches ---------------------------------------------------------------------

    def create_batch(self, batch: Batch) -> Batch:
        """Copy the batch's held files into its ``data`` file, link its other files into
        its folder and write its manifest (all durably): from then on the batch holds its
        files. No checkpoint: it would give every other held file a file of its own, which
        while a copy goes on is most of what it has written so far. A replay before the
        batch is done brings back copies it drops when done (``_same_as_batch``); once it
        is done, removal records say they are gone (``finish_batch``)."""
        folder = self.batches_dir / batch.id
        with self._lock:  # no commit between the copies, the links and the checkpoint
            os.makedirs(folder, exist_ok=True)

            def build() -> int | None:  # again after a reclaim, which gives held files files
                held = {p: self._held[p] for p in batch.files if p in self._held}
                self._link_batch(folder, batch, held)
                return self._write_batch_data(folder, batch, held)

            fd = self._retry_on_enospc(build)
            # the copies, the links' files and the journal before the manifest names them
            self._syncfs()
            try:
                self.save_batch(batch)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            if fd is not None:
                self._containers[batch.id] = fd
                self._hold_in_batch(batch, fd)
        return batch

    def _hold_in_batch(self, batch: Batch, fd: int) -> None:
        """The batch's held files are held by its data file from now on (``_lock``
        held). Each is held already, under the same name: only its entry changes, and
        the bytes it counted as held outside a batch; the folders' names are left as they
        are (this runs under the lock that every request of a copy waits for)."""
        held = self._held
        for view_path, (offset, size, mtime_ns) in batch.held.items():
            old = held.get(view_path)
            if old is None:  # given a file of its own since (a reclaim): held again
                self._set_held(view_path, Held(fd, offset, size, mtime_ns, batch.id))
                continue
            if old.batch is None:
                self._held_bytes -= old.size
            held[view_path] = Held(fd, offset, size, mtime_ns, batch.id)

    def _write_batch_data(self, folder: Path, batch: Batch, held: dict[str, Held]) -> int | None:
        """The held files' bytes in ``folder/data``, copied run by run as they lie in the
        journal, the headers between them included (not flushed: the caller syncs);
        records where each is in ``batch.held``. Returns the open file."""
        batch.held = {}
        if not held:
            return None
        fd = os.open(folder / "data", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            for src, start, end, members in _held_runs(held):
                _copy_range(src, fd, start, end - start, offset)
                for view_path, entry in members:
                    batch.held[view_path] = [
                        offset + entry.offset - start,
                        entry.size,
                        entry.mtime_ns,
                    ]
                offset += end - start
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _link_batch(self, folder: Path, batch: Batch, held: dict[str, Held]) -> None:
        files = os.path.join(folder, "files")
        os.makedirs(files, exist_ok=True)
        made = {files}  # plain strings and one mkdir per folder: a link per file
        for view_path in batch.files:
            if view_path in held:
                continue
            rel = view_path.lstrip("/")
            link = os.path.join(files, rel)
            parent = os.path.dirname(link)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            with contextlib.suppress(FileExistsError):  # linked before a crash
                os.link(os.path.join(self.staged_str, rel), link)

    def save_batch(self, batch: Batch) -> None:
        """Write the batch's manifest atomically (after reclaiming the journal's space if
        the file system is full: the manifest is all an import needs of the spool)."""
        folder = self.batches_dir / batch.id
        data = self._manifest_bytes(batch)
        self._retry_on_enospc(lambda: write_atomic(folder / "manifest.json", data))
        fsync_dir(folder)

    def _manifest_bytes(self, batch: Batch) -> bytes:
        """The batch's manifest, the JSON of ``json.dumps(batch.to_json())``.

        A batch is saved at every step of its import, and most of its manifest (its files,
        their places in its data file, the members of its tar) is set once, before the
        first save that holds it: those fields are encoded once per batch and reused while
        they are the same objects of the same length; the rest is encoded each time."""
        cache = self._encoded.setdefault(batch.id, {})
        parts = []
        for name, value in batch.to_json().items():
            if name in _SET_ONCE and isinstance(value, list | dict):
                known = cache.get(name)
                if known is None or known[0] is not value or known[1] != len(value):
                    known = (value, len(value), json.dumps(value))
                    cache[name] = known
                text = known[2]
            else:
                text = json.dumps(value)
            parts.append(f"{json.dumps(name)}: {text}")
        return ("{" + ", ".join(parts) + "}").encode()

    def batch_source(self, batch: Batch, view_path: str) -> Path | InlineFile:
        """The batch's snapshot of ``view_path``: its bytes for a held file, else the
        batch's link to the staged file."""
        entry = batch.held.get(view_path)
        if entry is None:
            return self.batches_dir / batch.id / "files" / view_path.lstrip("/")
        offset, size, mtime_ns = entry
        with self._lock:
            fd = self._containers.get(batch.id)
            if fd is None:
                raise OSError(errno.EIO, f"batch {batch.id}: its data file is not open")
            data = _pread_exact(fd, size, offset)
        return InlineFile(view_path.rsplit("/", 1)[1], data, mtime_ns / 1e9)

    def batch_bytes(self, batch: Batch, view_path: str) -> bytes:
        stream, _, _ = open_source(self.batch_source(batch, view_path))
        with stream:
            return stream.read()

    def open_batches(self) -> list[Batch]:
        """Batches left by an earlier run (oldest first), to be finished before new ones."""
        out = []
        batches: list[tuple[int, Path]] = []
        for folder in self.batches_dir.iterdir():
            if folder.name.startswith(_RETIRED_PREFIX):
                # finished: its removal is under way in the background (so it may vanish
                # while this looks at it: not stat'ed), or was cut short (a later pass,
                # with no removal running, takes it)
                if not any(t.is_alive() for t in self._removals):
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                batches.append((folder.stat().st_mtime_ns, folder))
        for _, folder in sorted(batches):
            manifest = folder / "manifest.json"
            if not manifest.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # crashed before its manifest
                continue
            out.append(Batch(**json.loads(manifest.read_bytes())))
        return out

    def finish_batch(self, batch: Batch) -> dict[str, int]:
        """Drop the staged files the batch imported (unless re-written since); returns
        them with their sizes."""
        done: dict[str, int] = {}
        links = os.path.join(str(self.batches_dir), batch.id, "files")
        with self._lock:
            # When the batch holds every held file, one checkpoint (nothing left to give a
            # file of its own, everything else durable already: one small syncfs and the
            # header flip) retires the records instead of a removal record per file.
            alone = bool(batch.held) and all(h.batch == batch.id for h in self._held.values())
            recorded = not alone  # every held file dropped so far has its removal journaled
            for view_path in batch.held:
                held = self._held.get(view_path)
                if held is not None and held.batch == batch.id:
                    # its write record is still in the journal: a replay must not bring
                    # it back once the batch stops being one to finish
                    if recorded and self._log(Kind.REMOVE, view_path, sync=False) is None:
                        self.checkpoint()  # a full journal: retire every record instead
                        recorded = False
                    self._unhold(view_path)
                    done[view_path] = held.size
                elif held is None and self._same_as_batch(batch, view_path):
                    os.unlink(self.file_path(view_path))  # a replay's copy, unchanged
                    self._forget_name(view_path)
                    done[view_path] = batch.held[view_path][1]
            if recorded and done:
                self._journal.flush()  # before the batch is retired, below
            elif alone:
                self.checkpoint()  # likewise
            fd = self._containers.pop(batch.id, None)
            if fd is not None:
                os.close(fd)
            self._encoded.pop(batch.id, None)
        emptied: set[str] = set()
        for view_path in batch.files:
            if view_path in batch.held:
                continue
            rel = view_path.lstrip("/")
            staged = os.path.join(self.staged_str, rel)
            try:
                with self._lock:  # not between a commit's link and its name (``_names``)
                    st = os.stat(staged)
                    if st.st_ino == os.stat(os.path.join(links, rel)).st_ino:
                        os.unlink(staged)
                        self._forget_name(view_path)
                        done[view_path] = st.st_size
                        emptied.add(os.path.dirname(staged))
            except FileNotFoundError:
                pass
        # The removals must be on disk before the batch stops being one to finish: a
        # power cut in between would otherwise bring imported files back with no batch
        # that says they were imported, and the next pass would import them again.
        for folder in sorted(emptied):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)
        retired = self.batches_dir / f"{_RETIRED_PREFIX}{batch.id}"
        os.replace(self.batches_dir / batch.id, retired)  # no longer a batch to finish
        fsync_dir(self.batches_dir)
        thread = threading.Thread(
            target=shutil.rmtree,
            args=(retired,),
            kwargs={"ignore_errors": True},
            name="blobfs-spool-cleanup",
            daemon=True,
        )
        thread.start()
        self._removals = [t for t in self._removals if t.is_alive()] + [thread]
        return done

    def _same_as_batch(self, batch: Batch, view_path: str) -> bool:
        """Whether the staged file ``view_path`` holds the batch's bytes of it (a replay
        after a crash recreates a held file the batch had taken)."""
        offset, size, _ = batch.held[view_path]
        try:
            with open(self.file_path(view_path), "rb") as f:
                if os.fstat(f.fileno()).st_size != size:
                    return False
                data = f.read()
            fd = self._containers.get(batch.id)
            return fd is not None and data == _pread_exact(fd, size, offset)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
