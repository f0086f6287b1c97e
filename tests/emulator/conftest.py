"""Fixtures for the emulator tests: an in-process emulator, a raw HTTP caller, sample blobs.

The sample blob is a plain ``tarfile`` tar plus an offsets file in the SDK's pickle
format (written by blobfs's writer, which the SDK conformance tests cross-check), so the
raw HTTP tests need neither the SDK nor a packer.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from blobfs.format.offsets import write_offsets
from blobfs.model import BlobMember
from blobfs.testing.emulator import Emulator
from blobfs.testing.sample import png_bytes

TOKEN = "emulator-test-token-7d1c"


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    with Emulator(tmp_path / "state", TOKEN) as e:
        yield e


def api_url(emu: Emulator | str, method: str) -> str:
    base = emu if isinstance(emu, str) else emu.url
    return f"{base}/public/api/v3/{method}"


def call(
    emu: Emulator | str,
    method: str,
    body: Any = None,
    token: str = TOKEN,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """POST a JSON body to an API method (raw: no status check)."""
    return requests.post(
        api_url(emu, method),
        json={} if body is None else body,
        headers={"x-api-key": token, **(headers or {})},
        timeout=30,
    )


def ok(emu: Emulator | str, method: str, body: Any = None) -> Any:
    """POST and return the JSON answer, failing the test on any non-200."""
    r = call(emu, method, body)
    assert r.status_code == 200, (method, r.status_code, r.text)
    return r.json()


def upload_file(emu: Emulator, path: Path, remote_dir: str = "/blob-files/") -> dict[str, Any]:
    """Team Files upload as ``api.file.upload`` sends it (multipart name/path/file)."""
    with open(path, "rb") as f:
        r = requests.post(
            api_url(emu, "file-storage.bulk.upload") + "?teamId=1",
            files=[
                ("name", (None, path.name)),
                ("path", (None, remote_dir)),
                ("file", (path.name, f, "application/octet-stream")),
            ],
            headers={"x-api-key": TOKEN},
            timeout=30,
        )
    assert r.status_code == 200, r.text
    [info] = r.json()
    return info  # type: ignore[no-any-return]


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


@pytest.fixture
def local_project(tmp_path: Path) -> LocalProject:
    return build_local_project(tmp_path / "project")
