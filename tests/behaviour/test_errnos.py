"""Every errno docs/semantics.md and docs/writeback.md promise, each with its own test, run
in-process and through a real mount.

==========  ===================================================  ==============================
errno       documented for                                       test
==========  ===================================================  ==============================
ENOENT      a path that does not exist; a write into a dataset   test_enoent_*
            that does not exist
ENOTDIR     readdir on a file (and a path through a file)        test_enotdir_*
(remote)    ENOENT, ENOTDIR, EROFS of a remote project           test_enoent_enotdir_and_erofs_*
EISDIR      a file operation on a folder (errors.py)             test_eisdir_for_a_read_of_a_folder
EROFS       open for writing, creat, mkdir, unlink, rename,      test_erofs_*
            chmod, truncate on a read-only mount
EIO         blob missing, truncated, a folder, range past its    test_eio_for_a_damaged_blob
            end
EIO         server fails (5xx) after the retries                 test_eio_when_the_server_keeps_failing
EIO         remote blob gone (HTTP 404)                          test_eio_when_the_remote_blob_is_gone
EIO         any unexpected exception                             test_eio_for_an_unexpected_exception
ETIMEDOUT   an operation not done within --timeout               test_etimedout_*
EACCES      the server refuses the token (images, annotations,   test_eacces_*
            meta.json, listings)
EPERM       writeback: imported image rewritten, imported file   test_eperm_*
            renamed/removed/chmod'ed, paths outside datasets
EBUSY       writeback: write/rename/unlink of a file whose       test_ebusy_while_its_batch_imports
            batch is importing
EEXIST      writeback: an image name the project holds           test_eexist_*
            unservably (create, rename); mkdir of a dataset
            that exists
ENOTEMPTY   writeback: rmdir of a new dataset holding files      test_enotempty_*
ENOSPC      writeback: a write on a full spool, and close()      test_enospc_*
==========  ===================================================  ==============================
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.sample import png_bytes

from .conftest import DAMAGED, TOKEN, Served, flush, status
from .fs import FS, errno_of, wait_until, write_file

IMPORTED = "/ds/img/img_000000.png"


def _image_doc(served: Served, name: str, dataset: str = "train") -> dict[str, Any]:
    assert served.emulator is not None
    store = served.emulator.store
    for ds in store.all("datasets"):
        if ds["name"] == dataset:
            for doc in store.all("images", ds["id"]):
                if doc["name"] == name:
                    return doc
    raise AssertionError(name)


# ---- ENOENT, ENOTDIR, EISDIR --------------------------------------------------------------


def test_enoent_for_a_path_that_does_not_exist(ro: Served) -> None:
    for path in ("/nope", "/train/img/missing.png", "/train/ann/missing.png.json", "/x/img"):
        assert errno_of(ro.fs.stat, path) == errno.ENOENT, path
        assert errno_of(ro.fs.read, path) == errno.ENOENT, path
    assert errno_of(ro.fs.listdir, "/train/nope") == errno.ENOENT


def test_enotdir_for_a_listing_of_a_file(ro: Served) -> None:
    assert errno_of(ro.fs.listdir, "/meta.json") == errno.ENOTDIR
    assert errno_of(ro.fs.listdir, "/train/img/plain.png") == errno.ENOTDIR


def test_enotdir_for_a_path_through_a_file(ro: Served) -> None:
    assert errno_of(ro.fs.stat, "/meta.json/x") == errno.ENOTDIR


def test_eisdir_for_a_read_of_a_folder(ro: Served) -> None:
    assert errno_of(ro.fs.read, "/train/img") == errno.EISDIR


def test_enoent_enotdir_and_erofs_on_a_remote_mount_too(remote: Callable[..., Any]) -> None:
    with remote() as r:
        assert errno_of(r.fs.stat, "/train/img/missing.png") == errno.ENOENT
        assert errno_of(r.fs.listdir, "/meta.json") == errno.ENOTDIR
        assert errno_of(write_file, r.fs, "/train/img/new.png", b"x") == errno.EROFS
        assert errno_of(r.fs.mkdir, "/newds") == errno.EROFS


# ---- EROFS ----------------------------------------------------------------------------------

EROFS_CASES: dict[str, Callable[[FS], object]] = {
    "creat": lambda fs: write_file(fs, "/train/img/new.png", b"x"),
    "mkdir": lambda fs: fs.mkdir("/newds"),
    "unlink": lambda fs: fs.unlink("/train/img/plain.png"),
    "rename": lambda fs: fs.rename("/train/img/plain.png", "/train/img/p2.png"),
    "chmod": lambda fs: fs.chmod("/meta.json", 0o644),
    "truncate": lambda fs: fs.truncate("/meta.json", 0),
}


@pytest.mark.parametrize("case", sorted(EROFS_CASES))
def test_erofs_for_every_change_to_a_read_only_mount(ro: Served, case: str) -> None:
    assert errno_of(EROFS_CASES[case], ro.fs) == errno.EROFS
    assert ro.fs.read("/train/img/plain.png") == ro.expected["/train/img/plain.png"]


@pytest.mark.only_on(
    "mount",
    reason="the kernel refuses it (the mount is ro) before asking the daemon; no-open mode "
    "means the daemon's open never sees write flags",
)
def test_erofs_for_an_open_for_writing_of_an_existing_file(ro: Served) -> None:
    assert errno_of(ro.fs.open_write, "/train/img/plain.png", False) == errno.EROFS


# ---- EIO --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DAMAGED)
def test_eio_for_a_damaged_blob(ro: Served, dataset: str) -> None:
    """Missing tar, tar cut short, tar that is a folder, entry past the tar's end: EIO
    for its images (the kernel repeats the read; still EIO), and every other file reads."""
    names = ro.fs.listdir(f"/{dataset}/img")
    assert names, dataset
    failing = [n for n in names if errno_of(ro.fs.read, f"/{dataset}/img/{n}") == errno.EIO]
    expected = names if dataset != "past" else [names[-1]]
    assert failing == expected, (dataset, failing)
    assert errno_of(ro.fs.read, f"/{dataset}/img/{failing[0]}") == errno.EIO
    assert ro.fs.read("/train/img/img_000001.png") == ro.expected["/train/img/img_000001.png"]
    if ro.mount is not None:
        assert ro.mount.alive()
        assert "blob" in ro.mount.log_text()


@pytest.mark.only_on(
    "inprocess",
    reason="no real part raises an unexpected exception on demand, and a mock cannot reach "
    "into the daemon's process",
)
def test_eio_for_an_unexpected_exception(ro: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ro.ops is not None

    def broken(*args: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ro.ops.view, "read_path", broken)
    assert errno_of(ro.fs.read, "/train/img/plain.png") == errno.EIO  # not EINVAL


def test_eio_when_the_server_keeps_failing(remote: Callable[..., Any]) -> None:
    with remote() as r:
        r.fs.listdir("/train/img")
        r.emulator.faults.update({"fail_n": 1000, "fail_status": 500})
        assert errno_of(r.fs.read, "/train/img/img_000002.png") == errno.EIO
        r.emulator.faults.reset()
        assert r.fs.read("/train/img/img_000002.png") == png_bytes(2)  # the next read retries


def test_eio_when_the_remote_blob_is_gone(remote: Callable[..., Any]) -> None:
    """Its Team Files object deleted (``img_000007.png`` is alone in its blob, and only
    this test reads it): EIO, one log line naming the blob and the 404."""
    with remote() as r:
        r.fs.listdir("/train/img")
        blob = _image_doc(r, "img_000007.png")["relatedDataId"]
        store = r.emulator.store
        if store.get_many("files", [blob]):
            store.remove_team_file(store.get("files", blob))
        assert errno_of(r.fs.read, "/train/img/img_000007.png") == errno.EIO
        assert errno_of(r.fs.read, "/train/img/img_000007.png") == errno.EIO
        assert r.fs.read("/train/img/img_000004.png") == png_bytes(4)
        if r.mount is not None:
            lines = [ln for ln in r.log_text().splitlines() if f"blob {blob}" in ln]
            assert len(lines) == 1 and "404" in lines[0], r.log_text()[-1500:]


# ---- ETIMEDOUT, EACCES --------------------------------------------------------------------


def test_etimedout_when_the_server_is_slower_than_the_deadline(
    remote: Callable[..., Any],
) -> None:
    with remote(timeout_s=1.0) as r:
        r.fs.listdir("/train/img")
        r.emulator.faults.update({"latency_ms": 3000})
        started = time.monotonic()
        assert errno_of(r.fs.read, "/train/img/img_000005.png") == errno.ETIMEDOUT
        assert time.monotonic() - started < 2.5
        r.emulator.faults.reset()
        time.sleep(0.3)  # past the window in which a repeat fails at once
        assert r.fs.read("/train/img/img_000005.png") == png_bytes(5)


def test_eacces_when_the_token_is_refused(remote: Callable[..., Any]) -> None:
    with remote() as r:
        r.emulator.token = "revoked"  # before anything was listed: the root's listing
        assert errno_of(r.fs.listdir, "/") == errno.EACCES
        assert errno_of(r.fs.read, "/meta.json") == errno.EACCES
        r.emulator.token = TOKEN
        r.fs.listdir("/train/img")
        r.emulator.token = "revoked"
        for path in (
            "/train/img/img_000006.png",
            "/train/ann/img_000006.png.json",
            "/train/img/plain.png",
        ):
            assert errno_of(r.fs.read, path) == errno.EACCES, path
        assert errno_of(r.fs.listdir, "/other/img") == errno.EACCES


# ---- writeback: EPERM, EEXIST, ENOTEMPTY, ENOENT ------------------------------------------

EPERM_CASES: dict[str, Callable[[FS], object]] = {
    "rewrite an imported image": lambda fs: write_file(fs, IMPORTED, b"x"),
    "unlink an imported image": lambda fs: fs.unlink(IMPORTED),
    "rename an imported image": lambda fs: fs.rename(IMPORTED, "/ds/img/moved.png"),
    "unlink an imported annotation": lambda fs: fs.unlink("/ds/ann/img_000000.png.json"),
    "chmod an imported image": lambda fs: fs.chmod(IMPORTED, 0o600),
    "a file at the top": lambda fs: write_file(fs, "/stray.txt", b"x"),
    "a folder inside a dataset": lambda fs: fs.mkdir("/ds/elsewhere"),
    "a file beside img and ann": lambda fs: write_file(fs, "/ds/notes.txt", b"x"),
    "an annotation not named <image>.json": lambda fs: write_file(fs, "/ds/ann/x.txt", b"{}"),
    "rmdir of an imported dataset": lambda fs: fs.rmdir("/ds"),
}


@pytest.mark.parametrize("case", sorted(EPERM_CASES))
def test_eperm_for_what_writeback_refuses(wb: Served, case: str) -> None:
    assert errno_of(EPERM_CASES[case], wb.fs) == errno.EPERM
    assert wb.fs.read(IMPORTED) == png_bytes(0)


def test_eperm_for_rmdir_of_img_in_a_new_dataset(wb: Served) -> None:
    wb.fs.mkdir("/keepsdirs")
    assert errno_of(wb.fs.rmdir, "/keepsdirs/img") == errno.EPERM
    wb.fs.rmdir("/keepsdirs")


def test_eexist_for_an_image_name_the_project_holds_unservably(wb: Served) -> None:
    assert "img_000003.png" not in wb.fs.listdir("/ds/img")
    assert errno_of(write_file, wb.fs, "/ds/img/img_000003.png", png_bytes(3)) == errno.EEXIST
    write_file(wb.fs, "/ds/img/tmp-twin.png", png_bytes(5))
    assert errno_of(wb.fs.rename, "/ds/img/tmp-twin.png", "/ds/img/img_000003.png") == (
        errno.EEXIST
    )
    wb.fs.unlink("/ds/img/tmp-twin.png")


def test_eexist_for_mkdir_of_a_dataset_that_exists(wb: Served) -> None:
    assert errno_of(wb.fs.mkdir, "/ds") == errno.EEXIST


def test_enotempty_for_rmdir_of_a_new_dataset_with_files(wb: Served) -> None:
    wb.fs.mkdir("/full")
    write_file(wb.fs, "/full/img/a.png", png_bytes(52))
    assert errno_of(wb.fs.rmdir, "/full") == errno.ENOTEMPTY
    wb.fs.unlink("/full/img/a.png")
    wb.fs.rmdir("/full")  # its always-present img/ and ann/ do not count


def test_enoent_for_a_write_into_a_dataset_that_does_not_exist(wb: Served) -> None:
    assert errno_of(write_file, wb.fs, "/nope/img/a.png", b"x") == errno.ENOENT


# ---- writeback: EBUSY, ENOSPC ---------------------------------------------------------------


def test_ebusy_while_its_batch_imports(fresh_wb: Callable[..., Any]) -> None:
    with fresh_wb(env={"BLOBFS_FAILPOINT": "importing:sleep=1.5"}) as w:
        write_file(w.fs, "/ds/img/new.png", png_bytes(50))
        flush_answer = w.fs.read("/.blobfs/flush-new-busy")  # asks; waits at most 1 s
        assert flush_answer
        assert wait_until(lambda: status(w.fs)["importing"] == ["/ds/img/new.png"])
        assert errno_of(w.fs.unlink, "/ds/img/new.png") == errno.EBUSY
        assert errno_of(w.fs.rename, "/ds/img/new.png", "/ds/img/other.png") == errno.EBUSY
        assert errno_of(write_file, w.fs, "/ds/img/new.png", png_bytes(51)) == errno.EBUSY
        flush(w.fs)
        assert errno_of(w.fs.unlink, "/ds/img/new.png") == errno.EPERM  # imported now
        assert w.fs.read("/ds/img/new.png") == png_bytes(50)


def test_enospc_for_a_write_on_a_full_spool_and_again_at_close(
    fresh_wb: Callable[..., Any], tmpfs: Path
) -> None:
    big = 300  # png_bytes(seed, 300, 300): ~270 KB of noise, a valid image
    with fresh_wb(spool=tmpfs / "spool") as w:
        failed = None
        for i in range(200):
            path, data = f"/ds/img/big{i}.png", png_bytes(1000 + i, big, big)
            fd = w.fs.open_write(path)
            code = 0
            for at in range(0, len(data), 65536):  # the kernel's chunks
                code = errno_of(w.fs.write, fd, data[at : at + 65536], at)
                if code:
                    break
            if code:
                assert code == errno.ENOSPC
                assert errno_of(w.fs.close, fd) == errno.ENOSPC  # close() says it too
                failed = path
                break
            w.fs.close(fd)
        assert failed is not None, "the spool never filled"
        assert failed.rsplit("/", 1)[1] not in w.fs.listdir("/ds/img")
        assert w.fs.read("/ds/img/big0.png") == png_bytes(1000, big, big)
