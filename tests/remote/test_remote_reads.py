"""Remote reads against the emulator: request economy, faults, fallbacks, disk cache."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sly_emulator import Emulator, start_process
from sly_emulator.seed import upload_local_project

from tests.support import harness

from .conftest import TOKEN, build_project, mount_remote

pytestmark = [pytest.mark.fuse, pytest.mark.remote]


@pytest.fixture
def seeded(tmp_path: Path, emulator: Emulator) -> tuple[int, dict[str, bytes]]:
    project, expected = build_project(tmp_path, count=60)
    return upload_local_project(emulator.url, TOKEN, project), expected


def read_all(mnt: Path, expected: dict[str, bytes]) -> list[str]:
    """Read every image in listing order; the names whose bytes were wrong."""
    return [rel for rel, data in sorted(expected.items()) if (mnt / rel).read_bytes() != data]


def unmount(mnt: Path, mount: harness.Mount) -> int | None:
    return mount.unmount(30)


def test_a_scan_costs_about_one_request_per_blob_and_warm_reads_none(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    mnt = tmp_path / "mnt"
    proc = mount_remote(emulator, pid, mnt, tmp_path / "log")
    try:
        os.listdir(mnt / "train" / "img")
        os.listdir(mnt / "train" / "datasets" / "val" / "img")
        emulator.reset_stats()
        assert read_all(mnt, expected) == []
        cold = emulator.stats()["methods"]
        blobs = len(list((tmp_path / "project" / "blob").iterdir()))
        blob_reads = cold.get("images.data.download", 0)
        assert blob_reads <= blobs + 1, cold  # 40 KB blobs < one 1 MiB block each
        assert cold.get("file-storage.info", 0) == blobs
        assert cold.get("images.download", 0) == 1  # the one ordinary image
        emulator.reset_stats()
        assert read_all(mnt, expected) == []
        assert emulator.stats()["requests"] == 0  # warm: kernel and block cache
        stats = json.loads(
            subprocess.run(
                [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert stats["http_requests"] >= blob_reads
        assert stats["cache"]["fetches"] >= 1
    finally:
        assert unmount(mnt, proc) == 0


@pytest.mark.parametrize("fault", ["fail_n", "reset_mid_body", "short_body", "wrong_content_range"])
def test_transient_faults_are_retried_and_never_serve_wrong_bytes(
    fault: str, tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    mnt = tmp_path / "mnt"
    proc = mount_remote(emulator, pid, mnt, tmp_path / "log", "--block-size", "16K")
    try:
        setting = {"fail_n": 3} if fault == "fail_n" else {fault: True}
        emulator.faults.update(setting)
        if fault != "fail_n":  # a fault on every request is permanent: reads must fail
            with pytest.raises(OSError) as info:
                (mnt / sorted(expected)[0]).read_bytes()
            assert info.value.errno == errno.EIO
            emulator.faults.reset()
        assert read_all(mnt, expected) == []  # the mount stays up and recovers
    finally:
        assert unmount(mnt, proc) == 0
    assert "gave up" in (tmp_path / "log").read_text() or fault == "fail_n"


def test_a_server_that_ignores_range_still_gives_correct_bytes(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    mnt = tmp_path / "mnt"
    emulator.faults.update({"ignore_range": True})
    proc = mount_remote(emulator, pid, mnt, tmp_path / "log", "--block-size", "8K")
    try:
        assert read_all(mnt, expected) == []
    finally:
        assert unmount(mnt, proc) == 0
    assert "ignores Range" in (tmp_path / "log").read_text()


def test_server_killed_mid_read_fails_with_eio_and_a_restart_recovers(
    tmp_path: Path, seeded: tuple[int, dict[str, bytes]], emulator: Emulator
) -> None:
    pid, expected = seeded
    emulator.stop()  # the same state, served by a process that can be killed for real
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    server, url = start_process(tmp_path / "emu-state", token_file)
    port = int(url.rsplit(":", 1)[1])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = harness.start_remote(url, pid, mnt, token=TOKEN, log=tmp_path / "log")
    try:
        names = sorted(expected)
        assert (mnt / names[0]).read_bytes() == expected[names[0]]
        server.kill()
        server.wait(10)
        with pytest.raises(OSError) as info:
            (mnt / names[-1]).read_bytes()
        assert info.value.errno == errno.EIO
        server, _ = start_process(tmp_path / "emu-state", token_file, port=port)
        assert read_all(mnt, expected) == []
    finally:
        assert unmount(mnt, proc) == 0
        server.kill()
        server.wait(10)


def test_disk_cache_makes_a_second_mount_read_no_blob_bytes(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, expected = seeded
    cache = tmp_path / "disk-cache"
    for round_no in range(2):
        mnt = tmp_path / f"mnt{round_no}"
        proc = mount_remote(
            emulator, pid, mnt, tmp_path / f"log{round_no}", "--cache-dir", str(cache)
        )
        try:
            emulator.reset_stats()
            assert read_all(mnt, expected) == []
            methods = emulator.stats()["methods"]
        finally:
            assert unmount(mnt, proc) == 0
    assert methods.get("images.data.download", 0) == 0
    assert methods.get("images.download", 0) == 0
    assert oct(cache.stat().st_mode & 0o777) == "0o700"


def test_a_wrong_token_fails_the_mount_with_a_clear_message(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, _ = seeded
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [
            "python",
            "-m",
            "blobfs",
            "mount",
            f"sly://{pid}",
            str(tmp_path / "mnt"),
            "--server",
            emulator.url,
        ],
        env={**os.environ, "API_TOKEN": "not-the-token"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "token" in result.stderr.lower()
    assert "not-the-token" not in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


def test_the_token_is_not_in_the_daemon_command_line(
    tmp_path: Path, emulator: Emulator, seeded: tuple[int, dict[str, bytes]]
) -> None:
    pid, _ = seeded
    mnt = tmp_path / "mnt"
    proc = mount_remote(emulator, pid, mnt, tmp_path / "log")
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert TOKEN.encode() not in cmdline
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core  # no core file can hold the token
    finally:
        assert unmount(mnt, proc) == 0
