"""The stock Supervisely SDK (6.74.51, unmodified) as the emulator's client.

If the SDK's own flows work against the emulator, the emulator speaks the SDK's dialect
of the REST API, which keeps blobfs's remote side honest without a real server. The
blobs here are built with the SDK's helpers (``sly.fs.archive_directory``,
``get_file_offsets_batch_generator``, ``BlobImageInfo.dump_to_pickle``), independently
of blobfs's packer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sly_emulator import INSTANCE_VERSION, Emulator
from sly_emulator.seed import upload_local_project

from tests.support import harness
from tests.support.sample import make_images, png_bytes

from .conftest import TOKEN, build_local_project, rectangle_ann

sly = pytest.importorskip("supervisely")
from supervisely.api.image_api import BlobImageInfo  # noqa: E402
from supervisely.io.fs import get_file_offsets_batch_generator  # noqa: E402

pytestmark = pytest.mark.sdk


@dataclass
class Sdk:
    """The SDK client and the emulator it talks to."""

    api: Any
    emu: Emulator

    @property
    def team(self) -> Any:
        return self.api.team.get_list()[0]

    @property
    def workspace(self) -> Any:
        return self.api.workspace.get_list(self.team.id)[0]


@pytest.fixture
def sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sdk]:
    # http:// would make the SDK probe https:// on the same port first; retries without
    # sleeps keep injected failures fast.
    monkeypatch.setenv("SUPERVISELY_SKIP_HTTPS_USER_HELPER_CHECK", "1")
    with Emulator(tmp_path / "state", TOKEN) as emu:
        api = sly.Api(
            server_address=emu.url,
            token=TOKEN,
            retry_count=3,
            retry_sleep_sec=0,
            ignore_task_id=True,
        )
        yield Sdk(api, emu)


@dataclass
class SdkBlob:
    """A blob made with the SDK's helpers: the tar, its offsets file, the images."""

    tar: Path
    offsets: Path
    images: dict[str, bytes]


def sdk_blob(folder: Path, count: int = 20, stem: str = "blob") -> SdkBlob:
    images_dir = folder / f"{stem}-images"
    paths = make_images(images_dir, count)
    tar = folder / f"{stem}.tar"
    sly.fs.archive_directory(str(images_dir), str(tar))
    offsets = folder / f"{stem}_offsets.pkl"
    batches = get_file_offsets_batch_generator(str(tar), output_format="objects")
    BlobImageInfo.dump_to_pickle(batches, str(offsets))
    return SdkBlob(tar, offsets, {p.name: p.read_bytes() for p in paths})


def new_dataset(sdk: Sdk, name: str = "p") -> tuple[Any, Any]:
    project = sdk.api.project.create(sdk.workspace.id, name, change_name_if_conflict=True)
    return project, sdk.api.dataset.create(project.id, "ds")


def upload_blob(sdk: Sdk, blob: SdkBlob) -> Any:
    """``api.file.upload`` the tar and its offsets into ``/blob-files/``; the tar's info."""
    info = sdk.api.file.upload(sdk.team.id, str(blob.tar), f"/blob-files/{blob.tar.name}")
    sdk.api.file.upload(sdk.team.id, str(blob.offsets), f"/blob-files/{blob.offsets.name}")
    return info


def test_api_construction_and_the_version_check_pass_quietly(
    sdk: Sdk, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        api = sly.Api(sdk.emu.url, TOKEN, check_instance_version=True, ignore_task_id=True)
    assert not [r for r in caplog.records if "version" in r.getMessage().lower()]
    assert api.instance_version == INSTANCE_VERSION
    assert api.is_version_supported() is True
    assert sdk.team.name and sdk.workspace.team_id == sdk.team.id


def test_blob_import_lists_reads_and_downloads_whole_blobs(sdk: Sdk, tmp_path: Path) -> None:
    blob = sdk_blob(tmp_path)
    project, dataset = new_dataset(sdk)
    tar_info = upload_blob(sdk, blob)
    assert tar_info.sizeb == blob.tar.stat().st_size
    sdk.api.image.upload_blob_images(dataset.id, f"/blob-files/{blob.tar.name}")

    assert sdk.api.project.get_custom_data(project.id)["is_blob_project"] is True
    infos = sdk.api.image.get_list(dataset.id)
    assert sorted(i.name for i in infos) == sorted(blob.images)
    tar_bytes = blob.tar.read_bytes()
    for info in infos:
        assert info.related_data_id == tar_info.id and info.download_id
        assert info.offset_end - info.offset_start == info.size
        assert tar_bytes[info.offset_start : info.offset_end] == blob.images[info.name]
        assert (info.width, info.height, info.ext) == (32, 32, "png")
    ids = [i.id for i in infos]
    assert sdk.api.image.download_bytes(dataset.id, ids) == [blob.images[i.name] for i in infos]
    assert [i.id for i in sdk.api.image.get_info_by_id_batch(ids[::-1])] == ids[::-1]
    sdk.api.image.download_path(ids[0], str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").read_bytes() == blob.images[infos[0].name]
    assert sdk.api.image.download_blob_file(project.id, infos[0].download_id) == tar_bytes
    out = tmp_path / "blob-copy.tar"
    sdk.api.image.download_blob_file(project.id, infos[0].download_id, path=str(out))
    assert out.read_bytes() == tar_bytes
    assert sdk.api.project.get_info_by_id(project.id).items_count == len(blob.images)


def test_importing_the_same_blob_twice_renames_through_nonunique_errors(
    sdk: Sdk, tmp_path: Path
) -> None:
    """``upload_blob_images`` resolves name clashes from the server's NONUNIQUE 400."""
    blob = sdk_blob(tmp_path, count=5)
    _, dataset = new_dataset(sdk)
    upload_blob(sdk, blob)
    sdk.api.image.upload_blob_images(dataset.id, f"/blob-files/{blob.tar.name}")
    sdk.api.image.upload_blob_images(dataset.id, f"/blob-files/{blob.tar.name}")
    names = [i.name for i in sdk.api.image.get_list(dataset.id)]
    assert len(names) == 10 and len(set(names)) == 10
    assert set(blob.images) <= set(names)


def test_upload_by_offsets_with_explicit_names(sdk: Sdk, tmp_path: Path) -> None:
    blob = sdk_blob(tmp_path, count=4)
    _, dataset = new_dataset(sdk)
    info = upload_blob(sdk, blob)
    entries = [
        e for batch in BlobImageInfo.load_from_pickle_generator(str(blob.offsets)) for e in batch
    ]
    infos = sdk.api.image.upload_by_offsets(
        dataset.id, info.id, [e.name for e in entries], [e.offsets_dict for e in entries]
    )
    assert [i.name for i in infos] == [e.name for e in entries]
    got = sdk.api.image.download_bytes(dataset.id, [i.id for i in infos])
    assert got == [blob.images[e.name] for e in entries]


def test_meta_annotations_plain_images_and_nested_datasets(sdk: Sdk, tmp_path: Path) -> None:
    api = sdk.api
    project, dataset = new_dataset(sdk)
    child = api.dataset.create(project.id, "child", parent_id=dataset.id)
    grandchild = api.dataset.create(project.id, "grand", parent_id=child.id)
    meta = sly.ProjectMeta(
        [sly.ObjClass("cat", sly.Rectangle)], [sly.TagMeta("t", sly.TagValueType.NONE)]
    )
    api.project.update_meta(project.id, meta.to_json())
    meta = sly.ProjectMeta.from_json(api.project.get_meta(project.id))
    assert [c.name for c in meta.obj_classes] == ["cat"]
    assert meta.get_obj_class("cat").sly_id is not None

    path = tmp_path / "plain.png"
    path.write_bytes(png_bytes(7, 40, 30))
    info = api.image.upload_path(grandchild.id, "plain.png", str(path))
    assert (info.width, info.height, info.related_data_id) == (40, 30, None)
    assert api.image.download_bytes(grandchild.id, [info.id]) == [png_bytes(7, 40, 30)]
    again = api.image.upload_paths(grandchild.id, ["copy.png"], [str(path)])  # hash known
    assert again[0].hash == info.hash

    label = sly.Label(sly.Rectangle(1, 2, 5, 6), meta.get_obj_class("cat"))
    ann = sly.Annotation((30, 40), [label])
    api.annotation.upload_anns([info.id], [ann])
    back = sly.Annotation.from_json(api.annotation.download(info.id).annotation, meta)
    assert back.labels[0].geometry.to_json()["points"] == label.geometry.to_json()["points"]
    # what the server holds is the SDK's subpixel form: right/bottom one further
    raw = requests.post(
        f"{sdk.emu.url}/public/api/v3/annotations.info",
        json={"imageId": info.id},
        headers={"x-api-key": TOKEN},
        timeout=10,
    ).json()["annotation"]
    (left, top), (right, bottom) = label.geometry.to_json()["points"]["exterior"]
    assert raw["objects"][0]["points"]["exterior"] == [[left, top], [right + 1, bottom + 1]]
    ann_path = tmp_path / "ann.json"
    sly.json.dump_json_file(ann.to_json(), str(ann_path))
    api.annotation.upload_paths([again[0].id], [str(ann_path)])
    batch = api.annotation.download_batch(grandchild.id, [info.id, again[0].id])
    assert [len(a.annotation["objects"]) for a in batch] == [1, 1]
    assert len(api.annotation.get_list(grandchild.id)) == 2

    tree = [(parents, ds.name) for parents, ds in api.dataset.tree(project.id)]
    assert tree == [([], "ds"), (["ds"], "child"), (["ds", "child"], "grand")]
    assert {d.name for d in api.dataset.get_list(project.id, recursive=True)} == {
        "ds",
        "child",
        "grand",
    }
    assert [d.name for d in api.dataset.get_list(project.id, parent_id=dataset.id)] == ["child"]
    api.project.update_settings(project.id, {"allowedTags": None}, merge_with_current=True)
    assert api.project.get_settings(project.id)["allowedTags"] is None


def test_download_fast_and_download_project_read_blob_projects(sdk: Sdk, tmp_path: Path) -> None:
    blob = sdk_blob(tmp_path, count=12)
    project, dataset = new_dataset(sdk, "dl")
    upload_blob(sdk, blob)
    sdk.api.image.upload_blob_images(dataset.id, f"/blob-files/{blob.tar.name}")

    fast = tmp_path / "fast"
    sly.download_fast(sdk.api, project.id, str(fast), download_blob_files=True)
    ds = sly.Project(str(fast), sly.OpenMode.READ).datasets.get("ds")
    for name, data in blob.images.items():
        assert ds.get_blob_img_bytes(name) == data
    assert [p.read_bytes() for p in (fast / "blob").iterdir()] == [blob.tar.read_bytes()]

    slow = tmp_path / "slow"
    sly.download_project(sdk.api, project.id, str(slow), log_progress=False)
    ds = sly.Project(str(slow), sly.OpenMode.READ).datasets.get("ds")
    for name, data in blob.images.items():
        img_path, ann_path = ds.get_item_paths(name)
        assert Path(img_path).read_bytes() == data
        assert os.path.isfile(ann_path)


def test_the_sdk_uploads_a_local_blob_project_like_seed_does(sdk: Sdk, tmp_path: Path) -> None:
    """``sly.upload_project`` and ``seed.upload_local_project`` on the same folder (offsets
    written by blobfs) give the same datasets, names, blob fields and bytes."""
    local = build_local_project(tmp_path / "project")
    via_sdk, _ = sly.upload_project(
        str(local.root), sdk.api, sdk.workspace.id, "via-sdk", log_progress=False
    )
    via_seed = upload_local_project(sdk.emu.url, TOKEN, local.root, "via-seed")
    assert describe(sdk, via_sdk) == describe(sdk, via_seed) == local.images
    for pid in (via_sdk, via_seed):
        assert sdk.api.project.get_custom_data(pid)["is_blob_project"] is True
        meta = sly.ProjectMeta.from_json(sdk.api.project.get_meta(pid))
        assert [c.name for c in meta.obj_classes] == ["cat"]


def test_uploading_a_project_again_overwrites_its_blobs_in_place(sdk: Sdk, tmp_path: Path) -> None:
    """``sly.upload_project`` puts each tar at ``/blob-files/<stem>.tar`` without looking
    first. Team Files overwrites a path in place (same id, new bytes), so re-running the
    upload keeps the first project's images readable, and both projects share one file."""
    local = build_local_project(tmp_path / "project")
    first, _ = sly.upload_project(
        str(local.root), sdk.api, sdk.workspace.id, "a", log_progress=False
    )
    second, _ = sly.upload_project(
        str(local.root), sdk.api, sdk.workspace.id, "b", log_progress=False
    )
    assert describe(sdk, first) == describe(sdk, second) == local.images

    def blob_ids(project_id: int) -> set[int]:
        return {
            i.related_data_id
            for _, ds in sdk.api.dataset.tree(project_id)
            for i in sdk.api.image.get_list(ds.id)
            if i.related_data_id is not None
        }

    assert blob_ids(first) == blob_ids(second)


def describe(sdk: Sdk, project_id: int) -> dict[str, bytes]:
    """``<dataset path>/<image name>`` -> bytes, read through the SDK."""
    out = {}
    for parents, ds in sdk.api.dataset.tree(project_id):
        prefix = "/datasets/".join([*parents, ds.name])
        infos = sdk.api.image.get_list(ds.id)
        for info in infos:
            assert (info.related_data_id is None) == (info.name == "plain.png")
        for info, data in zip(
            infos, sdk.api.image.download_bytes(ds.id, [i.id for i in infos]), strict=True
        ):
            out[f"{prefix}/{info.name}"] = data
    return out


def test_quick_import_uploads_through_the_async_file_api(sdk: Sdk, tmp_path: Path) -> None:
    blob = sdk_blob(tmp_path, count=6)
    project, dataset = new_dataset(sdk)
    ann_dir = tmp_path / "ann"
    ann_dir.mkdir()
    anns = []
    for name in blob.images:
        path = ann_dir / f"{name}.json"
        sly.json.dump_json_file(sly.Annotation((32, 32)).to_json(), str(path))
        anns.append(str(path))
    sdk.emu.reset_stats()
    # project_type must be given: without it 6.74.51 compares the info's "images" string
    # with the ProjectType enum, which never matches, and refuses every project.
    sdk.api.dataset.quick_import(
        dataset,
        str(blob.tar),
        str(blob.offsets),
        anns,
        project_type=sly.ProjectType.IMAGES,
        log_progress=True,  # False crashes in 6.74.51 (it calls None.update)
    )
    methods = sdk.emu.stats()["methods"]
    assert methods.get("file-storage.upload") == 2  # raw async uploads, no sync fallback
    assert "file-storage.bulk.upload" not in methods
    infos = sdk.api.image.get_list(dataset.id)
    assert sorted(i.name for i in infos) == sorted(blob.images)
    assert (
        sdk.api.image.download_blob_file(project.id, infos[0].download_id) == blob.tar.read_bytes()
    )
    assert sdk.api.project.get_custom_data(project.id)["is_blob_project"] is True


def test_quick_import_with_labels_and_tags_mounts_with_the_sdk_s_annotations(
    sdk: Sdk, tmp_path: Path
) -> None:
    """The guide's fastest flow, end to end: ``quick_import`` uploads blob + offsets, registers
    the images by offsets, and adds every label (``figures.bulk.add``), object tag
    (``figures.tags.bulk.add``) and image tag (``image-tags.bulk.add-to-image``) one batch at a
    time. The SDK then downloads each annotation with its labels and tags, the project is
    marked as a blob project, and a remote mount serves the same annotations."""
    blob = sdk_blob(tmp_path, count=8)
    project, dataset = new_dataset(sdk)
    meta = sly.ProjectMeta(
        obj_classes=[
            sly.ObjClass("cat", sly.Rectangle),
            sly.ObjClass("dog", sly.Polygon),
        ],
        tag_metas=[
            sly.TagMeta("train", sly.TagValueType.NONE),
            sly.TagMeta("pose", sly.TagValueType.ANY_STRING),
        ],
    )
    meta = sdk.api.project.update_meta(project.id, meta.to_json())  # with the ids given
    ann_dir = tmp_path / "ann"
    ann_dir.mkdir()
    anns = []
    for i, name in enumerate(sorted(blob.images)):
        labels = [
            sly.Label(
                sly.Rectangle(1, 2, 10 + i, 12),
                meta.get_obj_class("cat"),
                tags=[sly.Tag(meta.get_tag_meta("pose"), value=f"sitting-{i}")],
            )
        ]
        if i % 2:
            labels.append(
                sly.Label(
                    sly.Polygon(
                        [sly.PointLocation(1, 1), sly.PointLocation(5, 9), sly.PointLocation(9, 2)]
                    ),
                    meta.get_obj_class("dog"),
                )
            )
        ann = sly.Annotation((32, 32), labels, img_tags=[sly.Tag(meta.get_tag_meta("train"))])
        path = ann_dir / f"{name}.json"
        sly.json.dump_json_file(ann.to_json(), str(path))
        anns.append(str(path))
    sdk.api.dataset.quick_import(
        dataset,
        str(blob.tar),
        str(blob.offsets),
        anns,
        project_meta=meta,
        project_type=sly.ProjectType.IMAGES,
        log_progress=True,
    )
    methods = sdk.emu.stats()["methods"]
    assert {"figures.bulk.add", "figures.tags.bulk.add", "image-tags.bulk.add-to-image"} <= set(
        methods
    )
    assert sdk.api.project.get_custom_data(project.id)["is_blob_project"] is True
    infos = {i.name: i for i in sdk.api.image.get_list(dataset.id)}
    assert sorted(infos) == sorted(blob.images)
    downloaded = {}
    for i, name in enumerate(sorted(blob.images)):
        got = sly.Annotation.from_json(sdk.api.annotation.download_json(infos[name].id), meta)
        assert [lb.obj_class.name for lb in got.labels] == (["cat", "dog"] if i % 2 else ["cat"])
        assert got.labels[0].tags.get("pose").value == f"sitting-{i}"
        assert [t.name for t in got.img_tags] == ["train"]
        downloaded[name] = sdk.api.annotation.download_json(infos[name].id)
    mnt = tmp_path / "mnt"
    proc = harness.start_remote(sdk.emu.url, project.id, mnt, token=TOKEN, log=tmp_path / "log")
    try:
        for name, data in blob.images.items():
            assert (mnt / "ds" / "img" / name).read_bytes() == data
            served = json.loads((mnt / "ds" / "ann" / f"{name}.json").read_bytes())
            assert served == downloaded[name], name
        local = sly.Project(str(mnt), sly.OpenMode.READ)
        assert local.total_items == len(blob.images)
    finally:
        assert proc.unmount(30) == 0


def test_the_sdk_retries_injected_server_errors(sdk: Sdk, tmp_path: Path) -> None:
    blob = sdk_blob(tmp_path, count=3)
    project, dataset = new_dataset(sdk)
    upload_blob(sdk, blob)
    sdk.api.image.upload_blob_images(dataset.id, f"/blob-files/{blob.tar.name}")
    info = sdk.api.image.get_list(dataset.id)[0]
    sdk.emu.reset_stats()
    sdk.emu.faults.update({"fail_n": 2, "fail_status": 503, "scope": "projects.info"})
    assert sdk.api.project.get_info_by_id(project.id).name == project.name
    sdk.emu.faults.update({"fail_n": 1, "scope": "images.data.download"})
    assert sdk.api.image.download_blob_file(project.id, info.download_id) == blob.tar.read_bytes()
    statuses = [(e["method"], e["status"]) for e in sdk.emu.request_log()]
    assert statuses.count(("projects.info", 503)) == 2
    assert ("images.data.download", 503) in statuses
    # the first error answer makes the SDK check the instance version, once
    assert [s for s in statuses if s[0] == "instance.version"] == [("instance.version", 200)]


def test_seeded_projects_read_back_through_the_sdk(sdk: Sdk, tmp_path: Path) -> None:
    local = build_local_project(tmp_path / "project")
    project_id = upload_local_project(sdk.emu.url, TOKEN, local.root)
    assert describe(sdk, project_id) == local.images
    ds = sdk.api.dataset.get_list(project_id)[0]
    for ann in sdk.api.annotation.get_list(ds.id):
        assert ann.annotation["size"] == {"height": 32, "width": 32}


def test_a_cut_blob_download_resumes_with_range_and_loses_one_byte_in_6_74_51(
    sdk: Sdk, tmp_path: Path
) -> None:
    """Pins an SDK defect the emulator exposes by honouring Range exactly: after a cut,
    ``Api.stream_async`` asks ``bytes=<received + 1>-``, so the byte at ``received`` is
    never fetched (with 8 MiB chunks: a blob over 8 MiB cut past its first chunk).
    blobfs must not copy this resume arithmetic."""
    data = png_bytes(5) + os.urandom(18 << 20)  # cut at half: past the first chunk
    (tmp_path / "big.tar").write_bytes(data)
    project, dataset = new_dataset(sdk)
    tar = sdk.api.file.upload(sdk.team.id, str(tmp_path / "big.tar"), "/blob-files/big.tar")
    source = {"offsetStart": 0, "offsetEnd": len(png_bytes(5))}
    [info] = sdk.api.image.upload_by_offsets(dataset.id, tar.id, ["a.png"], [source])
    sdk.emu.faults.update({"short_body": True, "times": 1, "scope": "images.data.download"})
    sdk.emu.reset_stats()
    out = tmp_path / "out.tar"
    coroutine = sdk.api.image.download_blob_file_async(
        project.id, info.download_id, str(out), log_progress=False
    )
    sly.run_coroutine(coroutine)
    log = [(e["status"], e["range"]) for e in sdk.emu.request_log()]
    assert log == [(200, None), (206, f"bytes={(8 << 20) + 1}-")]
    got = out.read_bytes()
    assert len(got) == len(data) - 1
    assert got == data[: 8 << 20] + data[(8 << 20) + 1 :]


def test_a_remote_mount_serves_annotations_as_the_sdk_downloads_them(
    sdk: Sdk, tmp_path: Path
) -> None:
    """The server keeps subpixel geometry; the SDK converts on upload and on download.
    The mount's ``ann/*.json`` must equal ``api.annotation.download_json`` (and so the
    project folder it came from), also for fractional coordinates as the labeling tool
    stores them."""
    local = build_local_project(tmp_path / "project")
    project_id = upload_local_project(sdk.emu.url, TOKEN, local.root)
    ds = next(d for d in sdk.api.dataset.get_list(project_id) if d.name == "ds")
    infos = {i.name: i for i in sdk.api.image.get_list(ds.id)}
    drawn = rectangle_ann([[1.74, 1.55], [3.76, 4.63]])
    requests.post(
        f"{sdk.emu.url}/public/api/v3/annotations.bulk.add",
        json={
            "datasetId": ds.id,
            "annotations": [{"imageId": infos["img_001.png"].id, "annotation": drawn}],
        },
        headers={"x-api-key": TOKEN},
        timeout=30,
    ).raise_for_status()
    mnt = tmp_path / "mnt"
    proc = harness.start_remote(sdk.emu.url, project_id, mnt, token=TOKEN, log=tmp_path / "log")
    try:
        for name, info in infos.items():
            served = json.loads((mnt / "ds" / "ann" / f"{name}.json").read_bytes())
            assert served == sdk.api.annotation.download_json(info.id), name
            if name != "img_001.png":
                assert served == json.loads(
                    (local.root / "ds" / "ann" / f"{name}.json").read_text()
                )
        exterior = json.loads((mnt / "ds" / "ann" / "img_001.png.json").read_bytes())["objects"][0]
        assert exterior["points"]["exterior"] == [[2, 1], [3, 4]]
    finally:
        assert proc.unmount(30) == 0
