"""The emulator over raw HTTP: auth, Range semantics, faults, persistence, counters."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from blobfs.testing.emulator import Emulator, start_process

TOKEN = "secret-token-for-tests"


@pytest.fixture
def emu(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Emulator(tmp_path / "state", TOKEN) as e:
        yield e


def call(
    emu: Emulator, method: str, body: object = None, token: str = TOKEN, **kw: object
) -> requests.Response:
    return requests.post(
        f"{emu.url}/public/api/v3/{method}",
        json=body or {},
        headers={"x-api-key": token, **kw.pop("headers", {})},  # type: ignore[dict-item]
        **kw,
    )  # type: ignore[arg-type]


def upload(emu: Emulator, data: bytes, tmp_path: Path) -> dict:  # type: ignore[type-arg]
    src = tmp_path / "blob.tar"
    src.write_bytes(data)
    with open(src, "rb") as f:
        r = requests.post(
            f"{emu.url}/public/api/v3/file-storage.upload?teamId=1",
            data={"path": "/blob-files/", "name": "blob.tar"},
            files={"file": ("blob.tar", f)},
            headers={"x-api-key": TOKEN},
        )
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def test_requests_without_the_token_get_401_and_no_data(emu: Emulator) -> None:
    assert call(emu, "teams.list", token="").status_code == 401
    assert call(emu, "teams.list", token="wrong").status_code == 401
    assert TOKEN not in call(emu, "teams.list", token="wrong").text


def test_a_fresh_instance_has_one_team_and_one_workspace(emu: Emulator) -> None:
    teams = call(emu, "teams.list").json()
    assert teams["total"] == 1
    spaces = call(emu, "workspaces.list", {"teamId": teams["entities"][0]["id"]}).json()
    assert spaces["total"] == 1


def test_range_requests_get_206_exact_bytes_and_416_outside(emu: Emulator, tmp_path: Path) -> None:
    data = bytes(range(256)) * 100
    info = upload(emu, data, tmp_path)
    body = {"id": info["id"]}
    r = call(emu, "file-storage.download", body, headers={"Range": "bytes=10-19"})
    assert r.status_code == 206
    assert r.content == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert r.headers["ETag"]
    r = call(emu, "file-storage.download", body, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert call(emu, "file-storage.download", body).content == data


def test_faults_are_injected_per_request_and_per_run(emu: Emulator, tmp_path: Path) -> None:
    data = b"x" * 10_000 + b"y" * 10_000
    info = upload(emu, data, tmp_path)
    body = {"id": info["id"]}
    r = call(
        emu,
        "file-storage.download",
        body,
        headers={"Range": "bytes=0-99", "x-emulator-fault": "ignore_range"},
    )
    assert r.status_code == 200 and r.content == data
    r = call(
        emu,
        "file-storage.download",
        body,
        headers={"Range": "bytes=0-99", "x-emulator-fault": "wrong_content_range"},
    )
    assert r.headers["Content-Range"] == f"bytes 1-100/{len(data)}"  # shifted by one
    emu.faults.update({"fail_n": 2, "fail_status": 503})
    assert call(emu, "file-storage.download", body).status_code == 503
    assert call(emu, "file-storage.download", body).status_code == 503
    assert call(emu, "file-storage.download", body).status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        call(emu, "file-storage.download", body, headers={"x-emulator-fault": "short_body"})


def test_state_survives_a_restart(tmp_path: Path) -> None:
    with Emulator(tmp_path / "state", TOKEN) as first:
        pid = call(first, "projects.add", {"workspaceId": 1, "name": "kept"}).json()["id"]
    with Emulator(tmp_path / "state", TOKEN) as second:
        assert call(second, "projects.info", {"id": pid}).json()["name"] == "kept"


def test_stats_count_requests_per_method(emu: Emulator) -> None:
    emu.reset_stats()
    call(emu, "teams.list")
    call(emu, "teams.list")
    stats = requests.get(f"{emu.url}/_emulator/stats", headers={"x-api-key": TOKEN}).json()
    assert stats["methods"] == {"teams.list": 2}
    assert stats["requests"] == 2


def test_runs_as_a_command_and_prints_its_address(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc, url = start_process(tmp_path / "s", token_file)
    try:
        assert url.startswith("http://127.0.0.1:")
        r = requests.post(f"{url}/public/api/v3/teams.list", json={}, headers={"x-api-key": TOKEN})
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
