"""What the overlay remembers between the requests of a copy holds only while nothing
changed: a name found missing shows once written, a dataset removed refuses new files at
once, a name found missing in one folder says nothing of another.

In process over the real writable layer, and through a real mount with real tools.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobfs.errors import NotFound
from blobfs.writeback.fs import WritebackFS
from blobfs.writeback.spool import Spool
from tests.support import harness
from tests.support.sample import png_bytes
from tests.writeback.test_overlay import writable


@pytest.fixture
def view(project: Path, tmp_path: Path) -> Iterator[WritebackFS]:
    spool = Spool(tmp_path / "spool")
    fs, queue = writable(project, spool)
    yield fs
    queue.stop(drain=False)
    spool.close()


def write(view: WritebackFS, path: str, data: bytes) -> None:
    fh = view.create(path)
    view.write(fh, data, 0)
    view.close(fh)


def test_a_name_found_missing_shows_as_soon_as_it_is_created(view: WritebackFS) -> None:
    assert view.find_attrs("/ds/img/new.png") is None
    assert view.find_attrs("/ds/img/new.png") is None  # the kernel's exclusive create
    fh = view.create("/ds/img/new.png")
    attrs = view.find_attrs("/ds/img/new.png")
    assert attrs is not None and attrs["st_size"] == 0
    view.write(fh, png_bytes(1), 0)
    view.close(fh)
    attrs = view.find_attrs("/ds/img/new.png")
    assert attrs is not None and attrs["st_size"] == len(png_bytes(1))


def test_a_name_found_missing_says_nothing_of_another(view: WritebackFS) -> None:
    assert view.find_attrs("/ds/img/a.png") is None
    assert view.find_attrs("/ds/img/img_000001.png") is not None  # the project's own
    assert view.find_attrs("/ds/ann/a.png.json") is None


def test_a_renamed_file_shows_at_its_new_name_after_a_miss_there(view: WritebackFS) -> None:
    write(view, "/ds/img/old.png", png_bytes(2))
    assert view.find_attrs("/ds/img/moved.png") is None
    view.rename("/ds/img/old.png", "/ds/img/moved.png")
    assert view.find_attrs("/ds/img/moved.png") is not None
    assert view.find_attrs("/ds/img/old.png") is None


def test_a_removed_dataset_refuses_new_files_at_once(view: WritebackFS) -> None:
    view.mkdir("/fresh")
    write(view, "/fresh/img/a.png", png_bytes(3))  # the dataset is remembered as there
    view.unlink("/fresh/img/a.png")
    view.rmdir("/fresh")
    with pytest.raises(NotFound):
        view.create("/fresh/img/b.png")
    assert view.find_attrs("/fresh/img/a.png") is None


def test_a_removed_file_is_missing_again(view: WritebackFS) -> None:
    write(view, "/ds/ann/img_000001.png.json", b'{"objects": []}')
    assert view.find_attrs("/ds/ann/img_000001.png.json") is not None
    view.unlink("/ds/ann/img_000001.png.json")
    assert view.find_attrs("/ds/ann/img_000001.png.json") is not None  # the project's


@pytest.mark.fuse
def test_through_a_mount_names_datasets_and_renames_show_at_once(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    try:
        new = mnt / "ds" / "img" / "new.png"
        assert not new.exists()
        new.write_bytes(png_bytes(4))
        assert new.stat().st_size == len(png_bytes(4))
        moved = mnt / "ds" / "img" / "moved.png"
        assert not moved.exists()
        subprocess.run(["mv", str(new), str(moved)], check=True)
        assert moved.read_bytes() == png_bytes(4) and not new.exists()
        (mnt / "fresh").mkdir()
        (mnt / "fresh" / "img" / "a.png").write_bytes(png_bytes(5))
        (mnt / "fresh" / "img" / "a.png").unlink()
        (mnt / "fresh").rmdir()
        with pytest.raises(OSError) as raised:
            (mnt / "fresh" / "img" / "b.png").write_bytes(png_bytes(6))
        assert raised.value.errno == errno.ENOENT
        assert not os.path.exists(mnt / "fresh")
    finally:
        assert d.unmount() == 0
