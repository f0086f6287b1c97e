"""What a listing hands libfuse: attributes the first time, names once the kernel has them.

``BlobfsFUSE.readdir_fuse_3`` is called here as libfuse calls it, with a filler that
records what it is given; no mount is needed to see which entries carry attributes.
"""

from __future__ import annotations

import ctypes
import stat
import threading
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest

from blobfs.fuse import compat
from blobfs.fuse.compat import (
    FUSE_FILL_DIR_PLUS,
    FUSE_READDIR_PLUS,
    BlobfsFUSE,
    CacheCoherence,
    ContentPusher,
)
from blobfs.view.tree import ListingRun

pytestmark = pytest.mark.skipif(compat.FUSE_MAJOR < 3, reason="readdirplus needs libfuse 3")

FILE = {"st_mode": stat.S_IFREG | 0o444, "st_size": 4000, "st_nlink": 1}
DIR = {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}


ENTRIES: list[tuple[str, dict[str, int] | None]] = [
    ("a.png", FILE),
    ("b.png", FILE),
    ("sub", DIR),
    ("c.json", None),  # size unknown without a fetch
]


class Listing:
    """An operations object with ``readdir_plus``: two files, a folder, an unsized file."""

    direct_io_prefix = None
    serves_readdir_plus = True

    def readdir_plus(self, path: str, start: int) -> Iterator[tuple[str, dict[str, int] | None]]:
        return iter(ENTRIES[start:])


def fuse() -> Any:
    """The FUSE object without mounting (its constructor runs the mount loop)."""
    f = BlobfsFUSE.__new__(BlobfsFUSE)
    f._listed = set()
    f.operations = Listing()
    f.encoding, f.errors, f.use_ns = "utf-8", "surrogateescape", True
    return f


def list_once(
    f: Any, room: int = 100, offset: int = 0, flags: int = FUSE_READDIR_PLUS
) -> list[tuple[str, int, int]]:
    """(name, file type, flags) of every entry the filler accepted, as libfuse sees them."""
    got: list[tuple[str, int, int]] = []

    def filler(buf: Any, name: bytes, stp: Any, off: int, flags: int) -> int:
        if len(got) == room:
            return 1  # the reply buffer is full
        got.append((name.decode(), stat.S_IFMT(stp.contents.st_mode), flags))
        return 0

    assert f.readdir_fuse_3(b"/ds/img", None, filler, offset, None, flags) == 0
    return got


def test_the_first_listing_carries_attributes_for_every_entry_that_has_them() -> None:
    got = list_once(fuse())
    assert [(n, fl) for n, _, fl in got[2:]] == [
        ("a.png", FUSE_FILL_DIR_PLUS),
        ("b.png", FUSE_FILL_DIR_PLUS),
        ("sub", FUSE_FILL_DIR_PLUS),
        ("c.json", 0),
    ]


def test_a_later_listing_sends_names_and_types_only() -> None:
    f = fuse()
    list_once(f)
    got = list_once(f)
    assert [n for n, _, _ in got] == [".", "..", "a.png", "b.png", "sub", "c.json"]
    assert all(fl == 0 for _, _, fl in got)
    kinds = {n: k for n, k, _ in got}
    assert kinds["sub"] == stat.S_IFDIR and kinds["a.png"] == stat.S_IFREG


def test_a_listing_cut_short_by_a_full_buffer_keeps_attributes_for_the_next_pages() -> None:
    """Only a listing that reached its end went out whole: the kernel may not hold the
    entries of pages it never received."""
    f = fuse()
    first_page = list_once(f, room=3)
    assert first_page[-1] == ("a.png", stat.S_IFREG, FUSE_FILL_DIR_PLUS)
    rest = list_once(f, offset=3)
    assert [(n, fl) for n, _, fl in rest] == [
        ("b.png", FUSE_FILL_DIR_PLUS),
        ("sub", FUSE_FILL_DIR_PLUS),
        ("c.json", 0),
    ]
    assert all(fl == 0 for _, _, fl in list_once(f))


# ---- runs: a large folder's files, sharing all attributes but the size -----------------

SHARED = {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_mtime": 7 * 10**9 + 5, "st_uid": 3}
RUNS: list[ListingRun | tuple[str, dict[str, int] | None]] = [
    ("sub", DIR),
    ListingRun([b"a.png", b"b.png", b"\xff.png"], [10, 600, 0], SHARED),
    ListingRun([b"c.png"], [4096], {**SHARED, "st_mtime": 9 * 10**9}),
    ListingRun([b"d.json", b"e.json"], [0, 0], None),  # sizes known only at lookup
]
#: what libfuse must receive for each entry after "." and "..": (name, flags, stat fields)
EXPECTED = [
    (b"sub", FUSE_FILL_DIR_PLUS, (stat.S_IFDIR | 0o555, 0, 0, 0)),
    (b"a.png", FUSE_FILL_DIR_PLUS, (stat.S_IFREG | 0o444, 10, 1, 7 * 10**9 + 5)),
    (b"b.png", FUSE_FILL_DIR_PLUS, (stat.S_IFREG | 0o444, 600, 2, 7 * 10**9 + 5)),
    (b"\xff.png", FUSE_FILL_DIR_PLUS, (stat.S_IFREG | 0o444, 0, 0, 7 * 10**9 + 5)),
    (b"c.png", FUSE_FILL_DIR_PLUS, (stat.S_IFREG | 0o444, 4096, 8, 9 * 10**9)),
    (b"d.json", 0, (stat.S_IFREG, 0, 0, 0)),
    (b"e.json", 0, (stat.S_IFREG, 0, 0, 0)),
]


class RunListing:
    """An operations object whose listing comes as runs (what a ``FileTable`` gives)."""

    direct_io_prefix = None
    serves_readdir_plus = True

    def readdir_plus(
        self, path: str, start: int
    ) -> Iterator[ListingRun | tuple[str, dict[str, int] | None]]:
        # entry ``start`` may fall inside a run: the rest of that run, then the others
        at = 0
        for item in RUNS:
            if isinstance(item, tuple):
                if at >= start:
                    yield item
                at += 1
                continue
            skip = max(0, start - at)
            if skip < len(item.names):
                yield ListingRun(item.names[skip:], item.sizes[skip:], item.attrs)
            at += len(item.names)


Seen = tuple[bytes, int, int, tuple[int, int, int, int]]


def list_runs(
    f: Any,
    room: int = 100,
    offset: int = 0,
    flags: int = FUSE_READDIR_PLUS,
    operations: object | None = None,
) -> list[Seen]:
    """(name, next offset, flags, (mode, size, blocks, mtime ns)) of each accepted entry."""
    got: list[Seen] = []

    def filler(buf: Any, name: bytes, stp: Any, off: int, fl: int) -> int:
        if len(got) == room:
            return 1
        st = stp.contents
        mtime = st.st_mtimespec.tv_sec * 10**9 + st.st_mtimespec.tv_nsec
        got.append((name, off, fl, (st.st_mode, st.st_size, st.st_blocks, mtime)))
        return 0

    f.operations = RunListing() if operations is None else operations
    assert f.readdir_fuse_3(b"/ds/img", None, filler, offset, None, flags) == 0
    return got


def test_a_run_hands_each_file_the_shared_attributes_and_its_own_size() -> None:
    got = list_runs(fuse())
    assert [(n, o) for n, o, _, _ in got] == [
        (n, i + 1) for i, n in enumerate([b".", b"..", *(e[0] for e in EXPECTED)])
    ]
    assert [(n, fl, attrs) for n, _, fl, attrs in got[2:]] == EXPECTED


def test_a_run_cut_by_a_full_buffer_goes_on_from_the_next_entry() -> None:
    f = fuse()
    first = list_runs(f, room=4)  # ".", "..", "sub", "a.png"
    assert first[-1][:2] == (b"a.png", 4)
    rest = list_runs(f, offset=4)
    assert [(n, fl, attrs) for n, _, fl, attrs in rest] == EXPECTED[2:]
    assert [o for _, o, _, _ in rest] == list(range(5, 5 + len(EXPECTED) - 2))


def test_a_plain_readdir_request_gets_names_and_types_paged_by_offset() -> None:
    """Without FUSE_READDIR_PLUS the kernel wants names and types only; the listing still
    pages by entry index rather than being produced whole for libfuse to keep."""
    f = fuse()
    got = list_runs(f, room=5, flags=0)
    assert [(n, o, fl) for n, o, fl, _ in got] == [
        (b".", 1, 0),
        (b"..", 2, 0),
        (b"sub", 3, 0),
        (b"a.png", 4, 0),
        (b"b.png", 5, 0),
    ]
    rest = list_runs(f, offset=5, flags=0)
    assert [n for n, _, _, _ in rest] == [e[0] for e in EXPECTED[3:]]
    assert all(fl == 0 and stat.S_IFMT(a[0]) == stat.S_IFREG for _, _, fl, a in rest)
    # a plain listing does not count as one the kernel received with attributes
    assert list_runs(f)[3][2] == FUSE_FILL_DIR_PLUS


def test_a_later_listing_of_runs_sends_names_only() -> None:
    f = fuse()
    list_runs(f)
    again = list_runs(f)
    assert [n for n, _, _, _ in again][2:] == [e[0] for e in EXPECTED]
    assert all(fl == 0 for _, _, fl, _ in again)
    assert all(a[1] == 0 for _, _, _, a in again)  # no stale size left in the stat


def test_a_c_filler_is_called_holding_the_interpreter_lock_and_gets_every_entry() -> None:
    """libfuse hands a C function pointer; it is called as a PYFUNCTYPE (no GIL release
    per entry) with the same arguments."""
    import ctypes

    from mfusepy import c_stat

    from blobfs.fuse.compat import _FILL_DIR, _keeping_the_gil

    got: list[tuple[bytes, int, int]] = []

    def record(buf: Any, name: bytes, stp: Any, off: int, fl: int) -> int:
        got.append((name, off, stp.contents.st_size))
        return 0

    c_filler = ctypes.CFUNCTYPE(
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(c_stat),
        ctypes.c_int64,
        ctypes.c_int,
    )(record)
    fast = _keeping_the_gil(c_filler)
    assert isinstance(fast, _FILL_DIR) and _keeping_the_gil(c_filler) is fast
    assert _keeping_the_gil(record) is record  # a Python filler stays as it is
    f = fuse()
    f.operations = RunListing()
    assert f.readdir_fuse_3(b"/ds/img", None, c_filler, 0, None, FUSE_READDIR_PLUS) == 0
    assert [(n, s) for n, _, s in got[2:]] == [(e[0], e[2][1]) for e in EXPECTED]
    assert [o for _, o, _ in got] == list(range(1, len(EXPECTED) + 3))


# ---- who chooses READDIRPLUS: blobfs (always) or the kernel (auto) ---------------------


def wanted_after_init(readdirplus_auto: bool) -> int:
    """The capabilities blobfs leaves wanted after libfuse's ``init`` (mfusepy's own
    ``init_fuse_3`` stubbed: it calls the operations' ``init``)."""

    class Conn(ctypes.Structure):
        _fields_ = [("want", ctypes.c_uint32)]

    conn = Conn(want=compat.FUSE_CAP_READDIRPLUS_AUTO | 1)
    f = fuse()
    f.readdirplus_auto = readdirplus_auto
    with (
        mock.patch.object(compat, "_remember_fuse"),
        mock.patch.object(compat.FUSE, "init_fuse_3", lambda self, conn, config: None),
    ):
        f.init_fuse_3(ctypes.pointer(conn), None)
    return int(conn.want)


def test_always_takes_the_choice_from_the_kernel_and_auto_leaves_it() -> None:
    assert wanted_after_init(False) == 1  # READDIRPLUS for every page
    assert wanted_after_init(True) == compat.FUSE_CAP_READDIRPLUS_AUTO | 1


def test_a_plain_readdir_page_carries_names_and_types_only() -> None:
    """In auto mode the kernel asks for pages after the first without attributes."""
    got = list_once(fuse(), flags=0)
    assert [n for n, _, _ in got] == [".", "..", "a.png", "b.png", "sub", "c.json"]
    assert all(fl == 0 for _, _, fl in got)


# ---- contents held in memory: handed to the kernel after the page went out ----------------


class Pushes:
    """Stands in for the pusher: what each page handed it, by folder."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        self.generations: list[int] = []

    def push(self, folder: bytes, files: list[tuple[bytes, bytes]], generation: int) -> None:
        self.got.append((folder, files))
        self.generations.append(generation)


class HeldListing:
    """A folder whose files' content is held (a remote ``ann/`` fetched for its listing),
    one of them not (its batch failed), then a run of files whose content is not held."""

    direct_io_prefix = None
    serves_readdir_plus = True

    def readdir_plus(self, path: str, start: int) -> Iterator[ListingRun]:
        names = [b"a.json", b"b.json", b"c.json", b"d.json"]
        contents = [b"{}", b'{"b": 1}', None, b"[]"]
        if start < 4:
            yield ListingRun(names[start:], [2, 8, 0, 2][start:], SHARED, contents[start:])
        yield ListingRun([b"e.png"][max(0, start - 4) :], [10], SHARED)


def list_held(f: Any, room: int = 100, offset: int = 0, flags: int = FUSE_READDIR_PLUS) -> Pushes:
    pushes = f._pusher = Pushes()
    list_runs(f, room, offset, flags, HeldListing())
    return pushes


def test_files_listed_with_attributes_hand_their_held_content_on_once_the_page_is_out() -> None:
    pushes = list_held(fuse())
    assert pushes.got == [
        (b"/ds/img", [(b"a.json", b"{}"), (b"b.json", b'{"b": 1}'), (b"d.json", b"[]")])
    ]


def test_only_the_files_that_went_out_on_the_page_are_handed_on() -> None:
    f = fuse()
    first = list_held(f, room=3)  # ".", "..", "a.json"
    assert first.got == [(b"/ds/img", [(b"a.json", b"{}")])]
    rest = list_held(f, offset=3)
    assert rest.got == [(b"/ds/img", [(b"b.json", b'{"b": 1}'), (b"d.json", b"[]")])]


def test_a_listing_of_names_only_hands_nothing_on() -> None:
    f = fuse()
    assert list_held(f, flags=0).got == []
    list_held(f)
    assert list_held(f).got == []  # the kernel already holds these entries


# ---- a push against an invalidation: the old content never lands after it -----------------


def ok() -> bool:
    """A notification the kernel accepted."""
    return True


class Pusher(ContentPusher):
    """The pusher without a mount or its thread: every file the kernel knows has a node
    id here, and what it stores is recorded (with whether the coherence lock was held)."""

    def __init__(self, cache: CacheCoherence) -> None:
        super().__init__("/mnt", {}, cache, start=False)
        self.nodes = {b"/mnt/ds/img/a.json": 7, b"/mnt/ds/img/b.json": 8, b"/mnt/ds/img/d.json": 9}
        self.stored: list[tuple[int, bytes, bool]] = []
        self.cache = cache

    def node_of(self, path: bytes, size: int) -> int | None:
        return self.nodes.get(path)

    def store(self, node: int, data: bytes) -> bool:
        self.stored.append((node, data, self.cache.lock.locked()))
        return True


def listed_then_pushed(invalidate_between: bool) -> Pusher:
    """List the held folder (as libfuse asks), maybe invalidate a file, then push the page."""
    pushes = list_held(fuse())
    [(folder, files)], [generation] = pushes.got, pushes.generations
    if invalidate_between:  # an import replaced b.json: the kernel is told to drop it
        assert compat.coherence.invalidate(ok)
    pusher = Pusher(compat.coherence)
    pusher.store_files(folder, files, generation, pusher.store)
    return pusher


def test_a_page_listed_with_no_invalidation_since_is_stored_file_by_file_under_the_lock() -> None:
    pusher = listed_then_pushed(invalidate_between=False)
    assert pusher.stored == [(7, b"{}", True), (8, b'{"b": 1}', True), (9, b"[]", True)]
    assert pusher.counts == {"push": 3}


def test_an_invalidation_between_the_listing_and_the_push_prevents_every_store_of_the_page() -> (
    None
):
    pusher = listed_then_pushed(invalidate_between=True)
    assert pusher.stored == []
    assert pusher.counts == {"push_stale": 3}  # left to their READs, answered afresh


def test_an_invalidation_waits_for_a_store_in_progress_then_drops_what_it_stored() -> None:
    cache = CacheCoherence()
    pusher = Pusher(cache)
    invalidated: list[int] = []
    late: list[threading.Thread] = []

    def store_while_an_import_lands(node: int, data: bytes) -> bool:
        pusher.store(node, data)
        late.append(threading.Thread(target=lambda: invalidated.append(cache.invalidate(ok))))
        late[0].start()
        late[0].join(0.2)
        assert invalidated == []  # the kernel is not told until these pages are in
        return True

    pusher.store_files(
        b"/ds/img", [(b"a.json", b"{}")], cache.generation, store_while_an_import_lands
    )
    late[0].join(5)
    assert invalidated == [True] and cache.generation == 1
    assert pusher.counts == {"push": 1}


def test_files_the_kernel_holds_with_another_size_are_left_to_their_read() -> None:
    pusher = Pusher(CacheCoherence())
    del pusher.nodes[b"/mnt/ds/img/b.json"]  # node_of: not this size, or not this mount's
    files = [(b"a.json", b"{}"), (b"b.json", b'{"b": 1}')]
    pusher.store_files(b"/ds/img", files, 0, pusher.store)
    assert [node for node, _, _ in pusher.stored] == [7]
    assert pusher.counts == {"push": 1, "push_skipped": 1}


def test_a_pusher_that_cannot_store_keeps_no_content_queued(tmp_path: Any) -> None:
    """Without libfuse's handle (here: no mount) the push thread gives up: what it was
    handed and everything listed later is left to its READ at once, not held in a queue
    that nothing empties."""
    counts: dict[str, int] = {}
    pusher = ContentPusher(str(tmp_path), counts)
    pusher.push(b"/ds/ann", [(b"a.json", b"{}"), (b"b.json", b"{}")], 0)
    deadline = threading.Event()
    for _ in range(200):
        if counts.get("push_skipped") == 2:
            break
        deadline.wait(0.01)
    pusher.push(b"/ds/ann", [(b"c.json", b"{}")], 0)
    assert counts == {"push_queued": 3, "push_skipped": 3}
    assert pusher._jobs.empty()


@pytest.mark.parametrize(
    "attrs",
    [
        {"st_mode": 0o100644, "st_nlink": 1, "st_size": 4000, "st_blocks": 8, "st_uid": 7},
        {"st_mode": 0o40755, "st_nlink": 2, "st_mtime": 1_764_770_000_123_456_789},
        {
            "st_mode": 0o100444,
            "st_size": 1 << 40,
            "st_mtime": 5_000_000_001,
            "st_ctime": 6_000_000_002,
            "st_atime": 5_000_000_001,
            "st_gid": 3,
            "not_a_stat_field": 1,
        },
    ],
)
def test_a_stat_is_filled_as_mfusepy_fills_it(attrs: dict[str, int]) -> None:
    """The faster filler every answer with attributes uses leaves the same bytes."""
    from mfusepy import set_st_attrs

    from blobfs.fuse.compat import c_stat, fill_stat

    ours, theirs = c_stat(), c_stat()
    fill_stat(ours, attrs)
    set_st_attrs(theirs, attrs, use_ns=True)
    assert bytes(ours) == bytes(theirs)
