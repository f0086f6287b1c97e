"""Writeback into a remote project: blobs land in Team Files, images are registered by
offsets exactly once (crash or not), annotations and meta follow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs.format.ann_coords import to_pixel
from tests.helpers import add_class_and_annotation
from tests.support import harness
from tests.support.sample import make_images

from .conftest import TOKEN, build_project

pytestmark = [pytest.mark.fuse, pytest.mark.remote]


def api(emu: Emulator, method: str, body: dict) -> object:  # type: ignore[type-arg]
    r = requests.post(
        f"{emu.url}/public/api/v3/{method}", json=body, headers={"x-api-key": TOKEN}, timeout=30
    )
    r.raise_for_status()
    return r.json()


def remote_images(emu: Emulator, project: int) -> dict[str, list[bytes]]:
    """``dataset/name -> [bytes, ...]`` (a list, so a duplicate shows as two entries)."""
    out: dict[str, list[bytes]] = {}
    datasets = api(emu, "datasets.list", {"projectId": project, "recursive": True})
    for ds in datasets["entities"]:  # type: ignore[index]
        for img in api(emu, "images.list", {"datasetId": ds["id"]})["entities"]:  # type: ignore[index]
            r = requests.post(
                f"{emu.url}/public/api/v3/images.download",
                json={"id": img["id"]},
                headers={"x-api-key": TOKEN},
                timeout=30,
            )
            out.setdefault(f"{ds['name']}/{img['name']}", []).append(r.content)
    return out


def writeback_mount(
    emu: Emulator, pid: int, mnt: Path, log: Path, spool: Path, env: dict[str, str] | None = None
) -> harness.Mount:
    return harness.start_remote(
        emu.url,
        pid,
        mnt,
        "--writeback",
        "--spool-dir",
        str(spool),
        "--writeback-delay",
        "30",
        token=TOKEN,
        log=log,
        env=env or {},
    )


def flush(mnt: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blobfs", "flush", str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_in_and_flush(
    emu: Emulator, pid: int, images: list[Path], tmp_path: Path, env: dict[str, str] | None = None
) -> Path:
    """Mount ``pid`` for writeback, ``cp`` ``images`` into ``train/img``, ``blobfs flush``
    (which must succeed) and unmount cleanly; the mount's log."""
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    proc = writeback_mount(emu, pid, mnt, log, tmp_path / "spool", env=env)
    try:
        subprocess.run(["cp", *map(str, images), str(mnt / "train" / "img")], check=True)
        result = flush(mnt)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        assert proc.unmount(60) == 0
    return log


def resume_and_flush(emu: Emulator, pid: int, mnt: Path, spool: Path, log: Path) -> None:
    """Mount ``pid`` again over the ``spool`` a killed daemon left, ``blobfs flush``
    (which must succeed) and unmount cleanly."""
    proc = writeback_mount(emu, pid, mnt, log, spool)
    try:
        result = flush(mnt)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        assert proc.unmount(60) == 0


@pytest.fixture
def remote_project(tmp_path: Path, emulator: Emulator) -> int:
    project, _ = build_project(tmp_path, count=10)
    return upload_local_project(emulator.url, TOKEN, project)


def test_images_written_into_a_remote_mount_are_imported_once(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    new = make_images(tmp_path / "new", 15, start_seed=700)
    mnt = tmp_path / "mnt"
    proc = writeback_mount(emulator, remote_project, mnt, tmp_path / "log", tmp_path / "spool")
    try:
        subprocess.run(["cp", *map(str, new), str(mnt / "train" / "img")], check=True)
        (mnt / "fresh").mkdir()
        subprocess.run(["cp", str(new[0]), str(mnt / "fresh" / "img" / "first.png")], check=True)
        ann = add_class_and_annotation(mnt, mnt / "train" / "ann" / "img_000700.png.json", "dog")
        result = flush(mnt)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        assert proc.unmount(60) == 0
    got = remote_images(emulator, remote_project)
    for p in new:
        assert got[f"train/{p.name}"] == [p.read_bytes()]
    assert got["fresh/first.png"] == [new[0].read_bytes()]
    assert len(got) == 10 + 1 + 15 + 1  # seeded blob images + plain image + new ones
    meta = api(emulator, "projects.meta", {"id": remote_project})
    assert [c["title"] for c in meta["classes"]] == ["dog"]  # type: ignore[index]
    train = next(
        d
        for d in api(emulator, "datasets.list", {"projectId": remote_project})["entities"]
        if d["name"] == "train"
    )  # type: ignore[index]
    [image] = [
        i
        for i in api(emulator, "images.list", {"datasetId": train["id"]})["entities"]
        if i["name"] == "img_000700.png"
    ]  # type: ignore[index]
    got = api(emulator, "annotations.info", {"imageId": image["id"]})
    stored = got["annotation"]  # type: ignore[index]
    # the server keeps subpixel geometry, as the SDK's upload sends it; back in pixels it is
    # what was written
    assert stored["objects"][0]["points"]["exterior"] == [[1, 1], [6, 6]]
    assert to_pixel(stored) == ann
    files = api(emulator, "file-storage.list", {"teamId": 1, "path": "/blob-files/"})
    assert len(files) >= 2  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "point", ["remote-after-pack", "remote-after-upload", "remote-after-register"]
)
def test_a_crash_between_upload_and_registration_makes_no_duplicates(
    point: str, tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    new = make_images(tmp_path / "new", 6, start_seed=800)
    mnt, spool = tmp_path / "mnt", tmp_path / "spool"
    proc = writeback_mount(
        emulator, remote_project, mnt, tmp_path / "log", spool, env={"BLOBFS_FAILPOINT": point}
    )
    subprocess.run(["cp", *map(str, new), str(mnt / "train" / "img")], check=True)
    flush(mnt)
    assert proc.wait(30) == 137
    proc.kill9()  # only takes the dead mount away
    resume_and_flush(emulator, remote_project, mnt, spool, tmp_path / "log2")
    got = remote_images(emulator, remote_project)
    for p in new:
        assert got[f"train/{p.name}"] == [p.read_bytes()], point
    assert not any(os.scandir(spool / "batches"))


def test_after_a_flush_the_mount_serves_the_new_annotation_and_meta_at_once(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    """Sizes and contents change together: no old annotation from a cache, no new meta.json
    cut to the old length by the kernel's cached attributes."""
    mnt = tmp_path / "mnt"
    proc = writeback_mount(emulator, remote_project, mnt, tmp_path / "log", tmp_path / "spool")
    ann_path = mnt / "train" / "ann" / "img_000001.png.json"
    try:
        old_ann, old_meta = ann_path.read_bytes(), (mnt / "meta.json").read_bytes()
        assert json.loads(old_ann)["objects"] == []
        ann = add_class_and_annotation(mnt, ann_path, "dog")  # meta.json grows by one class
        done = threading.Event()

        def keep_statting() -> None:  # the kernel holds fresh attributes when flush returns
            while not done.is_set():
                for path in (ann_path, mnt / "meta.json"):
                    os.stat(path)
                time.sleep(0.01)

        statter = threading.Thread(target=keep_statting)
        statter.start()
        try:
            result = flush(mnt)
        finally:
            done.set()
            statter.join()
        assert result.returncode == 0, result.stdout + result.stderr
        for path in (ann_path, mnt / "meta.json"):  # at once: no wait for a timeout
            data = path.read_bytes()
            assert os.stat(path).st_size == len(data), path
            json.loads(data)
        assert json.loads(ann_path.read_bytes())["objects"] == ann["objects"]
        meta = json.loads((mnt / "meta.json").read_bytes())
        assert [c["title"] for c in meta["classes"]] == ["dog"]
        assert len((mnt / "meta.json").read_bytes()) != len(old_meta)
    finally:
        assert proc.unmount(60) == 0


def test_an_imported_image_reads_its_written_bytes_and_its_annotation_the_servers(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    """An image is imported byte for byte from its staged copy, so its import drops
    nothing of it from the kernel; its annotation, which the server may store otherwise,
    is dropped and read anew: what a fresh mount serves."""
    [image] = make_images(tmp_path / "new", 1, start_seed=710)
    mnt = tmp_path / "mnt"
    img_path = mnt / "train" / "img" / image.name
    ann_path = mnt / "train" / "ann" / f"{image.name}.json"
    written_ann = {"description": "new", "size": {"height": 32, "width": 32}, "tags": []}
    written_ann["objects"] = []
    log = tmp_path / "log"
    args = ("--writeback", "--spool-dir", str(tmp_path / "spool"), "--writeback-delay", "30")
    proc = harness.start_remote(
        emulator.url, remote_project, mnt, *args, "--log-level", "DEBUG", token=TOKEN, log=log
    )
    try:
        img_path.write_bytes(image.read_bytes())
        ann_path.write_text(json.dumps(written_ann))
        before = (img_path.read_bytes(), os.stat(img_path))  # held by the kernel
        result = flush(mnt)
        assert result.returncode == 0, result.stdout + result.stderr
        after = (img_path.read_bytes(), os.stat(img_path))
        served_ann = ann_path.read_bytes()
        assert os.stat(ann_path).st_size == len(served_ann)
    finally:
        assert proc.unmount(60) == 0
    assert before[0] == after[0] == image.read_bytes()
    # the same length: what the kernel holds of it stays true (its mode and mtime are the
    # project's from the next lookup on, within the mount's attribute timeout)
    assert after[1].st_size == before[1].st_size
    dropped = re.findall(r"kernel caches of \d+ of (\d+) imported files", log.read_text())
    assert dropped and sum(map(int, dropped)) == 1  # the annotation, not the image
    fresh = harness.start_remote(emulator.url, remote_project, mnt, token=TOKEN)
    try:
        assert ann_path.read_bytes() == served_ann
        assert json.loads(served_ann)["description"] == "new"
        assert img_path.read_bytes() == image.read_bytes()
    finally:
        assert fresh.unmount(60) == 0


def test_an_import_tells_the_kernel_only_of_the_annotations_it_may_still_hold(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    """The kernel keeps a file's size for the attribute timeout after its last answer,
    and a writable mount's pages only until the next open: an annotation written longer
    ago than that needs no notification when its import replaces it by the server's
    copy, and both read back whole, at their new size."""
    images = make_images(tmp_path / "new", 2, start_seed=720)
    mnt = tmp_path / "mnt"
    ann = {"description": "written long ago", "size": {"height": 32, "width": 32}}
    ann.update(tags=[], objects=[])
    log = tmp_path / "log"
    args = ("--writeback", "--spool-dir", str(tmp_path / "spool"), "--writeback-delay", "30")
    proc = harness.start_remote(
        emulator.url, remote_project, mnt, *args, "--log-level", "DEBUG", token=TOKEN, log=log
    )
    anns = [mnt / "train" / "ann" / f"{image.name}.json" for image in images]
    try:
        for image in images:
            (mnt / "train" / "img" / image.name).write_bytes(image.read_bytes())
        anns[0].write_text(json.dumps(ann))
        # past twice the attribute timeout of the first one's last answer: the mount
        # remembers an answer for at least the timeout, at most about twice that
        time.sleep(2.5)
        anns[1].write_text(json.dumps({**ann, "description": "written just now"}))
        result = flush(mnt)
        assert result.returncode == 0, result.stdout + result.stderr
        served = [path.read_bytes() for path in anns]
        sizes = [os.stat(path).st_size for path in anns]
    finally:
        assert proc.unmount(60) == 0
    told = re.findall(
        r"kernel caches of \d+ of (\d+) imported files dropped \((\d+) answered", log.read_text()
    )
    assert [(int(n), int(lately)) for n, lately in told] == [(2, 1)]
    assert sizes == [len(data) for data in served]
    fresh = harness.start_remote(emulator.url, remote_project, mnt, token=TOKEN)
    try:
        assert [path.read_bytes() for path in anns] == served
    finally:
        assert fresh.unmount(60) == 0
    assert [json.loads(data)["description"] for data in served] == [
        "written long ago",
        "written just now",
    ]


def test_in_process_an_imported_annotation_is_read_anew_from_the_server(
    tmp_path: Path, emulator: Emulator, remote_project: int
) -> None:
    """The layer below the kernel: after the import the view and the source hold no old
    copy of the annotation (nor its size)."""
    from blobfs.cache.blocks import BlockCache
    from blobfs.sly.api import SuperviselyApi
    from blobfs.sources.remote import RemoteProjectSource
    from blobfs.transport.http import HttpClient
    from blobfs.view.tree import ProjectView
    from blobfs.writeback.fs import WritebackFS
    from blobfs.writeback.queue import WritebackQueue
    from blobfs.writeback.remote import RemoteImporter
    from blobfs.writeback.spool import Spool
    from blobfs.writeback.validate import Validator

    client = HttpClient(emulator.url, TOKEN)
    source = RemoteProjectSource(
        SuperviselyApi(client), remote_project, BlockCache(1 << 16, 1 << 22)
    )
    spool = Spool(tmp_path / "spool")
    base = ProjectView(source, listing_ttl_s=60)
    queue = WritebackQueue(
        spool, RemoteImporter(source.api, remote_project), Validator(spool, base), delay_s=0
    )
    view = WritebackFS(base, spool, queue)
    path = "/train/ann/img_000002.png.json"
    try:
        old = view.read_path(path, 0, 1 << 20)
        assert view.getattr(path)["st_size"] == len(old)
        meta = json.loads(view.read_path("/meta.json", 0, 1 << 20))
        meta["classes"] = [{"title": "cat", "shape": "rectangle", "color": "#FF0000"}]
        rect = {"classTitle": "cat", "geometryType": "rectangle", "tags": []}
        rect["points"] = {"exterior": [[2, 2], [9, 9]], "interior": []}
        ann = json.loads(old)
        ann["objects"] = [rect]
        for where, data in (("/meta.json", meta), (path, ann)):
            fh = view.create(where)
            view.write(fh, json.dumps(data).encode(), 0)
            view.release(fh)
        queue.run_once(force=True)
        assert queue.status.pending == 0 and queue.status.failed == {}
        assert not spool.staged_path(path).exists()
        new = view.read_path(path, 0, 1 << 20)
        assert json.loads(new)["objects"] == [rect]
        assert view.getattr(path)["st_size"] == len(new)
    finally:
        spool.close()
        source.close()


@pytest.mark.sdk
def test_the_stock_sdk_registers_an_imported_blob_into_another_project(
    tmp_path: Path, emulator: Emulator, remote_project: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an import leaves in Team Files is the SDK's own layout (``<stem>.tar`` with
    ``<stem>_offsets.pkl`` beside it), so the guide's reuse works: the same blob registered
    into another project without uploading the images again, bytes read back whole."""
    sly = pytest.importorskip("supervisely")
    monkeypatch.setenv("SUPERVISELY_SKIP_HTTPS_USER_HELPER_CHECK", "1")
    sdk = sly.Api(emulator.url, TOKEN, retry_count=2, retry_sleep_sec=0, ignore_task_id=True)
    team = sdk.team.get_list()[0]
    seeded = {f["name"] for f in sdk.file.list(team.id, "/blob-files/")}
    new = make_images(tmp_path / "new", 6, start_seed=900)
    copy_in_and_flush(emulator, remote_project, new, tmp_path)
    names = {f["name"] for f in sdk.file.list(team.id, "/blob-files/")} - seeded
    [tar] = [n for n in names if n.endswith(".tar")]
    assert tar[: -len(".tar")] + "_offsets.pkl" in names
    workspace = sdk.workspace.get_list(team.id)[0]
    other = sdk.project.create(workspace.id, "reuse", change_name_if_conflict=True)
    dataset = sdk.dataset.create(other.id, "copy")
    sdk.image.upload_blob_images(dataset=dataset.id, blob_file=f"/blob-files/{tar}")
    infos = sdk.image.get_list(dataset.id)
    assert sorted(i.name for i in infos) == sorted(p.name for p in new)
    data = sdk.image.download_bytes(dataset.id, [i.id for i in infos])
    got = dict(zip([i.name for i in infos], data, strict=True))
    assert got == {p.name: p.read_bytes() for p in new}
