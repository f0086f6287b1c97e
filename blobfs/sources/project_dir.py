"""A Supervisely project folder on local disk, blob images included.

Layout read (the SDK's ``project/project.py``)::

    project/meta.json
    project/blob/<stem>.tar
    project/<dataset>/<stem>_offsets.pkl      -> images inside blob/<stem>.tar
    project/<dataset>/img/<name>              ordinary images
    project/<dataset>/ann/<name>.json
    project/<dataset>/img_info/*.json, meta/*.json   passed through
    project/<dataset>/datasets/<child>/...    nested datasets

Blob images are read with one ``pread`` of exactly their range of the tar, through a
bounded pool of descriptors; no block cache (the kernel's page cache already caches the
tar). Plain files are read directly.

Each folder of a dataset is indexed on first use into a compact table
(:mod:`blobfs.sources.compact`); the blob part of ``img/`` is kept in the index cache
(:mod:`blobfs.cache.index_store`) keyed by the identity of every offsets file and tar it
came from, so a remount of an unchanged project reads no pickle. An ordinary folder's names
(``ann/``) are kept there too, keyed by the folder's own identity (inode, mtime, ctime:
any name added, removed or renamed changes them), so that a remount lists none of its
folders again. Everything is opened
through :class:`ProjectRoot`, so no symlink of the project is ever followed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import os
import stat
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, groupby, islice, repeat
from pathlib import Path
from typing import Any, TypeVar, assert_never

from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.cache.index_store import IndexStore
from blobfs.cache.meta import LockedLru
from blobfs.errors import BlobfsError, CorruptData, NotFound
from blobfs.format.offsets import (
    FILE_REFUSED,
    OFFSETS_SUFFIX,
    OffsetsColumns,
    conflicting,
    find_entry,
    parse_offsets_columns,
    ranges_overlap,
    reject_conflicts,
)
from blobfs.format.tarhead import BLOCK, FIELDS_END, TAIL, fields_problem, member_problem
from blobfs.layout import name_problem
from blobfs.model import (
    AnnRef,
    BlobMember,
    BlobRef,
    BytesRef,
    DatasetRecord,
    FileRecord,
    LocalFileRef,
    RemoteImageRef,
)
from blobfs.problems import Problems, show
from blobfs.safe_open import (
    MAX_META_JSON_BYTES,
    MAX_OFFSETS_FILE_BYTES,
    DirItem,
    ProjectFileReader,
    ProjectRoot,
    UnsafeFile,
    describe,
)
from blobfs.sources.base import FolderLoaders, PeekingLoader, Source
from blobfs.sources.compact import (
    BLOB,
    FOLDER,
    EntrySource,
    FileTable,
    TableBuilder,
    building,
    pace,
    sorted_table,
)
from blobfs.sources.index_worker import IndexWorker, Job
from blobfs.sources.readers import BytesReader, FailingReader, PreadReader
from blobfs.transport.base import RangeReader
from blobfs.transport.local import FdPool

logger = logging.getLogger(__name__)

BLOB_DIR = "blob"
DATASETS_DIR = "datasets"
PASS_THROUGH_DIRS = ("img_info", "meta")
#: Folder names that are never datasets (the SDK's ``Dataset.ignorable_dirs``).
NOT_DATASETS = frozenset({"img", "ann", "img_info", "seg", "meta", "datasets", "blob"})
#: Verdicts of the tar on entries already read (bounded; a forgotten one is asked again).
VERDICTS_KEPT = 65_536
NOT_A_MEMBER = "entry is not a member of the tar"
_PAYLOAD_LEN = struct.Struct("<I")
#: Names of an ordinary folder added between two chances for a background build to pause.
PACE_EVERY = 8192
#: An ordinary folder's names are cached only when its last change is at least this much
#: older than the listing: a change in the same tick of the file system's clock as the
#: last one would leave the folder's mtime as it was, and the cache current in name only.
PLAIN_SETTLED_NS = 2_000_000_000
_T = TypeVar("_T")


#: What quick lookups keep of one dataset: (its key and its offsets files' names, inodes,
#: sizes and mtimes), their stems, their bytes.
_QuickKept = tuple[tuple[str, tuple[tuple[str, int, int, int], ...]], list[str], list[bytes]]


@dataclass(frozen=True)
class _Blob:
    cached: CachedBlob | None
    path: str  # for messages
    problem: str | None
    mtime_ns: int = 0
    rel: str = ""  # inside the project: what the descriptor pool opens


@dataclass
class _Entries:
    """A dataset's blob images as columns (the i-th name, start and end make one entry),
    and ``runs``: which blob holds them, as ``(stem, count)`` of consecutive entries.
    A quarter of a million entries cost three lists, not an object each."""

    names: list[str]
    starts: list[int]
    ends: list[int]
    runs: list[tuple[str, int]]
    #: whether the names are strictly ascending, once :meth:`in_doubt` has found out
    ordered: bool | None = None

    @classmethod
    def of(cls, pairs: Sequence[tuple[BlobMember, str]]) -> _Entries:
        runs = [(stem, sum(1 for _ in group)) for stem, group in groupby(map(_SECOND, pairs))]
        members = list(map(_FIRST, pairs))
        names, starts, ends = (list(map(f, members)) for f in (_NAME, _START, _END))
        return cls(names, starts, ends, runs)

    def members(self) -> list[BlobMember]:
        return list(map(BlobMember, self.names, self.starts, self.ends))

    def per_entry(self, labels: Sequence[_T]) -> list[_T]:
        """``labels`` (one per run) repeated for each entry of its run."""
        return list(chain.from_iterable(map(repeat, labels, map(_SECOND, self.runs))))

    def in_doubt(self) -> bool:
        """Whether a name repeats, or two ranges of one blob overlap (C-level passes):
        only then are entries checked one by one against the tar."""
        names = self.names
        # names strictly in order are distinct: one comparison pass instead of a set
        # of every name (offsets files usually list their names sorted)
        in_order = self.ordered = all(map(operator.lt, names, islice(names, 1, None)))
        if not in_order and len(set(names)) != len(names):
            return True
        by_stem: dict[str, list[range]] = {}
        at = 0
        for stem, count in self.runs:
            by_stem.setdefault(stem, []).append(range(at, at + count))
            at += count
        for spans in by_stem.values():
            if len(spans) == 1:
                lo, hi = spans[0].start, spans[0].stop
                starts, ends = self.starts[lo:hi], self.ends[lo:hi]
            else:
                starts = [self.starts[i] for r in spans for i in r]
                ends = [self.ends[i] for r in spans for i in r]
            if ranges_overlap(starts, ends):
                return True
        return False


class LocalProjectSource(Source):
    """Serve a project folder; listings are read once per dataset (the folder is immutable).

    Everything is opened through :class:`ProjectRoot` (no symlink followed, only regular
    files opened), every problem goes to one :class:`Problems` collector (aggregated log
    lines), and blob entries are checked against the tar's own headers: conflicting ones
    when the dataset is listed, every other one at its first read.
    """

    def __init__(
        self,
        project_dir: str | os.PathLike[str],
        cache: BlockCache,
        index_store: IndexStore | None = None,
    ) -> None:
        super().__init__(logger)
        self.fs = ProjectRoot(project_dir)
        self.root = self.fs.path
        self.cache = cache
        self.index_store = index_store
        self._pool = FdPool(self.fs.open_file)
        self._blobs: dict[str, _Blob] = {}
        # problems noted while a cached index is built go to its own collector first
        self._capture = threading.local()
        self._tables: weakref.WeakSet[FileTable] = weakref.WeakSet()
        self.index_builds = 0
        self.quick_lookups = 0
        # (dataset, offsets files' identities), stems, bytes: see _quick_buffers
        self._quick_kept: _QuickKept | None = None
        self._verdicts: LockedLru[tuple[str, int, int, str], str] = LockedLru(VERDICTS_KEPT)
        # dataset path -> relpath -> why the last listing left out an entry it holds
        self._refused: dict[tuple[str, ...], dict[str, str]] = {}
        self._lock = threading.Lock()
        self._worker: IndexWorker | None = None
        self._begun: set[str] = set()  # datasets whose blob index this process has begun

    # ---- Source API ------------------------------------------------------------------

    def meta_json(self) -> bytes | None:
        with self._problems.listing("meta.json"):
            return self._meta_json()

    def _meta_json(self) -> bytes | None:
        try:
            return self.fs.read_file("meta.json", MAX_META_JSON_BYTES, "meta.json")
        except NotFound:
            self._note(str(self.root), "meta.json is missing")
        except UnsafeFile as exc:
            self._note(self.fs.where("meta.json"), f"not served: {exc.reason}")
        except BlobfsError as exc:
            self._note(self.fs.where("meta.json"), "not served", str(exc))
        return None

    def datasets(self) -> Sequence[DatasetRecord]:
        found: list[DatasetRecord] = []
        with self._problems.listing("datasets"):
            self._walk_datasets((), (), found, top=True)
        return found

    def files(self, dataset: DatasetRecord) -> Sequence[FileRecord]:
        assert isinstance(dataset.key, str)
        refused: dict[str, str] = {}
        with self._problems.listing(("files", dataset.path)):
            records = self._files(dataset.key, refused)
        with self._lock:
            self._refused[dataset.path] = refused
        return records

    def open(self, record: FileRecord) -> RangeReader:
        ref = record.ref
        match ref:
            case BlobRef():
                blob = self._blob(ref.blob_key)  # known from the listing, or (cached index) now
                if blob.cached is None or blob.problem:
                    return FailingReader(blob.problem or f"blob {blob.path} unusable")
                inner = PreadReader(self._pool, blob.rel, ref)
                return _MemberReader(self, blob, ref, record.relpath.rsplit("/", 1)[-1], inner)
            case LocalFileRef():
                return ProjectFileReader(self.fs, ref.path)
            case BytesRef():
                return BytesReader(ref.data)
            case RemoteImageRef() | AnnRef():
                raise self.foreign(record)
            case _:
                assert_never(ref)

    def refused(self, dataset: tuple[str, ...], relpath: str) -> str | None:
        with self._lock:
            return self._refused.get(dataset, {}).get(relpath)

    def stats(self) -> dict[str, object]:
        tables = list(self._tables)
        return {
            "blob_reads": self._pool.stats(),
            "index": {
                "folders": len(tables),
                "entries": sum(len(t) for t in tables),
                "bytes": sum(t.nbytes for t in tables),
                "builds": self.index_builds,
                "quick_lookups": self.quick_lookups,
                "cache": self.index_store.stats() if self.index_store else None,
            },
        }

    def close(self) -> None:
        worker = self._worker
        if worker is not None:
            worker.stop()
        with self._lock:
            readers = [b.cached.reader for b in self._blobs.values() if b.cached is not None]
        for reader in readers:
            reader.close()
        self._pool.close()
        self.fs.close()

    # ---- listing ---------------------------------------------------------------------

    def _sink(self) -> Problems:
        """Where problems go now: the collector of an index being built, else the source's."""
        sink: Problems | None = getattr(self._capture, "sink", None)
        return self._problems if sink is None else sink

    def _note(self, where: str, cause: str, name: str | None = None) -> None:
        self._sink().add(where, cause, name)

    def _list(self, rel: str) -> list[DirItem]:
        """The folder ``rel``, or [] (noted) when it is a symlink or not a folder."""
        try:
            return self.fs.list_dir(rel)
        except BlobfsError as exc:
            self._note(self.fs.where(rel), "folder not read", str(exc))
            return []

    def _refuse_item(self, folder: str, item: DirItem) -> None:
        """Report a listed entry that is not a regular file (one line per folder and kind)."""
        self._note(self.fs.where(folder), f"{describe(item.mode)}; not served", show(item.name))

    def _walk_datasets(
        self, rel: tuple[str, ...], parents: tuple[str, ...], found: list[DatasetRecord], top: bool
    ) -> None:
        for item in sorted(self._list("/".join(rel)), key=lambda e: e.name):
            if item.name.startswith("."):
                continue
            if not item.is_dir:
                if not item.is_file and not (top and item.name == "meta.json"):
                    self._refuse_item("/".join(rel), item)
                continue
            if top and item.name == BLOB_DIR:
                continue
            if item.name in NOT_DATASETS or name_problem(item.name):
                continue
            path = (*parents, item.name)
            here = (*rel, item.name)
            found.append(DatasetRecord(path, "/".join(here), item.mtime_ns))
            sub = {i.name: i for i in self._list("/".join(here))}.get(DATASETS_DIR)
            if sub is not None and sub.is_dir:
                self._walk_datasets((*here, DATASETS_DIR), path, found, top=False)
            elif sub is not None:
                self._refuse_item("/".join(here), sub)

    def _files(self, key: str, refused: dict[str, str]) -> list[FileRecord]:
        """The dataset's served files; entries it holds but refuses go into ``refused``."""
        items = self._list(key)
        records: dict[str, FileRecord] = {}
        conflicts: set[str] = set()
        for rec in self._blob_images(key, items, refused):
            records[rec.relpath] = rec
        by_name = {i.name: i for i in items}
        for sub in ("img", "ann", *PASS_THROUGH_DIRS):
            item = by_name.get(sub)
            if item is None:
                continue
            if not item.is_dir:
                self._refuse_item(key, item)
                continue
            folder = f"{key}/{sub}"
            for entry in self._list(folder):
                if not entry.is_file:
                    self._refuse_item(folder, entry)
                elif sub != "ann" or entry.name.endswith(".json"):
                    ref = LocalFileRef(f"{folder}/{entry.name}")
                    rec = FileRecord(f"{sub}/{entry.name}", entry.size, entry.mtime_ns, ref)
                    self._add(records, conflicts, rec, key)
        for path in conflicts:
            records.pop(path, None)
            refused[path] = "both a blob image and a file in img/"
        return list(records.values())

    def _add(
        self, records: dict[str, FileRecord], conflicts: set[str], rec: FileRecord, key: str
    ) -> None:
        if rec.relpath in records:
            conflicts.add(rec.relpath)
            self._note(
                self.fs.where(key),
                "both a blob image and a file in img/ (neither is served)",
                show(rec.relpath),
            )
        else:
            records[rec.relpath] = rec

    # ---- blob images -----------------------------------------------------------------

    def _read_offsets(self, rel: str) -> OffsetsColumns:
        """One offsets file, validated; any failure refuses this file only."""
        where = self.fs.where(rel)
        try:
            data = self.fs.read_file(rel, MAX_OFFSETS_FILE_BYTES, "offsets file")
            return parse_offsets_columns(data, where)
        except UnsafeFile as exc:
            reason = exc.reason
        except BlobfsError as exc:
            reason = str(exc)
        except Exception as exc:  # never more than this file: see parse_offsets
            reason = f"{type(exc).__name__}"
        columns = OffsetsColumns()
        columns.problems.add(where, FILE_REFUSED, reason[:300])
        return columns

    def _blob_images(
        self, key: str, items: list[DirItem], refused: dict[str, str]
    ) -> list[FileRecord]:
        out: list[FileRecord] = []
        for m, stem in self._blob_members(key, items, refused):
            blob = self._blobs[stem]
            version = blob.cached.version if blob.cached else ""
            out.append(
                FileRecord(
                    f"img/{m.name}", m.size, blob.mtime_ns, BlobRef(stem, version, m.start, m.end)
                )
            )
        return out

    def _blob_members(
        self, key: str, items: list[DirItem], refused: dict[str, str]
    ) -> list[tuple[BlobMember, str]]:
        """Every blob image of the dataset ``key`` that is served, with its blob's stem;
        entries held but refused go into ``refused``."""
        entries = self._blob_entries(key, items, refused)
        stems = entries.per_entry([stem for stem, _ in entries.runs])
        return list(zip(entries.members(), stems, strict=True))

    def _blob_entries(self, key: str, items: list[DirItem], refused: dict[str, str]) -> _Entries:
        """Every blob image of the dataset ``key`` that is served, as columns; entries
        held but refused go into ``refused``."""
        got = _Entries([], [], [], [])
        wheres: list[str] = []  # the offsets file of each run
        for item in sorted(items, key=lambda e: e.name):
            if not item.name.endswith(OFFSETS_SUFFIX):
                continue
            if not item.is_file:  # a symlink could point anywhere on the machine
                self._refuse_item(key, item)
                continue
            stem = item.name[: -len(OFFSETS_SUFFIX)]
            blob = self._blob(stem)
            rel = f"{key}/{item.name}"
            columns = self._read_offsets(rel)
            pace()
            self._sink().merge(columns.problems)
            where = self.fs.where(rel)
            if blob.problem and len(columns):
                self._note(where, f"{len(columns)} images unreadable: {blob.problem}")
            elif blob.cached is not None:
                blob_size = blob.cached.size
                # one C-level pass finds none past the end (the usual case); counted only if any
                ends = columns.ends
                past = sum(map(blob_size.__lt__, ends)) if ends and max(ends) > blob_size else 0
                if past:
                    self._note(
                        where,
                        f"images end past the blob ({blob_size} bytes; truncated?), "
                        "reads of them fail",
                        f"{past} images",
                    )
            got.names += columns.names
            got.starts += columns.starts
            got.ends += columns.ends
            got.runs.append((stem, len(columns)))
            wheres.append(where)
            del columns
        if not got.in_doubt():
            return got  # the common case: no name twice, no ranges overlapping in a blob
        stems = got.per_entry([stem for stem, _ in got.runs])
        found = list(zip(got.members(), stems, got.per_entry(wheres), strict=True))
        kept = self._resolve(found, self.fs.where(key))
        served = {m.name for m, _, _ in kept}
        seen = Counter(got.names)
        for m, _, _ in found:
            if m.name not in served:
                refused[f"img/{m.name}"] = (
                    "name appears more than once" if seen[m.name] > 1 else "range overlaps another"
                )
        return _Entries.of([(m, stem) for m, stem, _ in kept])

    def _resolve(
        self, found: list[tuple[BlobMember, str, str]], where: str
    ) -> list[tuple[BlobMember, str, str]]:
        """Settle duplicates and overlaps by asking the tar, then refuse what stays in doubt.

        Only entries in conflict are checked here (a few, so the listing stays cheap); an
        entry the tar disowns is dropped, and exact repeats of one verified member are one
        file. What still conflicts afterwards (two real members of one name in two blobs,
        or a blob that cannot be read) is refused on both sides, as remote sources do.
        """
        members = list(map(_FIRST, found))
        # each offsets file adds one run of entries of one stem: group by runs (C-level)
        by_stem: dict[str, list[range]] = {}
        at = 0
        for stem, run in groupby(map(_SECOND, found)):
            n = len(list(run))
            by_stem.setdefault(stem, []).append(range(at, at + n))
            at += n
        suspects = set(conflicting(members, check_overlaps=False))
        for runs in by_stem.values():
            idxs: Sequence[int] = runs[0] if len(runs) == 1 else [i for r in runs for i in r]
            group = (
                members[idxs.start : idxs.stop]
                if isinstance(idxs, range)
                else [members[i] for i in idxs]
            )
            bad = conflicting(group, check_overlaps=True)
            suspects.update(idxs[j] for j in bad)
        del members
        if not suspects:
            return found
        drop: set[int] = set()
        verified: set[tuple[BlobMember, str]] = set()
        for i in sorted(suspects):
            m, stem, offsets = found[i]
            verdict = self._verdict(self._blobs[stem], m)
            if verdict is None:
                if (m, stem) in verified:
                    drop.add(i)  # the same member listed twice: one file
                    self._note(offsets, "entry listed more than once (served once)", show(m.name))
                verified.add((m, stem))
            elif verdict != "":
                drop.add(i)
                self._note(offsets, f"{NOT_A_MEMBER}: {verdict}", show(m.name))
        rest = [f for i, f in enumerate(found) if i not in drop]
        # What the tar could not settle falls back to refusing every side.
        clean = reject_conflicts([m for m, _, _ in rest], where, check_overlaps=False)
        names_ok = Counter(m.name for m in clean.members)
        self._sink().merge(clean.problems)
        final: list[tuple[BlobMember, str, str]] = []
        by_stem_rest: dict[str, list[tuple[BlobMember, str, str]]] = {}
        for f in rest:
            if names_ok[f[0].name]:
                by_stem_rest.setdefault(f[1], []).append(f)
        for stem, group in by_stem_rest.items():
            clean = reject_conflicts([m for m, _, _ in group], self._blobs[stem].path)
            self._sink().merge(clean.problems)
            keep = Counter(clean.members)
            final.extend(f for f in group if keep[f[0]])
        return final

    def _verdict(self, blob: _Blob, m: BlobMember, full: bool = True) -> str | None:
        """None: ``m`` is a member of the tar; a reason when it is not; "" when unknown.

        ``full`` reads the whole header (its checksum settles conflicts, which are few);
        otherwise only the fields the check needs are read (a first read of an image that
        is often smaller than a header: see :func:`fields_problem`).
        """
        if blob.cached is None:
            return ""
        key = (blob.cached.key, m.start, m.end, m.name)
        known = self._verdicts.get(key)
        if known is not None:
            return known or None
        if m.start < BLOCK:
            verdict = member_problem(b"", m)
        else:
            at = m.start - BLOCK
            try:
                if full:
                    verdict = member_problem(self._pool.pread(blob.rel, at, m.start), m)
                else:
                    head = self._pool.pread(blob.rel, at, at + FIELDS_END)
                    tail = functools.partial(self._pool.pread, blob.rel, at + TAIL[0], at + TAIL[1])
                    verdict = fields_problem(head, m, tail)
            except (BlobfsError, OSError):
                return ""  # the blob itself is unreadable; reads will say so
        self._verdicts.put(key, verdict or "")
        return verdict

    def blob_problem(self, stem: str) -> str | None:
        """Why the blob ``stem`` cannot be read (None when it can, or is not known)."""
        blob = self._blobs.get(stem)
        return blob.problem if blob is not None else None

    def check_member(self, blob: _Blob, ref: BlobRef, name: str) -> None:
        """Raise (EIO, logged once aggregated) when the tar disowns this entry."""
        m = BlobMember(name, ref.start, ref.end)
        verdict = self._verdict(blob, m, full=False)
        if verdict:
            self._note(blob.path, f"{NOT_A_MEMBER}: {verdict}", show(name))
            err = CorruptData(f"{blob.path}: {show(name)} [{ref.start}, {ref.end}): {verdict}")
            err.reported = True  # type: ignore[attr-defined]  # logged above, aggregated
            raise err

    def _blob(self, stem: str) -> _Blob:
        with self._lock:
            known = self._blobs.get(stem)
        if known is not None:
            return known
        rel = f"{BLOB_DIR}/{stem}.tar"
        path = self.fs.where(rel)
        try:
            st = self.fs.lstat(rel)
        except BlobfsError as exc:
            blob = _Blob(None, path, f"blob {path}: {exc}")
        except OSError as exc:
            blob = _Blob(None, path, f"blob {path}: {exc.strerror}")
        else:
            if st is None:
                blob = _Blob(None, path, f"blob {path} is missing")
            elif not stat.S_ISREG(st.st_mode):
                blob = _Blob(None, path, f"blob {path} is {describe(st.st_mode)}")
            else:
                version = f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
                blob = _Blob(
                    CachedBlob(stem, version, st.st_size, ProjectFileReader(self.fs, rel)),
                    path,
                    None,
                    st.st_mtime_ns,
                    rel,
                )
        with self._lock:
            return self._blobs.setdefault(stem, blob)

    # ---- compact listings (the view's path; ``files`` stays for ``check``) -----------

    def listing(self, dataset: DatasetRecord) -> FolderLoaders:
        assert isinstance(dataset.key, str)
        key = dataset.key
        loaders: FolderLoaders = {
            "img": PeekingLoader(
                lambda: self._listed(self._img_table, dataset),
                functools.partial(self._quick_image, dataset),
            ),
        }
        for rel, sub, suffix in self._plain_folders(key):
            loaders[sub] = functools.partial(self._listed, self._plain_table, rel, sub, suffix)
        return loaders

    def _plain_folders(self, key: str) -> list[tuple[str, str, str]]:
        """``(folder, its name in the view, the suffix of its files)`` of each ordinary
        folder of dataset ``key``: ``ann/`` always, the pass-through ones where present."""
        folders = [(f"{key}/ann", "ann", ".json")]
        for sub in PASS_THROUGH_DIRS:
            st = self.fs.lstat(f"{key}/{sub}")
            if st is not None and stat.S_ISDIR(st.st_mode):
                folders.append((f"{key}/{sub}", sub, ""))
        return folders

    def _quick_image(self, dataset: DatasetRecord, name: str) -> FileRecord | None:
        """The record of blob image ``name`` of ``dataset`` before the folder's index is
        built, for a ``stat`` right after the mount; None when in doubt (the caller then
        waits for the index).

        Answered only for an entry that :func:`find_entry` finds alone in the dataset's
        offsets files, with no file of that name in ``img/``, within its blob, and that
        the tar's full header says is that member. Bytes are never served from it: a read
        looks the name up in the built index, so a name that the whole folder's checks
        refuse (a later batch spoiling its file) fails there, with no wrong bytes. Asked
        also when the index cache holds the folder: finding one name in the offsets files
        is quicker than loading and checking the whole cached table, which waits for the
        first read or listing.
        """
        assert isinstance(dataset.key, str)
        key = dataset.key
        try:
            if self.fs.lstat(f"{key}/img/{name}") is not None:
                return None  # both a blob image and a file: refused, the index says so
            stems, files = self._quick_buffers(key)
        except (BlobfsError, OSError):
            return None
        found = find_entry(files, name)
        if found is None:
            return None
        which, start, end = found
        blob = self._blob(stems[which])
        if blob.cached is None or blob.problem or end > blob.cached.size:
            return None
        if self._verdict(blob, BlobMember(name, start, end), full=True) is not None:
            return None
        self.quick_lookups += 1
        ref = BlobRef(stems[which], blob.cached.version, start, end)
        return FileRecord(f"img/{name}", end - start, blob.mtime_ns, ref)

    def _quick_buffers(self, key: str) -> tuple[list[str], list[bytes]]:
        """The stems and bytes of the offsets files of dataset ``key``, for quick lookups.

        A burst of ``stat`` calls before the folder's index is built would otherwise read
        every offsets file of the dataset again for each one; the last dataset's files are
        kept (one dataset's at most, so memory stays bounded), while their names, inodes,
        sizes and mtimes are unchanged, and dropped once the folder's index is built.
        """
        items = sorted(
            (i for i in self._list(key) if i.name.endswith(OFFSETS_SUFFIX) and i.is_file),
            key=lambda e: e.name,
        )
        identity = (key, tuple((i.name, i.ino, i.size, i.mtime_ns) for i in items))
        kept = self._quick_kept
        if kept is not None and kept[0] == identity:
            return kept[1], kept[2]
        stems: list[str] = []
        files: list[bytes] = []
        for item in items:
            data = self._whole(f"{key}/{item.name}")
            if data is not None:
                files.append(data)
                stems.append(item.name[: -len(OFFSETS_SUFFIX)])
        self._quick_kept = (identity, stems, files)
        return stems, files

    def _whole(self, rel: str) -> bytes | None:
        """The bytes of the offsets file ``rel``, read in one copy (None when empty or
        too large). Not a memory map: a file truncated under a map kills the process."""
        fd = self.fs.open_file(rel)
        try:
            size = os.fstat(fd).st_size
            if not 0 < size <= MAX_OFFSETS_FILE_BYTES:
                return None
            parts, got = [], 0
            while got < size:
                part = os.read(fd, size - got)  # no zero-filled buffer to copy into
                if not part:
                    return None  # shrank while read: the index decides
                parts.append(part)
                got += len(part)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            os.close(fd)

    def _listed(self, build: Any, *args: Any) -> FileTable:
        """``build(*args)`` with its problems logged once it is done (one line each); a
        folder listed again (after an import) logs only what is new."""
        scope = (build.__name__, *(a.path if isinstance(a, DatasetRecord) else a for a in args))
        with self._problems.listing(scope):
            table: FileTable = build(*args)
        self._tables.add(table)
        return table

    def _lstat(self, rel: str) -> os.stat_result:
        """``lstat`` of a plain file at lookup, reached without following any symlink."""
        st = self.fs.lstat(rel)
        if st is None:
            raise FileNotFoundError(rel)
        return st

    def _plain_table(self, rel: str, sub: str, suffix: str = "") -> FileTable:
        """A folder of ordinary files: names only (sizes come from ``lstat`` at lookup),
        from the index cache while the folder is unchanged."""
        store = self.index_store
        st = self._folder_stat(rel) if store is not None else None
        key = b""
        if store is not None and st is not None:
            identity = [os.stat(self.root).st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
            key = json.dumps([_rules_digest(), "plain", rel, sub, suffix, identity]).encode(
                "utf-8", "surrogateescape"
            )
            cached = self._cached_plain(store, rel, sub, key)
            worker = self._worker
            dataset = rel.rpartition("/")[0]
            if cached is None and worker is not None and worker.wait_for(dataset, plain=True):
                cached = self._cached_plain(store, rel, sub, key)
            if cached is not None:
                return cached
        listed_at = time.time_ns()
        names, whole = self._plain_names(rel, suffix)
        names.sort()
        pace()
        source = EntrySource(FOLDER, rel)
        quick = sorted_table(f"{sub}/", [source], names, (0, 0, 0), None, self._lstat)
        if quick is not None:
            table = quick
        else:  # names that are not all ASCII: ordered by their bytes
            builder = TableBuilder(f"{sub}/")
            builder.add_names(_encode_names(names), builder.source(source))
            table, _ = builder.build(self._lstat)  # names in one folder are distinct
        del names, quick
        settled = (
            st is not None and listed_at - max(st.st_mtime_ns, st.st_ctime_ns) >= PLAIN_SETTLED_NS
        )
        if store is not None and settled and whole and len(table):  # an empty one is cheap
            store.save(self.fs.where(rel), key, table.to_bytes())
        return table

    def _folder_stat(self, rel: str) -> os.stat_result | None:
        """``lstat`` of folder ``rel``; None when it is missing, no folder, or not reachable
        without following a symlink (the listing then says why)."""
        try:
            st = self.fs.lstat(rel)
        except BlobfsError:
            return None
        return st if st is not None and stat.S_ISDIR(st.st_mode) else None

    def _cached_plain(self, store: IndexStore, rel: str, sub: str, key: bytes) -> FileTable | None:
        """The cached names of folder ``rel`` (None when absent, stale or not well-formed);
        its names are checked in full at its first listing, as a blob index's."""
        where = self.fs.where(rel)
        loaded = store.load_checked(where, key)
        if loaded is None:
            return None
        payload, trusted = loaded
        try:
            table = FileTable.from_bytes(payload, self._lstat, trusted)
        except ValueError as exc:
            logger.info("index cache entry not usable (%s); listing the folder", exc)
            return None
        if table.prefix != f"{sub}/" or table.sources != (EntrySource(FOLDER, rel),):
            return None  # not this folder's
        table.on_damaged = functools.partial(self._damaged_index, store, where)
        return table

    def _add_plain(self, builder: TableBuilder, rel: str, suffix: str = "") -> bool:
        """Add the regular files of folder ``rel`` (names ending in ``suffix``); whether
        the folder was read and held nothing else (a listing that noted a problem is
        not cached: each mount notes it again)."""
        names, whole = self._plain_names(rel, suffix)
        src = builder.source(EntrySource(FOLDER, rel))
        pace()
        for at in range(0, len(names), PACE_EVERY):
            builder.add_names(_encode_names(names[at : at + PACE_EVERY]), src)
            pace()
        return whole

    def _plain_names(self, rel: str, suffix: str = "") -> tuple[list[str], bool]:
        """The names of the regular files of folder ``rel`` ending in ``suffix`` (in the
        folder's order), and whether the folder was read and held nothing else; its
        other entries are refused (noted) here."""
        try:
            names, others = self.fs.list_regular(rel)
        except BlobfsError as exc:
            self._note(self.fs.where(rel), "folder not read", str(exc))
            return [], False
        for item in others:
            self._refuse_item(rel, item)
        # the usual folder holds only such names: one count over them all says so (a NUL
        # ends each name, and no name holds one)
        if suffix and ("\0".join(names) + "\0").count(suffix + "\0") != len(names):
            names = list(filter(operator.methodcaller("endswith", suffix), names))
        return names, not others

    def _img_table(self, dataset: DatasetRecord) -> FileTable:
        """Blob images (from the index cache when it is current) and plain ``img/`` files."""
        assert isinstance(dataset.key, str)
        key = dataset.key
        refused: dict[str, str] = {}
        blobs = self._blob_table(key, refused)
        builder = TableBuilder("img/")
        img = self.fs.lstat(f"{key}/img")
        if img is not None and stat.S_ISDIR(img.st_mode):
            self._add_plain(builder, f"{key}/img")
        elif img is not None:
            self._note(self.fs.where(key), f"{describe(img.st_mode)}; not served", "img")
        if len(builder):
            builder.add_table(blobs)
            table, both = builder.build(self._lstat)
            for name in both:
                refused[f"img/{name}"] = "both a blob image and a file in img/"
                self._note(
                    self.fs.where(key),
                    "both a blob image and a file in img/ (neither is served)",
                    show(f"img/{name}"),
                )
        else:
            table = blobs
        with self._lock:
            self._refused[dataset.path] = refused
        kept = self._quick_kept
        if kept is not None and kept[0][0] == key:
            self._quick_kept = None  # the index answers this folder's lookups now
        return table

    def _blob_table(self, key: str, refused: dict[str, str]) -> FileTable:
        with self._lock:
            self._begun.add(key)
        items = self._list(key)
        store = self.index_store
        index_key = self._index_key(key, items) if store is not None else b""
        if store is not None:
            where = self.fs.where(key)
            cached = _unpack_index(store.load_checked(where, index_key))
            worker = self._worker
            if cached is None and worker is not None and worker.wait_for(key):
                cached = _unpack_index(store.load_checked(where, index_key))
            if cached is not None:
                table, problems, cached_refused = cached
                self._problems.add_snapshot(problems)
                refused.update(cached_refused)
                table.on_damaged = functools.partial(self._damaged_index, store, where)
                return table
        collected = Problems()
        with building():
            self._capture.sink = collected
            try:
                entries = self._blob_entries(key, items, refused)
            finally:
                self._capture.sink = None
            builder = TableBuilder("img/")
            src: list[int] = []
            for stem, count in entries.runs:
                blob = self._blobs[stem]
                version = blob.cached.version if blob.cached else ""
                at = builder.source(EntrySource(BLOB, stem, version, blob.mtime_ns))
                src += repeat(at, count)
            pace()
            names, starts, ends = entries.names, entries.starts, entries.ends
            sizes = list(map(operator.sub, ends, starts))
            del ends
            quick = sorted_table(
                "img/", builder.sources, names, (src, starts, sizes), entries.ordered
            )
            del entries
            if quick is None:
                builder.add_many(_encode_names(names), src, starts, sizes)
                table, _ = builder.build()  # names were de-duplicated by _resolve
            else:
                table = quick
            del names, starts, sizes, src, builder, quick
        self._problems.merge(collected)
        self.index_builds += 1
        if store is not None:
            payload = _pack_index(table, collected.snapshot(), refused)
            store.save(self.fs.where(key), index_key, payload)
        return table

    def build_index(self, key: str) -> None:
        """Build the blob index of dataset ``key`` into the index cache (the worker's job),
        unless the cache already holds a current one."""
        self._blob_table(key, {})

    def build_plain(self, key: str) -> None:
        """List the ordinary folders of dataset ``key`` into the index cache (the worker's
        job), unless the cache already holds current listings."""
        for rel, sub, suffix in self._plain_folders(key):
            self._plain_table(rel, sub, suffix)

    def start_index_worker(self, keys: list[str]) -> IndexWorker | None:
        """Have one worker process build the indexes of datasets ``keys`` (in a walk's
        order) into the index cache (see :mod:`blobfs.sources.index_worker`, which says
        why the jobs come in this order); None when there is no usable cache, the
        daemon may run on one CPU only, or the process cannot be started (the daemon then
        builds everything itself)."""
        store = self.index_store
        jobs: list[Job] = []
        if keys:
            first, rest = keys[0], keys[1:]
            jobs.append(("plain", first))
            for key in rest:
                jobs += [("blob", key), ("plain", key)]
            jobs.append(("blob", first))
        with self._lock:
            # no folder built twice at once
            jobs = [j for j in jobs if j[0] != "blob" or j[1] not in self._begun]
        if store is None or not store.usable or not jobs:
            return None
        if len(os.sched_getaffinity(0)) < 2:
            return None  # one CPU: nothing to overlap, saving and loading the files is extra
        try:
            self._worker = IndexWorker(self.root, store.folder, jobs)
        except OSError as exc:
            logger.info("index worker not started (%s); folders are indexed here", exc)
            return None
        return self._worker

    def _damaged_index(self, store: IndexStore, where: str, why: str) -> None:
        """A cached index failed its deferred check: the next mount builds it again."""
        store.forget(where)
        self._problems.add(where, "index cache file damaged; it is rebuilt at the next mount", why)

    def _index_key(self, key: str, items: list[DirItem]) -> bytes:
        """What a cached index of ``key`` must have been built from to be current: every
        offsets file's and tar's identity, and the code that decided the entries."""
        files = []
        tars = []
        for item in sorted(items, key=lambda e: e.name):
            if not item.name.endswith(OFFSETS_SUFFIX):
                continue
            files.append([item.name, item.ino, item.size, item.mtime_ns, item.mode])
            stem = item.name[: -len(OFFSETS_SUFFIX)]
            st = self.fs.lstat(f"{BLOB_DIR}/{stem}.tar")
            tars.append(
                [stem, None if st is None else [st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode]]
            )
        device = os.stat(self.root).st_dev
        return json.dumps([_rules_digest(), device, key, files, tars]).encode()


_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_NAME = operator.attrgetter("name")
_START = operator.attrgetter("start")
_END = operator.attrgetter("end")


def _encode_names(names: list[str]) -> list[bytes]:
    """Every name as stored (:func:`encode_name`), in one pass: names hold no NUL."""
    if not names:
        return []
    return "\0".join(names).encode("utf-8", "surrogateescape").split(b"\0")


@functools.cache
def _rules_digest() -> str:
    """A digest of the code that decides which entries are served: a cached index built by
    other rules (another blobfs version, a fixed validation) is never used."""
    from blobfs import __version__, layout
    from blobfs.format import offsets, tarhead
    from blobfs.sources import compact

    h = hashlib.sha256(__version__.encode())
    for module in (offsets, tarhead, layout, compact):
        h.update(Path(module.__file__ or "").read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def _pack_index(table: FileTable, problems: list[list[Any]], refused: dict[str, str]) -> bytes:
    text = json.dumps({"problems": problems, "refused": refused}).encode("utf-8", "surrogateescape")
    return _PAYLOAD_LEN.pack(len(text)) + text + table.to_bytes()


def _unpack_index(
    loaded: tuple[bytes, bool] | None,
) -> tuple[FileTable, list[list[Any]], dict[str, str]] | None:
    """A cached (table, problems, refused names) from (payload, trusted), or None when
    absent or not well-formed."""
    if loaded is None or len(loaded[0]) < _PAYLOAD_LEN.size:
        return None
    payload, trusted = loaded
    (size,) = _PAYLOAD_LEN.unpack_from(payload)
    at = _PAYLOAD_LEN.size + size
    try:
        meta = json.loads(payload[_PAYLOAD_LEN.size : at].decode("utf-8", "surrogateescape"))
        problems, refused = meta["problems"], meta["refused"]
        if not isinstance(problems, list) or not isinstance(refused, dict):
            raise ValueError("problems or refused names of the wrong type")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in refused.items()):
            raise ValueError("refused names are not strings")
        table = FileTable.from_bytes(memoryview(payload)[at:], trusted=trusted)  # no copy
    except (ValueError, KeyError, TypeError) as exc:
        logger.info("index cache entry not usable (%s); rebuilding it", exc)
        return None
    if table.prefix != "img/" or any(s.kind != BLOB for s in table.sources):
        return None
    return table, problems, refused


class _MemberReader:
    """A blob image whose entry is checked against the tar's header at its first read."""

    def __init__(
        self, source: LocalProjectSource, blob: _Blob, ref: BlobRef, name: str, inner: RangeReader
    ) -> None:
        self._source, self._blob, self._ref, self._name = source, blob, ref, name
        self._inner = inner

    def read(self, start: int, end: int) -> bytes:
        self._source.check_member(self._blob, self._ref, self._name)
        return self._inner.read(start, end)

    def close(self) -> None:
        self._inner.close()
