"""One behaviour suite, run over a local project folder and over the same project served
by the emulator: the mount must look and read the same."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from .conftest import TOKEN, Mounted

pytestmark = pytest.mark.fuse


def test_tree_has_the_standard_layout(mounted: Mounted) -> None:
    mnt = mounted.mnt
    assert sorted(os.listdir(mnt)) == ["meta.json", "train"]
    assert sorted(os.listdir(mnt / "train")) == ["ann", "datasets", "img"]
    assert os.listdir(mnt / "train" / "datasets") == ["val"]
    found = subprocess.run(
        ["find", str(mnt), "-type", "f", "-path", "*/img/*"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(os.path.relpath(p, mnt) for p in found) == sorted(mounted.expected)
    json.loads((mnt / "meta.json").read_bytes())


def test_every_image_reads_back_exactly_with_cat(mounted: Mounted) -> None:
    for rel, data in mounted.expected.items():
        out = subprocess.run(["cat", str(mounted.mnt / rel)], capture_output=True, check=True)
        assert out.stdout == data, rel
        assert os.stat(mounted.mnt / rel).st_size == len(data)


def test_annotations_carry_the_image_size(mounted: Mounted) -> None:
    for rel in mounted.expected:
        ann_path = mounted.mnt / rel.replace("/img/", "/ann/")
        ann = json.loads(ann_path.with_name(ann_path.name + ".json").read_bytes())
        assert ann["size"] == {"height": 32, "width": 32}


def test_sixteen_readers_in_parallel_get_every_byte_right(mounted: Mounted) -> None:
    names = sorted(mounted.expected)
    wrong: list[str] = []

    def reader(k: int) -> None:
        for rel in names[k:] + names[:k]:
            if (mounted.mnt / rel).read_bytes() != mounted.expected[rel]:
                wrong.append(rel)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert wrong == []


def test_the_token_never_reaches_the_log(mounted: Mounted) -> None:
    for rel in mounted.expected:
        (mounted.mnt / rel).read_bytes()
    assert mounted.unmount() == 0
    assert TOKEN not in mounted.log.read_text()
