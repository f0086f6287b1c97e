"""Helpers shared by the benchmarks: timing, scans, RSS, mounts, tables. Not part of the suite.

Mounts are made and ended by the suite's harness (``tests/support/harness.py``), so a
benchmark mounts exactly as the tests do. Mount points are private to one benchmark process
(``bench/out/mnt/<name>-<pid>``): two benchmarks run at the same time must never stack
mounts on one directory (an unmount by one of them would make the other's files vanish
mid-scan, which reads as ENOENT). Every mount made through :class:`Mounts` is unmounted on
exit, on Ctrl-C, on SIGTERM and on errors.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
# the shared mount kit lives with the tests (tests/support/harness.py); a benchmark run as
# ``python bench/x.py`` has only bench/ on its path
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import harness  # noqa: E402
from tests.support.harness import is_mounted, pid_alive, pids_with_args, pin, unmount  # noqa: E402, F401

# ---- timing and statistics ---------------------------------------------------------------


def timed(func: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, by ``time.perf_counter``."""
    start = time.perf_counter()
    result = func()
    return time.perf_counter() - start, result


def summary(samples: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated measurements (the median is what tables show)."""
    return {
        "min": min(samples),
        "median": statistics.median(samples),
        "max": max(samples),
        "n": len(samples),
    }


def load_note() -> str:
    """Load average and CPU count: other work on the machine skews every number here."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ---- the scan ----------------------------------------------------------------------------


@dataclass
class Scan:
    """One scan: os.listdir of a folder, then open/read/close of every file, one reader."""

    seconds: float
    listdir_s: float
    files: int
    bytes: int


def scan(folder: Path | str, buffering: int = -1) -> Scan:
    """listdir + open/read/close of every file in ``folder``, in listing order, in Python.

    With the default ``buffering`` Python's ``open`` asks ``isatty()`` (an ioctl, which a
    FUSE mount answers with a round trip to the daemon); ``buffering=0`` does not.
    """
    folder = os.fspath(folder)
    start = time.perf_counter()
    names = os.listdir(folder)
    listed = time.perf_counter()
    total = 0
    for name in names:
        with open(os.path.join(folder, name), "rb", buffering=buffering) as f:
            total += len(f.read())
    end = time.perf_counter()
    return Scan(end - start, listed - start, len(names), total)


def warm_files(paths: Sequence[Path]) -> int:
    """Read files once so their bytes are in the page cache; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def drop_caches() -> bool:
    """Drop the kernel page, dentry and inode caches (root only); False when not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


# ---- processes ---------------------------------------------------------------------------


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM...), or None if unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS), NaN when the process is gone."""
    kb = proc_status_kb(pid, "VmRSS")
    return float("nan") if kb is None else kb / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of ``pid`` in MiB (VmHWM)."""
    kb = proc_status_kb(pid, "VmHWM")
    return float("nan") if kb is None else kb / 1024


# ---- mounts ------------------------------------------------------------------------------


def clean_stale_mounts() -> list[Path]:
    """Unmount what crashed benchmarks left in ``bench/out/mnt`` (their pid is gone);
    mounts of benchmarks still running are left alone."""
    cleaned = []
    folder = OUT / "mnt"
    if not folder.is_dir():
        return cleaned
    for path in folder.iterdir():
        owner = path.name.rpartition("-")[2]
        if owner.isdigit() and pid_alive(int(owner)) and int(owner) != os.getpid():
            continue
        if is_mounted(path):
            unmount(path)
            cleaned.append(path)
        with suppress(OSError):
            path.rmdir()
    return cleaned


def mountpoint(name: str) -> Path:
    """A fresh, empty mount point private to this process."""
    path = OUT / "mnt" / f"{name}-{os.getpid()}"
    if is_mounted(path):
        unmount(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Mounts(harness.Mounts):
    """Every mount a benchmark makes (:class:`tests.support.harness.Mounts`), so that all of
    them go away however it ends: use as a context manager around the whole benchmark; on
    leaving (normally, by an exception, by Ctrl-C) and on SIGTERM/SIGHUP it unmounts what
    is still mounted, in order, waits for the daemons and removes the mount points."""

    def __init__(self) -> None:
        super().__init__(signals=True, clean=True)


def blobfs_mount_cli(
    mounts: Mounts,
    source: str,
    mnt: Path,
    args: Sequence[str] = (),
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> tuple[float, int]:
    """``python -m blobfs mount SOURCE MNT`` as a user runs it (it returns once the mount is
    live); returns (seconds until it returned, daemon pid). The mount is registered."""
    if "--log-level" not in args:
        args = [*args, "--log-level", "WARNING"]
    start = time.perf_counter()
    # cwd "/": ``-m blobfs`` must import the interpreter's blobfs, not a checkout in the cwd
    done, mount = mounts.mount_cli(source, mnt, *args, python=python, python_flags=(), env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or mount is None or not harness.is_mounted(mnt):
        raise RuntimeError(f"blobfs mount failed ({done.returncode}): {done.stderr.strip()}")
    if mount.pid is None:
        raise RuntimeError(f"blobfs mounted {mnt} but its daemon was not found")
    return seconds, mount.pid


def spawn_foreground(
    mounts: Mounts,
    cmd: Sequence[str],
    mnt: Path,
    log: Path,
    env: dict[str, str] | None = None,
) -> tuple[float, harness.Mount]:
    """Start a foreground FUSE daemon ``cmd`` (:func:`tests.support.harness.spawn_server`);
    returns (seconds until ``mnt`` was live, its mount). The mount is registered."""
    start = time.perf_counter()
    mount = mounts.spawn_server(cmd, mnt, log, env=env)
    return time.perf_counter() - start, mount


# ---- output ------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first row is the header, first column left-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    """``value`` formatted, or ``-`` when missing."""
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:{spec}}{suffix}"
