"""Running blobfs like a real mount: sd_notify, fstab via mount(8), stats, signals, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blobfs import __version__
from blobfs.format.pack import ProjectPacker
from tests.support import harness
from tests.support.sample import make_images

pytestmark = pytest.mark.fuse


@pytest.fixture
def project(tmp_path: Path) -> Path:
    ProjectPacker(tmp_path / "project", "ds").pack(make_images(tmp_path / "images", 5))
    return tmp_path / "project"


def test_sd_notify_ready_only_once_mounted_then_stopping(project: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = harness.spawn(harness.daemon_argv(project, mnt), {"NOTIFY_SOCKET": str(sock_path)})
    try:
        ready = sock.recv(256).decode()
        assert ready == "READY=1"
        assert os.path.ismount(mnt), "READY=1 must come after the mount is live"
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(256).decode() == "STOPPING=1"
        assert proc.wait(20) == 0
        assert not os.path.ismount(mnt)
    finally:
        sock.close()
        harness.Mount(mnt, proc).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) with a helper in /sbin needs root")
def test_fstab_style_mount_through_mount_8(project: Path, tmp_path: Path) -> None:
    helper = Path("/sbin/mount.fuse.blobfs")
    if helper.exists() or helper.is_symlink():
        pytest.skip("a mount.fuse.blobfs is already installed")
    script = shutil.which("mount.fuse.blobfs") or str(
        Path(sys.executable).parent / "mount.fuse.blobfs"
    )
    helper.symlink_to(script)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(
            [
                "mount",
                "-t",
                "fuse.blobfs",
                str(project),
                str(mnt),
                "-o",
                "ro,_netdev,nofail,cache_size=64M,attr_timeout=5",
            ],
            check=True,
        )
        assert os.path.ismount(mnt)
        assert len(os.listdir(mnt / "ds" / "img")) == 5
        subprocess.run(["umount", str(mnt)], check=True)
        assert not os.path.ismount(mnt)
    finally:
        helper.unlink()
        subprocess.run(["fusermount", "-u", "-z", str(mnt)], capture_output=True)


def test_stats_are_live_and_hidden_from_listings(project: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run([sys.executable, "-m", "blobfs", "mount", str(project), str(mnt)], check=True)
    try:
        assert ".blobfs" not in os.listdir(mnt)

        def stats() -> dict:  # type: ignore[type-arg]
            out = subprocess.run(
                [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            return json.loads(out)  # type: ignore[no-any-return]

        before = stats()
        for name in os.listdir(mnt / "ds" / "img"):
            (mnt / "ds" / "img" / name).read_bytes()
        after = stats()
        assert after["blob_reads"]["bytes_read"] > before["blob_reads"]["bytes_read"]
        assert after["rss_bytes"] > 0
        text = subprocess.run(
            [sys.executable, "-m", "blobfs", "stats", str(mnt)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "blob_reads.reads:" in text and "index.entries:" in text
    finally:
        subprocess.run([sys.executable, "-m", "blobfs", "unmount", str(mnt)], check=True)


def test_log_lines_for_mount_and_unmount_without_timestamps_under_journald(
    project: Path, tmp_path: Path
) -> None:
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    mnt.mkdir()
    with open(log, "wb") as stderr, harness.Mount(mnt) as mount:
        # no --log-file: the log goes to stderr, as under systemd
        mount.proc = harness.spawn(
            harness.daemon_argv(project, mnt), {"JOURNAL_STREAM": "8:1234"}, stderr=stderr
        )
        mount.pid = mount.proc.pid
        harness.wait_mounted(mnt, mount.proc)
        assert mount.unmount(20) == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith("INFO blobfs.daemon: mounted ") for line in lines), lines
    assert any("unmounted" in line for line in lines)


def test_version_and_shell_completion() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "blobfs", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert __version__ in out
    comp = subprocess.run(
        [sys.executable, "-m", "blobfs"],
        capture_output=True,
        text=True,
        env={**os.environ, "_BLOBFS_COMPLETE": "bash_source"},
    )
    assert "complete" in comp.stdout


def test_mounting_a_missing_source_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "blobfs", "mount", str(tmp_path / "nope"), str(tmp_path / "mnt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "nope" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")
