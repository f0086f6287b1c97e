"""A full spool: nothing half-written is imported, and the spool drains once it can.

The spool lives on a small tmpfs here, a real file system that really fills up (ENOSPC on
demand, no mock): the journal must not hold space it cannot use, an import must start on a
full spool (and so free it), and a file whose write failed is refused at close and dropped.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobfs.errors import NoSpace
from blobfs.writeback.journal import HEADER_SIZE
from blobfs.writeback.spool import Spool
from tests.support import harness
from tests.support.sample import png_bytes

from .test_overlay import Overlay
from .test_writeback_mount import blobfs, project_images

BIG = 300  # png_bytes(seed, BIG, BIG): ~270 KB of noise, a valid image


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs (``mount -o remount,size=...`` gives it more room)."""
    where = tmp_path / "small-fs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_files_are_acknowledged_when_the_journal_has_no_room(tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=2m", str(tmpfs)], check=True)
    spool = Spool(tmpfs / "spool")  # the journal's 16 MiB of zeros cannot be written here
    fd, tmp = spool.new_temp()
    os.write(fd, b"small file")
    spool.commit(fd, tmp, "/ds/img/a.png")  # durable without the journal: fsync + rename
    spool.drop_temp(fd, tmp)
    again = Spool(tmpfs / "spool")  # as a restarted daemon finds it
    assert again.staged_path("/ds/img/a.png").read_bytes() == b"small file"
    assert os.stat(tmpfs / "spool" / "journal").st_size <= HEADER_SIZE + 4096


def test_a_clean_close_gives_the_journal_space_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for i in range(40):  # 40 x 1 MiB: more than two of the journal's segments
        fd, tmp = spool.new_temp()
        os.write(fd, bytes([i]) * (1 << 20))
        spool.commit(fd, tmp, f"/ds/img/{i}.png")
        spool.drop_temp(fd, tmp)
    assert os.stat(tmp_path / "spool" / "journal").st_size > 32 << 20
    spool.close()
    assert os.stat(tmp_path / "spool" / "journal").st_size <= (16 << 20) + HEADER_SIZE


def test_a_failed_write_is_never_imported_and_a_full_spool_drains(
    project: Path, tmpfs: Path
) -> None:
    overlay = Overlay(project, tmpfs / "spool")
    try:
        acknowledged: dict[str, bytes] = {}
        failed = None
        for i in range(200):
            path, data = f"/ds/img/big{i}.png", png_bytes(1000 + i, BIG, BIG)
            fh = overlay.view.create(path)
            try:
                for at in range(0, len(data), 65536):  # the kernel's chunks
                    overlay.view.write(fh, data[at : at + 65536], at)
            except NoSpace:
                failed = path
                with pytest.raises(NoSpace):
                    overlay.view.commit(fh)  # close() reports it too
                overlay.view.release(fh)
                break
            overlay.view.release(fh)
            acknowledged[path] = data
        assert failed is not None and acknowledged
        assert failed.rsplit("/", 1)[1] not in overlay.view.readdir("/ds/img")
        overlay.queue.run_once(force=True)  # the import starts on the full spool
        assert overlay.queue.status.last_error is None
        assert overlay.queue.status.pending == 0
        overlay.write("/ds/img/after.png", png_bytes(7))  # room again: the spool drained
        overlay.queue.run_once(force=True)
        assert overlay.queue.status.pending == 0
    finally:
        overlay.close()
    served = project_images(project)
    for path, data in acknowledged.items():
        assert served[path] == data
    assert failed not in served
    assert served["/ds/img/after.png"] == png_bytes(7)


@pytest.mark.fuse
def test_through_a_mount_a_full_spool_fails_the_write_and_flush_drains_it(
    project: Path, tmp_path: Path, tmpfs: Path, mounts: harness.Mounts
) -> None:
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmpfs / "spool", log=tmp_path / "log", delay_s=30)
    acknowledged: dict[str, bytes] = {}
    failed = None
    for i in range(200):
        name, data = f"big{i}.png", png_bytes(2000 + i, BIG, BIG)
        try:
            with open(mnt / "ds" / "img" / name, "wb") as f:
                f.write(data)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            failed = name
            break
        acknowledged[name] = data
    assert failed is not None and acknowledged
    assert not (mnt / "ds" / "img" / failed).exists()
    flushed = blobfs("flush", str(mnt))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    subprocess.run(["mount", "-o", "remount,size=40m", str(tmpfs)], check=True)
    (mnt / "ds" / "img" / failed).write_bytes(png_bytes(3000, BIG, BIG))  # written again
    assert d.unmount() == 0
    served = project_images(project)
    for name, data in acknowledged.items():
        assert served[f"/ds/img/{name}"] == data
    assert served[f"/ds/img/{failed}"] == png_bytes(3000, BIG, BIG)
