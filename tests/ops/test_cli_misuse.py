"""The command line as a new user (or an attacker) meets it: each mistake gets one clear line.

Everything here runs the real ``blobfs`` command in a subprocess against real mounts: a
folder that is not a project, a mount point in use, a daemon killed with SIGKILL, a working
directory holding a ``blobfs/`` package, files others can read.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs.format.pack import ProjectPacker
from tests.support import harness
from tests.support.sample import make_images

pytestmark = pytest.mark.fuse

TOKEN = "cli-test-token-7c21"
DAEMON = [sys.executable, "-P", "-m", "blobfs"]


def blobfs(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as the installed ``blobfs`` script does (the working folder not on the path)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "blobfs", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    ProjectPacker(tmp_path / "project", "ds").pack(make_images(tmp_path / "images", 3))
    return tmp_path / "project"


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    harness.detach(path)


# -- 1: nothing is imported from the working directory ---------------------------------------


@pytest.fixture
def hostile_cwd(tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding a ``blobfs`` package that leaves a mark when imported."""
    cwd, mark = tmp_path / "cwd", tmp_path / "PWNED"
    (cwd / "blobfs").mkdir(parents=True)
    code = f"open({str(mark)!r}, 'w').close()\n"
    (cwd / "blobfs" / "__init__.py").write_text(code)
    (cwd / "blobfs" / "__main__.py").write_text(code)
    return cwd, mark


def test_mount_from_a_folder_holding_a_blobfs_package_runs_none_of_it(
    project: Path, mnt: Path, hostile_cwd: tuple[Path, Path]
) -> None:
    cwd, mark = hostile_cwd
    result = blobfs("mount", str(project), str(mnt), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(mnt / "ds" / "img")) == 3
    assert not mark.exists(), "the daemon imported blobfs from the working directory"


def test_the_fstab_helper_from_a_folder_holding_a_blobfs_package_runs_none_of_it(
    project: Path, mnt: Path, hostile_cwd: tuple[Path, Path]
) -> None:
    cwd, mark = hostile_cwd
    helper = (
        "import sys; from blobfs.fstab import main; "
        f"sys.argv = ['mount.fuse.blobfs', {str(project)!r}, {str(mnt)!r}, '-o', 'ro']; main()"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", helper], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert os.path.ismount(mnt)
    assert not mark.exists(), "mount.fuse.blobfs imported blobfs from the working directory"


# -- 4: private log files, a warning for a token file others can read -----------------------


def test_a_log_file_is_created_readable_by_its_owner_only(project: Path, mnt: Path) -> None:
    log = mnt.parent / "blobfs.log"
    old = os.umask(0o022)
    try:
        result = blobfs("mount", str(project), str(mnt), "--log-file", str(log))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert "mounted" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def remote_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, int]]:
    root = tmp_path_factory.mktemp("remote")
    ProjectPacker(root / "project", "ds").pack(make_images(root / "images", 3))
    with Emulator(root / "emu-state", TOKEN) as emu:
        yield emu, upload_local_project(emu.url, TOKEN, root / "project")


def no_credentials_env(home: Path) -> dict[str, str]:
    """The environment without any server or token (and a HOME without supervisely.env)."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_TOKEN", "SERVER_ADDRESS")}
    env["HOME"] = str(home)
    return env


def test_a_token_file_others_can_read_is_used_with_one_warning_that_omits_the_token(
    remote_project: tuple[Emulator, int], mnt: Path
) -> None:
    emu, pid = remote_project
    token_file, log = mnt.parent / "token", mnt.parent / "daemon.log"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    result = blobfs(
        "mount",
        f"sly://{pid}",
        str(mnt),
        "--server",
        emu.url,
        "--token-file",
        str(token_file),
        "--log-file",
        str(log),
        env=no_credentials_env(mnt.parent),
    )
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(mnt / "ds" / "img")) == 3
    warnings = [line for line in result.stderr.splitlines() if "token file" in line]
    assert len(warnings) == 1, result.stderr
    assert "0644" in warnings[0] and "chmod 600" in warnings[0]
    assert TOKEN not in result.stderr and TOKEN not in log.read_text()
    assert log.read_text().count("accessible by others") == 1


def test_a_private_token_file_gives_no_warning(
    remote_project: tuple[Emulator, int], mnt: Path
) -> None:
    emu, pid = remote_project
    token_file = mnt.parent / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    result = blobfs(
        "mount", f"sly://{pid}", str(mnt), "--server", emu.url, "--token-file", str(token_file)
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


# -- 20 (command line half): -o takes what fstab takes; read-only vs. not blobfs -------------


def test_o_server_and_token_file_are_taken_as_fstab_takes_them(
    remote_project: tuple[Emulator, int], mnt: Path
) -> None:
    emu, pid = remote_project
    token_file = mnt.parent / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    result = blobfs(
        "mount",
        f"sly://{pid}",
        str(mnt),
        "-o",
        f"server={emu.url},token_file={token_file}",
        env=no_credentials_env(mnt.parent),
    )
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(mnt / "ds" / "img")) == 3


def test_status_and_flush_tell_a_read_only_mount_from_a_folder_that_is_no_mount(
    project: Path, mnt: Path, tmp_path: Path
) -> None:
    assert blobfs("mount", str(project), str(mnt)).returncode == 0
    for command in ("status", "flush"):
        assert_clean_failure(blobfs(command, str(mnt)), "read-only blobfs mount", "--writeback")
        folder = blobfs(command, str(tmp_path))
        assert_clean_failure(folder, "is not a blobfs mount")
        assert "writeback" not in folder.stderr


# -- 18: no stacked mounts, no hidden files, no project without meta.json --------------------


def test_mounting_onto_a_mounted_path_is_refused(project: Path, mnt: Path) -> None:
    assert blobfs("mount", str(project), str(mnt)).returncode == 0
    result = blobfs("mount", str(project), str(mnt))
    assert_clean_failure(result, "already a mount point", "blobfs unmount")
    assert harness.mounts_on(mnt) == 1


def test_mounting_over_files_needs_nonempty_and_hides_them_only_while_mounted(
    project: Path, mnt: Path
) -> None:
    (mnt / "mine.txt").write_text("keep")
    result = blobfs("mount", str(project), str(mnt))
    assert_clean_failure(result, "not empty", "-o nonempty")
    assert harness.mounts_on(mnt) == 0
    result = blobfs("mount", str(project), str(mnt), "-o", "nonempty")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(mnt)) == ["ds", "meta.json"]
    assert blobfs("unmount", str(mnt)).returncode == 0
    assert (mnt / "mine.txt").read_text() == "keep"


def test_a_folder_without_meta_json_is_refused_before_ready(tmp_path: Path, mnt: Path) -> None:
    images = tmp_path / "images"
    make_images(images, 3)
    result = blobfs("mount", str(images), str(mnt))
    assert_clean_failure(result, "not a Supervisely project: no meta.json")
    assert harness.mounts_on(mnt) == 0
    # in the foreground under systemd: the error, and no READY=1 before it
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.setblocking(False)
        log = tmp_path / "daemon.log"
        run = subprocess.run(
            [*DAEMON, "mount", str(images), str(mnt), "-f", "--log-file", str(log)],
            capture_output=True,
            text=True,
            env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
            timeout=60,
        )
        assert_clean_failure(run, "no meta.json")
        with pytest.raises(BlockingIOError):
            sock.recv(256)
        assert "mounted" not in log.read_text()


# -- 19: a daemon killed with SIGKILL leaves a dead mount; every command copes ---------------


def test_a_killed_writeback_mount_is_reported_then_unmounted(
    project: Path, mnt: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    proc = mounts.start(
        project, mnt, "--writeback", "--spool-dir", str(tmp_path / "sp"), log=tmp_path / "log"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with pytest.raises(OSError):
        os.listdir(mnt)  # ENOTCONN: what the user sees first
    for command in ("status", "flush", "stats"):
        assert_clean_failure(blobfs(command, str(mnt)), "dead mount", f"blobfs unmount {mnt}")
    result = blobfs("unmount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "spool" in result.stderr
    assert harness.mounts_on(mnt) == 0
    # and the folder is usable again
    assert blobfs("mount", str(project), str(mnt)).returncode == 0
    assert blobfs("unmount", str(mnt)).returncode == 0


def test_mounting_onto_a_killed_mount_takes_the_dead_one_away_first(
    project: Path, mnt: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    proc = mounts.start(project, mnt, log=tmp_path / "log")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    result = blobfs("mount", str(project), str(mnt))
    assert result.returncode == 0, result.stderr
    assert "dead mount" in result.stderr and "Traceback" not in result.stderr
    assert harness.mounts_on(mnt) == 1, "the dead mount must go, not stay under the new one"
    assert len(os.listdir(mnt / "ds" / "img")) == 3


def test_a_killed_mount_still_in_use_is_detached(
    project: Path, mnt: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    proc = mounts.start(project, mnt, log=tmp_path / "log")
    shell = subprocess.Popen(["sleep", "60"], cwd=mnt / "ds")  # holds the mount busy
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        result = blobfs("unmount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert harness.mounts_on(mnt) == 0
    finally:
        shell.kill()
        shell.wait()


def test_unmount_of_a_path_that_is_not_mounted_says_so_in_one_line(mnt: Path) -> None:
    result = blobfs("unmount", str(mnt))
    assert_clean_failure(result, f"{mnt} is not mounted")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "fusermount" not in result.stderr


def test_unmount_of_a_live_read_only_mount_still_works(project: Path, mnt: Path) -> None:
    proc_free = blobfs("mount", str(project), str(mnt))
    assert proc_free.returncode == 0
    harness.wait_mounted(mnt)
    assert blobfs("unmount", str(mnt)).returncode == 0
    assert harness.mounts_on(mnt) == 0


# -- 21: --help, docs/usage.md and the code say the same ------------------------------------

USAGE_MD = Path(__file__).resolve().parents[2] / "docs" / "usage.md"
COMMANDS = ("mount", "unmount", "pack", "check", "flush", "status", "stats")


def test_every_option_in_help_is_documented_in_usage_md() -> None:
    usage = USAGE_MD.read_text()
    for command in COMMANDS:
        text = blobfs(command, "--help").stdout
        for option in set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text)) - {"--help"}:
            assert re.search(rf"(?<![\w-]){option}(?![\w-])", usage), (command, option)


def test_the_cache_defaults_in_help_and_usage_md_are_the_code_s() -> None:
    from blobfs.config import DEFAULT_CACHE_BYTES, DEFAULT_LOCAL_CACHE_BYTES

    local, remote = f"{DEFAULT_LOCAL_CACHE_BYTES >> 20}M", f"{DEFAULT_CACHE_BYTES >> 20}M"
    row = next(line for line in USAGE_MD.read_text().splitlines() if "`--cache-size" in line)
    assert f"{local} local" in row and f"{remote} remote" in row, row
    help_text = " ".join(blobfs("mount", "--help").stdout.split())
    assert f"(default {local} local, {remote} remote)" in help_text


def test_help_texts_carry_no_markup() -> None:
    for command in ("", *COMMANDS):
        text = blobfs(*([command] if command else []), "--help").stdout
        assert "``" not in text, (command, text)


def test_check_counts_one_dataset_and_one_image_in_the_singular(tmp_path: Path) -> None:
    ProjectPacker(tmp_path / "one", "ds").pack(make_images(tmp_path / "img1", 1))
    out = blobfs("check", str(tmp_path / "one")).stdout
    assert "1 dataset, 1 image (1 in blobs), 0 problems" in out, out
    ProjectPacker(tmp_path / "one", "ds2").pack(make_images(tmp_path / "img2", 2))
    out = blobfs("check", str(tmp_path / "one")).stdout
    assert "2 datasets, 3 images" in out, out
