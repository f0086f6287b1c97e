"""What a program and the log see when the server, its data or the network go wrong.

Real HTTP against the emulator throughout; through a real mount where the symptom is an
errno a program sees.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs import deadline
from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.errors import AuthError, RemoteError, TimedOut, to_errno
from blobfs.fuse.ops import RETRY_AFTER_TIMEOUT_S
from blobfs.sly.api import SuperviselyApi
from blobfs.sources.remote import RemoteProjectSource
from blobfs.transport.http import HttpClient
from blobfs.view.tree import ProjectView
from tests.support import harness

from .conftest import TOKEN, build_project, mount_remote

pytestmark = pytest.mark.remote


@pytest.fixture
def seeded(tmp_path: Path, emulator: Emulator) -> tuple[int, dict[str, bytes]]:
    project, expected = build_project(tmp_path, count=20)
    return upload_local_project(emulator.url, TOKEN, project), expected


def unmount(mnt: Path, mount: harness.Mount) -> int | None:
    return mount.unmount(30)


def image_doc(emu: Emulator, name: str) -> dict[str, Any]:
    for ds in emu.store.all("datasets"):
        for doc in emu.store.all("images", ds["id"]):
            if doc["name"] == name:
                return doc
    raise AssertionError(name)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mount_cli(source: str, mnt: Path, *extra: str, token: str = TOKEN) -> tuple[int, str, float]:
    """``blobfs mount`` in the background as a user runs it: (rc, stderr, seconds)."""
    started = time.monotonic()
    result, mount = harness.mount_cli(
        source, mnt, *extra, env={"API_TOKEN": token}, python_flags=(), timeout_s=120
    )
    if mount is not None:
        mount.unmount()
    return result.returncode, result.stderr, time.monotonic() - started


# ---- item: a blob gone from the server, a token that stops working ---------------------


@pytest.mark.fuse
def test_an_image_whose_blob_is_gone_fails_with_eio_and_the_log_says_why(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    proc = mount_remote(emulator, pid, mnt, log)
    try:
        gone = sorted(rel for rel in expected if not rel.endswith("plain.png"))[0]
        blob_id = image_doc(emulator, Path(gone).name)["relatedDataId"]
        emulator.store.remove_team_file(emulator.store.get("files", blob_id))
        with pytest.raises(OSError) as info:
            (mnt / gone).read_bytes()
        assert info.value.errno == errno.EIO
        same_blob = {
            rel
            for rel in expected
            if not rel.endswith("plain.png")
            and image_doc(emulator, Path(rel).name)["relatedDataId"] == blob_id
        }
        for rel in sorted(set(expected) - same_blob):  # every other image still reads
            assert (mnt / rel).read_bytes() == expected[rel], rel
    finally:
        assert unmount(mnt, proc) == 0
    lines = [line for line in log.read_text().splitlines() if f"blob {blob_id}" in line]
    assert len(lines) == 1, lines  # the kernel asks twice; the log says it once
    assert "404" in lines[0] and "ERROR" in lines[0]


@pytest.mark.fuse
def test_a_token_that_stops_working_gives_eacces_for_images_and_annotations(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    mnt = tmp_path / "mnt"
    proc = mount_remote(emulator, pid, mnt, tmp_path / "log")
    try:
        image = sorted(rel for rel in expected if not rel.endswith("plain.png"))[0]
        ann = image.replace("/img/", "/ann/") + ".json"
        os.listdir(mnt / Path(image).parent)  # listed while the token worked
        emulator.token = "revoked-" + TOKEN[::-1]
        for rel in (image, ann, "train/img/plain.png"):
            with pytest.raises(OSError) as info:
                (mnt / rel).read_bytes()
            assert info.value.errno == errno.EACCES, rel
    finally:
        emulator.token = TOKEN
        assert unmount(mnt, proc) == 0


# ---- item: messages a user can act on -------------------------------------------------


def test_a_closed_port_says_connection_refused_and_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    client = HttpClient(url, TOKEN, sleep=lambda s: None)
    with pytest.raises(RemoteError) as info:
        client.post_json("projects.info", {"id": 1})
    assert f"connection refused: {url}" in str(info.value)
    assert "ConnectionError" not in str(info.value)


def test_an_unknown_host_says_name_not_resolved_and_the_host() -> None:
    client = HttpClient("http://no-such-host.invalid", TOKEN, sleep=lambda s: None)
    with pytest.raises(RemoteError) as info:
        client.post_json("projects.info", {"id": 1})
    assert "name not resolved: no-such-host.invalid" in str(info.value)


def test_tls_to_a_plain_http_server_is_not_retried_and_hints_http(emulator: Emulator) -> None:
    host_port = emulator.url.removeprefix("http://")
    client = HttpClient(f"https://{host_port}", TOKEN)
    with pytest.raises(RemoteError) as info:
        client.post_json("projects.info", {"id": 1})
    assert client.requests == 1 and client.retried == 0
    assert f"use http://{host_port}" in str(info.value)
    assert "TLS" in str(info.value)


@pytest.mark.fuse
def test_mount_errors_name_the_cause_and_never_the_token(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, _ = seeded
    port = closed_port()
    rc, err, took = mount_cli(
        f"sly://{pid}", tmp_path / "m1", "--server", f"http://127.0.0.1:{port}", "--timeout", "3"
    )
    assert rc != 0 and f"connection refused: http://127.0.0.1:{port}" in err, err
    assert took < 15, took

    host_port = emulator.url.removeprefix("http://")
    rc, err, took = mount_cli(f"sly://{pid}", tmp_path / "m2", "--server", host_port)
    assert rc != 0 and f"use http://{host_port}" in err, err
    assert took < 15, took  # no retries of a TLS error

    rc, err, _ = mount_cli("sly://999", tmp_path / "m3", "--server", emulator.url)
    assert rc != 0
    assert "project 999 not found or not visible to this token" in err, err

    rc, err, _ = mount_cli(f"sly://{pid}", tmp_path / "m4", "--server", emulator.url, token="x1y2")
    assert rc != 0 and "token" in err.lower()
    assert "x1y2" not in err
    for name in ("m1", "m2", "m3"):
        assert not os.path.ismount(tmp_path / name)


def test_no_message_carries_the_token_or_url_credentials(emulator: Emulator) -> None:
    url = f"http://user:secret-pw@127.0.0.1:{closed_port()}"
    client = HttpClient(url, TOKEN, sleep=lambda s: None)
    with pytest.raises(RemoteError) as info:
        client.post_json("projects.info", {"id": 1})
    assert "secret-pw" not in str(info.value) and TOKEN not in str(info.value)
    assert "connection refused: http://127.0.0.1:" in str(info.value)


def test_the_environment_proxy_and_no_proxy_still_apply(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment is read once per client (not per request), with the same effect."""
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(1)
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = proxy.accept()
        seen.append(conn.recv(4096))
        conn.close()  # no answer: the client fails, having gone through the proxy

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    via_proxy = HttpClient(emulator.url, TOKEN, retries=0)
    with pytest.raises(RemoteError):
        via_proxy.post_json("projects.info", {"id": 1})
    thread.join(5)
    proxy.close()
    assert seen and seen[0].startswith(f"POST {emulator.url}/public/api/v3/".encode()), seen

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = HttpClient(emulator.url, TOKEN, retries=0)
    with pytest.raises(RemoteError, match=r"not found|404"):
        direct.post_json("projects.info", {"id": 987654})  # the server itself answered


# ---- item: every operation has a deadline ---------------------------------------------


def test_retries_fit_inside_the_deadline(emulator: Emulator) -> None:
    client = HttpClient(emulator.url, TOKEN)
    emulator.faults.update({"fail_n": 1000, "fail_status": 503, "scope": "all"})
    started = time.monotonic()
    with pytest.raises(TimedOut) as info, deadline.within(1.0):
        client.post_json("projects.info", {"id": 1})
    took = time.monotonic() - started
    assert took < 1.3, took
    assert to_errno(info.value) == errno.ETIMEDOUT
    assert "1 s deadline" in str(info.value) and "HTTP 503" in str(info.value)


def test_a_slow_answer_is_cut_at_the_deadline(emulator: Emulator) -> None:
    client = HttpClient(emulator.url, TOKEN)
    emulator.faults.update({"latency_ms": 5000})
    started = time.monotonic()
    with pytest.raises(TimedOut), deadline.within(1.0):
        client.post_json("projects.info", {"id": 1})
    assert time.monotonic() - started < 1.5


def test_without_a_deadline_a_refused_token_is_still_auth_error(emulator: Emulator) -> None:
    client = HttpClient(emulator.url, "wrong")
    with pytest.raises(AuthError):
        client.post_json("projects.info", {"id": 1})


@pytest.mark.fuse
def test_a_slow_server_fails_a_read_within_the_timeout_and_the_mount_recovers(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    proc = mount_remote(emulator, pid, mnt, log, "-o", "timeout=2")
    try:
        image = sorted(rel for rel in expected if not rel.endswith("plain.png"))[0]
        emulator.faults.update({"latency_ms": 70_000})
        started = time.monotonic()
        with pytest.raises(OSError) as info:  # a first listing blocks, within the deadline
            os.listdir(mnt / Path(image).parent)
        assert info.value.errno == errno.ETIMEDOUT
        assert time.monotonic() - started < 2 + 1.5
        emulator.faults.reset()
        time.sleep(RETRY_AFTER_TIMEOUT_S + 0.1)
        os.listdir(mnt / Path(image).parent)
        emulator.faults.update({"latency_ms": 70_000})
        started = time.monotonic()
        result = subprocess.run(["cat", str(mnt / image)], capture_output=True, timeout=60)
        took = time.monotonic() - started
        assert result.returncode != 0
        assert b"Connection timed out" in result.stderr, result.stderr
        assert took < 2 + 1.5, took  # one deadline: the kernel's repeat fails at once
        emulator.faults.reset()
        time.sleep(RETRY_AFTER_TIMEOUT_S + 0.1)  # a moment later, a read tries again
        assert (mnt / image).read_bytes() == expected[image]
    finally:
        emulator.faults.reset()
        assert unmount(mnt, proc) == 0
    lines = [line for line in log.read_text().splitlines() if "2 s deadline" in line]
    assert len(lines) == 2, lines  # the listing, then the read


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def remote_view(emu: Emulator, pid: int, clock: Clock) -> ProjectView:
    source = RemoteProjectSource(
        SuperviselyApi(HttpClient(emu.url, TOKEN)), pid, BlockCache(1 << 16, 1 << 22)
    )
    return ProjectView(source, listing_ttl_s=60, clock=clock)


def settle(view: ProjectView) -> None:
    """Wait for background refreshes (so none outlives the emulator)."""
    until = time.monotonic() + 15
    while view._refreshing and time.monotonic() < until:
        time.sleep(0.05)


def test_no_read_waits_for_a_listing_refresh(
    emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    clock = Clock()
    view = remote_view(emulator, pid, clock)
    image = sorted(rel for rel in expected if not rel.endswith("plain.png"))[0]
    data = expected[image]
    assert view.read_path("/" + image, 0, len(data)) == data
    clock.now = 3600.0  # every listing is stale now
    emulator.faults.update({"latency_ms": 1500})
    started = time.monotonic()
    with deadline.within(1.0):
        assert view.read_path("/" + image, 0, len(data)) == data
        assert Path(image).name in view.readdir("/" + str(Path(image).parent))
    assert time.monotonic() - started < 0.5  # the stale listing was served
    assert view._refreshing  # while a refresh waits for the slow server
    settle(view)


def test_a_refresh_in_the_background_brings_the_new_listing(
    emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    clock = Clock()
    view = remote_view(emulator, pid, clock)
    image = sorted(rel for rel in expected if not rel.endswith("plain.png"))[0]
    folder = "/" + str(Path(image).parent)
    assert Path(image).name in view.readdir(folder)
    doc = image_doc(emulator, Path(image).name)
    emulator.store.update("images", {**doc, "name": "renamed.png"})
    clock.now = 3600.0
    assert Path(image).name in view.readdir(folder)  # stale, at once
    until = time.monotonic() + 10
    while "renamed.png" not in view.readdir(folder) and time.monotonic() < until:
        time.sleep(0.05)
    names = view.readdir(folder)
    assert "renamed.png" in names and Path(image).name not in names
    # a refresh of the root keeps the datasets' loaded listings: no first listing again
    clock.now = 7200.0
    view.readdir("/")
    until = time.monotonic() + 10
    while time.monotonic() < until and view._root.loaded_at != 7200.0:
        time.sleep(0.05)
    emulator.faults.update({"latency_ms": 1500})
    started = time.monotonic()
    assert "renamed.png" in view.readdir(folder)
    assert time.monotonic() - started < 0.5
    settle(view)


def test_a_refresh_that_meets_the_same_bad_entries_logs_nothing_new(
    emulator: Emulator, seeded: tuple[int, dict[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """Each TTL refresh lists the dataset again; its bad entries were reported already, so
    the log (and ``problems()``) keep one line however long the mount runs."""
    pid, expected = seeded
    first, second = sorted(rel for rel in expected if rel.startswith("train/img/img"))[:2]
    doc = image_doc(emulator, Path(second).name)
    emulator.store.update("images", {**doc, "name": Path(first).name})  # one name twice
    clock = Clock()
    view = remote_view(emulator, pid, clock)
    before = emulator.stats()["methods"].get("images.list", 0)
    with caplog.at_level(logging.WARNING):
        assert Path(first).name not in view.readdir("/train/img")
        for now in (3600.0, 7200.0):
            clock.now = now
            view.readdir("/train/img")  # stale: listed again in the background
            settle(view)
    assert emulator.stats()["methods"]["images.list"] - before >= 3  # really listed again
    lines = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert len(lines) == 1 and "name appears more than once: 2 entries" in lines[0], lines
    assert view.source.problems() == lines


def test_a_reader_waiting_for_another_readers_fetch_stops_at_its_deadline() -> None:
    release = threading.Event()

    class Stuck:
        def read(self, start: int, end: int) -> bytes:
            release.wait(10)
            return bytes(end - start)

    cache = BlockCache(1024, 8192)
    blob = CachedBlob("b", "v", 4096, Stuck())
    first = threading.Thread(target=cache.read, args=(blob, 0, 100))
    first.start()
    time.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(TimedOut), deadline.within(0.5):
        cache.read(blob, 0, 100)
    assert time.monotonic() - started < 0.9
    release.set()
    first.join(5)
