"""WritableView: the project tree plus an overlay of staged files (``--writeback``).

New files are written to private temp files in the spool and committed on
``flush``/``fsync``/``release``. As on a local file system, ``close()`` leaves the bytes in
the spool's files (they survive a crash of the daemon) and ``fsync()`` makes them survive a
power cut; with ``sync_close`` every ``close()`` is durable too.
The overlay shows files being written, staged files and new datasets on top of the
project's own tree, so a program sees what it wrote at once, before any import.

What may be written (everything else is refused, see docs/semantics.md):
``/meta.json``; ``/<ds>/img/<name>`` and ``/<ds>/ann/<name>.json`` of existing or new
datasets (nested ones too); new top-level datasets with ``mkdir``. Annotations and meta may
replace imported ones; images may not (EPERM), nor may imported files be renamed or removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blobfs.blob.ann_coords import AnnotationFormatError, to_subpixel
from blobfs.blob.index import name_problem
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
from blobfs.model import FileRecord
from blobfs.sources.base import Source
from blobfs.sources.readers import BytesReader
from blobfs.transport.local import FileRangeReader
from blobfs.view.handles import ReadHandle
from blobfs.view.tree import DIR_MODE, DirNode, ProjectView, split_path
from blobfs.writeback.queue import WritebackQueue, dataset_of
from blobfs.writeback.spool import Batch, Spool

logger = logging.getLogger(__name__)

STAGED_FILE_MODE = stat.S_IFREG | 0o644
STAGED_DIR_MODE = stat.S_IFDIR | 0o755
CONTROL_DIR = "/.blobfs"
CONTROL_FLUSH = "/.blobfs/flush"
CONTROL_STATUS = "/.blobfs/writeback.json"
CONTROL_SIZE = 1 << 20


@dataclass(eq=False)
class WriteHandle:
    """A file open for writing: a temp file in the spool, committed to ``path`` on flush."""

    fd: int
    tmp_path: str
    path: str
    dirty: bool = True
    #: The first error a write (or truncate) of this handle met: the file is then never
    #: committed, and close()/fsync() report the error (a program that checks only
    #: close() still learns of it).
    failed: Exception | None = None
    committed: bool = False  # a version of this handle reached the spool (fsync)
    synced: bool = False  # what was last committed is durable (fsync, or sync_close)


class WritableView(ProjectView):
    """ProjectView plus the staging overlay; see the module docstring."""

    def __init__(
        self,
        source: Source,
        spool: Spool,
        listing_ttl_s: float = float("inf"),
        on_staged: Callable[[int], None] | None = None,
        sync_close: bool = False,
    ) -> None:
        super().__init__(source, listing_ttl_s=listing_ttl_s)
        self.spool = spool
        self.sync_close = sync_close
        self.on_staged = on_staged
        self._writers: dict[int, WriteHandle] = {}
        self._wlock = threading.RLock()
        self._importing: set[str] = set()
        self.queue: WritebackQueue | None = None  # set by the daemon once both exist

    # ---- lookups through the overlay ---------------------------------------------------

    def _open_writer(self, path: str) -> WriteHandle | None:
        for handle in self._writers.values():
            if handle.path == path:
                return handle
        return None

    def _staged_stat(self, path: str) -> os.stat_result | None:
        try:
            return os.stat(self.spool.staged_path(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _writeback_control(self, path: str) -> bytes | None:
        """Contents of the control files under ``/.blobfs`` (None for other paths)."""
        if path == CONTROL_FLUSH and self.queue is not None:
            self.queue.flush()
        if path in (CONTROL_FLUSH, CONTROL_STATUS):
            status = self.queue.status.as_dict() if self.queue is not None else {}
            return (json.dumps(status, indent=1) + "\n").encode()
        return None

    def getattr(self, path: str) -> dict[str, int]:
        if path in (CONTROL_FLUSH, CONTROL_STATUS):
            # The real length is known only when read (a flush runs then): announce a
            # bound; the short read that follows is the end of file (no kernel_cache here).
            return {
                **self._file_attrs(os.stat(self.spool.root)),
                "st_mode": stat.S_IFREG | 0o444,
                "st_size": CONTROL_SIZE,
            }
        if path == CONTROL_DIR:
            try:
                return super().getattr(path)
            except NotFound:
                return {
                    **self._file_attrs(os.stat(self.spool.root)),
                    "st_mode": DIR_MODE,
                    "st_nlink": 2,
                }
        writer = self._open_writer(path)
        if writer is not None:
            return self._file_attrs(os.fstat(writer.fd))
        if self._implicit_dir(path) and self.lookup(path) is None:
            ds = os.stat(self.spool.staged_path("/" + split_path(path)[0]))
            return {**self._file_attrs(ds), "st_mode": STAGED_DIR_MODE, "st_nlink": 2}
        st = self._staged_stat(path) if path != "/" else None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                base = self.lookup(path)
                if isinstance(base, DirNode):
                    return super().getattr(path)
                return {**self._file_attrs(st), "st_mode": STAGED_DIR_MODE, "st_nlink": 2}
            return self._file_attrs(st)
        attrs = super().getattr(path)
        if stat.S_ISDIR(attrs["st_mode"]):
            attrs["st_mode"] = STAGED_DIR_MODE
        elif path == "/meta.json" or "/ann/" in path:
            attrs["st_mode"] = STAGED_FILE_MODE  # annotations and meta may be replaced
        return attrs

    def _file_attrs(self, st: os.stat_result) -> dict[str, int]:
        return {
            "st_mode": STAGED_FILE_MODE,
            "st_nlink": 1,
            "st_size": st.st_size,
            "st_blocks": (st.st_size + 511) // 512,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
            "st_atime": st.st_atime_ns,
            "st_uid": self.uid,
            "st_gid": self.gid,
        }

    def readdir(self, path: str) -> Sequence[str]:
        names: dict[str, None] = {}
        base = self.lookup(path)
        staged_dir = self.spool.staged_path(path)
        implicit = self._implicit_dir(path)
        if isinstance(base, DirNode):
            names.update(dict.fromkeys(super().readdir(path)))
        elif base is not None:
            raise NotADirectory(path)
        elif not staged_dir.is_dir() and not implicit:
            raise NotFound(path)
        if staged_dir.is_dir():
            names.update(
                dict.fromkeys(n for n in os.listdir(staged_dir) if not n.endswith(".commit"))
            )
        prefix = path.rstrip("/") + "/"
        for handle in list(self._writers.values()):
            if handle.path.startswith(prefix) and "/" not in handle.path[len(prefix) :]:
                names[handle.path[len(prefix) :]] = None
        if self._is_dataset_dir(path):
            names.update({"img": None, "ann": None})
        return list(names)

    def _implicit_dir(self, path: str) -> bool:
        """``/<new dataset>/img`` and ``/ann`` exist as soon as the dataset does."""
        parts = split_path(path)
        return (
            len(parts) == 2 and parts[1] in ("img", "ann") and self._is_dataset_dir("/" + parts[0])
        )

    def _is_dataset_dir(self, path: str) -> bool:
        parts = split_path(path)
        return len(parts) == 1 and self.spool.staged_path(path).is_dir()

    def read_path(self, path: str, offset: int, size: int) -> bytes:
        control = self._writeback_control(path) if path.startswith(CONTROL_DIR + "/") else None
        if control is not None:
            return control[offset : offset + size]
        staged = self._staged_stat(path)
        if staged is not None and not stat.S_ISDIR(staged.st_mode):
            with open(self.spool.staged_path(path), "rb") as f:
                return os.pread(f.fileno(), size, offset)
        return super().read_path(path, offset, size)

    # ---- what may be written -------------------------------------------------------

    def _dataset_exists(self, names: tuple[str, ...]) -> bool:
        path = "/" + "/datasets/".join(names)
        return isinstance(self.lookup(path), DirNode) or self.spool.staged_path(path).is_dir()

    def _check_writable(self, path: str) -> None:
        if path == "/meta.json":
            return
        where = dataset_of(path)
        if where is None:
            raise NotPermitted(
                f"{path}: only /meta.json, <dataset>/img/ and <dataset>/ann/ files can be written"
            )
        dataset, kind, name = where
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"{path}: {problem}")
        if not self._dataset_exists(dataset):
            raise NotFound(f"{path}: no dataset {'/'.join(dataset)}")
        if kind == "ann" and not name.endswith(".json"):
            raise NotPermitted(f"{path}: annotations are <image name>.json files")
        if kind == "img" and self._in_base(path):
            raise NotPermitted(f"{path}: an imported image cannot be changed")
        if kind == "img":  # the lookup above listed the dataset: its refusals are known
            refused = self.source.refused(dataset, f"img/{name}")
            if refused is not None:
                raise AlreadyExists(
                    f"{path}: the project already has an entry of that name that is not "
                    f"served ({refused}); an import could never be served either"
                )
        if path in self._importing:
            raise Busy(f"{path}: being imported right now")

    def _in_base(self, path: str) -> bool:
        node = self.lookup(path)
        return node is not None and not isinstance(node, DirNode)

    # ---- write operations ----------------------------------------------------------

    def create(self, path: str) -> int:
        """Create (or truncate) ``path`` for writing; returns a handle number."""
        self._check_writable(path)
        fd, tmp = self.spool.new_temp()
        return self._add_writer(WriteHandle(fd, tmp, path))

    def open_write(self, path: str, truncate: bool) -> int:
        """Open an existing file for writing: its bytes are copied unless truncating."""
        self._check_writable(path)
        fd, tmp = self.spool.new_temp()
        if not truncate:
            staged = self.spool.staged_path(path)
            if staged.is_file():
                with open(staged, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            elif self._in_base(path):
                rec = self.get(path)
                assert isinstance(rec, FileRecord)
                os.pwrite(fd, super().read_path(path, 0, self.size_of(rec)), 0)
        return self._add_writer(WriteHandle(fd, tmp, path, dirty=truncate))

    def _add_writer(self, handle: WriteHandle) -> int:
        with self._wlock:
            fh = self.handles.add(ReadHandle(FileRangeReader(handle.tmp_path), -1, handle.path))
            self._writers[fh] = handle
        return fh

    def open(self, path: str, write: bool = False) -> int:
        if write:
            return self.open_write(path, truncate=False)
        control = self._writeback_control(path) if path.startswith(CONTROL_DIR + "/") else None
        if control is not None:
            return self.handles.add(ReadHandle(BytesReader(control), len(control), path))
        staged = self._staged_stat(path)
        if staged is not None and not stat.S_ISDIR(staged.st_mode):
            reader = FileRangeReader(str(self.spool.staged_path(path)))
            return self.handles.add(ReadHandle(reader, staged.st_size, path))
        return super().open(path)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self._writer(fh)
        handle.dirty = True
        if handle.failed is not None:
            raise handle.failed
        try:
            return os.pwrite(handle.fd, data, offset)
        except OSError as exc:
            raise self._fail(handle, exc) from None

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

    def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._writers.get(fh)
        if handle is not None:
            return os.pread(handle.fd, size, offset)
        return super().read(fh, offset, size)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None and fh in self._writers:
            handle = self._writers[fh]
        elif self._open_writer(path) is not None:  # open(O_TRUNC) arrives as open + truncate
            for handle in list(self._writers.values()):
                if handle.path == path:
                    os.ftruncate(handle.fd, length)
                    handle.dirty = True
            return
        else:
            handle = self._writer(self.open_write(path, truncate=False))
            try:
                os.ftruncate(handle.fd, length)
                handle.dirty = True
                self.commit(self._fh_of(handle), durable=self.sync_close)
            finally:
                self.release(self._fh_of(handle))
            return
        try:
            os.ftruncate(handle.fd, length)
        except OSError as exc:
            raise self._fail(handle, exc) from None
        handle.dirty = True

    def _fh_of(self, handle: WriteHandle) -> int:
        return next(fh for fh, h in self._writers.items() if h is handle)

    def _writer(self, fh: int) -> WriteHandle:
        handle = self._writers.get(fh)
        if handle is None:
            raise InvalidInput(f"handle {fh} is not open for writing")
        return handle

    def close_commit(self, fh: int) -> None:
        """``close()`` (FUSE ``flush``): staged; durable only with ``sync_close``."""
        self.commit(fh, durable=self.sync_close)

    def fsync(self, path: str, fh: int | None) -> None:
        """``fsync()``/``fdatasync()``: what ``path`` holds survives a power cut on return.

        The kernel sends it on any handle (``sync FILE`` opens the file read-only): a
        handle not open for writing makes the whole spool durable (one checkpoint).
        """
        if fh is not None and fh in self._writers:
            self.commit(fh, durable=True)
        elif self._staged_stat(path) is not None:
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
            size = self.spool.commit(handle.fd, handle.tmp_path, handle.path, durable=durable)
        except OSError as exc:  # e.g. no space even for the durable rename path
            raise self._fail(handle, exc) from None
        was_dirty = handle.dirty
        handle.dirty = False
        handle.committed = True
        handle.synced = durable
        logger.debug("staged %s%s", handle.path, " durably" if durable else "")
        if was_dirty and self.on_staged is not None:
            self.on_staged(size)

    def release(self, fh: int) -> None:
        with self._wlock:
            handle = self._writers.get(fh)
            if handle is not None:
                try:
                    if handle.failed is None:  # close() already reported a failure
                        self.commit(fh, durable=self.sync_close)
                finally:
                    self._writers.pop(fh, None)
                    os.close(handle.fd)
                    os.unlink(handle.tmp_path)
        super().release(fh)

    def unlink(self, path: str) -> None:
        if self._staged_stat(path) is None:
            if self.lookup(path) is not None:
                raise NotPermitted(f"{path}: imported files cannot be removed")
            raise NotFound(path)
        if path in self._importing:
            raise Busy(f"{path}: being imported right now")
        self.spool.remove(path, durable=self.sync_close)

    def rename(self, old: str, new: str) -> None:
        if self._staged_stat(old) is None:
            if self.lookup(old) is not None:
                raise NotPermitted(f"{old}: imported files cannot be renamed")
            raise NotFound(old)
        self._check_writable(new)
        if old in self._importing:
            raise Busy(f"{old}: being imported right now")
        self.spool.rename(old, new, durable=self.sync_close)
        for handle in self._writers.values():
            if handle.path == old:
                handle.path = new
        if self.on_staged is not None:
            self.on_staged(0)

    def mkdir(self, path: str) -> None:
        parts = split_path(path)
        if self.lookup(path) is not None or self.spool.staged_path(path).exists():
            raise AlreadyExists(path)
        if (len(parts) == 3 and parts[1] == "datasets") or len(parts) != 1:
            raise NotPermitted(f"{path}: only new top-level datasets can be made")
        problem = name_problem(parts[0])
        if problem or parts[0] in ("blob", ".blobfs"):
            raise InvalidInput(f"{path}: {problem or 'reserved name'}")
        self.spool.mkdir(path)

    def rmdir(self, path: str) -> None:
        """Remove a new dataset that holds no files (its ``img/`` and ``ann/`` always show,
        so they do not count); ENOTEMPTY otherwise, like any file system."""
        if self.lookup(path) is not None:
            raise NotPermitted(f"{path}: imported datasets cannot be removed")
        if self._implicit_dir(path):
            raise NotPermitted(f"{path}: a dataset always has img/ and ann/")
        staged = self.spool.staged_path(path)
        if not staged.is_dir():
            raise NotFound(path)
        if set(self.readdir(path)) != {"img", "ann"} or any(
            self.readdir(f"{path}/{sub}") for sub in ("img", "ann")
        ):
            raise NotEmpty(f"{path}: not empty")
        try:
            for sub in ("img", "ann"):
                if (staged / sub).is_dir():
                    self.spool.rmdir(f"{path}/{sub}")
            self.spool.rmdir(path)
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:  # a file staged meanwhile
                raise NotEmpty(f"{path}: not empty") from None
            raise

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        staged = self.spool.staged_path(path)
        if staged.exists():
            os.utime(staged, ns=times) if times else os.utime(staged)
        elif self._open_writer(path) is None and self.lookup(path) is None:
            raise NotFound(path)

    def chmod_or_chown(self, path: str) -> None:
        """Accepted and ignored on staged files (``cp -a``, rsync); refused on imported ones."""
        if self._staged_stat(path) is None and self._open_writer(path) is None:
            if self.lookup(path) is None:
                raise NotFound(path)
            raise NotPermitted(f"{path}: imported files keep their mode")

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

    # ---- import bookkeeping ----------------------------------------------------------

    def importing(self, paths: Sequence[str]) -> None:
        """The queue's batch now importing (empty: none): changes to them are EBUSY."""
        self._importing = set(paths)

    def imported(self, batch: Batch) -> None:
        """Re-list the batch's dataset so imported files show from the project itself, as
        they are there now (the source and the sizes learnt from it forget old content)."""
        self.source.changed()
        self._sizes.clear()
        with self._lock:
            node = self.lookup("/" + "/datasets/".join(batch.dataset)) if batch.dataset else None
            if isinstance(node, DirNode):
                node.children = None
            else:  # meta.json, or a dataset the project did not have before
                self._root.children = None

    # ---- validation before import --------------------------------------------------

    def validate(self, path: str, staged_file: str) -> str | None:
        """Why ``path`` cannot be imported as staged, or None."""
        if path == "/meta.json":
            return _json_problem(staged_file, "classes")
        where = dataset_of(path)
        if where is None:
            return "not a dataset image or annotation"
        dataset, kind, name = where
        if kind == "img":
            from blobfs.blob.images import image_size_of_file

            try:
                image_size_of_file(staged_file, name)
            except InvalidInput as exc:
                return str(exc)
            return None
        problem = _json_problem(staged_file, "objects")
        if problem:
            return problem
        image = name[: -len(".json")]
        img_path = "/" + "/datasets/".join(dataset) + f"/img/{image}"
        if self._staged_stat(img_path) is None and not self._in_base(img_path):
            return f"no image named {image!r} in the dataset"
        return self._class_problem(staged_file)

    def _class_problem(self, staged_file: str) -> str | None:
        meta_bytes = (
            self.spool.staged_path("/meta.json").read_bytes()
            if self._staged_stat("/meta.json")
            else self.source.meta_json()
        )
        try:
            meta = json.loads(meta_bytes or b"{}")
            known = {c.get("title") for c in meta.get("classes", []) if isinstance(c, dict)}
            with open(staged_file, "rb") as f:
                ann = json.load(f)
            used = {o.get("classTitle") for o in ann.get("objects", []) if isinstance(o, dict)}
        except (ValueError, AttributeError) as exc:
            return f"cannot read classes: {exc}"
        unknown = sorted(str(u) for u in used - known)
        if unknown:
            return f"unknown classes {unknown} (add them to meta.json)"
        try:
            to_subpixel(ann)  # the conversion a remote import applies: refuse what it cannot
        except AnnotationFormatError as exc:
            return f"bad geometry: {exc}"
        return None


def _json_problem(path: str, required_key: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, OSError) as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get(required_key, []), list):
        return f"not a Supervisely JSON object with a '{required_key}' list"
    return None
