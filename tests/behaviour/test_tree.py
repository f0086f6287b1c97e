"""Lookups, listings and reads of a read-only mount: the same answers in-process and
through the kernel (docs/semantics.md, "The tree" and "Operations")."""

from __future__ import annotations

import json
import stat

from .conftest import DAMAGED, Served


def test_the_root_shows_meta_json_and_the_datasets_and_hides_blobfs_internals(
    ro: Served,
) -> None:
    assert sorted(ro.fs.listdir("/")) == sorted(["meta.json", "train", *DAMAGED])
    assert json.loads(ro.fs.read("/meta.json")) == json.loads((ro.root / "meta.json").read_bytes())


def test_a_dataset_holds_img_ann_and_its_nested_datasets(ro: Served) -> None:
    assert sorted(ro.fs.listdir("/train")) == ["ann", "datasets", "img"]
    assert ro.fs.listdir("/train/datasets") == ["val"]
    assert sorted(ro.fs.listdir("/train/datasets/val")) == ["ann", "img"]


def test_img_lists_every_image_once_blob_and_plain_alike(ro: Served) -> None:
    for folder in ("/train/img", "/train/datasets/val/img"):
        names = ro.fs.listdir(folder)
        assert len(names) == len(set(names))
        assert sorted(names) == sorted(
            p.rsplit("/", 1)[1] for p in ro.expected if p.startswith(folder + "/")
        )


def test_listings_are_in_name_order_meta_json_first(ro: Served) -> None:
    names = ro.fs.listdir("/")
    assert names[0] == "meta.json" and names[1:] == sorted(names[1:])
    for folder in ("/train/img", "/train/ann", "/train/datasets/val/img"):
        names = ro.fs.listdir(folder)
        assert names == sorted(names), folder


def test_ann_holds_one_json_per_image_with_its_size(ro: Served) -> None:
    for path in ro.expected:
        ann = path.replace("/img/", "/ann/") + ".json"
        assert json.loads(ro.fs.read(ann))["size"] == {"height": 32, "width": 32}, ann


def test_blobfs_internals_are_not_listed(ro: Served) -> None:
    for folder in ("/", "/train"):
        names = ro.fs.listdir(folder)
        assert ".blobfs" not in names and "blob" not in names
        assert not [n for n in names if n.endswith("_offsets.pkl")]


def test_files_are_0444_folders_0555_with_real_sizes(ro: Served) -> None:
    for path, data in ro.expected.items():
        st = ro.fs.stat(path)
        assert st.is_file and stat.S_IMODE(st.mode) == 0o444, path
        assert st.size == len(data), path
    for folder in ("/", "/train", "/train/img", "/train/datasets/val/ann"):
        st = ro.fs.stat(folder)
        assert st.is_dir and stat.S_IMODE(st.mode) == 0o555, folder


def test_a_blob_image_has_the_mtime_of_its_tar(ro: Served) -> None:
    tars = [p.stat().st_mtime_ns for p in (ro.root / "blob").glob("*.tar") if p.is_file()]
    assert ro.fs.stat("/train/img/img_000000.png").mtime_ns // 10**9 in {t // 10**9 for t in tars}


def test_every_image_reads_back_exactly(ro: Served) -> None:
    for path, data in ro.expected.items():
        assert ro.fs.read(path) == data, path


def test_ranged_reads_return_exactly_the_range(ro: Served) -> None:
    path = "/train/img/img_000004.png"
    data = ro.expected[path]
    for offset, size in [(0, 1), (5, 7), (100, 1000), (len(data) - 3, 3), (1, len(data) - 2)]:
        assert ro.fs.read(path, offset, size) == data[offset : offset + size], (offset, size)


def test_a_read_is_short_only_at_end_of_file(ro: Served) -> None:
    path = "/train/img/plain.png"
    data = ro.expected[path]
    assert ro.fs.read(path, len(data) - 10, 100) == data[-10:]
    assert ro.fs.read(path, len(data), 100) == b""
    assert ro.fs.read(path, len(data) + 5000, 10) == b""


def test_the_stats_file_is_there_though_hidden(ro: Served) -> None:
    stats = json.loads(ro.fs.read("/.blobfs/stats.json"))
    assert isinstance(stats, dict) and stats
