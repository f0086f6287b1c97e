"""What libfuse's getattr gets from a writeback mount: a missing name is ENOENT without an
error raised anywhere, and a file open for writing answers from its handle.

``BlobfsFUSE.fgetattr`` is called here as libfuse calls it (through mfusepy's wrapper) (path bytes, a ``stat`` buffer,
the ``fuse_file_info`` or NULL), over the real writable layer; no mount is needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from blobfs.fuse.compat import FUSE, BlobfsFUSE, c_stat
from blobfs.fuse.writeback_ops import WritebackOperations
from blobfs.writeback.spool import Spool
from tests.writeback.test_overlay import writable


class FileInfo(ctypes.Structure):
    """The one field of libfuse's ``fuse_file_info`` that getattr reads."""

    _fields_ = [("fh", ctypes.c_uint64)]


@pytest.fixture
def ops(project: Path, tmp_path: Path) -> Iterator[WritebackOperations]:
    spool = Spool(tmp_path / "spool")
    view, queue = writable(project, spool)
    yield WritebackOperations(view, queue)
    queue.stop(drain=False)
    spool.close()


def fuse(ops: WritebackOperations) -> Any:
    """The FUSE object without mounting (its constructor runs the mount loop)."""
    f = BlobfsFUSE.__new__(BlobfsFUSE)
    f.operations = ops
    f.encoding, f.errors, f.use_ns, f.raw_fi = "utf-8", "surrogateescape", True, False
    return f


def getattr_(f: Any, path: str, fh: int | None = None) -> tuple[int, c_stat]:
    st = c_stat()
    fip = ctypes.pointer(FileInfo(fh)) if fh is not None else None
    # through mfusepy's error boundary, as every libfuse callback
    return FUSE._wrapper(f, f.fgetattr, path.encode(), ctypes.pointer(st), fip), st


def test_a_name_not_there_is_enoent_and_nothing_is_raised(ops: WritebackOperations) -> None:
    f = fuse(ops)
    with mock.patch("blobfs.fuse.ops.FuseOSError", side_effect=AssertionError("raised")):
        got, _ = getattr_(f, "/ds/img/not-yet.png")
    assert got == -errno.ENOENT
    assert ops.view.op_counts["getattr"] == 1  # still counted as the getattr it is


def test_an_imported_file_fills_the_stat_buffer(ops: WritebackOperations, tmp_path: Path) -> None:
    got, st = getattr_(fuse(ops), "/ds/img/img_000000.png")
    assert got == 0
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == (tmp_path / "seed-images" / "img_000000.png").stat().st_size


def test_a_file_open_for_writing_answers_from_its_handle(ops: WritebackOperations) -> None:
    f = fuse(ops)
    fh = ops.create("/ds/img/new.png", 0o644, os.O_WRONLY)
    ops.write("/ds/img/new.png", b"x" * 1234, 0, fh)
    got, st = getattr_(f, "/ds/img/new.png", fh)
    assert got == 0
    assert stat.S_ISREG(st.st_mode) and st.st_size == 1234
    ops.flush("/ds/img/new.png", fh)
    ops.release("/ds/img/new.png", fh)
    got, st = getattr_(f, "/ds/img/new.png")  # by path once closed: the staged file
    assert got == 0 and st.st_size == 1234


def test_a_missing_control_file_is_still_enoent(ops: WritebackOperations) -> None:
    got, _ = getattr_(fuse(ops), "/.blobfs/no-such-file")
    assert got == -errno.ENOENT


def test_an_import_tells_the_kernel_only_of_paths_it_answered_within_the_timeout(
    ops: WritebackOperations,
) -> None:
    """The kernel keeps what an answer told it for the attribute timeout: an imported
    file answered longer ago than that needs no notification, one answered since does."""
    ops.attr_timeout_s = 0.05
    f = fuse(ops)
    getattr_(f, "/ds/img/img_000001.png")
    time.sleep(0.15)  # past twice the timeout: the first answer is forgotten
    assert getattr_(f, "/ds/img/img_000002.png")[0] == 0
    assert getattr_(f, "/ds/img/nothing-here.png")[0] == -errno.ENOENT  # no answer kept
    paths = ["/ds/img/img_000001.png", "/ds/img/img_000002.png", "/ds/img/nothing-here.png"]
    with mock.patch("blobfs.fuse.writeback_ops.invalidate_path", return_value=True) as told:
        ops.forget_cached(paths)
    assert told.call_args_list == [mock.call("/ds/img/img_000002.png")]
    time.sleep(0.15)
    with mock.patch("blobfs.fuse.writeback_ops.invalidate_path", return_value=True) as told:
        ops.forget_cached(paths)
    assert told.call_args_list == []
