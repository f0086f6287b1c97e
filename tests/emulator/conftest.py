"""Sample projects for the SDK conformance tests of the emulator.

Blobs are plain ``tarfile`` tars plus offsets files written by blobfs's own writer, so
the SDK's ``upload_project`` reading them cross-checks that writer too. The emulator's
own raw-HTTP tests live with it, in ``emulator/tests``.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blobfs.format.offsets import write_offsets
from blobfs.model import BlobMember
from tests.support.sample import png_bytes

TOKEN = "emulator-test-token-7d1c"


def write_tar(path: Path, files: dict[str, bytes]) -> list[BlobMember]:
    """A plain tar of ``files``; members' data ranges read back as the SDK computes them."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [
            BlobMember(m.name.rsplit("/", 1)[-1], m.offset_data, m.offset_data + m.size)
            for m in tar.getmembers()
            if m.isfile()
        ]


def write_offsets_file(path: Path, members: list[BlobMember]) -> None:
    with open(path, "wb") as f:
        write_offsets(f, members)


@dataclass
class LocalProject:
    """A local blob project on disk and the bytes each image must have."""

    root: Path
    images: dict[str, bytes]  # "<dataset path>/<name>" -> bytes


def build_local_project(root: Path) -> LocalProject:
    """``ds`` (blob of 6 + one ordinary image + meta), ``ds/datasets/child`` (blob of 4)."""
    images: dict[str, bytes] = {}
    (root / "blob").mkdir(parents=True)
    meta = {"classes": [{"title": "cat", "shape": "rectangle", "color": "#FF0000"}], "tags": []}
    (root / "meta.json").write_text(json.dumps(meta))
    layout = {"ds": ("blob_a", range(6)), "ds/datasets/child": ("blob_b", range(10, 14))}
    for ds, (stem, seeds) in layout.items():
        folder = root / ds
        (folder / "ann").mkdir(parents=True)
        files = {f"img_{s:03d}.png": png_bytes(s) for s in seeds}
        members = write_tar(root / "blob" / f"{stem}.tar", files)
        write_offsets_file(folder / f"{stem}_offsets.pkl", members)
        for name, data in files.items():
            images[f"{ds}/{name}"] = data
            _write_ann(folder / "ann" / f"{name}.json")
    (root / "ds" / "img").mkdir()
    (root / "ds" / "img" / "plain.png").write_bytes(png_bytes(99))
    _write_ann(root / "ds" / "ann" / "plain.png.json")
    images["ds/plain.png"] = png_bytes(99)
    return LocalProject(root, images)


def _write_ann(path: Path) -> None:
    """An SDK-style annotation in pixel coordinates with one rectangle that touches the
    image's far corner (where the coordinate conversions are most easily wrong)."""
    path.write_text(json.dumps(rectangle_ann([[3, 4], [31, 31]])))


def rectangle_ann(exterior: list[list[float]]) -> dict[str, Any]:
    """A 32x32 image's annotation JSON with one ``cat`` rectangle of corners ``exterior``."""
    return {
        "description": "",
        "size": {"height": 32, "width": 32},
        "tags": [],
        "objects": [
            {
                "classTitle": "cat",
                "geometryType": "rectangle",
                "tags": [],
                "points": {"exterior": exterior, "interior": []},
            }
        ],
    }
