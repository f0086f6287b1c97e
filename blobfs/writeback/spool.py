"""The spool: staged files on disk, made durable through a write-ahead journal.

Layout::

    spool/journal                    small closed files, removals, moves (``journal.py``)
    spool/tmp/                       files being written, unnamed (O_TMPFILE) where the file
                                     system allows, else tmp/<random> (lost on crash: never
                                     acknowledged)
    spool/staged/<view path>         committed files, as a program last closed them
    spool/staged/<dataset>/          a dataset made with mkdir
    spool/batches/<id>/manifest.json a batch being imported (written atomically)
    spool/batches/<id>/files/<view path>  hard links to the staged files of the batch

Two strengths of commit. A plain one (``close()`` by default) links the temp file to its
staged name and returns: the bytes are in the spool's files, in the kernel, so a daemon
killed at any moment keeps them, and the next checkpoint makes them durable. A durable one
(``fsync()``, or every ``close()`` with ``--sync-close``) returns only once the file
survives a power cut: a file up to ``INLINE_MAX`` bytes as one journal record (one
``fdatasync``), its staged link left to the kernel's writeback; a larger one by fsync,
rename and fsync of its folder. A plain change to a path the journal holds goes through
the journal too (a replay would otherwise bring the older record back over it).

A *checkpoint* (one ``syncfs`` of the spool's file system, then a new journal generation)
makes the staged folder itself durable, plain commits included; it runs before anything
that must not be undone by a replay or rely on bytes still in the page cache: a batch's
hard links, a durable operation on a path the journal holds, a full journal, a clean
close, :meth:`Spool.sync`. On start-up the journal is replayed over ``staged/`` and
checkpointed. A batch holds hard links, so a file re-written while its batch imports
keeps the batch's snapshot.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import queue
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from blobfs.errors import Busy
from blobfs.format.pack import fsync_dir, write_atomic
from blobfs.writeback import journal
from blobfs.writeback.journal import Journal, JournalFull, Kind, Record

logger = logging.getLogger(__name__)

#: Files up to this size are made durable as one journal record (they are written twice:
#: journal and staged file); larger ones by fsync + rename + fsync of the folder.
INLINE_MAX = 1024 * 1024
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
        self._journaled: set[str] = set()  # view paths the journal's records touch
        # plain changes since the last syncfs; true at start: a killed daemon's plain
        # commits may still be only in the page cache
        self._unsynced = True
        self.tmp_str = str(self.tmp)
        self._unnamed = _unnamed_temps_work(self.tmp_str)
        self._pool: queue.Queue[tuple[int, str | None]] = queue.Queue(maxsize=POOL_SIZE)
        self._pool_thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._removals: list[threading.Thread] = []
        self._recover()

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
        """Make ``staged/`` durable as it is and retire the journal's records."""
        with self._lock:
            if self._journal.empty and not self._unsynced:
                return  # every journaled path has a record: nothing to retire
            syncfs(self.root)
            self._unsynced = False
            if self._journal.empty:
                return
            self._journal.reset()
            self._journaled.clear()
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize < self._journal.prepared:  # the disk is filling
                self._journal.shrink()

    def sync(self) -> None:
        """Make everything staged so far survive a power cut (``fsync`` of a file that is
        not open for writing, ``blobfs flush``): one checkpoint."""
        self.checkpoint()

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

    def _log(self, kind: Kind, path: str, path2: str = "", data: bytes = b"") -> bool:
        """Append a record durably (checkpointing first when the journal is full).

        False when the file system has no room for the record even after the journal
        gave its space back: the caller then makes its change durable without the
        journal (fsync, rename, fsync of the folder), which needs no extra space.
        """
        try:
            try:
                self._journal.append(kind, path, path2, data)
            except JournalFull:
                self.checkpoint()
                self._journal.append(kind, path, path2, data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            self.reclaim()
            return False
        self._journaled.add(path)
        if path2:
            self._journaled.add(path2)
        return True

    def reclaim(self, keep: int = journal.HEADER_SIZE) -> None:
        """Checkpoint and give the journal's zeroed space past ``keep`` bytes back to the
        file system: what a full spool does before it fails (the journal is the one thing
        here that holds space it does not need yet), and a clean unmount."""
        with self._lock:
            if not self._journal.empty or self._unsynced:
                syncfs(self.root)
                self._unsynced = False
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
        """The staged file or folder at ``view_path``, or None."""
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
        return [n for n in names if not n.endswith(_COMMIT_SUFFIX)]

    def file_path(self, view_path: str) -> str:
        """A path to open the staged file ``view_path`` for reading (a plain string: the
        queue asks for thousands per pass)."""
        return os.path.join(self.staged_str, view_path.lstrip("/"))

    def read_bytes(self, view_path: str) -> bytes:
        return self.staged_path(view_path).read_bytes()

    def utime(self, view_path: str, times_ns: tuple[int, int] | None) -> bool:
        """Set the staged file's times; False when nothing is staged there."""
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
        os.close(self._lock_fd)  # releases the lock

    def commit(self, fd: int, tmp_path: str | None, view_path: str, durable: bool = True) -> int:
        """Make the temp file (``tmp_path``, None: unnamed) the staged content of
        ``view_path``; returns its size.

        The hot path of every close: plain strings and a memo of folders known to exist
        keep it to the syscalls that matter (one link for a new name, a link and a rename
        to replace one; for a durable commit of a small file one journal append +
        fdatasync before them).
        """
        size = os.fstat(fd).st_size
        if not durable:
            with self._lock:
                if view_path not in self._journaled:
                    self._unsynced = True
                    self._link_staged(fd, tmp_path, view_path, durable=False)
                    return size
            # the journal holds an older version: replay must find this one after it
        inline = size <= INLINE_MAX
        data = _read_all(fd, size) if inline else b""
        if not inline:
            os.fsync(fd)
        with self._lock:
            logged = inline and self._log(Kind.WRITE, view_path, data=data)
            if not logged:
                if inline:  # no room for the journal: the durable path without it
                    os.fsync(fd)
                self._checkpoint_if_journaled([view_path])
            self._link_staged(fd, tmp_path, view_path, durable=not logged)
        return size

    def _link_staged(self, fd: int, tmp_path: str | None, view_path: str, durable: bool) -> None:
        """Give the temp file its staged name: a new name is one link (the name appears
        with the whole file); an existing one is replaced by a link and a rename."""
        final = os.path.join(self.staged_str, view_path.lstrip("/"))
        folder = os.path.dirname(final)
        source: str | int = tmp_path if tmp_path is not None else fd
        if folder not in self._folders:
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

        def link() -> None:
            if isinstance(source, int):
                link_fd(source, target)
            else:
                os.link(source, target)

        try:
            link()
        except FileNotFoundError:  # the folder was removed (rmdir) since it was memoized
            self._folders.discard(folder)
            os.makedirs(folder, exist_ok=True)
            link()
        except NotADirectoryError:
            self._folders.discard(folder)
            raise

    def mkdir(self, view_path: str) -> None:
        path = self.staged_path(view_path)
        path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)

    def rmdir(self, view_path: str) -> None:
        """Remove an empty staged folder, durably (after a checkpoint if a replay could
        otherwise bring files back into it)."""
        path = self.staged_path(view_path)
        with self._lock:
            self._checkpoint_if_journaled([view_path], tree=True)
            path.rmdir()
            self._folders.clear()
            fsync_dir(path.parent)

    def remove(self, view_path: str, durable: bool = True) -> None:
        path = self.staged_path(view_path)
        with self._lock:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", view_path)
            if not durable and not self._journal_touches([view_path]):
                self._unsynced = True
                path.unlink()
                return
            if self._log(Kind.REMOVE, view_path):
                path.unlink()
                return
            self._checkpoint_if_journaled([view_path])
            path.unlink()
            fsync_dir(path.parent)

    def rename(self, old: str, new: str, durable: bool = True) -> None:
        source, target = self.staged_path(old), self.staged_path(new)
        with self._lock:
            st = os.lstat(source)
            if target.is_dir() and not stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", new)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not durable and not self._journal_touches([old, new], tree=True):
                self._unsynced = True
                os.replace(source, target)
                self._folders.clear()
                return
            if (
                not stat.S_ISDIR(st.st_mode)
                and st.st_size <= INLINE_MAX
                and self._log(Kind.MOVE, old, new, source.read_bytes())
            ):
                os.replace(source, target)
                return
            self._checkpoint_if_journaled([old, new], tree=True)
            os.replace(source, target)
            fsync_dir(target.parent)
            fsync_dir(source.parent)
            self._folders.clear()  # a moved folder takes memoized subfolders with it

    def walk(self) -> tuple[list[str], list[str]]:
        """All staged files and dirs as view paths (``/ds/img/a.png``), dirs first."""
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
        """Link the batch's files into its folder and write its manifest, durably."""
        folder = self.batches_dir / batch.id
        with self._lock:  # no commit between the checkpoint and the links
            self.checkpoint()  # the linked files' bytes must be durable before the manifest
            self._retry_on_enospc(lambda: self._link_batch(folder, batch))
            self.save_batch(batch)
        return batch

    def _link_batch(self, folder: Path, batch: Batch) -> None:
        files = os.path.join(folder, "files")
        os.makedirs(files, exist_ok=True)
        made = {files}  # plain strings and one mkdir per folder: a link per file
        for view_path in batch.files:
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
        data = json.dumps(batch.to_json()).encode()
        self._retry_on_enospc(lambda: write_atomic(folder / "manifest.json", data))
        fsync_dir(folder)

    def batch_file(self, batch: Batch, view_path: str) -> Path:
        return self.batches_dir / batch.id / "files" / view_path.lstrip("/")

    def open_batches(self) -> list[Batch]:
        """Batches left by an earlier run (oldest first), to be finished before new ones."""
        out = []
        for folder in sorted(self.batches_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            if folder.name.startswith(_RETIRED_PREFIX):  # finished; its removal was cut short
                shutil.rmtree(folder, ignore_errors=True)
                continue
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
        for view_path in batch.files:
            rel = view_path.lstrip("/")
            staged = os.path.join(self.staged_str, rel)
            try:
                st = os.stat(staged)
                if st.st_ino == os.stat(os.path.join(links, rel)).st_ino:
                    os.unlink(staged)
                    done[view_path] = st.st_size
            except FileNotFoundError:
                pass
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
