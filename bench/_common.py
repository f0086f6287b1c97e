"""Helpers shared by the benchmarks: timing, mounts, RSS, tables. Not part of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def scan(folder: Path) -> tuple[float, int, int]:
    """listdir + open/read/close of every file, one reader: (seconds, files, bytes)."""
    start = time.perf_counter()
    files = total = 0
    for name in os.listdir(folder):
        with open(folder / name, "rb") as f:
            total += len(f.read())
        files += 1
    return time.perf_counter() - start, files, total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drop_caches() -> bool:
    """Drop the kernel page cache if allowed (root, not in a locked-down container)."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def wait_mounted(
    mnt: Path, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 600
) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {mnt} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} did not mount")
        time.sleep(0.005)


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount", "-u", str(mnt)], check=False)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount", "-u", "-z", str(mnt)], check=False)


@contextmanager
def blobfs_mount(
    source: str, mnt: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """A foreground blobfs daemon; yields (process, seconds until the mount was live)."""
    mnt.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            source,
            str(mnt),
            "--foreground",
            "--log-level",
            "WARNING",
            *extra,
        ],
        env={**os.environ, **(env or {})},
    )
    try:
        wait_mounted(mnt, proc)
        yield proc, time.perf_counter() - start
    finally:
        unmount(mnt)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def timed(func: Callable[[], object]) -> float:
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
