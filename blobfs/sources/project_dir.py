"""A Supervisely project folder on local disk, blob images included.

Layout read (the SDK's ``project/project.py``)::

    project/meta.json
    project/blob/<stem>.tar
    project/<dataset>/<stem>_offsets.pkl      -> images inside blob/<stem>.tar
    project/<dataset>/img/<name>              ordinary images
    project/<dataset>/ann/<name>.json
    project/<dataset>/img_info/*.json, meta/*.json   passed through
    project/<dataset>/datasets/<child>/...    nested datasets

Blob images are read with one ``os.pread`` of exactly their range of the tar, through a
bounded pool of descriptors; no block cache (the kernel's page cache already caches the
tar). Plain files are read directly.

Each folder of a dataset is indexed on first use into a compact table
(:mod:`blobfs.sources.compact`); the blob part of ``img/`` is kept in the index cache
(:mod:`blobfs.cache.index_store`) keyed by the identity of every offsets file and tar it
came from, so a remount of an unchanged project reads no pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import stat
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from blobfs.blob.index import OFFSETS_SUFFIX, name_problem, read_offsets_file, reject_conflicts
from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.cache.index_store import IndexStore
from blobfs.errors import NotFound
from blobfs.model import BlobMember, BlobRef, DatasetRecord, FileRecord
from blobfs.sources.base import FolderLoaders, Source
from blobfs.sources.compact import (
    BLOB,
    FOLDER,
    EntrySource,
    FileTable,
    TableBuilder,
    building,
    encode_name,
)
from blobfs.sources.readers import FailingReader, PreadReader
from blobfs.transport.base import RangeReader
from blobfs.transport.local import FdPool, FileRangeReader, open_regular

logger = logging.getLogger(__name__)

BLOB_DIR = "blob"
DATASETS_DIR = "datasets"
PASS_THROUGH_DIRS = ("img_info", "meta")
#: Folder names that are never datasets (the SDK's ``Dataset.ignorable_dirs``).
NOT_DATASETS = frozenset({"img", "ann", "img_info", "seg", "meta", "datasets", "blob"})
#: Refused-entry messages kept with a cached index (replayed at each mount).
MAX_CACHED_PROBLEMS = 10_000
_PROBLEMS_LEN = struct.Struct("<I")


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


class LocalProjectSource(Source):
    """Serve a project folder; listings are read once per dataset (the folder is immutable)."""

    def __init__(
        self,
        project_dir: str | os.PathLike[str],
        cache: BlockCache,
        index_store: IndexStore | None = None,
        opener: Callable[[str], int] = open_regular,
    ) -> None:
        self.root = Path(project_dir)
        if not self.root.is_dir():
            raise NotFound(f"project folder {self.root} does not exist")
        self.cache = cache
        self.index_store = index_store
        self._pool = FdPool(opener)
        self._blobs: dict[str, _Blob] = {}
        self._problems: list[str] = []
        self._lock = threading.Lock()
        self._capture = threading.local()  # problems noted while a cached index is built
        self._tables: weakref.WeakSet[FileTable] = weakref.WeakSet()
        self.index_builds = 0

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
        for rec in self._blob_images(folder):
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
        return list(records.values())

    def open(self, record: FileRecord) -> RangeReader:
        ref = record.ref
        if isinstance(ref, BlobRef):
            blob = self._blobs[ref.blob_key]
            if blob.cached is None or blob.problem:
                return FailingReader(blob.problem or f"blob {blob.path} unusable")
            return PreadReader(self._pool, str(blob.path), ref)
        assert isinstance(ref, str)
        return FileRangeReader(ref)

    def problems(self) -> list[str]:
        with self._lock:
            return list(self._problems)

    def stats(self) -> dict[str, object]:
        tables = list(self._tables)
        return {
            "blob_reads": self._pool.stats(),
            "index": {
                "folders": len(tables),
                "entries": sum(len(t) for t in tables),
                "bytes": sum(t.nbytes for t in tables),
                "builds": self.index_builds,
                "cache": self.index_store.stats() if self.index_store else None,
            },
        }

    def close(self) -> None:
        self._pool.close()

    # ---- helpers ---------------------------------------------------------------------

    def _note(self, problem: str) -> None:
        logger.warning("%s", problem)
        with self._lock:
            self._problems.append(problem)
        sink: list[str] | None = getattr(self._capture, "notes", None)
        if sink is not None:
            sink.append(problem)

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

    def _blob_images(self, folder: Path) -> list[FileRecord]:
        out: list[FileRecord] = []
        for m, stem in self._blob_members(folder):
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

    def _blob_members(self, folder: Path) -> list[tuple[BlobMember, str]]:
        """Every blob image of ``folder`` that is served, with its blob's stem."""
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
        for problem in clean.problems:
            self._note(str(problem))
        keep = {id(m) for m in clean.members}  # the objects themselves: no hashing
        return [(m, stem) for m, stem in members if id(m) in keep]

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

    # ---- compact listings (the view's path; ``files`` stays for ``check``) -----------

    def listing(self, dataset: DatasetRecord) -> FolderLoaders:
        folder = self._folder(dataset)
        loaders: FolderLoaders = {
            "img": lambda: self._img_table(folder),
            "ann": lambda: self._plain_table(folder, "ann", ".json"),
        }
        for sub in PASS_THROUGH_DIRS:
            if _is_real_dir(folder / sub):
                loaders[sub] = functools.partial(self._plain_table, folder, sub)
        return loaders

    def _plain_table(self, folder: Path, sub: str, suffix: str = "") -> FileTable:
        """A folder of ordinary files: names only (sizes come from ``lstat`` at lookup)."""
        builder = TableBuilder(f"{sub}/")
        self._add_plain(builder, folder / sub, suffix)
        table, _ = builder.build()  # names in one folder are distinct
        self._tables.add(table)
        return table

    def _add_plain(self, builder: TableBuilder, path: Path, suffix: str = "") -> None:
        src = builder.source(EntrySource(FOLDER, str(path)))
        for entry in _regular_files(path):
            if entry.name.endswith(suffix):
                builder.add(encode_name(entry.name), src)

    def _img_table(self, folder: Path) -> FileTable:
        """Blob images (from the index cache when it is current) and plain ``img/`` files."""
        blobs = self._blob_table(folder)
        builder = TableBuilder("img/")
        self._add_plain(builder, folder / "img")
        if not len(builder):
            self._tables.add(blobs)
            return blobs
        builder.add_table(blobs)
        table, both = builder.build()
        for name in both:
            self._note(
                f"{folder}: img/{name} is both a blob image and a file in img/; neither is served"
            )
        self._tables.add(table)
        return table

    def _blob_table(self, folder: Path) -> FileTable:
        key = self._index_key(folder)
        store = self.index_store
        if store is not None:
            cached = _unpack_index(store.load(str(folder), key))
            if cached is not None:
                table, problems = cached
                for problem in problems:
                    self._note(problem)
                return table
        notes: list[str] = []
        with building():
            self._capture.notes = notes
            try:
                members = self._blob_members(folder)
            finally:
                self._capture.notes = None
            builder = TableBuilder("img/")
            sources: dict[str, int] = {}
            for m, stem in members:
                src = sources.get(stem)
                if src is None:
                    blob = self._blobs[stem]
                    version = blob.cached.version if blob.cached else ""
                    src = builder.source(EntrySource(BLOB, stem, version, blob.mtime_ns))
                    sources[stem] = src
                builder.add(encode_name(m.name), src, m.start, m.end - m.start)
            del members
            table, _ = builder.build()  # names were de-duplicated by reject_conflicts
            del builder
        self.index_builds += 1
        if store is not None:
            store.save(str(folder), key, _pack_index(table, notes))
        return table

    def _index_key(self, folder: Path) -> bytes:
        """What a cached index of ``folder`` must have been built from to be current: every
        offsets file's and tar's identity, and the code that decided the entries."""
        files = []
        tars = []
        for entry in sorted(_regular_files(folder), key=lambda e: e.name):
            if not entry.name.endswith(OFFSETS_SUFFIX):
                continue
            st = entry.stat(follow_symlinks=False)
            files.append([entry.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
            stem = entry.name[: -len(OFFSETS_SUFFIX)]
            blob = self._blob(stem)
            tars.append([stem, _identity(blob.path), blob.problem])
        return json.dumps([_rules_digest(), str(folder), files, tars]).encode()


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _identity(path: Path) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode]


@functools.cache
def _rules_digest() -> str:
    """A digest of the code that decides which entries are served: a cached index built by
    other rules (another blobfs version, a fixed validation) is never used."""
    from blobfs import __version__
    from blobfs.blob import index
    from blobfs.sources import compact

    h = hashlib.sha256(__version__.encode())
    for module in (index, compact):
        h.update(Path(module.__file__ or "").read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def _pack_index(table: FileTable, problems: list[str]) -> bytes:
    kept = problems[:MAX_CACHED_PROBLEMS]
    if len(problems) > len(kept):
        kept.append(f"... and {len(problems) - len(kept)} more problems (blobfs check lists all)")
    text = json.dumps(kept).encode("utf-8", "surrogateescape")
    return _PROBLEMS_LEN.pack(len(text)) + text + table.to_bytes()


def _unpack_index(payload: bytes | None) -> tuple[FileTable, list[str]] | None:
    """A cached (table, problems), or None when absent or not well-formed."""
    if payload is None or len(payload) < _PROBLEMS_LEN.size:
        return None
    (size,) = _PROBLEMS_LEN.unpack_from(payload)
    at = _PROBLEMS_LEN.size + size
    try:
        problems = json.loads(payload[_PROBLEMS_LEN.size : at])
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise ValueError("problems are not a list of strings")
        table = FileTable.from_bytes(payload[at:])
    except ValueError as exc:
        logger.info("index cache entry not usable (%s); rebuilding it", exc)
        return None
    if table.prefix != "img/" or any(s.kind != BLOB for s in table.sources):
        return None
    return table, problems
