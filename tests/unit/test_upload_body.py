"""A Team Files upload's body: the form requests would send, the file read as it goes."""

from __future__ import annotations

from pathlib import Path

import pytest
import urllib3

from blobfs.errors import RemoteError
from blobfs.transport.http import UPLOAD_CHUNK, MultipartFileBody


def _sent(body: MultipartFileBody) -> bytes:
    return b"".join(bytes(chunk) for chunk in body)


def test_the_body_is_urllib3s_form_of_the_same_fields(tmp_path: Path) -> None:
    data = bytes(range(256)) * (UPLOAD_CHUNK // 256 * 2 + 3)  # more than two buffers
    path = tmp_path / "b.tar"
    path.write_bytes(data)
    with MultipartFileBody(
        {"path": "/blob-files/", "name": "b.tar"}, "file", "b.tar", str(path)
    ) as body:
        sent = _sent(body)
        assert len(body) == len(sent)
        boundary = body.content_type.split("boundary=")[1]
    part = urllib3.fields.RequestField("file", data, "b.tar")
    part.make_multipart(content_type="application/x-tar")
    expected, _ = urllib3.filepost.encode_multipart_formdata(
        [("path", "/blob-files/"), ("name", "b.tar"), part], boundary
    )
    assert sent == expected


def test_a_body_can_be_sent_again(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(b"abc")
    with MultipartFileBody({}, "file", "b.tar", str(path)) as body:
        assert _sent(body) == _sent(body)


def test_a_file_that_shrank_fails_the_upload(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(b"x" * 1000)
    with MultipartFileBody({}, "file", "b.tar", str(path)) as body:
        path.write_bytes(b"x" * 10)  # truncated in place: the open file sees it
        with pytest.raises(RemoteError, match="shrank"):
            _sent(body)
