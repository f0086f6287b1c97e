"""A remote batch's import runs in a worker process; whatever becomes of the worker (it
cannot start, dies, hangs), the batch is imported once, by the daemon if need be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs.failpoints import ENV as FAILPOINT_ENV
from blobfs.format.pack import new_blob_stem
from blobfs.sly.api import SuperviselyApi
from blobfs.transport.http import HttpClient
from blobfs.writeback.import_worker import DEADLINE_ENV, FAILPOINT, ImportWorker, WorkerImporter
from blobfs.writeback.remote import RemoteImporter
from blobfs.writeback.spool import INLINE_MAX, Batch, Spool
from tests.helpers import stage_held
from tests.support import harness
from tests.support.sample import make_images, png_bytes

from .conftest import TOKEN, build_project
from .test_remote_writeback import (
    copy_in_and_flush,
    remote_images,
    resume_and_flush,
    writeback_mount,
)

pytestmark = [pytest.mark.remote]


@pytest.fixture
def remote_project(tmp_path: Path, emulator: Emulator) -> int:
    project, _ = build_project(tmp_path, count=4)
    return upload_local_project(emulator.url, TOKEN, project)


class _Counting:
    """The in-process import, counting the batches it is given."""

    def __init__(self, inner: RemoteImporter) -> None:
        self.inner = inner
        self.batches = 0

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        self.batches += 1
        self.inner.import_batch(spool, batch)


def _in_daemon(emu: Emulator, project: int) -> _Counting:
    return _Counting(RemoteImporter(SuperviselyApi(HttpClient(emu.url, TOKEN)), project))


def _batch(tmp_path: Path, count: int = 4) -> tuple[Spool, Batch, dict[str, bytes]]:
    """A batch of ``count`` held images, the first with an annotation."""
    spool = Spool(tmp_path / "spool")
    images = {f"w{i}.png": png_bytes(900 + i) for i in range(count)}
    for name, data in images.items():
        stage_held(spool, f"/train/img/{name}", data)
    ann = {"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}
    stage_held(spool, "/train/ann/w0.png.json", json.dumps(ann).encode())
    files = [f"/train/img/{n}" for n in images] + ["/train/ann/w0.png.json"]
    batch = spool.create_batch(Batch("b1", ["train"], files, new_blob_stem("train")))
    return spool, batch, images


def _assert_imported_once(emu: Emulator, project: int, images: dict[str, bytes]) -> None:
    got = remote_images(emu, project)
    for name, data in images.items():
        assert got[f"train/{name}"] == [data]


def _worker(emu: Emulator, project: int, deadline_s: float = 60) -> ImportWorker:
    return ImportWorker(emu.url, TOKEN, 4, project, deadline_s)


def test_a_batch_imported_in_the_worker_lands_once_and_the_daemon_saves_each_step(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    spool, batch, images = _batch(tmp_path)
    fallback = _in_daemon(emulator, remote_project)
    importer = WorkerImporter(fallback, lambda: _worker(emulator, remote_project))
    try:
        importer.import_batch(spool, batch)
        assert importer.in_worker and fallback.batches == 0
        # the daemon's batch and its manifest hold what the worker's steps gave
        saved = json.loads((spool.batches_dir / "b1" / "manifest.json").read_bytes())
        assert batch.state == saved["state"] == "registered"
        assert sorted(batch.image_ids) == sorted(saved["image_ids"]) == sorted(images)
        _assert_imported_once(emulator, remote_project, images)
        importer.import_batch(spool, batch)  # again, as a retry would: nothing new
        _assert_imported_once(emulator, remote_project, images)
    finally:
        importer.close()


def test_a_step_the_daemon_cannot_save_fails_the_import_and_the_retry_goes_on_from_the_last(
    tmp_path: Path, emulator: Emulator, remote_project: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, batch, images = _batch(tmp_path)
    real_save = spool.save_batch

    def full_at_upload(b: Batch) -> None:
        if b.state == "uploaded":
            raise OSError(28, "No space left on device")
        real_save(b)

    monkeypatch.setattr(spool, "save_batch", full_at_upload)
    fallback = _in_daemon(emulator, remote_project)
    importer = WorkerImporter(fallback, lambda: _worker(emulator, remote_project))
    try:
        with pytest.raises(OSError, match="No space"):
            importer.import_batch(spool, batch)
        saved = json.loads((spool.batches_dir / "b1" / "manifest.json").read_bytes())
        assert saved["state"] == "packed"
        monkeypatch.setattr(spool, "save_batch", real_save)
        batch = spool.open_batches()[0]  # what the queue's retry finds
        importer.import_batch(spool, batch)  # the same worker, still in step with the daemon
        assert importer.in_worker and fallback.batches == 0
    finally:
        importer.close()
    _assert_imported_once(emulator, remote_project, images)


def test_the_token_reaches_the_worker_by_its_pipe_only(
    emulator: Emulator, remote_project: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_TOKEN", TOKEN)  # as a mount given its token by the environment
    worker = _worker(emulator, remote_project)
    try:
        pid = worker._proc.pid
        assert TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    finally:
        worker.close()


def test_the_worker_runs_at_a_lower_priority_than_the_daemon(
    emulator: Emulator, remote_project: int
) -> None:
    """When both want a CPU, the daemon's FUSE requests (the copy) come first."""
    worker = _worker(emulator, remote_project)
    try:
        pid = worker._proc.pid
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        deadline = time.monotonic() + 30
        while os.getpriority(os.PRIO_PROCESS, pid) == ours and time.monotonic() < deadline:
            time.sleep(0.05)  # until the worker has started
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(ours + 5, 19)
    finally:
        worker.close()


def test_a_worker_that_cannot_start_leaves_every_import_to_the_daemon(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    spool, batch, images = _batch(tmp_path)
    fallback = _in_daemon(emulator, remote_project)

    def cannot_start() -> ImportWorker:
        raise OSError("no python")

    importer = WorkerImporter(fallback, cannot_start)
    importer.import_batch(spool, batch)
    assert not importer.in_worker and fallback.batches == 1
    _assert_imported_once(emulator, remote_project, images)


def test_a_batch_with_an_image_not_held_is_packed_and_imported_in_the_daemon(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    spool = Spool(tmp_path / "spool")
    big = png_bytes(990) + bytes(INLINE_MAX)  # too large to be held: a file of its own
    fd, tmp = spool.new_temp()
    os.write(fd, big)
    spool.commit(fd, tmp, "/train/img/big.png")
    spool.drop_temp(fd, tmp)
    batch = spool.create_batch(Batch("b2", ["train"], ["/train/img/big.png"], "train_big"))
    fallback = _in_daemon(emulator, remote_project)
    importer = WorkerImporter(fallback, lambda: _worker(emulator, remote_project))
    try:
        importer.import_batch(spool, batch)  # its tar is written into the spool: not by the worker
        assert fallback.batches == 1 and importer.in_worker
    finally:
        importer.close()
    _assert_imported_once(emulator, remote_project, {"big.png": big})


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_worker_that_dies_or_hangs_leaves_the_batch_to_the_daemon(
    how: str,
    tmp_path: Path,
    emulator: Emulator,
    remote_project: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAILPOINT_ENV, FAILPOINT if how == "dies" else f"{FAILPOINT}:sleep=60")
    spool, batch, images = _batch(tmp_path)
    fallback = _in_daemon(emulator, remote_project)
    importer = WorkerImporter(fallback, lambda: _worker(emulator, remote_project, deadline_s=1))
    started = time.monotonic()
    importer.import_batch(spool, batch)
    assert time.monotonic() - started < 30  # a hung worker is not waited for past its deadline
    assert not importer.in_worker and fallback.batches == 1
    _assert_imported_once(emulator, remote_project, images)
    importer.import_batch(spool, batch)  # from then on in the daemon
    assert fallback.batches == 2


def _worker_of(daemon: int) -> int:
    [pid] = [
        p
        for p in harness.pids_with_args("-m", "blobfs.writeback.import_worker")
        if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(daemon)
    ]
    return pid


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_through_a_mount_a_lost_worker_leaves_the_copy_to_the_daemon(
    how: str, tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    env = {FAILPOINT_ENV: FAILPOINT if how == "dies" else f"{FAILPOINT}:sleep=60"}
    env[DEADLINE_ENV] = "1"
    new = make_images(tmp_path / "new", 6, start_seed=500)
    log = copy_in_and_flush(emulator, remote_project, new, tmp_path, env=env)
    _assert_imported_once(emulator, remote_project, {p.name: p.read_bytes() for p in new})
    assert "import worker lost" in log.read_text()


@pytest.mark.fuse
def test_through_a_mount_the_worker_imports_pairs_while_the_copy_goes_on(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    wb = ["--writeback", "--spool-dir", str(tmp_path / "spool"), "--writeback-delay", "3600"]
    proc = harness.start_remote(
        emulator.url,
        remote_project,
        mnt,
        *wb,
        *["--batch-files", "4", "--log-level", "INFO"],
        token=TOKEN,
        log=log,
    )
    ann = {"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}
    images = {f"pair{i}.png": png_bytes(950 + i) for i in range(2)}
    try:
        for name, data in images.items():
            (mnt / "train" / "img" / name).write_bytes(data)
            (mnt / "train" / "ann" / f"{name}.json").write_text(json.dumps(ann))
        deadline = time.monotonic() + 30  # no flush, no quiet period: the count seals it
        while "import_worker: imported 2 images" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        assert proc.unmount(60) == 0
    _assert_imported_once(emulator, remote_project, images)


@pytest.mark.fuse
def test_a_daemon_killed_with_sigkill_takes_its_worker_down_and_the_next_mount_imports(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    new = make_images(tmp_path / "new", 6, start_seed=600)
    mnt, spool = tmp_path / "mnt", tmp_path / "spool"
    # the worker is caught in its import: the batch is sealed, nothing of it uploaded
    env = {FAILPOINT_ENV: f"{FAILPOINT}:sleep=60"}
    proc = writeback_mount(emulator, remote_project, mnt, tmp_path / "log", spool, env=env)
    subprocess.run(["cp", *map(str, new), str(mnt / "train" / "img")], check=True)
    worker = _worker_of(proc.pid)
    subprocess.Popen(  # the flush waits for the import; the kill ends it
        [sys.executable, "-m", "blobfs", "flush", str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not any((spool / "batches").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.kill9()  # only takes the dead mount away
    deadline = time.monotonic() + 10
    while harness.pid_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not harness.pid_alive(worker)
    resume_and_flush(emulator, remote_project, mnt, spool, tmp_path / "log2")
    _assert_imported_once(emulator, remote_project, {p.name: p.read_bytes() for p in new})
    assert not any(os.scandir(spool / "batches"))
