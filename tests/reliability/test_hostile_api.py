"""Hostile API answers: a server that lies must not crash the mount or escape its tree.

A tiny HTTP server answers each method with crafted JSON (the emulator only tells the
truth, so a fake is the one way to get these answers on demand).
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from blobfs import deadline
from blobfs.cache.blocks import BlockCache
from blobfs.errors import BlobfsError, RemoteError, TimedOut, to_errno
from blobfs.sly.api import SuperviselyApi
from blobfs.sources.remote import RemoteProjectSource
from blobfs.transport.http import HttpClient
from blobfs.view.tree import ProjectView

GOOD_IMAGE = {
    "id": 1,
    "name": "ok.png",
    "size": 4,
    "updatedAt": "",
    "hash": "h",
    "relatedDataId": None,
}


def serve(answers: dict[str, Any]) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            method = self.path.rsplit("/", 1)[1]
            answer = answers.get(method, {})
            status = 200
            if isinstance(answer, tuple) and answer[0] == "status":  # a bare HTTP status
                status, answer = answer[1], {}
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def view_of() -> Iterator[Any]:
    servers = []

    def make(answers: dict[str, Any]) -> ProjectView:
        server, url = serve(
            {
                "projects.meta": {"classes": []},
                "datasets.list": {
                    "total": 1,
                    "pagesCount": 1,
                    "entities": [{"id": 5, "name": "ds"}],
                },
                **answers,
            }
        )
        servers.append(server)
        client = HttpClient(url, "t", retries=0)
        return ProjectView(RemoteProjectSource(SuperviselyApi(client), 1, BlockCache(64, 640)))

    yield make
    for s in servers:
        s.shutdown()


def page(*entities: Any, pages: Any = 1) -> dict[str, Any]:
    return {"total": len(entities), "pagesCount": pages, "entities": list(entities)}


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "no-id.png"},  # missing id
        {"id": "7", "name": "str-id.png"},  # wrong type
        {"id": 8, "name": 123},  # name not a string
        {"id": 9, "name": "x.png", "offsetStart": "0", "relatedDataId": 3, "downloadId": "d"},
        "not an object",
    ],
)
def test_malformed_image_infos_fail_the_listing_with_eio(view_of: Any, bad: Any) -> None:
    view = view_of({"images.list": page(GOOD_IMAGE, bad)})
    with pytest.raises(RemoteError) as info:
        view.readdir("/ds/img")
    assert to_errno(info.value) == 5  # EIO


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "a/b.png", "nul\0.png", "x" * 300])
def test_image_names_that_try_to_escape_are_not_served(view_of: Any, name: str) -> None:
    evil = {**GOOD_IMAGE, "id": 2, "name": name}
    view = view_of({"images.list": page(GOOD_IMAGE, evil)})
    assert view.readdir("/ds/img") == ["ok.png"]
    assert "not served" in view.source.problems()[0]


def test_duplicate_names_from_the_server_are_both_refused(view_of: Any) -> None:
    view = view_of({"images.list": page(GOOD_IMAGE, {**GOOD_IMAGE, "id": 2})})
    assert view.readdir("/ds/img") == []


def test_a_huge_page_count_is_refused_not_followed(view_of: Any) -> None:
    view = view_of({"images.list": page(GOOD_IMAGE, pages=10**12)})
    with pytest.raises(RemoteError, match="implausible pagesCount"):
        view.readdir("/ds/img")


def test_dataset_names_that_try_to_escape_are_not_served(view_of: Any) -> None:
    view = view_of(
        {
            "datasets.list": page({"id": 5, "name": "../up"}, {"id": 6, "name": "fine"}),
            "images.list": page(),
        }
    )
    assert sorted(view.readdir("/")) == ["fine", "meta.json"]


def test_a_dataset_parent_loop_is_refused(view_of: Any) -> None:
    view = view_of(
        {
            "datasets.list": page(
                {"id": 5, "name": "a", "parentId": 6}, {"id": 6, "name": "b", "parentId": 5}
            )
        }
    )
    assert sorted(view.readdir("/")) == ["meta.json"]


def test_a_blob_range_outside_the_blob_fails_only_that_image(view_of: Any) -> None:
    blob_image = {
        "id": 3,
        "name": "blob.png",
        "size": 10,
        "updatedAt": "",
        "hash": None,
        "relatedDataId": 42,
        "downloadId": "tf42",
        "offsetStart": 100,
        "offsetEnd": 10_000,
    }
    view = view_of(
        {"images.list": page(blob_image), "file-storage.info": {"id": 42, "size": 600, "hash": "x"}}
    )
    assert view.readdir("/ds/img") == ["blob.png"]
    with pytest.raises(BlobfsError) as info:
        view.read_path("/ds/img/blob.png", 0, 100)
    assert to_errno(info.value) == 5


def test_an_annotation_with_broken_geometry_fails_only_its_own_file(view_of: Any) -> None:
    def ann(exterior: Any) -> dict[str, Any]:
        label = {"classTitle": "c", "geometryType": "rectangle", "points": {"exterior": exterior}}
        return {"size": {"height": 8, "width": 8}, "objects": [label]}

    view = view_of(
        {
            "images.list": page(GOOD_IMAGE, {**GOOD_IMAGE, "id": 2, "name": "two.png"}),
            "annotations.bulk.info": [
                {"imageId": 1, "annotation": ann([[1, 1], [3.5, 8]])},
                {"imageId": 2, "annotation": ann([["x", 1], [3, 3]])},
            ],
        }
    )
    good = json.loads(view.read_path("/ds/ann/ok.png.json", 0, 10_000))
    assert good["objects"][0]["points"]["exterior"] == [[1, 1], [3, 7]]  # pixels, as the SDK
    with pytest.raises(BlobfsError, match=r"image 2: objects\[0\].points.exterior") as info:
        view.read_path("/ds/ann/two.png.json", 0, 10_000)
    assert to_errno(info.value) == 5


def test_a_team_file_size_is_read_where_the_sdk_reads_it(view_of: Any) -> None:
    """``FileInfo.sizeb`` comes from ``meta.size`` (SDK ``ApiField.SIZEB2``)."""
    view = view_of({"file-storage.info": {"id": 42, "meta": {"size": 600}, "hash": "x"}})
    assert view.source.api.file_info(42).size == 600


def trickle_server(delay_s: float) -> tuple[ThreadingHTTPServer, str]:
    """Answers every request with a valid body, one byte per ``delay_s``: each read of
    the socket succeeds in time, only the whole answer is too slow (a fault the emulator,
    which sleeps before answering, cannot produce)."""
    body = json.dumps({"id": 1, "name": "p"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(delay_s)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_an_answer_trickling_in_is_cut_at_the_deadline() -> None:
    server, url = trickle_server(0.1)
    try:
        client = HttpClient(url, "t")
        started = time.monotonic()
        with pytest.raises(TimedOut) as info, deadline.within(1.0):
            client.post_json("projects.info", {"id": 1})
        assert time.monotonic() - started < 1.5
        assert to_errno(info.value) == errno.ETIMEDOUT
        assert client.post_json("projects.info", {"id": 1}) == {"id": 1, "name": "p"}  # no deadline
    finally:
        server.shutdown()


@pytest.mark.parametrize(("status", "code"), [(404, errno.EIO), (401, errno.EACCES)])
def test_a_blob_the_server_refuses_fails_its_images_with_the_right_errno(
    view_of: Any, status: int, code: int
) -> None:
    """404 for a blob the listing named: the project is damaged (EIO, not ENOENT);
    401/403: the token no longer works (EACCES, as for annotations)."""
    blob_image = {
        "id": 3,
        "name": "blob.png",
        "size": 10,
        "updatedAt": "",
        "hash": None,
        "relatedDataId": 42,
        "downloadId": "tf42",
        "offsetStart": 0,
        "offsetEnd": 10,
    }
    view = view_of({"images.list": page(blob_image), "file-storage.info": ("status", status)})
    assert view.readdir("/ds/img") == ["blob.png"]
    with pytest.raises(BlobfsError) as info:
        view.read_path("/ds/img/blob.png", 0, 10)
    assert to_errno(info.value) == code
    assert "blob 42" in str(info.value) or status != 404
