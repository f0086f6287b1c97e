"""How a local project is indexed: per folder, lazily, compactly, cached between mounts.

In-process on the view and the source, then through real mounts of a 200,000-image project
(written in a few seconds by :mod:`tests.support.scale`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blobfs.cache.blocks import BlockCache
from blobfs.cache.index_store import IndexStore
from blobfs.errors import BlobfsError, NotFound, to_errno
from blobfs.format import offsets as offsets_module
from blobfs.format.offsets import OFFSETS_SUFFIX, dumps_batch
from blobfs.format.tarhead import FIELDS_END
from blobfs.model import AnnRef, BlobMember, FileRecord, RemoteImageRef
from blobfs.sources.compact import FileTable
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import DirNode, ProjectView
from tests.support import harness
from tests.support.scale import ScaleProject, write_scale_project


def source(root: Path, store: IndexStore | None = None) -> LocalProjectSource:
    return LocalProjectSource(root, BlockCache(4096, 1 << 20), index_store=store)


@pytest.fixture
def small(tmp_path: Path) -> ScaleProject:
    """3 datasets of 2,000 images in 4 tars (one tar spans two datasets), with anns."""
    return write_scale_project(tmp_path / "p", ["a", "b", "c"], 2000, 4, anns=True)


def test_a_lookup_indexes_only_its_own_folder(small: ScaleProject) -> None:
    view = ProjectView(source(small.root))
    path = "/" + small.path(1, 1234)
    assert view.read_path(path, 0, 1 << 20) == small.expected(1, 1234)
    root = view._root.children
    assert root is not None
    b = root["b"]
    assert isinstance(b, DirNode) and b.children is not None
    img, ann = b.children["img"], b.children["ann"]
    assert isinstance(img, DirNode) and isinstance(img.children, FileTable)
    assert isinstance(ann, DirNode) and ann.children is None  # not listed, not scanned
    for other in ("a", "c"):
        node = root[other]
        assert isinstance(node, DirNode) and node.children is None
    assert view._listings == {}  # no listing was built to answer it


def test_a_table_serves_the_exact_bytes_listing_and_attributes(small: ScaleProject) -> None:
    view = ProjectView(source(small.root))
    for d in range(3):
        names = view.readdir(f"/{small.datasets[d]}/img")
        assert sorted(names) == names and len(names) == 2000
        for i in random.Random(d).sample(range(2000), 50):
            path = "/" + small.path(d, i)
            assert view.read_path(path, 0, 1 << 20) == small.expected(d, i)
            assert view.getattr(path)["st_size"] == len(small.expected(d, i))
            ann = f"/{small.datasets[d]}/ann/{path.rsplit('/', 1)[1]}.json"
            assert json.loads(view.read_path(ann, 0, 1 << 20))["objects"] == []
        page = list(view.readdir_attrs(f"/{small.datasets[d]}/img", 1990))
        assert [n for n, _ in page] == names[1990:]
        assert all(a is not None and a["st_size"] > 0 for _, a in page)
    with pytest.raises(NotFound):
        view.getattr("/a/img/small-image-0002000.png")


def test_a_remount_of_an_unchanged_project_reads_no_offsets_file(
    small: ScaleProject, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = tmp_path / "cache"
    first = source(small.root, IndexStore(store_dir))
    assert ProjectView(first).preload() == (3 + 1 + 3 * 2, 3 * 4000 + 1)
    assert first.index_builds == 3

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an offsets file was parsed")

    monkeypatch.setattr("blobfs.sources.project_dir.parse_offsets_columns", refuse)
    again = source(small.root, IndexStore(store_dir))
    view = ProjectView(again)
    for d in range(3):
        for i in (0, 999, 1999):
            assert view.read_path("/" + small.path(d, i), 0, 1 << 20) == small.expected(d, i)
    assert again.index_builds == 0
    assert again.index_store is not None and again.index_store.hits == 3


@pytest.mark.parametrize("change", ["offsets", "tar", "cache"])
def test_a_changed_input_or_a_damaged_cache_file_rebuilds(
    small: ScaleProject, tmp_path: Path, change: str
) -> None:
    store_dir = tmp_path / "cache"
    ProjectView(source(small.root, IndexStore(store_dir))).preload()
    if change == "offsets":  # one entry dropped: the dataset's new offsets must be seen
        offsets = small.root / "a" / f"blob_000{OFFSETS_SUFFIX}"
        members = offsets_module.read_offsets_file(str(offsets)).members
        offsets.write_bytes(dumps_batch(members[1:]))
    elif change == "tar":
        tar = small.root / "blob" / "blob_000.tar"
        st = tar.stat()
        os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    else:
        for f in store_dir.iterdir():
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 1
            f.write_bytes(bytes(data))
    again = source(small.root, IndexStore(store_dir))
    view = ProjectView(again)
    if change == "offsets":
        with pytest.raises(NotFound):
            view.getattr("/" + small.path(0, 0))
    assert view.read_path("/" + small.path(0, 5), 0, 1 << 20) == small.expected(0, 5)
    builds = {"offsets": 1, "tar": 1, "cache": 1}[change]  # only dataset a reads blob_000
    view.readdir("/b/img")
    view.readdir("/c/img")
    assert again.index_builds == builds + (2 if change == "cache" else 0)


def _forge_cache_files(store_dir: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` in every cached payload, with a checksum that holds and
    no MAC (a forger does not have the folder's secret)."""
    from blobfs.cache import index_store

    for f in store_dir.glob(f"*{index_store.SUFFIX}"):
        data = f.read_bytes()
        _, key_len, payload_len, _ = index_store._HEAD.unpack_from(data)
        at = index_store._HEAD.size
        key, payload = data[at : at + key_len], data[at + key_len : at + key_len + payload_len]
        if old in payload:
            payload = payload.replace(old, new)
            head = index_store._HEAD.pack(index_store.MAGIC, key_len, len(payload), 0)
            f.write_bytes(head + key + payload + index_store._digest(key, payload))


@pytest.mark.usefixtures("settled_at_once")
def test_a_cached_index_blobfs_wrote_is_listed_without_checking_its_names_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next mount lists a blob index and a cached ordinary folder from files whose
    MAC holds without the pass over every name, and serves the same entries."""
    from blobfs.sources import compact

    project = write_scale_project(tmp_path / "p", ["a"], 100, 1, anns=True)
    store_dir = tmp_path / "cache"
    first = ProjectView(source(project.root, IndexStore(store_dir)))
    listings = [sorted(first.readdir(f"/a/{sub}")) for sub in ("img", "ann")]
    assert len(list(store_dir.glob("*.idx"))) == 2  # the blob index and the ann/ listing

    def no_check(names: bytes, count: int) -> object:
        raise AssertionError("names of a file blobfs wrote were checked")

    monkeypatch.setattr(compact, "_check_names", no_check)
    again = source(project.root, IndexStore(store_dir))
    view = ProjectView(again)
    assert [sorted(view.readdir(f"/a/{sub}")) for sub in ("img", "ann")] == listings
    assert again.index_builds == 0
    assert view.read_path("/" + project.path(0, 50), 0, 1 << 20) == project.expected(0, 50)


def test_a_cached_index_is_served_before_its_names_are_checked_and_a_bad_one_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache file whose checksum holds but whose names are out of order (only a bug or
    a forger makes one): lookups answer at once from exact names, the listing is EIO and
    logged once, and the next mount builds the index again."""
    project = write_scale_project(tmp_path / "p", ["a"], 100, 1)
    store_dir = tmp_path / "cache"
    ProjectView(source(project.root, IndexStore(store_dir))).preload()
    five, six = (f"small-image-{i:07d}.png".encode() for i in (5, 6))
    _forge_cache_files(store_dir, five + b"\0" + six, six + b"\0" + five)
    again = source(project.root, IndexStore(store_dir))
    view = ProjectView(again)
    with caplog.at_level(logging.WARNING):
        assert view.read_path("/" + project.path(0, 50), 0, 1 << 20) == project.expected(0, 50)
        for _ in range(2):
            with pytest.raises(BlobfsError) as info:
                view.readdir("/a/img")
            assert to_errno(info.value) == errno.EIO
    lines = [r.getMessage() for r in caplog.records if "index cache file damaged" in r.getMessage()]
    assert len(lines) == 1, caplog.records
    assert again.index_builds == 0
    third = source(project.root, IndexStore(store_dir))
    assert len(ProjectView(third).readdir("/a/img")) == 100
    assert third.index_builds == 1


def test_a_stat_before_the_index_is_built_is_answered_from_the_offsets_alone(
    small: ScaleProject,
) -> None:
    """A ``stat`` of a not yet indexed folder reads only the batch holding the name (and
    the member's tar header); the first read then builds the index and serves from it."""
    src = source(small.root)
    view = ProjectView(src)
    path = "/" + small.path(2, 1500)
    assert view.getattr(path)["st_size"] == len(small.expected(2, 1500))
    assert (src.quick_lookups, src.index_builds) == (1, 0)
    with pytest.raises(NotFound):
        view.getattr("/c/img/small-image-0009999.png")  # not there: the index says so
    assert src.index_builds == 1
    assert view.read_path(path, 0, 1 << 20) == small.expected(2, 1500)
    assert src.quick_lookups == 1  # the folder is loaded now: no quick answer needed


def test_a_stat_with_a_cached_index_is_answered_quickly_and_the_same(
    small: ScaleProject, tmp_path: Path
) -> None:
    """With the folder's index in the cache, a ``stat`` before the folder is loaded still
    takes the quick answer (one name found in the offsets files; the cached table is not
    read): the same attributes the loaded index gives, and the same misses."""
    store = IndexStore(tmp_path / "cache")
    assert ProjectView(source(small.root, store)).preload()[0] == 3 + 1 + 3 * 2
    names = ["/" + small.path(d, i) for d in range(3) for i in (0, 777, 1999)]
    missing = ["/a/img/small-image-0009999.png", "/b/img/nothing.png"]
    quick = source(small.root, IndexStore(tmp_path / "cache"))
    view = ProjectView(quick)
    answers = [view.getattr(path) for path in names]
    assert quick.quick_lookups == len(names) and quick.index_builds == 0
    store_stats = quick.stats()["index"]
    assert isinstance(store_stats, dict) and store_stats["cache"]["hits"] == 0  # not loaded
    loaded = source(small.root, IndexStore(tmp_path / "cache"))
    full = ProjectView(loaded)
    for ds in ("a", "b", "c"):
        full.readdir(f"/{ds}/img")
    assert [full.getattr(path) for path in names] == answers
    assert loaded.quick_lookups == 0 and loaded.index_builds == 0  # from the cache
    for path in missing:
        with pytest.raises(NotFound):
            view.getattr(path)
        with pytest.raises(NotFound):
            full.getattr(path)
    assert view.read_path(names[1], 0, 1 << 20) == small.expected(0, 777)


def test_a_burst_of_stats_before_the_index_reads_the_offsets_files_once(
    small: ScaleProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stats of many names of a folder not indexed yet reuse the offsets files read for
    the first (one dataset's kept, dropped once the folder's index is built); a file
    changed meanwhile is read again."""
    src = source(small.root)
    view = ProjectView(src)
    reads: list[str] = []
    original = src._whole

    def counting(rel: str) -> bytes | None:
        reads.append(rel)
        return original(rel)

    monkeypatch.setattr(src, "_whole", counting)
    for i in range(0, 2000, 100):
        assert view.getattr("/" + small.path(1, i))["st_size"] == len(small.expected(1, i))
    files = len(set(reads))
    assert src.quick_lookups == 20 and len(reads) == files
    reads.clear()
    view.getattr("/" + small.path(2, 7))  # another dataset: its own files, once
    view.getattr("/" + small.path(2, 8))
    assert reads and len(reads) == len(set(reads)) and src._quick_kept is not None
    view.readdir("/c/img")
    assert src._quick_kept is None  # the index answers that folder now


def test_a_quick_stat_never_answers_for_a_name_in_doubt_and_never_serves_bytes(
    tmp_path: Path,
) -> None:
    """A name in two offsets files, or one the tar disowns, waits for the index (which
    settles or refuses it); a name whose file is refused by a later batch may have been
    stat-ed, but reading it fails: no bytes come from the quick answer."""
    project = write_scale_project(tmp_path / "p", ["a"], 100, 2)
    ds = project.root / "a"
    first = ds / f"blob_000{OFFSETS_SUFFIX}"
    second = ds / f"blob_001{OFFSETS_SUFFIX}"
    ones = offsets_module.read_offsets_file(str(first)).members
    twos = offsets_module.read_offsets_file(str(second)).members
    twin = BlobMember(ones[3].name, twos[0].start, twos[0].end)  # another member's range
    shifted = BlobMember(ones[4].name, ones[4].start + 512, ones[4].end + 512)
    first.write_bytes(dumps_batch([*ones[:4], shifted, *ones[5:]]))
    second.write_bytes(dumps_batch([twin, *twos[1:]]))

    def fresh() -> tuple[LocalProjectSource, ProjectView]:
        src = source(project.root)
        return src, ProjectView(src)

    src, view = fresh()
    size = view.getattr(f"/a/img/{ones[3].name}")["st_size"]  # the tar settles the twins
    assert size == ones[3].size and (src.quick_lookups, src.index_builds) == (0, 1)
    src, view = fresh()
    view.getattr(f"/a/img/{shifted.name}")  # the tar disowns it: the index answers
    assert (src.quick_lookups, src.index_builds) == (0, 1)
    with pytest.raises(BlobfsError) as info:
        view.read_path(f"/a/img/{shifted.name}", 0, 1 << 20)
    assert to_errno(info.value) == errno.EIO
    evil = b"\x80\x02cos\nsystem\n."  # a later batch that refuses the whole file
    second.write_bytes(dumps_batch([twin, *twos[1:]]) + evil)
    src, view = fresh()
    assert view.getattr(f"/a/img/{twos[5].name}")["st_size"] == twos[5].size
    assert src.quick_lookups == 1
    with pytest.raises(NotFound):
        view.read_path(f"/a/img/{twos[5].name}", 0, 1 << 20)


def test_problems_are_reported_again_from_a_cached_index(tmp_path: Path) -> None:
    project = write_scale_project(tmp_path / "p", ["a"], 100, 1)
    offsets = project.root / "a" / f"blob_000{OFFSETS_SUFFIX}"
    members = offsets_module.read_offsets_file(str(offsets)).members
    offsets.write_bytes(dumps_batch([*members, BlobMember("bad/name.png", 0, 1)]))
    store = tmp_path / "cache"
    first = source(project.root, IndexStore(store))
    ProjectView(first).readdir("/a/img")
    again = source(project.root, IndexStore(store))
    ProjectView(again).readdir("/a/img")
    assert again.index_builds == 0
    assert first.problems() == again.problems() and any("bad/name" in p for p in first.problems())


def test_a_forgotten_dataset_is_listed_again_and_logs_no_old_problem_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What writeback asks once an import changed the project under the view."""
    project = write_scale_project(tmp_path / "p", ["a"], 100, 1)
    offsets = project.root / "a" / f"blob_000{OFFSETS_SUFFIX}"
    members = offsets_module.read_offsets_file(str(offsets)).members
    offsets.write_bytes(dumps_batch([*members, BlobMember("bad/name.png", 0, 1)]))
    view = ProjectView(source(project.root))
    with caplog.at_level(logging.WARNING):
        assert len(view.readdir("/a/img")) == 100
        (project.root / "a" / "img").mkdir()
        (project.root / "a" / "img" / "new.png").write_bytes(b"new")
        assert "new.png" not in view.readdir("/a/img")  # a local listing is read once
        view.forget(("a",))
        assert "new.png" in view.readdir("/a/img")
        assert view.read_path("/a/img/new.png", 0, 10) == b"new"
        (project.root / "b" / "ann").mkdir(parents=True)
        view.forget(("b",))  # a dataset the tree did not have: the root is listed again
        assert "b" in view.readdir("/")
        assert len(view.readdir("/a/img")) == 101  # the whole tree is read again, lazily
    lines = [r.getMessage() for r in caplog.records if "bad/name" in r.getMessage()]
    assert len(lines) == 1, lines
    assert sum("bad/name" in p for p in view.source.problems()) == 1


@pytest.fixture
def settled_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders count as settled as soon as they are listed (a test's folders are new)."""
    monkeypatch.setattr("blobfs.sources.project_dir.PLAIN_SETTLED_NS", 0)


def _ann_listing(root: Path, store_dir: Path) -> tuple[list[str], LocalProjectSource]:
    src = source(root, IndexStore(store_dir))
    return list(ProjectView(src).readdir("/a/ann")), src


HOSTILE_ANNS = ["\udcff.json", "new\nline.json", " lead.json", "a b.json", "ä.json", "-x.json"]


@pytest.mark.usefixtures("settled_at_once")
def test_a_remount_lists_an_unchanged_ordinary_folder_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ann/`` is not read again while the folder is unchanged; the cached listing is the
    folder's (same names, same order, hostile names too) and its files are looked up as
    before (sizes from ``lstat``)."""
    project = write_scale_project(tmp_path / "p", ["a"], 300, 1, anns=True)
    ann = project.root / "a" / "ann"
    for name in HOSTILE_ANNS:
        (ann / name).write_bytes(b"{}")
    (ann / "not-json.txt").write_bytes(b"x")  # left out (not an annotation), with or without
    store_dir = tmp_path / "cache"
    first, _ = _ann_listing(project.root, store_dir)
    reference = sorted(os.fsencode(n) for n in os.listdir(ann) if n.endswith(".json"))
    assert [os.fsencode(n) for n in first] == reference

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the folder was read again")

    monkeypatch.setattr("blobfs.safe_open.ProjectRoot.list_regular", refuse)
    again, src = _ann_listing(project.root, store_dir)
    assert again == first
    view = ProjectView(src)
    for name in (first[0], first[-1], "\udcff.json", "new\nline.json"):
        assert view.getattr(f"/a/ann/{name}")["st_size"] == (ann / name).stat().st_size
        assert view.read_path(f"/a/ann/{name}", 0, 1 << 20) == (ann / name).read_bytes()
    with pytest.raises(NotFound):
        view.getattr("/a/ann/not-json.txt")


@pytest.mark.parametrize("extra", [[], ["not-json.txt"], ["x.json.txt", "ä.json"], [".json"]])
def test_an_ordinary_folder_lists_its_annotations_bytewise(
    tmp_path: Path, extra: list[str]
) -> None:
    """Whatever else the folder holds (a file of another kind, a name that is not ASCII),
    ``ann/`` lists exactly its ``.json`` files, in the order of their bytes."""
    project = write_scale_project(tmp_path / "p", ["a"], 40, 1, anns=True)
    ann = project.root / "a" / "ann"
    for name in extra:
        (ann / name).write_bytes(b"{}")
    listed, _ = _ann_listing(project.root, tmp_path / "cache")
    reference = sorted(os.fsencode(n) for n in os.listdir(ann) if n.endswith(".json"))
    assert [os.fsencode(n) for n in listed] == reference


@pytest.mark.usefixtures("settled_at_once")
@pytest.mark.parametrize("change", ["added", "removed", "renamed", "replaced by a symlink"])
def test_a_changed_ordinary_folder_is_read_again(tmp_path: Path, change: str) -> None:
    project = write_scale_project(tmp_path / "p", ["a"], 50, 1, anns=True)
    ann = project.root / "a" / "ann"
    store_dir = tmp_path / "cache"
    first, _ = _ann_listing(project.root, store_dir)
    name = first[7]
    if change == "added":
        (ann / "zz-new.json").write_bytes(b"{}")
    elif change == "removed":
        (ann / name).unlink()
    elif change == "renamed":
        (ann / name).rename(ann / "zz-new.json")
    else:
        (ann / name).unlink()
        (ann / name).symlink_to("/etc/passwd")
    again, src = _ann_listing(project.root, store_dir)
    assert again == sorted(n for n in os.listdir(ann) if not (ann / n).is_symlink())
    assert (name in again) == (change == "added")
    if change == "replaced by a symlink":
        assert any("symlink" in p for p in src.problems())


def test_a_folder_changed_a_moment_ago_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change in the same tick of the file system's clock as the listing would leave
    the folder's mtime as it was; such a listing is never kept for the next mount."""
    from blobfs.safe_open import ProjectRoot

    project = write_scale_project(tmp_path / "p", ["a"], 50, 1, anns=True)
    store_dir = tmp_path / "cache"
    _ann_listing(project.root, store_dir)  # the folder was just written
    reads: list[object] = []
    real = ProjectRoot.list_regular

    def counted(self: ProjectRoot, rel: str) -> object:
        reads.append(rel)
        return real(self, rel)

    monkeypatch.setattr(ProjectRoot, "list_regular", counted)
    again, _ = _ann_listing(project.root, store_dir)
    assert reads == ["a/ann"] and len(again) == 50


@pytest.mark.usefixtures("settled_at_once")
def test_a_folder_with_entries_that_are_not_served_is_read_again_and_says_so(
    tmp_path: Path,
) -> None:
    project = write_scale_project(tmp_path / "p", ["a"], 50, 1, anns=True)
    (project.root / "a" / "ann" / "link.json").symlink_to("/etc/passwd")
    store_dir = tmp_path / "cache"
    for _ in range(2):
        names, src = _ann_listing(project.root, store_dir)
        assert len(names) == 50 and "link.json" not in names
        assert any("link.json" in p for p in src.problems())


@pytest.mark.usefixtures("settled_at_once")
def test_a_forged_cached_folder_listing_is_eio_and_read_again_at_the_next_mount(
    tmp_path: Path,
) -> None:
    project = write_scale_project(tmp_path / "p", ["a"], 100, 1, anns=True)
    store_dir = tmp_path / "cache"
    first, _ = _ann_listing(project.root, store_dir)
    five, six = (f"small-image-{i:07d}.png.json".encode() for i in (5, 6))
    _forge_cache_files(store_dir, five + b"\0" + six, six + b"\0" + five)
    view = ProjectView(source(project.root, IndexStore(store_dir)))
    with pytest.raises(BlobfsError) as info:
        view.readdir("/a/ann")
    assert to_errno(info.value) == errno.EIO
    again, _ = _ann_listing(project.root, store_dir)
    assert again == first


@pytest.mark.parametrize("ref", [AnnRef(1, 2), RemoteImageRef(1, 4, "v")])
def test_a_record_of_a_kind_the_source_never_lists_is_eio(
    tmp_path: Path, ref: AnnRef | RemoteImageRef
) -> None:
    project = write_scale_project(tmp_path / "p", ["a"], 2, 1)
    with pytest.raises(BlobfsError) as info:
        source(project.root).open(FileRecord("img/x.png", 4, 0, ref))
    assert to_errno(info.value) == errno.EIO


class _SlowFirstFolder(LocalProjectSource):
    """A real source whose ``slow`` dataset's img/ takes until ``release`` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, BlockCache(4096, 1 << 20))
        self.entered = threading.Event()
        self.release = threading.Event()

    def _blob_table(self, key: str, refused: dict[str, str]) -> FileTable:
        if key == "slow":
            self.entered.set()
            assert self.release.wait(30)
        return super()._blob_table(key, refused)


def test_a_slow_folder_does_not_hold_up_any_other(tmp_path: Path) -> None:
    project = write_scale_project(tmp_path / "p", ["fast", "slow"], 50, 2)
    src = _SlowFirstFolder(project.root)
    view = ProjectView(src)
    slow = threading.Thread(target=view.readdir, args=("/slow/img",))
    slow.start()
    try:
        assert src.entered.wait(10)
        started = time.monotonic()
        assert len(view.readdir("/fast/img")) == 50
        assert view.read_path("/" + project.path(0, 7), 0, 4096) == project.expected(0, 7)
        assert view.readdir("/slow/ann") == []  # another folder of the same dataset
        assert time.monotonic() - started < 5 and slow.is_alive()
    finally:
        src.release.set()
        slow.join(10)


# ---- through real mounts ---------------------------------------------------------------


def stats(mnt: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> ScaleProject:
    """200,000 images: two datasets of 100,000 in 4 tars."""
    return write_scale_project(tmp_path_factory.mktemp("big") / "p", ["ds0", "ds1"], 100_000, 4)


@pytest.fixture
def mount_env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(tmp_path / "xdg")}


@pytest.mark.fuse
def test_stat_right_after_mounting_200000_images_is_quick_and_a_remount_quicker(
    big: ScaleProject, tmp_path: Path, mount_env: dict[str, str], mounts: harness.Mounts
) -> None:
    """Generous bounds, not a benchmark: the first stat parses one dataset's offsets (not
    the whole project's); after a remount it parses none."""
    timings = []
    for run in range(2):
        mnt = tmp_path / f"mnt{run}"
        proc = mounts.start(big.root, mnt, log=tmp_path / f"log{run}", env=mount_env)
        started = time.monotonic()
        size = os.stat(mnt / big.path(1, 54_321)).st_size
        timings.append(time.monotonic() - started)
        assert size == len(big.expected(1, 54_321))
        assert (mnt / big.path(1, 54_321)).read_bytes() == big.expected(1, 54_321)
        assert len(os.listdir(mnt / "ds0" / "img")) == 100_000
        before = stats(mnt)["blob_reads"]
        delivered = 0
        for i in random.Random(run).sample(range(100_000), 200):
            data = (mnt / big.path(0, i)).read_bytes()
            assert data == big.expected(0, i)
            delivered += len(data)
        after = stats(mnt)["blob_reads"]
        assert isinstance(before, dict) and isinstance(after, dict)
        # each image plus its header's first fields, checked at its first read
        read = after["bytes_read"] - before["bytes_read"]
        assert delivered <= read <= delivered + 200 * FIELDS_END, (read, delivered)
        index = stats(mnt)["index"]
        assert isinstance(index, dict)
        cache = index["cache"]
        assert isinstance(cache, dict)
        # both datasets were read: built here, or (first mount) by the index worker
        assert index["builds"] + (cache["hits"] if run == 0 else 0) == (2 if run == 0 else 0)
        assert index["quick_lookups"] == 1  # the stat, before them (cached index or not)
        assert proc.unmount(30) == 0
    assert timings[0] < 20, timings
    assert timings[1] < 1.5, timings


@pytest.mark.fuse
def test_a_forged_cache_file_serves_exact_names_and_its_listing_is_eio_once(
    tmp_path: Path, mount_env: dict[str, str], mounts: harness.Mounts
) -> None:
    """Through a mount: a cache file whose checksum holds but whose names are out of
    order serves a stat and a read at once, fails the listing with EIO (logged once),
    and is built again at the next mount."""
    project = write_scale_project(tmp_path / "p", ["a"], 100, 1)
    store_dir = Path(mount_env["XDG_CACHE_HOME"]) / "blobfs" / "index"
    ProjectView(source(project.root, IndexStore(store_dir))).preload()
    five, six = (f"small-image-{i:07d}.png".encode() for i in (5, 6))
    _forge_cache_files(store_dir, five + b"\0" + six, six + b"\0" + five)
    log = tmp_path / "log"
    for run in range(2):
        mnt = tmp_path / f"mnt{run}"
        proc = mounts.start(project.root, mnt, log=log if run == 0 else None, env=mount_env)
        try:
            assert (mnt / project.path(0, 50)).read_bytes() == project.expected(0, 50)
            if run == 0:
                for _ in range(2):
                    with pytest.raises(OSError) as info:
                        os.listdir(mnt / "a" / "img")
                    assert info.value.errno == errno.EIO
            else:
                assert len(os.listdir(mnt / "a" / "img")) == 100
        finally:
            assert proc.unmount(20) == 0
    assert log.read_text().count("index cache file damaged") == 1


def _write_huge_offsets(path: Path, entries: int) -> None:
    """``entries`` empty images (valid, distinct names), written from one batch template."""
    batch = dumps_batch([BlobMember(f"n000000-{i:05d}.png", 0, 0) for i in range(10_000)])
    with open(path, "wb") as f:
        for b in range(entries // 10_000):
            f.write(batch.replace(b"n000000-", b"n%06d-" % b))


@pytest.mark.fuse
def test_listing_a_dataset_does_not_wait_for_another_being_indexed(
    tmp_path: Path, mount_env: dict[str, str], mounts: harness.Mounts
) -> None:
    project = write_scale_project(tmp_path / "p", ["huge", "small"], 10, 2)
    _write_huge_offsets(project.root / "huge" / f"blob_000{OFFSETS_SUFFIX}", 300_000)
    mnt = tmp_path / "mnt"
    mounts.start(project.root, mnt, log=tmp_path / "log", env=mount_env)
    huge: list[int] = []
    listing = threading.Thread(target=lambda: huge.append(len(os.listdir(mnt / "huge" / "img"))))
    started = time.monotonic()
    listing.start()
    time.sleep(0.3)
    small_started = time.monotonic()
    names = os.listdir(mnt / "small" / "img")
    small_s = time.monotonic() - small_started
    busy = listing.is_alive()
    assert (mnt / project.path(1, 3)).read_bytes() == project.expected(1, 3)
    listing.join(120)
    huge_s = time.monotonic() - started
    assert len(names) == 10 and huge == [300_000]
    # The proof is the order: the small folder answered while the huge one was still being
    # built. How much faster it was depends on how the two threads share the interpreter.
    assert busy and small_s < 5, (small_s, huge_s)


def test_a_background_build_steps_aside_while_requests_are_served(small: ScaleProject) -> None:
    """The mount's preload shares the interpreter with the requests: inside a build it
    pauses while requests keep arriving, and goes on at once when one waits for a folder
    (it may be the folder being built) or when they stop."""
    from blobfs.sources import compact

    view = ProjectView(source(small.root))
    calls: list[float] = []
    with compact.paced(lambda: calls.append(time.monotonic())):
        view.readdir("/a/ann")  # a folder of ordinary files, built under the hook
    assert calls
    view.readdir("/b/ann")
    count = len(calls)
    assert len(calls) == count  # outside the block no hook is called

    busy = threading.Event()

    def requests() -> None:
        while not busy.is_set():
            view.op_counts["read"] = view.op_counts.get("read", 0) + 1
            time.sleep(0.002)

    worker = threading.Thread(target=requests)
    worker.start()
    try:
        started = time.monotonic()
        threading.Timer(0.3, busy.set).start()
        view._step_aside()
        assert time.monotonic() - started >= 0.25  # paused until the requests stopped
    finally:
        busy.set()
        worker.join()
    busy.clear()
    worker = threading.Thread(target=requests)
    worker.start()
    try:
        view._foreground = 1  # a request waits for a folder to be filled
        started = time.monotonic()
        view._step_aside()
        assert time.monotonic() - started < 0.2
    finally:
        busy.set()
        worker.join()


@pytest.mark.fuse
def test_a_huge_folder_lists_names_and_its_files_are_looked_up_when_used(
    tmp_path: Path, mount_env: dict[str, str], mounts: harness.Mounts
) -> None:
    """Through the mount: a 300,000-file ``img/`` lists whole with names only (the kernel
    gets no attributes to build 300,000 inodes from), so a ``stat`` after ``ls`` is a
    lookup; a small folder's listing still carries them (no lookup per file)."""
    project = write_scale_project(tmp_path / "p", ["huge", "small"], 10, 2)
    _write_huge_offsets(project.root / "huge" / f"blob_000{OFFSETS_SUFFIX}", 300_000)
    mnt = tmp_path / "mnt"
    mounts.start(project.root, mnt, log=tmp_path / "log", env=mount_env)
    names = os.listdir(mnt / "huge" / "img")
    assert len(names) == 300_000 and len(set(names)) == 300_000
    small = os.listdir(mnt / "small" / "img")

    def getattrs() -> int:
        ops = stats(mnt)["fuse_ops"]
        assert isinstance(ops, dict)
        return int(ops.get("getattr", 0))

    before = getattrs()
    picked = random.Random(5).sample(names, 50)
    assert all(os.stat(mnt / "huge" / "img" / n).st_size == 0 for n in picked)
    for n in small:
        assert os.stat(mnt / "small" / "img" / n).st_size == len(
            project.expected(1, int(n.split("-")[-1].split(".")[0]))
        )
    looked_up = getattrs() - before
    assert 50 <= looked_up < 50 + 5, looked_up  # the huge folder's only (+ stats files)


def test_a_folder_scan_keeps_regular_files_and_says_what_the_rest_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ann/`` is scanned by directory entry type in bulk: regular files by name, every
    other entry ``lstat``-ed for its message, in chunks (a small chunk here)."""
    from blobfs import safe_open

    monkeypatch.setattr(safe_open, "LIST_CHUNK", 3)
    folder = tmp_path / "ann"
    folder.mkdir()
    files = {f"f{i}.json" for i in range(8)} | {"\udcff.json"}
    for name in files:
        (folder / name).write_bytes(b"{}")
    (folder / "link.json").symlink_to(folder / "f0.json")
    os.mkfifo(folder / "pipe.json")
    (folder / "sub").mkdir()
    root = safe_open.ProjectRoot(tmp_path)
    try:
        names, others = root.list_regular("ann")
    finally:
        root.close()
    assert sorted(names) == sorted(files) and len(names) == len(files)
    kinds = {item.name: safe_open.describe(item.mode) for item in others}
    assert kinds == {
        "link.json": "a symlink (not followed)",
        "pipe.json": "a FIFO",
        "sub": "a directory",
    }
