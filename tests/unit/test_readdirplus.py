"""What a listing hands libfuse: attributes the first time, names once the kernel has them.

``BlobfsFUSE.readdir_fuse_3`` is called here as libfuse calls it, with a filler that
records what it is given; no mount is needed to see which entries carry attributes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import Any

import pytest

from blobfs.fuse import compat
from blobfs.fuse.compat import FUSE_FILL_DIR_PLUS, FUSE_READDIR_PLUS, BlobfsFUSE

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

    def readdir_plus(self, path: str, start: int) -> Iterator[tuple[str, dict[str, int] | None]]:
        return iter(ENTRIES[start:])


def fuse() -> Any:
    """The FUSE object without mounting (its constructor runs the mount loop)."""
    f = BlobfsFUSE.__new__(BlobfsFUSE)
    f._listed = set()
    f.operations = Listing()
    f.encoding, f.errors, f.use_ns = "utf-8", "surrogateescape", True
    return f


def list_once(f: Any, room: int = 100, offset: int = 0) -> list[tuple[str, int, int]]:
    """(name, file type, flags) of every entry the filler accepted, as libfuse sees them."""
    got: list[tuple[str, int, int]] = []

    def filler(buf: Any, name: bytes, st: Any, off: int, flags: int) -> int:
        if len(got) == room:
            return 1  # the reply buffer is full
        got.append((name.decode(), stat.S_IFMT(st.st_mode), flags))
        return 0

    assert f.readdir_fuse_3(b"/ds/img", None, filler, offset, None, FUSE_READDIR_PLUS) == 0
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
