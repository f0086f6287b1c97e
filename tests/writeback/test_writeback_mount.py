"""Writeback through a real mount: what is written arrives in the project exactly once."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blobfs.commands.check import check_project
from blobfs.format.offsets import OFFSETS_SUFFIX, dumps_batch, read_offsets_file
from blobfs.model import BlobMember
from tests.helpers import add_class_and_annotation
from tests.support import harness
from tests.support.crash import project_images
from tests.support.sample import make_images, png_bytes

pytestmark = pytest.mark.fuse


def blobfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blobfs", *args], capture_output=True, text=True)


def test_copied_folder_is_imported_once_with_the_same_bytes(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    new = make_images(tmp_path / "new", 25, start_seed=500)
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    subprocess.run(["cp", "-r", *map(str, new), str(mnt / "ds" / "img")], check=True)
    for p in new:  # visible at once, before any import
        assert (mnt / "ds" / "img" / p.name).read_bytes() == p.read_bytes()
    assert d.unmount() == 0
    served = project_images(project)
    for p in new:
        assert served[f"/ds/img/{p.name}"] == p.read_bytes()
    assert len(served) == 35
    report = check_project(project)
    assert report.problems == []
    ann = json.loads((project / "ds" / "ann" / "img_000500.png.json").read_bytes())
    assert ann["size"] == {"height": 32, "width": 32}


def test_new_dataset_meta_and_annotation_are_imported(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    (mnt / "fresh").mkdir()
    (mnt / "fresh" / "img" / "a.png").write_bytes(png_bytes(900))
    ann = add_class_and_annotation(mnt, mnt / "fresh" / "ann" / "a.png.json", "cat")
    flushed = blobfs("flush", str(mnt))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert d.unmount() == 0
    assert (project / "fresh" / "ann" / "a.png.json").read_bytes() == json.dumps(ann).encode()
    assert json.loads((project / "meta.json").read_bytes())["classes"][0]["title"] == "cat"
    assert project_images(project)["/fresh/img/a.png"] == png_bytes(900)


def test_bad_input_is_kept_and_reported_not_dropped(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    (mnt / "ds" / "img" / "not-an-image.png").write_bytes(b"hello")
    (mnt / "ds" / "ann" / "img_000001.png.json").write_text("{broken")
    (mnt / "ds" / "ann" / "img_000002.png.json").write_text(
        json.dumps({"size": {"height": 32, "width": 32}, "objects": [{"classTitle": "unicorn"}]})
    )
    meta = json.loads((mnt / "meta.json").read_bytes())
    meta["classes"] = [{"title": "cat", "shape": "rectangle", "color": "#FF0000"}]
    (mnt / "meta.json").write_text(json.dumps(meta))
    rectangle = {"classTitle": "cat", "geometryType": "rectangle", "points": {"exterior": [[1]]}}
    (mnt / "ds" / "ann" / "img_000003.png.json").write_text(
        json.dumps({"size": {"height": 32, "width": 32}, "objects": [rectangle]})
    )
    flushed = blobfs("flush", str(mnt))
    assert flushed.returncode == 1
    assert "not-an-image.png" in flushed.stdout and "not an image" in flushed.stdout
    assert "not valid JSON" in flushed.stdout
    assert "unknown classes ['unicorn']" in flushed.stdout
    assert "bad geometry: objects[0].points.exterior: [1] is not an [x, y] point" in flushed.stdout
    assert (mnt / "ds" / "img" / "not-an-image.png").read_bytes() == b"hello"
    assert d.unmount() == 0
    assert (tmp_path / "spool" / "staged" / "ds" / "img" / "not-an-image.png").exists()
    assert "/ds/img/not-an-image.png" not in project_images(project)


def test_staged_files_can_be_renamed_and_removed_before_import(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log", delay_s=30)
    img = mnt / "ds" / "img"
    (img / ".tmp-upload").write_bytes(png_bytes(700))  # what rsync does
    (img / ".tmp-upload").rename(img / "renamed.png")
    (img / "gone.png").write_bytes(png_bytes(701))
    (img / "gone.png").unlink()
    assert sorted(p for p in os.listdir(img) if not p.startswith("img_")) == ["renamed.png"]
    assert d.unmount() == 0
    served = project_images(project)
    assert served["/ds/img/renamed.png"] == png_bytes(700)
    assert "/ds/img/gone.png" not in served


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_rsync_into_the_mount(project: Path, tmp_path: Path, mounts: harness.Mounts) -> None:
    new = make_images(tmp_path / "new", 8, start_seed=300)
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    subprocess.run(["rsync", "-a", f"{tmp_path / 'new'}/", str(mnt / "ds" / "img")], check=True)
    assert d.unmount() == 0
    served = project_images(project)
    for p in new:
        assert served[f"/ds/img/{p.name}"] == p.read_bytes()


def test_busy_notempty_and_a_refused_annotation_retried_through_the_mount(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    mnt = tmp_path / "mnt"
    env = {"BLOBFS_FAILPOINT": "importing:sleep=2"}
    d = mounts.start_writeback(
        project, mnt, tmp_path / "spool", log=tmp_path / "log", env=env, delay_s=30
    )
    (mnt / "fresh").mkdir()
    (mnt / "fresh" / "img" / "a.png").write_bytes(png_bytes(901))
    with pytest.raises(OSError) as info:
        (mnt / "fresh").rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    person = {"classTitle": "person", "geometryType": "rectangle", "tags": []}
    person["points"] = {"exterior": [[1, 1], [5, 5]], "interior": []}
    ann = json.dumps({"size": {"height": 32, "width": 32}, "objects": [person]})
    (mnt / "ds" / "ann" / "img_000004.png.json").write_text(ann)
    flusher = subprocess.Popen([sys.executable, "-m", "blobfs", "flush", str(mnt)])
    staged = mnt / "fresh" / "img" / "a.png"
    deadline = time.monotonic() + 10
    while True:  # the status file says when the batch is importing
        status = json.loads((mnt / ".blobfs" / "writeback.json").read_bytes())
        if "/fresh/img/a.png" in status["importing"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "/fresh/img/a.png" in status["importing"]
    for action in (staged.unlink, lambda: staged.rename(staged.with_name("b.png"))):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.EBUSY
    assert flusher.wait(60) == 1  # the annotation names a class meta.json lacks
    meta = json.loads((mnt / "meta.json").read_bytes())
    meta["classes"] = [{"title": "person", "shape": "rectangle", "color": "#FF0000"}]
    (mnt / "meta.json").write_text(json.dumps(meta))
    flushed = blobfs("flush", str(mnt))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert d.unmount() == 0
    assert (project / "ds" / "ann" / "img_000004.png.json").read_text() == ann
    assert project_images(project)["/fresh/img/a.png"] == png_bytes(901)


def test_a_second_writeback_mount_of_the_same_source_is_refused_before_mounting(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    spool = tmp_path / "spool"
    first = mounts.start_writeback(project, tmp_path / "mnt", spool, log=tmp_path / "log")
    for other_spool in (spool, tmp_path / "spool2"):
        second = tmp_path / f"mnt-{other_spool.name}"
        second.mkdir()
        args = ["--writeback", "--spool-dir", str(other_spool), "--log-file", str(tmp_path / "l2")]
        result = blobfs("mount", str(project), str(second), *args)
        assert result.returncode != 0
        assert not os.path.ismount(second)
        expected = "is in use by another writeback mount" if other_spool == spool else "already"
        assert expected in result.stderr, result.stderr
    (tmp_path / "mnt" / "ds" / "img" / "one.png").write_bytes(png_bytes(77))
    assert first.unmount() == 0
    assert list(project_images(project)).count("/ds/img/one.png") == 1


def test_writing_a_name_the_project_holds_unservably_is_eexist(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    from .test_overlay import duplicate_across_blobs

    duplicate_across_blobs(project, tmp_path, "img_000003.png")
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    with pytest.raises(OSError) as info:
        (mnt / "ds" / "img" / "img_000003.png").write_bytes(png_bytes(3))
    assert info.value.errno == errno.EEXIST
    assert "not served (name appears more than once)" in (tmp_path / "log").read_text()
    assert d.unmount() == 0
    assert "/ds/img/img_000003.png" not in project_images(project)
    assert not any((tmp_path / "spool" / "staged").rglob("img_000003.png"))


def test_an_import_lists_its_dataset_again_and_logs_no_old_problem_again(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    offsets = next((project / "ds").glob(f"*{OFFSETS_SUFFIX}"))
    members = read_offsets_file(str(offsets)).members
    offsets.write_bytes(dumps_batch([*members, BlobMember("bad/name.png", 0, 1)]))
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    assert len(os.listdir(mnt / "ds" / "img")) == 10
    (mnt / "ds" / "img" / "new.png").write_bytes(png_bytes(901))
    flushed = blobfs("flush", str(mnt))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert len(os.listdir(mnt / "ds" / "img")) == 11  # listed again, from the project
    assert (mnt / "ds" / "img" / "new.png").read_bytes() == png_bytes(901)
    assert d.unmount() == 0
    lines = [line for line in (tmp_path / "log").read_text().splitlines() if "bad/name" in line]
    assert len(lines) == 1, lines


def test_images_with_their_annotations_are_imported_while_writes_go_on(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """With ``--batch-files``, no quiet period and no flush: the pairs are imported while
    the mount is still being written; the image without an annotation waits."""
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(
        project, mnt, tmp_path / "spool", "--batch-files", "4", log=tmp_path / "log", delay_s=3600
    )
    for i in range(3):
        (mnt / "ds" / "img" / f"pair{i}.png").write_bytes(png_bytes(1200 + i))
    for i in range(2):
        ann = {"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}
        (mnt / "ds" / "ann" / f"pair{i}.png.json").write_text(json.dumps(ann))
    deadline = time.monotonic() + 20
    while "/ds/img/pair1.png" not in project_images(project):
        assert time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.1)
    served = project_images(project)
    assert served["/ds/img/pair0.png"] == png_bytes(1200)
    assert "/ds/img/pair2.png" not in served
    assert (mnt / "ds" / "img" / "pair2.png").read_bytes() == png_bytes(1202)  # still staged
    assert d.unmount() == 0
    assert project_images(project)["/ds/img/pair2.png"] == png_bytes(1202)


def test_a_file_lives_on_after_one_of_its_descriptors_is_closed(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """close() commits and ends the daemon's handle of the open file, but the open file
    itself lives on in the kernel: a ``dup``'d descriptor still writes and reads it, a
    mapping still reads it after its descriptor is closed, and what the last close()
    committed is what is imported."""
    import mmap

    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "log")
    path = mnt / "ds" / "img" / "dup.png"
    first, rest = png_bytes(901)[:100], png_bytes(901)[100:]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    other = os.dup(fd)
    os.write(fd, first)
    os.close(fd)  # a flush: committed, the daemon's handle ended
    assert os.pwrite(other, rest, len(first)) == len(rest)
    assert os.pread(other, 50, 0) == first[:50]
    assert os.fstat(other).st_size == len(first) + len(rest)
    os.close(other)
    assert path.read_bytes() == png_bytes(901)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        assert mapped[: len(first)] == first  # read by page faults, after the close
    finally:
        mapped.close()
    assert d.unmount() == 0
    assert project_images(project)["/ds/img/dup.png"] == png_bytes(901)
