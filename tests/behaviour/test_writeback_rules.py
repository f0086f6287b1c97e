"""The writeback overlay's rules (docs/writeback.md, "What can be written"), in-process and
through a real mount: what is written shows at once over the project, staged files can be
renamed and removed, annotations and meta.json may replace the project's, and a flush
makes staged files project files like the others."""

from __future__ import annotations

import errno
import json
import stat

from tests.support.crash import project_images
from tests.support.sample import png_bytes

from .conftest import Served, flush, status
from .fs import errno_of, write_file

RECT = {"title": "person", "shape": "rectangle", "color": "#FF0000"}


def test_a_new_image_shows_at_once_with_its_bytes_and_size(wb: Served) -> None:
    write_file(wb.fs, "/ds/img/fresh.png", png_bytes(600))
    assert "fresh.png" in wb.fs.listdir("/ds/img")
    st = wb.fs.stat("/ds/img/fresh.png")
    assert st.is_file and st.size == len(png_bytes(600))
    assert stat.S_IMODE(st.mode) & 0o200  # staged files are writable
    assert wb.fs.read("/ds/img/fresh.png") == png_bytes(600)
    assert wb.fs.read("/ds/img/fresh.png", 10, 20) == png_bytes(600)[10:30]


def test_the_project_still_shows_beside_staged_files(wb: Served) -> None:
    names = wb.fs.listdir("/ds/img")
    assert {f"img_{i:06d}.png" for i in range(10)} - {"img_000003.png"} <= set(names)
    assert wb.fs.read("/ds/img/img_000001.png") == png_bytes(1)


def test_a_staged_file_can_be_rewritten_renamed_and_removed(wb: Served) -> None:
    write_file(wb.fs, "/ds/img/.part", png_bytes(700))  # rsync: a temp name, then rename
    write_file(wb.fs, "/ds/img/.part", png_bytes(701))  # written again before the rename
    wb.fs.rename("/ds/img/.part", "/ds/img/renamed.png")
    assert wb.fs.read("/ds/img/renamed.png") == png_bytes(701)
    assert errno_of(wb.fs.stat, "/ds/img/.part") == errno.ENOENT
    write_file(wb.fs, "/ds/img/gone.png", png_bytes(702))
    wb.fs.unlink("/ds/img/gone.png")
    assert "gone.png" not in wb.fs.listdir("/ds/img")
    assert errno_of(wb.fs.read, "/ds/img/gone.png") == errno.ENOENT


def test_an_annotation_of_an_imported_image_may_be_replaced(wb: Served) -> None:
    path = "/ds/ann/img_000002.png.json"
    new = json.dumps({"size": {"height": 32, "width": 32}, "objects": [], "tags": []})
    write_file(wb.fs, path, new.encode())
    assert wb.fs.read(path) == new.encode()
    assert wb.fs.stat(path).size == len(new)


def test_meta_json_is_replaced_as_a_whole(wb: Served) -> None:
    meta = json.loads(wb.fs.read("/meta.json"))
    meta["classes"] = [RECT]
    data = json.dumps(meta).encode()
    write_file(wb.fs, "/meta.json", data)
    assert wb.fs.read("/meta.json") == data


def test_mkdir_makes_a_dataset_with_img_and_ann_at_once_and_rmdir_removes_it(
    wb: Served,
) -> None:
    wb.fs.mkdir("/made")
    assert "made" in wb.fs.listdir("/")
    assert sorted(wb.fs.listdir("/made")) == ["ann", "img"]
    assert wb.fs.stat("/made/img").is_dir and wb.fs.listdir("/made/img") == []
    wb.fs.rmdir("/made")
    assert "made" not in wb.fs.listdir("/")


def test_a_file_that_cannot_be_imported_stays_visible_and_is_reported(wb: Served) -> None:
    write_file(wb.fs, "/ds/img/not-an-image.png", b"plain text")
    answer = flush(wb.fs)
    assert "/ds/img/not-an-image.png" in answer["failed"]
    assert wb.fs.read("/ds/img/not-an-image.png") == b"plain text"
    assert "/ds/img/not-an-image.png" in status(wb.fs)["failed"]


def test_after_a_flush_a_new_image_is_a_project_file_like_the_others(wb: Served) -> None:
    write_file(wb.fs, "/ds/img/landed.png", png_bytes(800))
    flush(wb.fs)
    assert project_images(wb.root)["/ds/img/landed.png"] == png_bytes(800)
    assert wb.fs.read("/ds/img/landed.png") == png_bytes(800)
    assert errno_of(wb.fs.unlink, "/ds/img/landed.png") == errno.EPERM
    assert errno_of(write_file, wb.fs, "/ds/img/landed.png", b"x") == errno.EPERM


def test_the_status_file_reads_whole_after_it_grew(wb: Served) -> None:
    """``/.blobfs/writeback.json`` announces a 1 MiB bound and ends with a short read; a
    second read that finds a longer status (more digits) is whole, even within the
    attribute timeout (the kernel must neither cut it to the first read's length nor
    take that length as the file's size)."""
    before = json.loads(wb.fs.read("/.blobfs/writeback.json"))
    # more digits in pending_bytes: the next answer is longer than this one
    write_file(wb.fs, "/ds/img/grow.png", b"x" * (10 * before["pending_bytes"] + 1000))
    after = json.loads(wb.fs.read("/.blobfs/writeback.json"))
    assert after["pending"] == before["pending"] + 1
    wb.fs.unlink("/ds/img/grow.png")
