"""Helpers shared by the benchmarks: timing, scans, RSS, mounts, tables. Not part of the suite.

Mount points are private to one benchmark process (``bench/out/mnt/<name>-<pid>``): two
benchmarks run at the same time must never stack mounts on one directory (an unmount by
one of them would make the other's files vanish mid-scan, which reads as ENOENT).
Every mount made through :class:`Mounts` is unmounted on exit, on Ctrl-C, on SIGTERM and
on errors.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
MOUNT_TIMEOUT_S = 600.0
UNMOUNT_TIMEOUT_S = 30.0


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


def pids_with_args(*needles: str) -> list[int]:
    """Processes whose argv contains every one of ``needles`` as a whole argument."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = {a.decode(errors="replace") for a in argv}
        if all(n in args for n in needles):
            found.append(int(entry.name))
    return found


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (threads it starts later inherit that)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0): look at its state
    with suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


# ---- mounts ------------------------------------------------------------------------------


def is_mounted(path: Path | str) -> bool:
    """True when ``path`` is a mount point (per /proc/self/mountinfo, exact match)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if _unescape(line.split()[4]) == target:
                return True
    return False


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


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


def wait_mounted(
    mnt: Path, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = MOUNT_TIMEOUT_S
) -> None:
    """Poll until ``mnt`` is a mount point; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {mnt} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} did not mount within {timeout_s:.0f} s")
        time.sleep(0.002)


def fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


def unmount(mnt: Path, pid: int | None = None, timeout_s: float = UNMOUNT_TIMEOUT_S) -> None:
    """Unmount ``mnt`` (fusermount -u, retried while busy, lazily as a last resort) and
    wait for the daemon ``pid`` to exit; kill it only if it outlives the timeout."""
    deadline = time.monotonic() + timeout_s
    while is_mounted(mnt):
        done = subprocess.run(
            [fusermount(), "-u", str(mnt)], capture_output=True, text=True, check=False
        )
        if done.returncode == 0 or not is_mounted(mnt):
            break
        if time.monotonic() > deadline:
            subprocess.run([fusermount(), "-u", "-z", str(mnt)], check=False)
            break
        time.sleep(0.2)
    if pid is None:
        return
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)


def mountpoint(name: str) -> Path:
    """A fresh, empty mount point private to this process."""
    path = OUT / "mnt" / f"{name}-{os.getpid()}"
    if is_mounted(path):
        unmount(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Mounts:
    """Every mount a benchmark makes, so that all of them go away however it ends.

    Use as a context manager around the whole benchmark: on leaving (normally, by an
    exception, by Ctrl-C) and on SIGTERM/SIGHUP it unmounts what is still mounted, waits
    for the daemons and removes the private mount points.
    """

    def __init__(self) -> None:
        self._live: dict[Path, tuple[int | None, subprocess.Popen[bytes] | None]] = {}
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Mounts:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount_all()
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    def _on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def add(
        self, mnt: Path, pid: int | None = None, proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        self._live[mnt] = (pid, proc)

    def release(self, mnt: Path) -> None:
        """Unmount ``mnt`` now and wait for its daemon."""
        pid, proc = self._live.pop(mnt, (None, None))
        try:
            unmount(mnt, pid)
        finally:
            if proc is not None:
                try:
                    proc.wait(UNMOUNT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            with suppress(OSError):
                mnt.rmdir()

    def unmount_all(self) -> None:
        # Ctrl-C pressed again while cleaning up must not leave mounts behind
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for mnt in list(self._live):
                try:
                    self.release(mnt)
                except Exception as exc:  # keep cleaning the others
                    print(f"warning: could not unmount {mnt}: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)

    @contextmanager
    def mounted(
        self, mnt: Path, pid: int | None = None, proc: subprocess.Popen[bytes] | None = None
    ) -> Iterator[Path]:
        """Register ``mnt`` for the block's duration; unmounted when the block ends."""
        self.add(mnt, pid, proc)
        try:
            yield mnt
        finally:
            self.release(mnt)


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
    cmd = [python, "-m", "blobfs", "mount", source, str(mnt), *args]
    if "--log-level" not in args:
        cmd += ["--log-level", "WARNING"]
    start = time.perf_counter()
    # cwd: ``-m blobfs`` must import the interpreter's blobfs, not a checkout in the cwd
    done = subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    # the daemon is the re-executed foreground child: its argv names the mount point
    pids = pids_with_args("blobfs", "mount", str(mnt), "--foreground")
    mounts.add(mnt, pids[0] if pids else None)
    if done.returncode != 0 or not is_mounted(mnt):
        raise RuntimeError(f"blobfs mount failed ({done.returncode}): {done.stderr.strip()}")
    if not pids:
        raise RuntimeError(f"blobfs mounted {mnt} but its daemon was not found")
    return seconds, pids[0]


def spawn_foreground(
    mounts: Mounts,
    cmd: Sequence[str],
    mnt: Path,
    log: Path,
    env: dict[str, str] | None = None,
) -> tuple[float, subprocess.Popen[bytes]]:
    """Start a foreground FUSE daemon ``cmd`` (its own session: Ctrl-C reaches only us, and
    we unmount it in order); returns (seconds until ``mnt`` was live, process)."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    mounts.add(mnt, proc.pid, proc)
    try:
        wait_mounted(mnt, proc)
    except RuntimeError as exc:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{exc}; log {log}:\n{tail}") from None
    return time.perf_counter() - start, proc


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
