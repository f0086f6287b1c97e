"""ProjectView: the Supervisely project layout as a read-only directory tree.

Shape of the tree::

    /meta.json
    /<dataset>/img/<image>            every image, blob or not
    /<dataset>/ann/<image>.json
    /<dataset>/img_info/, meta/       when the source has them
    /<dataset>/datasets/<child>/...   nested datasets

Folders are filled on first access, each on its own: a dataset's ``img/`` is indexed when
something in it is first looked up, under that folder's own lock, so a ``stat`` or ``ls``
elsewhere never waits for it (a mount of a 1M-image project is ready before any offsets
file is read). Large folders come from the source as compact tables
(:class:`blobfs.sources.compact.FileTable`): a lookup is a binary search, a listing pages
through the table, and no per-file object is kept. Sources whose listings may change
(remote) are re-listed after ``listing_ttl_s``; immutable ones are listed once.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blobfs import deadline
from blobfs.cache.meta import LockedLru
from blobfs.errors import IsADirectory, NotADirectory, NotFound, ReadOnly
from blobfs.layout import DatasetPath, dataset_view_path
from blobfs.model import BytesRef, DatasetRecord, FileRecord
from blobfs.sources.base import PeekingLoader, Source
from blobfs.sources.compact import BLOB, FileTable, paced
from blobfs.sources.readers import BytesReader
from blobfs.view.handles import HandleTable, ReadHandle

logger = logging.getLogger(__name__)

DATASETS_DIR = "datasets"
DEFAULT_LISTING_TTL_S = 60.0
DEFAULT_REFRESH_TIMEOUT_S = 30.0
#: Background listing refreshes at a time (a ``find`` over many stale folders must not
#: start a thread and a request per folder at once).
MAX_REFRESHES = 4
CONTROL_DIR = "/.blobfs"
MAX_SNAPSHOTS = 64
SIZE_CACHE_ENTRIES = 1_000_000
#: Folders whose listing is kept as a list for paging (readdirplus); a few suffice.
LISTING_MEMO_ENTRIES = 64
#: Folders of up to this many files are listed with every file's attributes (the kernel
#: then never looks them up; a scan of the folder costs one round trip per file less).
#: A larger folder is listed with names and types only: with attributes the kernel makes
#: an inode per entry at once (1,000,000 entries: seconds, and memory for an hour), which
#: an ``ls`` or ``find`` never uses; its files are looked up when first opened.
LISTING_ATTRS_MAX = 100_000
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555

Children = Mapping[str, "DirNode | FileRecord"]
#: How often a background preload looks again whether foreground fills are still running.
PRELOAD_YIELD_S = 0.02


@dataclass(frozen=True, slots=True)
class ListingRun:
    """Consecutive files of a listing that share every ``stat`` field but the size.

    What a large folder hands the FUSE layer instead of one ``(name, attrs)`` pair per
    entry: the names as the bytes the kernel gets, their sizes, and the fields they share
    (``attrs``, without ``st_size``/``st_blocks``), so that a ``stat`` per entry costs two
    integer stores rather than a dict built and copied field by field. ``attrs`` is None
    when these entries' attributes need I/O to learn (ordinary files, ``lstat``-ed at
    lookup): they go out with their names and file type only.
    """

    names: Sequence[bytes]
    sizes: Sequence[int]
    attrs: dict[str, int] | None
    #: Each file's whole content where the tree holds it in memory (None where it does
    #: not), or None for none: a read would be answered from it without any I/O.
    contents: Sequence[bytes | None] | None = None


@dataclass(eq=False)
class DirNode:
    """A directory; ``children`` is None until ``fill`` has run (lazy folders).

    ``lock`` serialises filling this node only. ``refresh`` is False for folders that are
    re-created with their parent (a dataset's ``img/``): only the parent ages.
    """

    mtime_ns: int
    children: Children | None = None
    fill: Callable[[], Children] | None = None
    #: Answers one name's attributes before ``fill`` has run (``PeekingLoader.peek``).
    peek: Callable[[str], FileRecord | None] | None = None
    loaded_at: float = 0.0
    subsets: dict[str, DirNode] = field(default_factory=dict)
    refresh: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def split_path(path: str) -> list[str]:
    """``/a/b`` -> ``["a", "b"]``; the FUSE layer hands us normalised absolute paths."""
    return [p for p in path.split("/") if p]


class ProjectView:
    """The tree over one source, with handles for open files."""

    def __init__(
        self,
        source: Source,
        listing_ttl_s: float = DEFAULT_LISTING_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.listing_ttl_s = listing_ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        # Sizes learnt by fetching content (remote annotations), keyed by the record itself:
        # records are immutable and hashable, and a refreshed listing brings new ones.
        self._sizes: LockedLru[FileRecord, int] = LockedLru(SIZE_CACHE_ENTRIES)
        # id(children dict) -> (that dict, its items as a list): readdirplus pages through
        # a listing by index, and a 30,000-entry folder is listed in ~155 pages.
        self._listings: dict[int, tuple[Children, list[tuple[str, Any]]]] = {}
        self.handles = HandleTable()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mount_time_ns = time.time_ns()
        self._root = DirNode(self.mount_time_ns, fill=self._fill_root)
        self._immutable = source.is_immutable()
        self._snapshots: dict[str, FileRecord] = {}
        self.extra_stats: Callable[[], dict[str, object]] | None = None
        #: FUSE operations served, by name (counted by the FUSE layer): shows in
        #: ``blobfs stats`` how many round trips reached Python, e.g. lookups saved by
        #: readdirplus.
        self.op_counts: dict[str, int] = {}
        #: Deadline of a background listing refresh (the daemon sets ``--timeout``).
        self.refresh_timeout_s = DEFAULT_REFRESH_TIMEOUT_S
        self._refresh_lock = threading.Lock()
        self._refreshing: set[DirNode] = set()
        # fills that a request waits for right now; a background preload yields to them
        self._foreground = 0
        self._foreground_lock = threading.Lock()
        self._served_seen = 0  # requests served when a background build last looked

    # ---- tree ------------------------------------------------------------------------

    def _fill_root(self) -> Children:
        children: dict[str, DirNode | FileRecord] = {}
        meta = self.source.meta_json()
        if meta is not None:
            children["meta.json"] = FileRecord(
                "meta.json", len(meta), self.mount_time_ns, BytesRef(meta)
            )
        by_path: dict[tuple[str, ...], DirNode] = {}
        for ds in sorted(self.source.datasets(), key=lambda d: len(d.path)):
            node = DirNode(ds.mtime_ns or self.mount_time_ns, fill=self._dataset_filler(ds))
            by_path[ds.path] = node
            if len(ds.path) == 1:
                children[ds.name] = node
            elif ds.path[:-1] in by_path:
                by_path[ds.path[:-1]].subsets[ds.name] = node
        return children

    def _dataset_filler(self, ds: DatasetRecord) -> Callable[[], Children]:
        def fill() -> Children:
            return self._fill_dataset(ds)

        return fill

    def _fill_dataset(self, ds: DatasetRecord) -> Children:
        """The dataset's folders, each filled on its own first access."""
        mtime = ds.mtime_ns or self.mount_time_ns
        return {
            sub: DirNode(
                mtime,
                fill=load,
                peek=load.peek if isinstance(load, PeekingLoader) else None,
                refresh=False,
            )
            for sub, load in self.source.listing(ds).items()
        }

    def _stale(self, node: DirNode) -> bool:
        return (
            node.refresh
            and node.fill is not None
            and self._clock() - node.loaded_at > self.listing_ttl_s
        )

    def _children(self, node: DirNode, background: bool = False) -> Children:
        children = node.children
        if children is not None:
            if not self._immutable and self._stale(node):
                self._refresh_in_background(node, children)
            return children  # the hot path; a stale listing is served while it is refreshed
        if not background:
            with self._foreground_lock:
                self._foreground += 1
        try:
            # Only a first listing blocks, only this folder's (lookups elsewhere go on), and
            # only until the operation's deadline.
            deadline.acquire(node.lock, "listing")
            try:
                if node.children is None:
                    assert node.fill is not None
                    filled = self._with_subsets(node, node.fill())
                    node.children, node.loaded_at = filled, self._clock()
                children = node.children
            finally:
                node.lock.release()
        finally:
            if not background:
                with self._foreground_lock:
                    self._foreground -= 1
        assert children is not None
        return children

    def _wait_for_quiet(self) -> None:
        """Return once no request is filling a folder and none arrived for a moment: the
        preload shares the interpreter with the requests (one runs Python at a time), so
        a listing being paged out or an epoch being read goes first."""
        seen = -1
        while True:
            served = sum(list(self.op_counts.values()))
            if not self._foreground and served == seen:
                return
            seen = served
            time.sleep(PRELOAD_YIELD_S)

    def _step_aside(self) -> None:
        """Called inside a background build now and then: while requests are being
        served, pause (the requests need the interpreter lock back after every round
        trip), unless one waits for a folder to be filled, which may be this one."""
        seen = self._served_seen
        while True:
            served = sum(list(self.op_counts.values()))
            if self._foreground or served == seen:
                break
            seen = served
            time.sleep(PRELOAD_YIELD_S)
        self._served_seen = served

    def preload(self) -> tuple[int, int]:
        """Fill every folder of the tree, one at a time, yielding to requests.

        Run in the background after mounting, so that refused entries are logged early and
        the index cache is warm for the next mount. Between folders it waits until no
        request is filling a folder or being served (requests come first); it holds no
        lock but the folder's own. Returns (folders, files).
        """
        folders = files = 0
        stack: list[DirNode] = [self._root]
        while stack:
            node = stack.pop()
            self._wait_for_quiet()
            with paced(self._step_aside):
                children = self._children(node, background=True)
            folders += 1
            if isinstance(children, FileTable):
                files += len(children)
                continue
            for child in children.values():
                if isinstance(child, DirNode):
                    stack.append(child)
                else:
                    files += 1
        return folders, files

    @staticmethod
    def _with_subsets(node: DirNode, filled: Children) -> Children:
        """A dataset's listing with its nested datasets under ``datasets/``."""
        if node.subsets:
            return {**filled, DATASETS_DIR: DirNode(node.mtime_ns, dict(node.subsets))}
        return filled

    def _refresh_in_background(self, node: DirNode, seen: Children) -> None:
        """Re-list ``node`` in a thread of its own (one per folder at a time).

        No operation waits for a refresh: a slow or failing server leaves the old listing
        in place (a failure is logged and tried again after another TTL).
        """
        with self._refresh_lock:
            if node in self._refreshing or len(self._refreshing) >= MAX_REFRESHES:
                return  # a later access of a still stale folder starts it
            self._refreshing.add(node)
        threading.Thread(
            target=self._refresh, args=(node, seen), name="blobfs-refresh", daemon=True
        ).start()

    def _refresh(self, node: DirNode, seen: Children) -> None:
        try:
            assert node.fill is not None
            with deadline.within(self.refresh_timeout_s):
                filled = self._with_subsets(node, node.fill())
            _carry_over(seen, filled, self._clock())
            with node.lock:
                if node.children is seen:  # not dropped or replaced meanwhile (an import)
                    node.children, node.loaded_at = filled, self._clock()
        except Exception as exc:
            logger.warning("listing refresh failed (the previous listing stays served): %s", exc)
            node.loaded_at = self._clock()  # try again after another TTL, not at once
        finally:
            with self._refresh_lock:
                self._refreshing.discard(node)

    def lookup(self, path: str, quick: bool = False) -> DirNode | FileRecord | None:
        """The node at ``path``, or None when nothing is there.

        ``quick`` (a ``stat``): when the last folder is not loaded yet and its loader can
        answer one name alone (:class:`~blobfs.sources.base.PeekingLoader`), its answer
        is returned without loading the folder. Only attributes come from it; reads look
        up the loaded folder.
        """
        if path.startswith(CONTROL_DIR):
            return self._control(path)
        node: DirNode | FileRecord = self._root
        parts = split_path(path)
        for at, part in enumerate(parts, 1):
            if not isinstance(node, DirNode):
                return None
            if quick and at == len(parts) and node.children is None:
                rec = node.peek(part) if node.peek is not None else None
                if rec is not None:
                    return rec
            found = self._children(node).get(part)
            if found is None:
                return None
            node = found
        return node

    def _control(self, path: str) -> DirNode | FileRecord | None:
        """``/.blobfs`` (hidden from listings) and its live statistics files.

        Any name ``/.blobfs/stats*.json`` is a fresh snapshot taken at lookup: the kernel
        caches a file's size and pages, so ``blobfs stats`` asks for a new name each time
        (``stats-<nonce>.json``) and always gets current figures.
        """
        if path == CONTROL_DIR:
            return DirNode(self.mount_time_ns, {})
        name = path[len(CONTROL_DIR) + 1 :]
        if "/" in name or not (name.startswith("stats") and name.endswith(".json")):
            return None
        with self._lock:
            rec = self._snapshots.get(name)
            if rec is None:
                data = (json.dumps(self.stats(), indent=1, default=str) + "\n").encode()
                rec = FileRecord(name, len(data), time.time_ns(), BytesRef(data))
                self._snapshots[name] = rec
                while len(self._snapshots) > MAX_SNAPSHOTS:
                    self._snapshots.pop(next(iter(self._snapshots)))
            return rec

    def stats(self) -> dict[str, object]:
        """Live figures for ``blobfs stats``: cache, requests, problems, memory, uptime."""
        out: dict[str, object] = {
            "uptime_s": round((time.time_ns() - self.mount_time_ns) / 1e9, 1),
            "open_handles": len(self.handles),
            "problems": len(self.source.problems()),
            "rss_bytes": _rss_bytes(),
            **self.source.stats(),
            "fuse_ops": dict(self.op_counts),
        }
        if self.extra_stats is not None:
            out.update(self.extra_stats())
        return out

    def get(self, path: str) -> DirNode | FileRecord:
        """The node at ``path``.

        Raises:
            NotFound: nothing is there (or a parent is a file).
        """
        node = self.lookup(path)
        if node is None:
            raise NotFound(path)
        return node

    def forget(self, dataset: DatasetPath | list[str]) -> None:
        """The project changed under this view (a writeback import into ``dataset``, a
        chain of names): its folder is listed again at its next access, from the source
        as it is now, and what was learnt from files' content is dropped (sizes fetched,
        the source's small files, see :meth:`Source.changed`).

        An empty chain (``meta.json``), or a dataset the tree does not hold yet, forgets
        the root listing instead, so meta.json and new datasets show (every folder is then
        listed again at its next access); otherwise other folders keep their listings.
        """
        self.source.changed()
        self._sizes.clear()
        with self._lock:
            node = self.lookup(dataset_view_path(dataset)) if dataset else None
            if isinstance(node, DirNode):
                node.children = None
            else:
                self._root.children = None

    # ---- operations ------------------------------------------------------------------

    def size_of(self, rec: FileRecord) -> int:
        """The file's size, fetching its content once when the source did not know it."""
        if rec.size is not None:
            return rec.size
        size = self._sizes.get(rec)
        if size is None:
            size = len(self.source.content(rec))
            self._sizes.put(rec, size)
        return size

    def getattr(self, path: str) -> dict[str, int]:
        """``stat`` fields of ``path`` (times in ns)."""
        attrs = self.find_attrs(path)
        if attrs is None:
            raise NotFound(path)
        return attrs

    def find_attrs(self, path: str) -> dict[str, int] | None:
        """``stat`` fields of ``path`` (times in ns), or None when nothing is there."""
        node = self.lookup(path, quick=True)
        if node is None:
            return None
        if isinstance(node, DirNode):
            return self._dir_attrs(node)
        return self._record_attrs(node, self.size_of(node))

    def _dir_attrs(self, node: DirNode) -> dict[str, int]:
        return {
            "st_mode": DIR_MODE,
            "st_nlink": 2,
            "st_size": 0,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.mtime_ns,
            "st_atime": node.mtime_ns,
            "st_uid": self.uid,
            "st_gid": self.gid,
        }

    def _record_attrs(self, rec: FileRecord, size: int) -> dict[str, int]:
        return self.size_attrs(size, rec.mtime_ns)

    def size_attrs(self, size: int, mtime_ns: int) -> dict[str, int]:
        """A new dict of a file's ``stat`` fields from its size and mtime alone: what the
        writeback layer also needs for a file still being written, whose bytes have no
        ``stat_result`` yet."""
        return {
            "st_mode": FILE_MODE,
            "st_nlink": 1,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_mtime": mtime_ns,
            "st_ctime": mtime_ns,
            "st_atime": mtime_ns,
            "st_uid": self.uid,
            "st_gid": self.gid,
        }

    def readdir_attrs(
        self, path: str, start: int = 0
    ) -> Iterator[tuple[str, dict[str, int] | None]]:
        """Names in ``path`` from entry ``start`` on, with ``stat`` fields where known
        without any I/O.

        This feeds readdirplus: the kernel learns every entry's attributes from the listing
        and skips one lookup round trip per file. An entry whose size needs a fetch (a
        remote annotation not read yet) comes without attributes, so listing a folder
        never downloads its files. Raises (eagerly) like :meth:`readdir`.
        """
        node = self.get(path)
        if not isinstance(node, DirNode):
            raise NotADirectory(path)
        children = self._children(node)
        if isinstance(children, FileTable):  # pages straight from the table
            children.check()  # a table loaded from disk checks its names at its first listing
            return self._table_attrs(children, start)
        with self._lock:
            memo = self._listings.get(id(children))
            if memo is None or memo[0] is not children:
                memo = (children, list(children.items()))
                self._listings[id(children)] = memo
                while len(self._listings) > LISTING_MEMO_ENTRIES:
                    self._listings.pop(next(iter(self._listings)))
        return self._attrs_from(memo[1], start)

    def readdir_runs(
        self, path: str, start: int = 0
    ) -> Iterator[ListingRun | tuple[str, dict[str, int] | None]]:
        """:meth:`readdir_attrs` for the FUSE hot path: a folder held as a table comes as
        :class:`ListingRun` s (one per page and source), any other folder as pairs.
        Raises (eagerly) like :meth:`readdir`."""
        node = self.get(path)
        if not isinstance(node, DirNode):
            raise NotADirectory(path)
        children = self._children(node)
        if isinstance(children, FileTable):
            children.check()
            return self._table_runs(children, start)
        return self.readdir_attrs(path, start)

    def _table_runs(self, table: FileTable, start: int) -> Iterator[ListingRun]:
        shared: dict[int, dict[str, int]] = {}
        with_attrs = len(table) <= LISTING_ATTRS_MAX
        at = max(0, start)
        for names, source, sizes in table.runs_from(start):
            lo, at = at, at + len(names)
            if source.kind != BLOB or not with_attrs:
                # sizes of ordinary files are known only at lookup; a huge folder's
                # entries are made by the kernel when (if) they are looked up
                yield ListingRun(names, sizes, None)
                continue
            attrs = shared.get(source.mtime_ns)
            if attrs is None:
                attrs = shared[source.mtime_ns] = self.size_attrs(0, source.mtime_ns)
                del attrs["st_size"], attrs["st_blocks"]
            yield ListingRun(names, sizes, attrs, table.contents(lo, at))

    def _table_attrs(
        self, table: FileTable, start: int
    ) -> Iterator[tuple[str, dict[str, int] | None]]:
        # a folder entry's size is known only once it is looked up (no stat per listing)
        for name, size, mtime in table.entries_from(start):
            yield name, None if size is None else self.size_attrs(size, mtime)

    def _attrs_from(
        self, items: list[tuple[str, DirNode | FileRecord]], start: int
    ) -> Iterator[tuple[str, dict[str, int] | None]]:
        for i in range(start, len(items)):
            name, child = items[i]
            if isinstance(child, DirNode):
                yield name, self._dir_attrs(child)
                continue
            size = child.size if child.size is not None else self._sizes.get(child)
            yield name, None if size is None else self._record_attrs(child, size)

    def readdir(self, path: str) -> Sequence[str]:
        """Names in the directory ``path`` (without ``.`` and ``..``)."""
        node = self.get(path)
        if not isinstance(node, DirNode):
            raise NotADirectory(path)
        return list(self._children(node))

    def open(self, path: str, write: bool = False) -> int:
        """Open a file for reading; returns the handle number."""
        if write:
            raise ReadOnly(f"{path}: the mount is read-only")
        node = self.get(path)
        if isinstance(node, DirNode):
            raise IsADirectory(path)
        if isinstance(node.ref, BytesRef):  # the view's own files; the rest is the source's
            data = node.ref.data
            handle = ReadHandle(BytesReader(data), len(data), path)
        elif node.size is None:
            data = self.source.content(node)
            handle = ReadHandle(BytesReader(data), len(data), path)
        else:
            handle = ReadHandle(self.source.open(node), node.size, path)
        return self.handles.add(handle)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; short only at end of file."""
        handle = self.handles.get(fh)
        end = min(offset + size, handle.size)
        if offset >= end:
            return b""
        return handle.reader.read(offset, end)

    def read_path(self, path: str, offset: int, size: int) -> bytes:
        """Read by path with no open handle: the FUSE fast path for the read-only tree."""
        node = self.get(path)
        if isinstance(node, DirNode):
            raise IsADirectory(path)
        if isinstance(node.ref, BytesRef):
            return node.ref.data[offset : offset + size]
        if node.size is None:
            return self.source.content(node)[offset : offset + size]
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        reader = self.source.open(node)
        try:
            return reader.read(offset, end)
        finally:
            reader.close()

    def release(self, fh: int) -> None:
        handle = self.handles.remove(fh)
        if handle is not None:
            handle.reader.close()

    def statfs(self) -> dict[str, int]:
        """Filesystem figures for ``df``; a read-only tree has no free space."""
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": 0,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 0,
            "f_ffree": 0,
            "f_namemax": 255,
        }

    def walk_files(self) -> list[tuple[str, FileRecord]]:
        """Every file of the tree with its path (used by ``check`` and tests)."""
        out: list[tuple[str, FileRecord]] = []
        stack: list[tuple[str, DirNode]] = [("", self._root)]
        while stack:
            prefix, node = stack.pop()
            for name, child in self._children(node).items():
                if isinstance(child, DirNode):
                    stack.append((f"{prefix}/{name}", child))
                else:
                    out.append((f"{prefix}/{name}", child))
        return out


def _carry_over(old: Children, new: Children, now: float) -> None:
    """Keep the listings already loaded under folders that a refresh of their parent
    brought back as new, unloaded nodes (a refreshed root lists every dataset anew): a
    read there must not wait for a first listing again. A dataset's own folders
    (``img/``, ``ann/``: no TTL of their own) are filled anew here, in the refresh's
    thread; other folders keep their listing and load time, so their own refresh comes
    after their own TTL, in the background."""
    for name, node in new.items():
        prev = old.get(name)
        if not isinstance(node, DirNode) or not isinstance(prev, DirNode):
            continue
        _carry_over(prev.subsets, node.subsets, now)
        if node.children is None and prev.children is not None and not node.refresh:
            assert node.fill is not None
            node.children, node.loaded_at = node.fill(), now
        elif node.children is None and prev.children is not None:
            kept = {k: v for k, v in prev.children.items() if k != DATASETS_DIR}
            if node.subsets:
                kept[DATASETS_DIR] = DirNode(node.mtime_ns, dict(node.subsets))
            node.children, node.loaded_at = kept, prev.loaded_at
        elif node.children is not None and prev.children is not None:
            _carry_over(prev.children, node.children, now)


def _rss_bytes() -> int:
    """This process's resident memory (Linux), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
