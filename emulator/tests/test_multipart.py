"""Multipart uploads are split as they arrive: the same parts whatever the chunking."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import urllib3

from sly_emulator._store import ApiError, Store, parse_multipart


def _form(data: bytes) -> tuple[bytes, str]:
    part = urllib3.fields.RequestField("file", data, "blob.tar")
    part.make_multipart(content_type="application/x-tar")
    return urllib3.filepost.encode_multipart_formdata(
        [("path", "/blob-files/"), ("name", "blob.tar"), part], "b0undary"
    )


def _chunks(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 7, 13, 4096, 1 << 30])
def test_parts_are_the_same_whatever_the_chunks(tmp_path: Path, size: int) -> None:
    # file bytes that look like the start of a delimiter, across any chunk edge
    data = b"\r\n--b0und" + random.Random(size).randbytes(3000) + b"\r\n--b0undar\r\n"
    body, content_type = _form(data)
    store = Store(tmp_path / "state")
    parts = parse_multipart(_chunks(body, size), content_type, store)
    assert [(name, filename) for name, filename, _ in parts] == [
        ("path", None),
        ("name", None),
        ("file", "blob.tar"),
    ]
    assert parts[0][2] == "/blob-files/" and parts[1][2] == "blob.tar"
    assert Path(parts[2][2]).read_bytes() == data


def test_an_empty_file_part(tmp_path: Path) -> None:
    body, content_type = _form(b"")
    parts = parse_multipart(_chunks(body, 5), content_type, Store(tmp_path / "state"))
    assert Path(parts[2][2]).read_bytes() == b""


def test_a_body_cut_short_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    body, content_type = _form(b"x" * 10_000)
    store = Store(tmp_path / "state")
    with pytest.raises(ApiError, match="truncated"):
        parse_multipart(_chunks(body[:5000], 100), content_type, store)
    uploads = store.new_upload_path().parent
    assert not list(uploads.iterdir())
