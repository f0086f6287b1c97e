"""The command line's checks in-process: mount targets, projects, -o options, file modes."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blobfs.cli import _blobfs_options, _readdirplus
from blobfs.config import parse_fuse_options
from blobfs.credentials import resolve, token_file_warning
from blobfs.daemon import check_local_project, fuse_kwargs
from blobfs.errors import InvalidInput, NotFound
from blobfs.fstab import daemon_command
from blobfs.logs import setup_logging
from blobfs.mountpoint import Kind, check_mount_target, inspect, mounted_fstype


def test_the_daemon_is_started_without_the_working_directory_on_its_path() -> None:
    cmd = daemon_command()
    assert cmd[1:] == ["-P", "-m", "blobfs"]
    assert "-I" not in cmd  # PYTHONPATH must still count


def test_a_mount_target_must_be_an_existing_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        check_mount_target(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        check_mount_target(str(tmp_path / "file"))
    with pytest.raises(InvalidInput, match=r"not empty \(1 entries.*-o nonempty"):
        check_mount_target(str(tmp_path))
    check_mount_target(str(tmp_path), nonempty=True)
    (tmp_path / "empty").mkdir()
    check_mount_target(str(tmp_path / "empty"))
    assert inspect(str(tmp_path / "empty")).kind is Kind.FOLDER


def test_a_mounted_target_is_refused_with_what_to_run() -> None:
    assert inspect("/proc").kind is Kind.MOUNTED
    with pytest.raises(InvalidInput, match=r"/proc is already a mount point \(proc\).*umount"):
        check_mount_target("/proc")


def test_the_mount_table_is_read_with_its_escapes_and_the_topmost_mount_wins(
    tmp_path: Path,
) -> None:
    target = tmp_path / "a dir"
    target.mkdir()
    escaped = str(target).replace(" ", "\\040")
    table = tmp_path / "mountinfo"
    table.write_text(
        f"40 27 0:40 / {escaped} rw,relatime - tmpfs tmpfs rw\n"
        f"41 40 0:41 / {escaped} ro shared:1 - fuse.blobfs blobfs:/p ro,user_id=0\n"
        "42 27 0:42 / /elsewhere rw - ext4 /dev/sda rw\n"
    )
    assert mounted_fstype(str(target), str(table)) == "fuse.blobfs"
    assert mounted_fstype(str(tmp_path), str(table)) is None


def test_an_automount_trigger_is_mounted_over_without_being_listed(tmp_path: Path) -> None:
    """fstab's ``x-systemd.automount`` runs the mount on top of an autofs mount point."""
    point = tmp_path / "auto"
    point.mkdir()
    (point / "would-be-hidden").write_text("x")  # stands in for what listing would trigger
    table = tmp_path / "mountinfo"
    table.write_text(f"40 27 0:40 / {point} rw,relatime - autofs systemd-1 rw,fd=1\n")
    check_mount_target(str(point), mountinfo=str(table))
    with pytest.raises(InvalidInput, match="not empty"):
        check_mount_target(str(point))


def test_a_folder_without_meta_json_is_not_a_project(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"not a Supervisely project: no meta\.json"):
        check_local_project(str(tmp_path))
    with pytest.raises(NotFound, match="is not a project folder"):
        check_local_project(str(tmp_path / "nope"))
    (tmp_path / "meta.json").write_text("{}")
    check_local_project(str(tmp_path))


def test_o_takes_the_fstab_options_and_leaves_fuse_s_alone() -> None:
    fuse = parse_fuse_options(("server=http://h:1,token_file=/t,writeback,attr_timeout=5",))
    assert _blobfs_options(fuse) == {
        "server": "http://h:1",
        "token_file": "/t",
        "writeback": True,
    }
    assert fuse == {"attr_timeout": "5"}
    with pytest.raises(InvalidInput, match="-o server needs a value"):
        _blobfs_options(parse_fuse_options(("server",)))


def test_o_sync_and_sync_close_ask_for_durable_closes_and_never_reach_fuse() -> None:
    for option in ("sync", "sync_close"):
        fuse = parse_fuse_options((f"writeback,{option},attr_timeout=5",))
        assert _blobfs_options(fuse) == {"writeback": True, option: True}
        assert fuse == {"attr_timeout": "5"}


def test_readdirplus_is_always_or_auto_by_flag_or_o_and_never_reaches_fuse() -> None:
    assert _readdirplus(None) == "always"
    assert _readdirplus("auto") == "auto"
    assert _readdirplus("ALWAYS") == "always"
    fuse = parse_fuse_options(("readdirplus=auto,attr_timeout=5",))
    assert _blobfs_options(fuse) == {"readdirplus": "auto"}
    assert fuse == {"attr_timeout": "5"}
    for bad in ("", "never", "1"):
        with pytest.raises(InvalidInput, match="readdirplus must be one of always, auto"):
            _readdirplus(bad)
    with pytest.raises(InvalidInput, match="-o readdirplus needs a value"):
        _blobfs_options(parse_fuse_options(("readdirplus",)))


def test_a_bad_readdirplus_mode_is_refused_before_mounting(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "meta.json").write_text("{}")
    argv = [sys.executable, "-m", "blobfs", "mount", str(tmp_path), str(tmp_path / "mnt")]
    done = subprocess.run([*argv, "--readdirplus", "sometimes"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "readdirplus must be one of always, auto, not 'sometimes'" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.ismount(tmp_path / "mnt")


def test_nonempty_reaches_libfuse_2_only() -> None:
    from blobfs.config import MountConfig
    from blobfs.fuse.compat import FUSE_MAJOR

    config = MountConfig(source="/p", mountpoint="/m", fuse_options={"nonempty": True})
    assert ("nonempty" in fuse_kwargs(config, True)) == (FUSE_MAJOR == 2)


def test_a_remote_mount_imports_batches_during_a_long_copy_by_default_a_local_one_not() -> None:
    from blobfs.config import DEFAULT_BATCH_FILES, MountConfig

    assert MountConfig(source="sly://7", mountpoint="/m").effective_batch_files() == (
        DEFAULT_BATCH_FILES
    )
    assert MountConfig(source="/p", mountpoint="/m").effective_batch_files() == 0
    given = MountConfig(source="sly://7", mountpoint="/m", writeback_batch_files=0)
    assert given.effective_batch_files() == 0


def test_a_new_log_file_is_private(tmp_path: Path) -> None:
    log = tmp_path / "new.log"
    old = os.umask(0o022)
    try:
        setup_logging("INFO", str(log))
        logging.getLogger("blobfs.test").info("hello")
    finally:
        os.umask(old)
        setup_logging("WARNING")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "hello" in log.read_text()


def test_a_token_file_others_can_read_is_used_with_a_warning_without_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("secret-token-1234\n")
    token.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        assert resolve("http://h", str(token), env={}, env_file=tmp_path / "none") == (
            "http://h",
            "secret-token-1234",
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0640" in warnings[0] and "chmod 600" in warnings[0]
    assert "secret-token-1234" not in caplog.text
    token.chmod(0o600)
    assert token_file_warning(str(token)) is None
