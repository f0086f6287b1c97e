"""A Supervisely project folder on local disk, blob images included.

Layout read (the SDK's ``project/project.py``)::

    project/meta.json
    project/blob/<stem>.tar
    project/<dataset>/<stem>_offsets.pkl      -> images inside blob/<stem>.tar
    project/<dataset>/img/<name>              ordinary images
    project/<dataset>/ann/<name>.json
    project/<dataset>/img_info/*.json, meta/*.json   passed through
    project/<dataset>/datasets/<child>/...    nested datasets

Blob images are served through the shared :class:`BlockCache` by ``os.pread`` on the tar;
small plain files are read directly (the kernel page cache already does their caching).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blobfs.blob.index import (
    OFFSETS_SUFFIX,
    Problem,
    name_problem,
    read_offsets_file,
    reject_conflicts,
)
from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.errors import NotFound
from blobfs.model import BlobMember, BlobRef, DatasetRecord, FileRecord
from blobfs.sources.base import Source
from blobfs.sources.readers import FailingReader, SliceReader
from blobfs.transport.base import RangeReader
from blobfs.transport.local import FileRangeReader

logger = logging.getLogger(__name__)

BLOB_DIR = "blob"
DATASETS_DIR = "datasets"
PASS_THROUGH_DIRS = ("img_info", "meta")
#: Folder names that are never datasets (the SDK's ``Dataset.ignorable_dirs``).
NOT_DATASETS = frozenset({"img", "ann", "img_info", "seg", "meta", "datasets", "blob"})


@dataclass(frozen=True)
class _Blob:
    cached: CachedBlob | None
    path: Path
    problem: str | None
    mtime_ns: int = 0


def _regular_files(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _note_refused(refused: dict[str, str], problems: list[Problem]) -> None:
    for problem in problems:
        refused.setdefault(f"img/{problem.name}", problem.reason)


class LocalProjectSource(Source):
    """Serve a project folder; listings are read once per dataset (the folder is immutable)."""

    def __init__(self, project_dir: str | os.PathLike[str], cache: BlockCache) -> None:
        self.root = Path(project_dir)
        if not self.root.is_dir():
            raise NotFound(f"project folder {self.root} does not exist")
        self.cache = cache
        self._blobs: dict[str, _Blob] = {}
        self._problems: list[str] = []
        self._refused: dict[tuple[str, ...], dict[str, str]] = {}
        self._lock = threading.Lock()

    # ---- Source API ------------------------------------------------------------------

    def meta_json(self) -> bytes | None:
        try:
            return (self.root / "meta.json").read_bytes()
        except FileNotFoundError:
            self._note(f"{self.root}: meta.json is missing")
            return None
        except OSError as exc:
            self._note(f"{self.root}/meta.json: {exc.strerror}")
            return None

    def datasets(self) -> Sequence[DatasetRecord]:
        found: list[DatasetRecord] = []
        self._walk_datasets(self.root, (), found, top=True)
        return found

    def files(self, dataset: DatasetRecord) -> Sequence[FileRecord]:
        folder = self._folder(dataset)
        records: dict[str, FileRecord] = {}
        conflicts: set[str] = set()
        refused: dict[str, str] = {}
        for rec in self._blob_images(folder, refused):
            records[rec.relpath] = rec
        for entry in _regular_files(folder / "img"):
            self._add(records, conflicts, self._plain("img", entry), folder)
        for entry in _regular_files(folder / "ann"):
            if entry.name.endswith(".json"):
                self._add(records, conflicts, self._plain("ann", entry), folder)
        for sub in PASS_THROUGH_DIRS:
            for entry in _regular_files(folder / sub):
                self._add(records, conflicts, self._plain(sub, entry), folder)
        for path in conflicts:
            records.pop(path, None)
            refused[path] = "both a blob image and a file in img/"
        with self._lock:
            self._refused[dataset.path] = refused
        return list(records.values())

    def open(self, record: FileRecord) -> RangeReader:
        ref = record.ref
        if isinstance(ref, BlobRef):
            blob = self._blobs[ref.blob_key]
            if blob.cached is None or blob.problem:
                return FailingReader(blob.problem or f"blob {blob.path} unusable")
            return SliceReader(self.cache, blob.cached, ref)
        assert isinstance(ref, str)
        return FileRangeReader(ref)

    def problems(self) -> list[str]:
        with self._lock:
            return list(self._problems)

    def refused(self, dataset: tuple[str, ...], relpath: str) -> str | None:
        with self._lock:
            return self._refused.get(dataset, {}).get(relpath)

    def stats(self) -> dict[str, object]:
        return {"cache": self.cache.stats.as_dict(), "cache_bytes": self.cache.used_bytes}

    def close(self) -> None:
        for blob in self._blobs.values():
            if blob.cached is not None:
                reader = blob.cached.reader
                if isinstance(reader, FileRangeReader):
                    reader.close()

    # ---- helpers ---------------------------------------------------------------------

    def _note(self, problem: str) -> None:
        logger.warning("%s", problem)
        with self._lock:
            self._problems.append(problem)

    def _folder(self, dataset: DatasetRecord) -> Path:
        assert isinstance(dataset.key, str)
        return Path(dataset.key)

    def _walk_datasets(
        self, folder: Path, parents: tuple[str, ...], found: list[DatasetRecord], top: bool
    ) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._note(f"{folder}: {exc.strerror}")
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
                continue
            if top and entry.name == BLOB_DIR:
                continue
            if entry.name in NOT_DATASETS or name_problem(entry.name):
                continue
            path = (*parents, entry.name)
            found.append(DatasetRecord(path, entry.path, entry.stat().st_mtime_ns))
            self._walk_datasets(Path(entry.path) / DATASETS_DIR, path, found, top=False)

    def _plain(self, sub: str, entry: os.DirEntry[str]) -> FileRecord:
        st = entry.stat(follow_symlinks=False)
        return FileRecord(f"{sub}/{entry.name}", st.st_size, st.st_mtime_ns, entry.path)

    def _add(
        self, records: dict[str, FileRecord], conflicts: set[str], rec: FileRecord, folder: Path
    ) -> None:
        if rec.relpath in records:
            conflicts.add(rec.relpath)
            self._note(
                f"{folder}: {rec.relpath} is both a blob image and a file in img/; "
                "neither is served"
            )
        else:
            records[rec.relpath] = rec

    def _blob_images(self, folder: Path, refused: dict[str, str]) -> list[FileRecord]:
        """The dataset's served blob images; names left out go into ``refused``."""
        for link in folder.glob(f"*{OFFSETS_SUFFIX}"):
            if link.is_symlink():  # could point anywhere on the machine: never followed
                self._note(f"{link}: offsets file is a symlink; not read")
        members: list[tuple[BlobMember, str]] = []
        for entry in sorted(_regular_files(folder), key=lambda e: e.name):
            if not entry.name.endswith(OFFSETS_SUFFIX):
                continue
            stem = entry.name[: -len(OFFSETS_SUFFIX)]
            blob = self._blob(stem)
            blob_size = blob.cached.size if blob.cached is not None else None
            index = read_offsets_file(entry.path, None)
            _note_refused(refused, index.problems)
            for problem in index.problems:
                self._note(str(problem))
            if blob.problem and index.members:
                self._note(f"{entry.path}: {len(index.members)} images unreadable: {blob.problem}")
            elif blob_size is not None:
                past = [m for m in index.members if m.end > blob_size]
                if past:
                    self._note(
                        f"{entry.path}: {len(past)} images end past the blob "
                        f"({blob_size} bytes; truncated?), reads of them fail"
                    )
            members.extend((m, stem) for m in index.members)
        clean = reject_conflicts([m for m, _ in members], str(folder), check_overlaps=False)
        _note_refused(refused, clean.problems)
        for problem in clean.problems:
            self._note(str(problem))
        keep = set(clean.members)
        out: list[FileRecord] = []
        for m, stem in members:
            if m in keep:
                blob = self._blobs[stem]
                version = blob.cached.version if blob.cached else ""
                out.append(
                    FileRecord(
                        f"img/{m.name}",
                        m.size,
                        blob.mtime_ns,
                        BlobRef(stem, version, m.start, m.end),
                    )
                )
        return out

    def _blob(self, stem: str) -> _Blob:
        with self._lock:
            known = self._blobs.get(stem)
        if known is not None:
            return known
        path = self.root / BLOB_DIR / f"{stem}.tar"
        try:
            st = path.stat()
        except OSError as exc:
            blob = _Blob(None, path, f"blob {path}: {exc.strerror}")
        else:
            if not stat.S_ISREG(st.st_mode):
                blob = _Blob(None, path, f"blob {path} is not a regular file")
            else:
                version = f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
                blob = _Blob(
                    CachedBlob(stem, version, st.st_size, FileRangeReader(str(path))),
                    path,
                    None,
                    st.st_mtime_ns,
                )
        with self._lock:
            return self._blobs.setdefault(stem, blob)
