"""The spool: staged files on disk, where the file system itself is the journal.

Layout::

    spool/tmp/<random>               a file being written (lost on crash: never acknowledged)
    spool/staged/<view path>         committed: fsync'd, then renamed into place, dir fsync'd
    spool/staged/<dataset>/          a dataset made with mkdir
    spool/batches/<id>/manifest.json a batch being imported (written atomically)
    spool/batches/<id>/files/<view path>  hard links to the staged files of the batch

A file is acknowledged (``close()``/``fsync()`` returned) only after its rename into
``staged/`` is durable, so a daemon killed at any moment loses nothing acknowledged. A batch
holds hard links, so a file re-written while its batch imports keeps the batch's snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blobfs.blob.pack import fsync_dir, write_atomic

logger = logging.getLogger(__name__)


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
        return asdict(self)


class Spool:
    """Durable staging area for one mount source (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for sub in ("tmp", "staged", "batches"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self.tmp = self.root / "tmp"
        self.staged = self.root / "staged"
        self.staged_str = str(self.staged)
        self._folders: set[str] = set()  # staged folders known to exist (commit's memo)
        self.batches_dir = self.root / "batches"
        self._lock = threading.Lock()
        self._recover()

    def _recover(self) -> None:
        """Drop unacknowledged partial writes; everything else is kept as it is."""
        dropped = 0
        for path in self.tmp.iterdir():
            path.unlink(missing_ok=True)
            dropped += 1
        for path in self.staged.rglob(".*.commit"):
            path.unlink(missing_ok=True)
        if dropped:
            logger.info("spool %s: dropped %d unacknowledged partial writes", self.root, dropped)

    # ---- staging ---------------------------------------------------------------------

    def staged_path(self, view_path: str) -> Path:
        return self.staged / view_path.lstrip("/")

    def new_temp(self) -> tuple[int, str]:
        """An empty private temp file for a new write: ``(fd, path)``."""
        path = str(self.tmp / uuid.uuid4().hex)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, path

    def commit(self, fd: int, tmp_path: str, view_path: str) -> int:
        """Make the temp file the durable staged content of ``view_path``; returns its size.

        The hot path of every durable close: plain strings and a memo of folders known to
        exist keep it to the syscalls that matter (fsync, link, rename, fsync of the folder).
        """
        os.fsync(fd)
        st = os.fstat(fd)
        final = os.path.join(self.staged_str, view_path.lstrip("/"))
        folder = os.path.dirname(final)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        try:
            if os.stat(final).st_ino == st.st_ino:
                return st.st_size  # committed before and written in place since: fsync suffices
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            self._folders.discard(folder)
            raise
        link = os.path.join(folder, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.commit")
        try:
            os.link(tmp_path, link)
        except FileNotFoundError:  # the folder was removed (rmdir) since it was memoized
            self._folders.discard(folder)
            os.makedirs(folder, exist_ok=True)
            os.link(tmp_path, link)
        os.replace(link, final)
        fsync_dir(folder)
        return st.st_size

    def mkdir(self, view_path: str) -> None:
        path = self.staged_path(view_path)
        path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)

    def remove(self, view_path: str) -> None:
        path = self.staged_path(view_path)
        path.unlink()
        fsync_dir(path.parent)

    def rename(self, old: str, new: str) -> None:
        target = self.staged_path(new)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staged_path(old), target)
        fsync_dir(target.parent)
        fsync_dir(self.staged_path(old).parent)

    def walk(self) -> tuple[list[str], list[str]]:
        """All staged files and dirs as view paths (``/ds/img/a.png``), dirs first."""
        files: list[str] = []
        dirs: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.staged):
            rel = os.path.relpath(dirpath, self.staged)
            prefix = "" if rel == "." else "/" + rel
            dirs.extend(f"{prefix}/{d}" for d in dirnames)
            files.extend(f"{prefix}/{f}" for f in filenames if not f.endswith(".commit"))
        return files, dirs

    # ---- batches ---------------------------------------------------------------------

    def create_batch(self, batch: Batch) -> Batch:
        """Link the batch's files into its folder and write its manifest, durably."""
        folder = self.batches_dir / batch.id
        (folder / "files").mkdir(parents=True, exist_ok=True)
        for view_path in batch.files:
            link = folder / "files" / view_path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.link(self.staged_path(view_path), link)
        self.save_batch(batch)
        return batch

    def save_batch(self, batch: Batch) -> None:
        folder = self.batches_dir / batch.id
        write_atomic(folder / "manifest.json", json.dumps(batch.to_json()).encode())
        fsync_dir(folder)

    def batch_file(self, batch: Batch, view_path: str) -> Path:
        return self.batches_dir / batch.id / "files" / view_path.lstrip("/")

    def open_batches(self) -> list[Batch]:
        """Batches left by an earlier run (oldest first), to be finished before new ones."""
        out = []
        for folder in sorted(self.batches_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            manifest = folder / "manifest.json"
            if not manifest.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # crashed before its manifest
                continue
            out.append(Batch(**json.loads(manifest.read_bytes())))
        return out

    def finish_batch(self, batch: Batch) -> list[str]:
        """Drop the staged files the batch imported (unless re-written since); returns them."""
        done = []
        for view_path in batch.files:
            staged, link = self.staged_path(view_path), self.batch_file(batch, view_path)
            try:
                if staged.stat().st_ino == link.stat().st_ino:
                    staged.unlink()
                    done.append(view_path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.batches_dir / batch.id, ignore_errors=True)
        fsync_dir(self.batches_dir)
        return done
