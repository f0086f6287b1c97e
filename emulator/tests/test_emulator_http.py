"""The emulator over raw HTTP: auth, Range, faults, persistence, counters, the REST methods.

Each test starts its own emulator on a free port in ``tmp_path``; the Python API
(``Emulator``) and the command line (``python -m sly_emulator``) are both used.
"""

from __future__ import annotations

import http.client
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from support import (
    TOKEN,
    LocalProject,
    api_url,
    call,
    ok,
    png_bytes,
    upload_file,
    write_offsets_file,
    write_tar,
)

from sly_emulator import Emulator, Unsatisfiable, parse_range, start_process
from sly_emulator._store import image_dims
from sly_emulator.seed import SeedError, read_offsets, upload_local_project

BLOB_FILES = {f"img_{i:02d}.png": png_bytes(i) for i in range(8)}


@pytest.fixture
def blob(emu: Emulator, tmp_path: Path) -> dict[str, Any]:
    """A project, dataset, a Team Files blob of 8 PNGs registered by offsets."""
    tar = tmp_path / "blob.tar"
    members = write_tar(tar, BLOB_FILES)
    info = upload_file(emu, tar)
    project = ok(emu, "projects.add", {"workspaceId": 1, "name": "p"})
    dataset = ok(emu, "datasets.add", {"projectId": project["id"], "name": "ds"})
    items = [
        {
            "title": m.name,
            "teamFileId": info["id"],
            "sourceBlob": {"offsetStart": m.start, "offsetEnd": m.end},
        }
        for m in members
    ]
    images = ok(emu, "images.bulk.add", {"datasetId": dataset["id"], "images": items})
    return {
        "file": info,
        "tar": tar.read_bytes(),
        "project": project,
        "dataset": dataset,
        "images": images,
    }


def blob_download(blob: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "images.data.download", {
        "projectId": blob["project"]["id"],
        "downloadId": blob["images"][0]["downloadId"],
    }


# ---- auth ---------------------------------------------------------------------------------


def test_requests_without_the_right_token_get_401_json_without_the_token(emu: Emulator) -> None:
    for token in ("", "wrong", TOKEN + "x"):
        r = call(emu, "teams.list", token=token)
        assert r.status_code == 401
        assert r.json()["error"] == "Unauthorized"
        assert TOKEN not in r.text
    r = requests.get(f"{emu.url}/_emulator/stats", timeout=10)
    assert r.status_code == 401


def test_an_unauthorized_upload_is_not_stored(emu: Emulator, tmp_path: Path) -> None:
    r = requests.post(
        api_url(emu, "file-storage.upload") + "?teamId=1",
        files={"file": ("x.tar", b"x" * 5000)},
        data={"path": "/blob-files/"},
        headers={"x-api-key": "nope"},
        timeout=10,
    )
    assert r.status_code == 401
    assert os.listdir(tmp_path / "state" / "files") == []
    assert ok(emu, "file-storage.list", {"teamId": 1, "path": "/"}) == []


def test_a_fresh_instance_has_one_team_one_workspace_and_a_version(emu: Emulator) -> None:
    teams = ok(emu, "teams.list")
    assert (teams["total"], teams["pagesCount"]) == (1, 1)
    team = teams["entities"][0]
    spaces = ok(emu, "workspaces.list", {"teamId": team["id"]})
    assert spaces["total"] == 1
    assert spaces["entities"][0]["teamId"] == team["id"]
    assert ok(emu, "instance.version")["version"]


# ---- Range, ETag, streaming ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=5-", (5, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=90-500", (90, 100)),
        ("bytes=9-3", None),  # invalid: ignored
        ("bytes=0-1,5-6", None),  # several ranges: ignored (whole body)
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


@pytest.mark.parametrize("how", ["file-by-id", "file-by-path", "blob", "image"])
def test_range_reads_answer_206_with_exact_bytes_and_416_past_the_end(
    emu: Emulator, blob: dict[str, Any], how: str
) -> None:
    tar, image = blob["tar"], blob["images"][3]
    method, body = {
        "file-by-id": ("file-storage.download", {"id": blob["file"]["id"]}),
        "file-by-path": ("file-storage.download", {"teamId": 1, "path": "/blob-files/blob.tar"}),
        "blob": blob_download(blob),
        "image": ("images.download", {"id": image["id"]}),
    }[how]
    data = BLOB_FILES[image["name"]] if how == "image" else tar
    whole = call(emu, method, body)
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["ETag"]
    part = call(emu, method, body, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == data[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    assert part.headers["Content-Length"] == "90"
    assert part.headers["ETag"] == whole.headers["ETag"]
    tail = call(emu, method, body, headers={"Range": "bytes=-7"})
    assert (tail.status_code, tail.content) == (206, data[-7:])
    past = call(emu, method, body, headers={"Range": f"bytes={len(data)}-"})
    assert past.status_code == 416
    assert past.headers["Content-Range"] == f"bytes */{len(data)}"
    ignored = call(emu, method, body, headers={"Range": "bytes=0-1,4-5"})
    assert (ignored.status_code, ignored.content) == (200, data)


def test_etag_changes_with_the_content_and_if_none_match_gives_304(
    emu: Emulator, blob: dict[str, Any], tmp_path: Path
) -> None:
    body = {"id": blob["file"]["id"]}
    first = call(emu, "file-storage.download", body).headers["ETag"]
    assert call(emu, "file-storage.download", body).headers["ETag"] == first
    r = call(emu, "file-storage.download", body, headers={"If-None-Match": first})
    assert (r.status_code, r.content) == (304, b"")
    path = tmp_path / "state" / "files" / str(blob["file"]["id"])
    time.sleep(0.01)
    path.write_bytes(path.read_bytes()[::-1])  # same size, new bytes
    assert call(emu, "file-storage.download", body).headers["ETag"] != first
    image = {"id": blob["images"][0]["id"]}
    old = call(emu, "images.download", image).headers["ETag"]
    path.write_bytes(blob["tar"])
    assert call(emu, "images.download", image).headers["ETag"] != old


def test_big_files_stream_in_full_and_by_range(emu: Emulator, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = os.urandom(3 << 20) + bytes(range(256)) * 4096
    big.write_bytes(data)
    info = upload_file(emu, big, "/other/")
    assert info["size"] == len(data)
    r = call(emu, "file-storage.download", {"id": info["id"]})
    assert r.content == data
    r = call(
        emu, "file-storage.download", {"id": info["id"]}, headers={"Range": "bytes=1000000-2999999"}
    )
    assert r.content == data[1_000_000:3_000_000]
    emu.reset_stats()
    call(emu, "file-storage.download", {"id": info["id"]}, headers={"Range": "bytes=0-99"})
    assert emu.stats()["bytes_sent"] == 100


def test_connections_are_kept_alive(emu: Emulator, blob: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    headers = {"x-api-key": TOKEN, "Content-Type": "application/json"}
    for i in range(3):
        conn.request(
            "POST",
            "/public/api/v3/file-storage.download",
            json.dumps({"id": blob["file"]["id"]}),
            {**headers, "Range": f"bytes={i}-{i}"},
        )
        r = conn.getresponse()
        assert (r.status, r.read()) == (206, blob["tar"][i : i + 1])
        assert r.getheader("Connection") is None
    assert conn.sock is not None  # never reopened
    conn.close()


def test_get_requests_take_their_fields_from_the_query(emu: Emulator, blob: dict[str, Any]) -> None:
    method, body = blob_download(blob)
    r = requests.get(api_url(emu, method), params=body, headers={"x-api-key": TOKEN}, timeout=10)
    assert r.content == blob["tar"]


def test_raw_and_chunked_uploads_reach_team_files(emu: Emulator) -> None:
    """``api.file.upload_async`` POSTs the bytes as application/octet-stream, chunked."""
    payload = [b"a" * 70_000, b"b" * 5, b"c" * 100_000]
    r = requests.post(
        api_url(emu, "file-storage.upload"),
        params={"teamId": 1, "path": "/blob-files/raw.bin"},
        data=iter(payload),  # no length: requests sends Transfer-Encoding: chunked
        headers={"x-api-key": TOKEN, "Content-Type": "application/octet-stream"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["path"], info["size"]) == ("/blob-files/raw.bin", 170_005)
    assert call(emu, "file-storage.download", {"id": info["id"]}).content == b"".join(payload)


# ---- faults -------------------------------------------------------------------------------


def test_fail_n_answers_the_next_n_requests_in_scope_with_the_status(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    method, body = blob_download(blob)
    emu.faults.update({"fail_n": 2, "fail_status": 503})
    assert call(emu, "teams.list").status_code == 200  # default scope: byte downloads only
    assert [call(emu, method, body).status_code for _ in range(3)] == [503, 503, 200]
    emu.faults.update({"fail_n": 1, "fail_status": 500, "scope": "all"})
    assert call(emu, "teams.list").status_code == 500
    assert call(emu, "teams.list").status_code == 200


def test_faults_can_be_scoped_to_one_method(emu: Emulator, blob: dict[str, Any]) -> None:
    method, body = blob_download(blob)
    emu.faults.update({"ignore_range": True, "scope": "images.data.download"})
    assert call(emu, method, body, headers={"Range": "bytes=0-9"}).status_code == 200
    r = call(
        emu, "file-storage.download", {"id": blob["file"]["id"]}, headers={"Range": "bytes=0-9"}
    )
    assert r.status_code == 206


def test_faults_can_be_set_per_method_whatever_the_scope(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    method, body = blob_download(blob)
    team_file = {"id": blob["file"]["id"]}
    emu.faults.update(
        {
            "methods": {
                "images.data.download": "ignore_range",
                "file-storage.download": "fail_status=404",
            }
        }
    )
    r = call(emu, method, body, headers={"Range": "bytes=0-9"})
    assert (r.status_code, r.content) == (200, blob["tar"])
    assert call(emu, "file-storage.download", team_file).status_code == 404
    assert call(emu, "teams.list").status_code == 200  # other methods are healthy
    with pytest.raises(ValueError):
        emu.faults.update({"methods": {"images.data.download": "no_such_fault"}})
    emu.faults.reset()
    assert emu.faults.snapshot()["methods"] == {}
    assert call(emu, method, body, headers={"Range": "bytes=0-9"}).status_code == 206


def test_per_request_faults_come_from_a_header(emu: Emulator, blob: dict[str, Any]) -> None:
    method, body = blob_download(blob)
    fault = {"x-emulator-fault": "fail_n=1;fail_status=429"}
    assert call(emu, method, body, headers=fault).status_code == 429
    r = call(emu, method, body, headers={"Range": "bytes=0-99", "x-emulator-fault": "ignore_range"})
    assert (r.status_code, r.content) == (200, blob["tar"])
    r = call(
        emu,
        method,
        body,
        headers={"Range": "bytes=10-19", "x-emulator-fault": "wrong_content_range"},
    )
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 11-20/{len(blob['tar'])}"
    assert r.content == blob["tar"][10:20]  # right bytes, wrong label
    assert call(emu, method, body, headers={"x-emulator-fault": "no_such_fault"}).status_code == 400
    began = time.monotonic()
    call(emu, "teams.list", headers={"x-emulator-fault": "latency_ms=150"})
    assert time.monotonic() - began >= 0.15


def raw_get(
    emu: Emulator, method: str, body: dict[str, Any], fault: str
) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    conn.request(
        "POST",
        f"/public/api/v3/{method}",
        json.dumps(body),
        {"x-api-key": TOKEN, "Content-Type": "application/json", "x-emulator-fault": fault},
    )
    return conn.getresponse(), conn


def test_short_body_sends_half_the_announced_bytes_then_closes(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    r, conn = raw_get(emu, *blob_download(blob), "short_body")
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead) as info:
        r.read()
    assert info.value.partial == blob["tar"][: len(blob["tar"]) // 2]
    conn.close()


def test_reset_mid_body_resets_the_connection(emu: Emulator, blob: dict[str, Any]) -> None:
    r, conn = raw_get(emu, *blob_download(blob), "reset_mid_body")
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        r.read()
    conn.close()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        call(emu, *blob_download(blob), headers={"x-emulator-fault": "reset_mid_body"})


def test_json_answers_can_be_cut_too(emu: Emulator) -> None:
    emu.faults.update({"short_body": True, "scope": "teams.list"})
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        call(emu, "teams.list")
    assert call(emu, "workspaces.list", {"teamId": 1}).status_code == 200
    emu.faults.reset()
    assert call(emu, "teams.list").status_code == 200


def test_times_limits_body_faults_to_the_next_n_requests(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    method, body = blob_download(blob)
    emu.faults.update({"ignore_range": True, "times": 1})
    assert call(emu, method, body, headers={"Range": "bytes=0-0"}).status_code == 200
    assert call(emu, method, body, headers={"Range": "bytes=0-0"}).status_code == 206


def test_faults_are_set_over_http_for_an_emulator_in_another_process(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    headers = {"x-api-key": TOKEN}
    r = requests.post(
        f"{emu.url}/_emulator/faults",
        json={"fail_n": "1", "ignore_range": "true"},
        headers=headers,
        timeout=10,
    )
    assert r.json()["fail_n"] == 1 and r.json()["ignore_range"] is True
    assert emu.faults.fail_n == 1
    bad = requests.post(
        f"{emu.url}/_emulator/faults", json={"typo": 1}, headers=headers, timeout=10
    )
    assert bad.status_code == 400
    assert call(emu, *blob_download(blob)).status_code == 500
    r = requests.post(f"{emu.url}/_emulator/faults/reset", headers=headers, timeout=10)
    assert r.json()["ignore_range"] is False
    r = requests.post(
        f"{emu.url}/_emulator/faults",
        json={"latency_ms": 1},
        headers={"x-api-key": "bad"},
        timeout=10,
    )
    assert r.status_code == 401
    assert emu.faults.latency_ms == 0


def test_run_wide_latency_applies_to_every_request(emu: Emulator) -> None:
    emu.faults.update({"latency_ms": 100})
    began = time.monotonic()
    call(emu, "teams.list")
    assert time.monotonic() - began >= 0.1


# ---- stats and the request log -----------------------------------------------------------


def test_stats_and_request_log_count_methods_statuses_and_bytes(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    emu.reset_stats()
    call(emu, "teams.list")
    call(emu, "teams.list", token="bad")
    r = call(
        emu, "file-storage.download", {"id": blob["file"]["id"]}, headers={"Range": "bytes=0-9"}
    )
    stats = emu.stats()
    assert stats["methods"] == {"teams.list": 2, "file-storage.download": 1}
    assert stats["statuses"] == {"200": 1, "401": 1, "206": 1}
    assert stats["requests"] == 3
    assert stats["bytes_sent"] > len(r.content)
    log = emu.request_log()
    assert [e["method"] for e in log] == ["teams.list", "teams.list", "file-storage.download"]
    assert log[-1]["range"] == "bytes=0-9" and log[-1]["bytes"] == 10 and log[-1]["status"] == 206
    over_http = requests.get(
        f"{emu.url}/_emulator/stats", headers={"x-api-key": TOKEN}, timeout=10
    ).json()
    assert over_http["methods"] == stats["methods"]
    assert (
        requests.get(f"{emu.url}/_emulator/log", headers={"x-api-key": TOKEN}, timeout=10).json()
        == log
    )
    requests.post(f"{emu.url}/_emulator/stats/reset", headers={"x-api-key": TOKEN}, timeout=10)
    assert emu.stats() == {"requests": 0, "methods": {}, "statuses": {}, "bytes_sent": 0}


def test_the_log_names_the_faults_that_fired(emu: Emulator, blob: dict[str, Any]) -> None:
    emu.reset_stats()
    call(emu, *blob_download(blob), headers={"x-emulator-fault": "ignore_range;latency_ms=1"})
    assert set(emu.request_log()[-1]["faults"]) == {"ignore_range", "latency_ms"}


# ---- persistence and the command line ---------------------------------------------------


def test_state_survives_a_restart(tmp_path: Path) -> None:
    tar = tmp_path / "b.tar"
    members = write_tar(tar, BLOB_FILES)
    with Emulator(tmp_path / "state", TOKEN) as first:
        info = upload_file(first, tar)
        pid = ok(first, "projects.add", {"workspaceId": 1, "name": "kept"})["id"]
        ds = ok(first, "datasets.add", {"projectId": pid, "name": "ds"})["id"]
        m = members[0]
        [image] = ok(
            first,
            "images.bulk.add",
            {
                "datasetId": ds,
                "images": [
                    {
                        "title": m.name,
                        "teamFileId": info["id"],
                        "sourceBlob": {"offsetStart": m.start, "offsetEnd": m.end},
                    }
                ],
            },
        )
        ann = {"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}
        ok(
            first,
            "annotations.bulk.add",
            {"datasetId": ds, "annotations": [{"imageId": image["id"], "annotation": ann}]},
        )
    with Emulator(tmp_path / "state", TOKEN) as second:
        assert ok(second, "projects.info", {"id": pid})["imagesCount"] == 1
        assert ok(second, "images.info", {"id": image["id"]}) == image | {
            "updatedAt": ok(second, "images.info", {"id": image["id"]})["updatedAt"]
        }
        assert call(second, "images.download", {"id": image["id"]}).content == BLOB_FILES[m.name]
        assert ok(second, "annotations.info", {"imageId": image["id"]})["annotation"] == ann
        assert ok(second, "teams.list")["total"] == 1  # not seeded twice


def test_runs_as_a_command_with_the_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc, url = start_process(tmp_path / "s", token_file)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert ok(url, "teams.list")["total"] == 1
        pid = ok(url, "projects.add", {"workspaceId": 1, "name": "x"})["id"]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM is a clean stop
    proc, url = start_process(tmp_path / "s", token_file)
    try:
        assert ok(url, "projects.info", {"id": pid})["name"] == "x"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_token_can_come_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "SLY_EMULATOR_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sly_emulator",
            "--state",
            str(tmp_path / "s"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        assert call(url, "teams.list").status_code == 200
        assert call(url, "teams.list", token="").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
    missing = subprocess.run(
        [sys.executable, "-m", "sly_emulator", "--state", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "SLY_EMULATOR_TOKEN"},
        timeout=30,
    )
    assert missing.returncode != 0 and "token" in missing.stderr


# ---- the REST methods ---------------------------------------------------------------------


def test_blob_images_carry_the_blob_fields_and_their_size(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    for image in blob["images"]:
        assert image["relatedDataId"] == blob["file"]["id"]
        assert image["downloadId"] == f"tf{blob['file']['id']}"
        assert (
            image["offsetEnd"] - image["offsetStart"]
            == image["size"]
            == len(BLOB_FILES[image["name"]])
        )
        assert (image["width"], image["height"], image["mime"], image["ext"]) == (
            32,
            32,
            "image/png",
            "png",
        )
        assert blob["tar"][image["offsetStart"] : image["offsetEnd"]] == BLOB_FILES[image["name"]]


def test_bulk_add_refuses_bad_ranges_and_reports_name_conflicts_like_the_server(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    ds, file_id, size = blob["dataset"]["id"], blob["file"]["id"], len(blob["tar"])
    for source in (
        {"offsetStart": 0, "offsetEnd": size + 1},
        {"offsetStart": 5, "offsetEnd": 5},
        {"offsetStart": "0", "offsetEnd": 9},
    ):
        r = call(
            emu,
            "images.bulk.add",
            {
                "datasetId": ds,
                "images": [{"title": "new.png", "teamFileId": file_id, "sourceBlob": source}],
            },
        )
        assert r.status_code == 400
    taken = blob["images"][0]
    r = call(
        emu,
        "images.bulk.add",
        {
            "datasetId": ds,
            "images": [
                {
                    "title": taken["name"],
                    "teamFileId": file_id,
                    "sourceBlob": {"offsetStart": 0, "offsetEnd": 9},
                }
            ],
        },
    )
    assert r.status_code == 400
    assert r.json()["details"]["type"] == "NONUNIQUE"
    assert r.json()["details"]["errors"] == [{"name": taken["name"], "id": taken["id"]}]
    assert ok(emu, "images.list", {"datasetId": ds})["total"] == len(
        BLOB_FILES
    )  # nothing half-added


def test_images_list_pages_filters_and_sorts(emu: Emulator, blob: dict[str, Any]) -> None:
    ds = blob["dataset"]["id"]
    pages = [ok(emu, "images.list", {"datasetId": ds, "page": p, "per_page": 3}) for p in (1, 2, 3)]
    assert [(p["total"], p["perPage"], p["pagesCount"]) for p in pages] == [(8, 3, 3)] * 3
    ids = [e["id"] for p in pages for e in p["entities"]]
    assert ids == sorted(i["id"] for i in blob["images"])
    wanted = ids[2:5]
    got = ok(
        emu,
        "images.list",
        {"datasetId": ds, "filter": [{"field": "id", "operator": "in", "value": wanted}]},
    )
    assert [e["id"] for e in got["entities"]] == wanted
    by_name = ok(
        emu,
        "images.list",
        {"datasetId": ds, "filter": [{"field": "name", "operator": "=", "value": "img_05.png"}]},
    )
    assert [e["name"] for e in by_name["entities"]] == ["img_05.png"]
    desc = ok(emu, "images.list", {"datasetId": ds, "sort": "name", "sort_order": "desc"})
    assert [e["name"] for e in desc["entities"]] == sorted(BLOB_FILES, reverse=True)
    assert ok(emu, "images.list", {"projectId": blob["project"]["id"]})["total"] == 8
    assert call(emu, "images.list", {"datasetId": ds, "per_page": -1}).status_code == 400


def test_images_list_fields_cut_every_entity_to_the_fields_asked_for(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    ds = blob["dataset"]["id"]
    full = ok(emu, "images.list", {"datasetId": ds})["entities"]
    fields = ["id", "name", "offsetStart", "meta", "noSuchField"]
    for body in (  # the plain listing (served by SQL) and a filtered one agree
        {"datasetId": ds, "fields": fields, "per_page": 5, "page": 2},
        {"datasetId": ds, "fields": fields, "per_page": 5, "page": 2, "sort": "name"},
    ):
        page = ok(emu, "images.list", body)
        assert (page["total"], page["perPage"], page["pagesCount"]) == (8, 5, 2)
        assert page["entities"] == [
            {
                "id": e["id"],
                "name": e["name"],
                "offsetStart": e["offsetStart"],
                "meta": {},
                "noSuchField": None,
            }
            for e in full[5:]
        ]
    for bad in (["id", "name; DROP"], "id", [1]):
        assert call(emu, "images.list", {"datasetId": ds, "fields": bad}).status_code == 400


def test_annotations_bulk_info_answers_in_the_order_asked_and_refuses_unknown_ids(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    ids = [i["id"] for i in blob["images"]][::-1]
    body = {"datasetId": blob["dataset"]["id"], "imageIds": ids}
    assert [a["imageId"] for a in ok(emu, "annotations.bulk.info", body)] == ids
    for bad in ([*ids, 10**9], [ids[0], "x"], [ids[0], True]):
        r = call(emu, "annotations.bulk.info", {**body, "imageIds": bad})
        assert r.status_code in (400, 404), bad


def put_one_rectangle(
    emu: Emulator, blob: dict[str, Any], tags: list[dict[str, Any]]
) -> dict[str, Any]:
    """Annotate the blob's first image with one rectangle carrying ``tags``; the annotation."""
    obj = {
        "classTitle": "cat",
        "geometryType": "rectangle",
        "tags": tags,
        "points": {"exterior": [[1, 1], [5, 5]], "interior": []},
    }
    ann = {"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": [obj]}
    image_id = blob["images"][0]["id"]
    body = {
        "datasetId": blob["dataset"]["id"],
        "annotations": [{"imageId": image_id, "annotation": ann}],
    }
    ok(emu, "annotations.bulk.add", body)
    return ann


def test_annotations_bulk_info_keeps_tag_order_only_below_60_ids(
    emu: Emulator, blob: dict[str, Any]
) -> None:
    """The SDK asks 50 ids at a time because from about 60 up the server answers the tags
    inside an object in no stable order; the emulator shows the same to a bigger batch."""
    ds, images = blob["dataset"]["id"], blob["images"]
    put_one_rectangle(emu, blob, [{"name": n, "value": None} for n in ("a", "b", "c")])
    ids = [i["id"] for i in images]

    def tag_names(count: int) -> list[list[str]]:
        asked = (ids * count)[:count]
        answer = ok(emu, "annotations.bulk.info", {"datasetId": ds, "imageIds": asked})
        return [
            [t["name"] for t in a["annotation"]["objects"][0]["tags"]]
            for a in answer
            if a["imageId"] == ids[0]
        ]

    assert tag_names(50) == tag_names(50) == [["a", "b", "c"]] * 7  # stable: as stored
    first, again = tag_names(60), tag_names(60)
    assert first != again and all(sorted(t) == ["a", "b", "c"] for t in first + again)
    r = call(emu, "annotations.bulk.info", {"datasetId": ds, "imageIds": (ids * 13)[:101]})
    assert r.status_code == 400 and "less than or equal to 100" in r.text


def test_ordinary_images_upload_by_hash_and_download(emu: Emulator, blob: dict[str, Any]) -> None:
    data = png_bytes(123, 40, 20)
    r = requests.post(
        api_url(emu, "images.bulk.upload"),
        files={"0-file": ("0", data, "image/*")},
        headers={"x-api-key": TOKEN},
        timeout=10,
    )
    [answer] = r.json()
    digest = answer["hash"]
    assert ok(emu, "images.internal.hashes.list", [digest, "nope"]) == [digest]
    [image] = ok(
        emu,
        "images.bulk.add",
        {"datasetId": blob["dataset"]["id"], "images": [{"title": "p.png", "hash": digest}]},
    )
    assert (image["hash"], image["width"], image["height"], image["relatedDataId"]) == (
        digest,
        40,
        20,
        None,
    )
    assert call(emu, "images.download", {"id": image["id"]}).content == data
    r = call(
        emu,
        "images.bulk.download",
        {"datasetId": blob["dataset"]["id"], "imageIds": [image["id"], blob["images"][1]["id"]]},
    )
    assert r.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert data in r.content and BLOB_FILES[blob["images"][1]["name"]] in r.content


def test_nested_datasets_are_listed_with_recursive_and_keep_custom_data_out_unless_asked(
    emu: Emulator,
) -> None:
    pid = ok(emu, "projects.add", {"workspaceId": 1, "name": "n"})["id"]
    top = ok(emu, "datasets.add", {"projectId": pid, "name": "top", "customData": {"k": 1}})
    child = ok(emu, "datasets.add", {"projectId": pid, "name": "child", "parentId": top["id"]})
    assert child["parentId"] == top["id"]
    assert [d["name"] for d in ok(emu, "datasets.list", {"projectId": pid})["entities"]] == ["top"]
    listed = ok(emu, "datasets.list", {"projectId": pid, "recursive": True})["entities"]
    assert [d["name"] for d in listed] == ["top", "child"]
    assert "customData" not in listed[0]
    extra = ok(
        emu, "datasets.list", {"projectId": pid, "recursive": True, "extraFields": ["customData"]}
    )
    assert extra["entities"][0]["customData"] == {"k": 1}
    assert (
        call(
            emu, "datasets.add", {"projectId": pid, "name": "child", "parentId": top["id"]}
        ).status_code
        == 400
    )
    assert ok(emu, "projects.info", {"id": pid})["datasetsCount"] == 2


def test_project_meta_custom_data_and_settings(emu: Emulator) -> None:
    pid = ok(emu, "projects.add", {"workspaceId": 1, "name": "m"})["id"]
    meta = {
        "classes": [{"title": "cat", "shape": "rectangle", "color": "#FF0000"}],
        "tags": [{"name": "t", "value_type": "none", "color": "#00FF00"}],
    }
    saved = ok(emu, "projects.meta.update", {"id": pid, "meta": meta})
    cat_id = saved["classes"][0]["id"]
    again = ok(
        emu,
        "projects.meta.update",
        {
            "id": pid,
            "meta": {
                **meta,
                "classes": [
                    *meta["classes"],
                    {"title": "dog", "shape": "polygon", "color": "#0000FF"},
                ],
            },
        },
    )
    assert again["classes"][0]["id"] == cat_id  # a known class keeps its id
    assert again["classes"][1]["id"] not in (cat_id, again["tags"][0]["id"])
    assert [c["title"] for c in ok(emu, "projects.meta", {"id": pid})["classes"]] == ["cat", "dog"]
    ok(
        emu,
        "projects.editInfo",
        {"id": pid, "customData": {"is_blob_project": True}, "silent": True},
    )
    ok(emu, "projects.settings.update", {"id": pid, "settings": {"multiView": {"enabled": False}}})
    info = ok(emu, "projects.info", {"id": pid})
    assert info["customData"] == {"is_blob_project": True}
    assert info["settings"] == {"multiView": {"enabled": False}}
    assert "meta" not in info


def test_team_files_list_and_remove(emu: Emulator, tmp_path: Path) -> None:
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(name.encode())
    upload_file(emu, tmp_path / "a.bin", "/x/")
    upload_file(emu, tmp_path / "b.bin", "/x/sub/")
    every = ok(emu, "file-storage.list", {"teamId": 1, "path": "/x/", "recursive": True})
    assert sorted(f["path"] for f in every) == ["/x/a.bin", "/x/sub/b.bin"]
    assert every[0]["meta"]["size"] == 5
    top = ok(emu, "file-storage.list", {"teamId": 1, "path": "/x/", "recursive": False})
    assert [(f["path"], f["isDir"]) for f in top] == [("/x/a.bin", False), ("/x/sub/", True)]
    ok(emu, "file-storage.remove", {"teamId": 1, "path": "/x/sub/"})
    assert [f["path"] for f in ok(emu, "file-storage.list", {"teamId": 1, "path": "/"})] == [
        "/x/a.bin"
    ]
    assert call(emu, "file-storage.remove", {"teamId": 1, "path": "/nothing"}).status_code == 404


def test_annotations_round_trip_and_list_by_page(emu: Emulator, blob: dict[str, Any]) -> None:
    ds, images = blob["dataset"]["id"], blob["images"]
    ann = put_one_rectangle(emu, blob, [])
    assert ok(emu, "annotations.info", {"imageId": images[0]["id"]})["annotation"] == ann
    assert ok(emu, "images.info", {"id": images[0]["id"]})["labelsCount"] == 1
    default = ok(emu, "annotations.info", {"imageId": images[1]["id"]})["annotation"]
    assert default["objects"] == [] and default["size"] == {"height": 32, "width": 32}
    bulk = ok(
        emu, "annotations.bulk.info", {"datasetId": ds, "imageIds": [i["id"] for i in images[:3]]}
    )
    assert [a["imageId"] for a in bulk] == [i["id"] for i in images[:3]]
    assert (
        call(
            emu, "annotations.bulk.info", {"datasetId": ds, "imageIds": list(range(1, 102))}
        ).status_code
        == 400
    )
    page = ok(emu, "annotations.list", {"datasetId": ds, "page": 2, "per_page": 5})
    assert (page["total"], page["pagesCount"], len(page["entities"])) == (8, 2, 3)


def test_unknown_methods_and_bad_bodies_are_client_errors(emu: Emulator) -> None:
    assert call(emu, "no.such.method").status_code == 404
    assert call(emu, "projects.info", {}).status_code == 400
    assert call(emu, "projects.info", {"id": 999}).status_code == 404
    r = requests.post(
        api_url(emu, "teams.list"), data=b"{not json", headers={"x-api-key": TOKEN}, timeout=10
    )
    assert r.status_code == 400


def test_image_dims_reads_png_and_jpeg_headers() -> None:
    assert image_dims(png_bytes(1, 7, 3)) == (7, 3)
    sof = (
        b"\xff\xc0\x00\x11\x08"
        + (48).to_bytes(2, "big")
        + (64).to_bytes(2, "big")
        + b"\x03"
        + b"\x00" * 9
    )
    jpeg = b"\xff\xd8" + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + sof
    assert image_dims(jpeg) == (64, 48)
    assert image_dims(b"GIF89a....") == (None, None)


# ---- seed -----------------------------------------------------------------------------------


def test_seed_uploads_a_local_project_with_nested_datasets(
    emu: Emulator, local_project: LocalProject
) -> None:
    pid = upload_local_project(emu.url, TOKEN, local_project.root, "seeded")
    info = ok(emu, "projects.info", {"id": pid})
    assert (info["name"], info["imagesCount"], info["customData"]) == (
        "seeded",
        11,
        {"is_blob_project": True},
    )
    assert ok(emu, "projects.meta", {"id": pid})["classes"][0]["title"] == "cat"
    datasets = ok(emu, "datasets.list", {"projectId": pid, "recursive": True})["entities"]
    by_id = {d["id"]: d for d in datasets}
    paths = {}
    for d in datasets:
        paths[d["id"]] = (
            d["name"]
            if d["parentId"] is None
            else f"{by_id[d['parentId']]['name']}/datasets/{d['name']}"
        )
    seen = {}
    for ds_id, path in paths.items():
        for image in ok(emu, "images.list", {"datasetId": ds_id})["entities"]:
            seen[f"{path}/{image['name']}"] = call(
                emu, "images.download", {"id": image["id"]}
            ).content
            assert ok(emu, "annotations.info", {"imageId": image["id"]})["annotation"]["size"] == {
                "height": 32,
                "width": 32,
            }
    assert seen == local_project.images
    files = ok(emu, "file-storage.list", {"teamId": 1, "path": "/blob-files/"})
    assert sorted(f["name"] for f in files) == [
        "blob_a.tar",
        "blob_a_offsets.pkl",
        "blob_b.tar",
        "blob_b_offsets.pkl",
    ]


def test_seeding_twice_keeps_both_projects_readable(
    emu: Emulator, local_project: LocalProject
) -> None:
    first = upload_local_project(emu.url, TOKEN, local_project.root)
    second = upload_local_project(emu.url, TOKEN, local_project.root)
    assert first != second
    for pid in (first, second):
        [ds] = ok(emu, "datasets.list", {"projectId": pid})["entities"]
        image = ok(emu, "images.list", {"datasetId": ds["id"], "per_page": 1})["entities"][0]
        assert (
            call(emu, "images.download", {"id": image["id"]}).content
            == local_project.images[f"ds/{image['name']}"]
        )


def test_seed_is_batched(emu: Emulator, tmp_path: Path) -> None:
    files = {f"i{i:05d}.png": png_bytes(i % 50, 4, 4) for i in range(2500)}
    root = tmp_path / "big"
    (root / "ds" / "ann").mkdir(parents=True)
    (root / "blob").mkdir()
    write_offsets_file(root / "ds" / "b_offsets.pkl", write_tar(root / "blob" / "b.tar", files))
    emu.reset_stats()
    pid = upload_local_project(emu.url, TOKEN, root)
    assert ok(emu, "projects.info", {"id": pid})["imagesCount"] == 2500
    assert emu.stats()["methods"]["images.bulk.add"] == 3


def test_read_offsets_refuses_any_other_global(tmp_path: Path) -> None:
    evil = tmp_path / "evil_offsets.pkl"
    evil.write_bytes(pickle.dumps([os.system]))
    with pytest.raises(SeedError, match="not allowed"):
        read_offsets(evil)
    good = tmp_path / "good_offsets.pkl"
    members = write_tar(tmp_path / "t.tar", {"a.png": b"12345"})
    write_offsets_file(good, members)
    assert [(m.name, m.start, m.end) for m in read_offsets(good)] == [
        (m.name, m.start, m.end) for m in members
    ]


def test_seed_reports_a_missing_blob(emu: Emulator, local_project: LocalProject) -> None:
    (local_project.root / "blob" / "blob_a.tar").unlink()
    with pytest.raises(SeedError, match="missing"):
        upload_local_project(emu.url, TOKEN, local_project.root)
    with pytest.raises(SeedError, match="401"):
        upload_local_project(emu.url, "bad-token", local_project.root)
