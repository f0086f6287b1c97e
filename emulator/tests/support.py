"""Helpers of the emulator tests: a raw HTTP caller, sample PNGs, blobs and projects.

A sample blob is a plain ``tarfile`` tar plus an offsets file in the SDK's pickle format
(written here opcode by opcode, as the README's offsets rule describes), so these tests
need neither the SDK nor any client's packer.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from sly_emulator import Emulator
from sly_emulator.seed import Member

TOKEN = "emulator-test-token-7d1c"


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


def png_bytes(seed: int, width: int = 32, height: int = 32) -> bytes:
    """A valid RGB PNG of seeded noise (every seed differs, so nothing dedups by accident)."""
    rng = random.Random(seed)
    rows = b"".join(b"\0" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 1))
        + chunk(b"IEND", b"")
    )


def write_tar(path: Path, files: dict[str, bytes]) -> list[Member]:
    """A plain tar of ``files``; members' data ranges read back as the SDK computes them."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [
            Member(m.name.rsplit("/", 1)[-1], m.offset_data, m.offset_data + m.size)
            for m in tar.getmembers()
            if m.isfile()
        ]


def _text(value: str) -> bytes:
    data = value.encode()
    return pickle.BINUNICODE + len(data).to_bytes(4, "little") + data


def _int(value: int) -> bytes:
    data = pickle.encode_long(value)
    return pickle.LONG1 + bytes([len(data)]) + data


def offsets_pickle(members: list[Member]) -> bytes:
    """One pickle of ``list[BlobImageInfo]`` as ``pickle.dumps(..., protocol=2)`` writes the
    SDK's dataclass: the class by name, an empty instance, its field dict as state."""
    out = [pickle.PROTO, b"\x02", pickle.EMPTY_LIST, pickle.MARK]
    for m in members:
        out += [pickle.GLOBAL, b"supervisely.api.image_api\nBlobImageInfo\n"]
        out += [pickle.EMPTY_TUPLE, pickle.NEWOBJ, pickle.EMPTY_DICT, pickle.MARK]
        out += [_text("name"), _text(m.name), _text("offset_start"), _int(m.start)]
        out += [_text("offset_end"), _int(m.end), pickle.SETITEMS, pickle.BUILD]
    out += [pickle.APPENDS, pickle.STOP]
    return b"".join(out)


def write_offsets_file(path: Path, members: list[Member], batch: int = 10_000) -> None:
    """An offsets file: one pickle per ``batch`` entries, appended, as the SDK writes it."""
    with open(path, "wb") as f:
        for i in range(0, len(members), batch):
            f.write(offsets_pickle(members[i : i + batch]))


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
