"""Fixtures for writeback tests: a small local project and a daemon in a subprocess."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobfs.format.pack import ProjectPacker
from tests.support.sample import make_images


def fuse_usable() -> str | None:
    """None when real mounts can run here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if subprocess.run(["which", "fusermount"], capture_output=True).returncode != 0:
        return "fusermount is missing (apt-get install fuse)"
    return None


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    reason = fuse_usable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"FUSE must work in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with dataset ``ds`` of 10 blob images (seeds 0..9)."""
    root = tmp_path / "project"
    images = make_images(tmp_path / "seed-images", 10)
    ProjectPacker(root, "ds").pack(images)
    return root


class Daemon:
    """``blobfs mount --writeback --foreground`` in a subprocess, killable at will."""

    def __init__(
        self,
        source: Path,
        mountpoint: Path,
        spool: Path,
        log: Path,
        env: dict[str, str] | None = None,
        delay_s: float = 0.3,
        args: tuple[str, ...] = (),
    ) -> None:
        self.source, self.mountpoint, self.spool, self.log = source, mountpoint, spool, log
        self.env = {**os.environ, **(env or {})}
        self.delay_s = delay_s
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.mountpoint.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            str(self.source),
            str(self.mountpoint),
            "--foreground",
            "--writeback",
            "--spool-dir",
            str(self.spool),
            "--writeback-delay",
            str(self.delay_s),
            "--log-file",
            str(self.log),
            "--log-level",
            "DEBUG",
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mount did not come up")
            time.sleep(0.02)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        cleanup_mount(self.mountpoint)

    def unmount(self) -> int:
        """Clean unmount (drains writeback); returns the daemon's exit status."""
        subprocess.run(["fusermount", "-u", str(self.mountpoint)], check=True)
        assert self.proc is not None
        return self.proc.wait(60)

    def wait_exit(self, timeout_s: float = 30) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None


def cleanup_mount(mountpoint: Path) -> None:
    """Unmount, also a dead mount (its daemon killed: ENOTCONN, which ``ismount`` hides)."""
    try:
        os.stat(mountpoint)
        dead = False
    except OSError as exc:
        dead = exc.errno == errno.ENOTCONN
    if dead or os.path.ismount(mountpoint):
        subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Collects daemons started by a test; kills and unmounts whatever is left."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        cleanup_mount(d.mountpoint)
