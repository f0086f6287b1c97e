"""The stock Supervisely SDK, unmodified, against the emulator: the optimized-import flows.

If the SDK works against the emulator, the emulator speaks the SDK's dialect of the REST
API, which is what keeps blobfs's remote side honest without a real server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blobfs.blob.pack import ProjectPacker
from blobfs.testing.emulator import Emulator
from blobfs.testing.sample import make_images, png_bytes

sly = pytest.importorskip("supervisely")
pytestmark = [
    pytest.mark.sdk,
    pytest.mark.filterwarnings("ignore"),
]  # the SDK's own deprecation noise

TOKEN = "sdk-conformance-token"


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SUPERVISELY_PUBLIC_API_RETRIES", "1")
    with Emulator(tmp_path / "state", TOKEN) as emu:
        yield sly.Api(server_address=emu.url, token=TOKEN, ignore_task_id=True)


@pytest.fixture
def blob_project(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A packed project: (tar, offsets file, folder of the original images)."""
    images = make_images(tmp_path / "images", 20)
    result = ProjectPacker(tmp_path / "project", "ds").pack(images)
    tar = result.blobs[0]
    offsets = tmp_path / "project" / "ds" / f"{tar.stem}_offsets.pkl"
    return tar, offsets, tmp_path / "images"


def test_optimized_import_flow(api, blob_project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tar, offsets, images = blob_project
    team = api.team.get_list()[0]
    workspace = api.workspace.get_list(team.id)[0]
    project = api.project.create(workspace.id, "blobs", change_name_if_conflict=True)
    dataset = api.dataset.create(project.id, "ds")
    api.file.upload(team.id, str(tar), f"/blob-files/{tar.name}")
    api.file.upload(team.id, str(offsets), f"/blob-files/{offsets.name}")
    api.image.upload_blob_images(dataset.id, f"/blob-files/{tar.name}")

    infos = api.image.get_list(dataset.id)
    assert sorted(i.name for i in infos) == sorted(p.name for p in images.iterdir())
    for info in infos:
        assert info.related_data_id is not None and info.download_id
        assert info.offset_end - info.offset_start == info.size
        assert (info.width, info.height) == (32, 32)
    first = infos[0]
    assert api.image.download_bytes(dataset.id, [first.id])[0] == (images / first.name).read_bytes()
    assert api.image.download_blob_file(project.id, first.download_id) == tar.read_bytes()


def test_meta_annotations_plain_images_and_nested_datasets(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    team = api.team.get_list()[0]
    project = api.project.create(api.workspace.get_list(team.id)[0].id, "p")
    dataset = api.dataset.create(project.id, "ds")
    child = api.dataset.create(project.id, "child", parent_id=dataset.id)
    meta = sly.ProjectMeta([sly.ObjClass("cat", sly.Rectangle)])
    api.project.update_meta(project.id, meta.to_json())
    meta = sly.ProjectMeta.from_json(api.project.get_meta(project.id))
    assert [c.name for c in meta.obj_classes] == ["cat"]
    path = tmp_path / "plain.png"
    path.write_bytes(png_bytes(7))
    info = api.image.upload_path(child.id, "plain.png", str(path))
    assert api.image.download_bytes(child.id, [info.id])[0] == png_bytes(7)
    ann = sly.Annotation(
        (32, 32), [sly.Label(sly.Rectangle(1, 1, 5, 5), meta.get_obj_class("cat"))]
    )
    api.annotation.upload_anns([info.id], [ann])
    assert len(api.annotation.download(info.id).annotation["objects"]) == 1
    names = {d.name for d in api.dataset.get_list(project.id, recursive=True)}
    assert names == {"ds", "child"}


def test_download_fast_with_blob_files(api, blob_project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tar, offsets, images = blob_project
    team = api.team.get_list()[0]
    project = api.project.create(api.workspace.get_list(team.id)[0].id, "dl")
    dataset = api.dataset.create(project.id, "ds")
    api.file.upload(team.id, str(tar), f"/blob-files/{tar.name}")
    api.file.upload(team.id, str(offsets), f"/blob-files/{offsets.name}")
    api.image.upload_blob_images(dataset.id, f"/blob-files/{tar.name}")
    out = tmp_path / "downloaded"
    sly.download_fast(api, project.id, str(out), download_blob_files=True)
    local = sly.Project(str(out), sly.OpenMode.READ)
    ds = local.datasets.get("ds")
    for name in os.listdir(images):
        assert ds.get_blob_img_bytes(name) == (images / name).read_bytes()


def test_seeded_project_reads_back_through_the_sdk(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from blobfs.testing.seed import upload_local_project

    images = make_images(tmp_path / "images", 12)
    ProjectPacker(tmp_path / "project", "ds", blob_size=20_000).pack(images)
    project_id = upload_local_project(api.server_address, TOKEN, tmp_path / "project")
    [dataset] = api.dataset.get_list(project_id)
    infos = api.image.get_list(dataset.id)
    assert len(infos) == 12
    got = dict(
        zip(
            [i.id for i in infos],
            api.image.download_bytes(dataset.id, [i.id for i in infos]),
            strict=True,
        )
    )
    for info in infos:
        assert got[info.id] == (tmp_path / "images" / info.name).read_bytes()
