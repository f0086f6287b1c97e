"""The one way tests and benchmarks run a blobfs mount.

Every real mount the suite and ``bench/`` make goes through here: start a daemon (local,
remote against the emulator, writeback; any options, pinned CPUs), wait until the kernel
serves it, read its log, ``kill -9`` it, unmount it cleanly, and clean up whatever a test
or a crashed benchmark leaves. One implementation means one set of answers to the hard
parts (a dead mount hides from ``os.path.ismount``; ``fusermount -u`` fails while the
mount is busy; a daemon that dies before it is ready must fail the test with its log, not
hang it) instead of four slightly different ones.

A test that checks the command line itself (a raw ``Popen`` of ``blobfs mount`` with its
own stderr, a ``NOTIFY_SOCKET``, a signal) still starts it with :func:`daemon_argv` and
:func:`spawn`, and hands the process to :class:`Mount` so the clean-up is the same.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

#: How long a daemon may take to be mounted (a cold 250k-entry project included).
MOUNT_TIMEOUT_S = 60.0
UNMOUNT_TIMEOUT_S = 30.0
#: The interpreter's ``-P``: the daemon imports nothing from the working directory.
ISOLATED = ("-P",)

PathLike = str | os.PathLike[str]


# ---- can real mounts run here --------------------------------------------------------------


def fuse_missing() -> str | None:
    """None when real mounts can run here, else why not (for a skip reason)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
        return "fusermount is missing (apt-get install fuse)"
    return None


def fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


# ---- mount table ---------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_on(path: PathLike) -> int:
    """How many file systems the kernel has mounted on ``path``, dead ones included
    (``os.path.ismount`` cannot see a mount whose daemon died: its ``stat`` fails)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if _unescape(line.split()[4]) == target)


def is_mounted(path: PathLike) -> bool:
    """True when anything, live or dead, is mounted on ``path``."""
    return mounts_on(path) > 0


def is_dead(path: PathLike) -> bool:
    """True when ``path`` is a FUSE mount whose daemon is gone (ENOTCONN)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def wait_mounted(
    mnt: PathLike,
    proc: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
    timeout_s: float = MOUNT_TIMEOUT_S,
) -> None:
    """Return once ``mnt`` is served; raise (with the log's tail) if ``proc`` exits first
    or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"daemon for {mnt} exited with {proc.returncode} before mounting{_tail(log)}"
            )
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
                proc.wait(10)
            raise RuntimeError(f"{mnt} did not mount within {timeout_s:.0f} s{_tail(log)}")
        time.sleep(0.005)


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return f"; log {log}:\n{log.read_text(errors='replace')[-3000:]}"


def unmount(mnt: PathLike, pid: int | None = None, timeout_s: float = UNMOUNT_TIMEOUT_S) -> None:
    """Unmount ``mnt`` (``fusermount -u``, retried while busy, lazily as a last resort,
    also a dead mount) and wait for the daemon ``pid`` to exit; kill it only if it
    outlives the timeout."""
    deadline = time.monotonic() + timeout_s
    while is_mounted(mnt):
        lazy = is_dead(mnt) or time.monotonic() > deadline
        cmd = [fusermount(), "-u", *(["-z"] if lazy else []), os.fspath(mnt)]
        done = subprocess.run(cmd, capture_output=True, check=False)
        if lazy or (done.returncode == 0 and not is_mounted(mnt)):
            break
        time.sleep(0.1)
    if pid is None:
        return
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.01)


def detach(mnt: PathLike) -> None:
    """Take away whatever is mounted on ``mnt`` (stacked and dead mounts too), lazily."""
    for _ in range(mounts_on(mnt)):
        subprocess.run([fusermount(), "-u", "-z", os.fspath(mnt)], capture_output=True)


# ---- processes -----------------------------------------------------------------------------


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


def daemon_argv(
    source: PathLike,
    mnt: PathLike,
    *args: str,
    log: Path | None = None,
    foreground: bool = True,
    python: str = sys.executable,
    python_flags: Sequence[str] = (),
) -> list[str]:
    """``python [flags] -m blobfs mount SOURCE MNT [--foreground] [--log-file LOG] ARGS``."""
    cmd = [python, *python_flags, "-m", "blobfs", "mount", os.fspath(source), os.fspath(mnt)]
    if foreground:
        cmd.append("--foreground")
    if log is not None:
        cmd += ["--log-file", str(log)]
    return [*cmd, *args]


def spawn(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
    preexec: Callable[[], None] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    new_session: bool = False,
    cwd: PathLike | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` as a daemon is started here: stdin closed, ``env`` over ours, on
    ``cpus`` only when given (set before exec, so every thread inherits it)."""

    def before_exec() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if preexec is not None:
            preexec()

    return subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env={**os.environ, **(env or {})},
        preexec_fn=before_exec if cpus is not None or preexec is not None else None,
        start_new_session=new_session,
        cwd=cwd,
    )


# ---- one mount -----------------------------------------------------------------------------


class Mount:
    """A mount made here (or a daemon's process handed to it) and how to end it."""

    def __init__(
        self,
        mnt: Path,
        proc: subprocess.Popen[Any] | None = None,
        log: Path | None = None,
        pid: int | None = None,
    ) -> None:
        self.mnt = mnt
        self.proc = proc
        self.log = log
        self.pid = pid if pid is not None else (proc.pid if proc is not None else None)

    def __repr__(self) -> str:
        return f"Mount({self.mnt}, pid={self.pid})"

    def path(self, rel: str = "") -> Path:
        """``rel`` inside the mount (a leading ``/`` is allowed)."""
        return self.mnt / rel.lstrip("/")

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def wait_exit(self, timeout_s: float = 30) -> int | None:
        """The daemon's exit status once it exits, None if it outlives ``timeout_s``."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return None
        deadline = time.monotonic() + timeout_s
        while self.pid is not None and pid_alive(self.pid):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return None  # not our child: its status is not ours to read

    def kill9(self) -> None:
        """``kill -9`` the daemon, then take its dead mount away (as a reboot would)."""
        if self.pid is not None and self.alive():
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.wait_exit(10)
        detach(self.mnt)

    def send_signal(self, signum: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, signum)

    def wait(self, timeout_s: float | None = None) -> int:
        """The daemon's exit status, as ``Popen.wait`` (TimeoutExpired if it runs on)."""
        assert self.proc is not None, "not our child: use wait_exit"
        return self.proc.wait(timeout_s)

    def poll(self) -> int | None:
        assert self.proc is not None, "not our child: use alive"
        return self.proc.poll()

    def unmount(self, timeout_s: float = 60) -> int | None:
        """Clean unmount (``fusermount -u``, retried while busy; a writeback mount drains
        its queue first); returns the daemon's exit status."""
        unmount(self.mnt, None, timeout_s)
        return self.wait_exit(timeout_s)

    def close(self) -> None:
        """End it whatever state it is in (a test's tear-down): kill what still runs,
        then detach every mount left on the folder."""
        if self.alive():
            assert self.pid is not None
            with suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.wait_exit(10)
        detach(self.mnt)

    def __enter__(self) -> Mount:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start(
    source: PathLike,
    mnt: Path,
    *args: str,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
    python_flags: Sequence[str] = (),
    preexec: Callable[[], None] | None = None,
    stderr: int | IO[Any] | None = None,
    new_session: bool = False,
    timeout_s: float = MOUNT_TIMEOUT_S,
) -> Mount:
    """``blobfs mount SOURCE MNT --foreground --log-file LOG ARGS`` in a subprocess,
    returned once the mount is served. ``log`` defaults to ``<mnt>.log`` beside it."""
    mnt.mkdir(parents=True, exist_ok=True)
    log = log if log is not None else mnt.with_name(mnt.name + ".log")
    argv = daemon_argv(source, mnt, *args, log=log, python_flags=python_flags)
    proc = spawn(argv, env, cpus=cpus, preexec=preexec, stderr=stderr, new_session=new_session)
    wait_mounted(mnt, proc, log, timeout_s)
    return Mount(mnt, proc, log)


def start_remote(
    url: str, project_id: int, mnt: Path, *args: str, token: str, **kwargs: Any
) -> Mount:
    """A mount of project ``project_id`` on the server at ``url`` (the emulator)."""
    env = {"API_TOKEN": token, **kwargs.pop("env", {})}
    return start(f"sly://{project_id}", mnt, "--server", url, *args, env=env, **kwargs)


def start_writeback(
    source: PathLike,
    mnt: Path,
    spool: Path,
    *args: str,
    delay_s: float = 0.3,
    log_level: str = "DEBUG",
    **kwargs: Any,
) -> Mount:
    """A ``--writeback`` mount with its own spool; ``delay_s`` is ``--writeback-delay``."""
    wb = ["--writeback", "--spool-dir", str(spool), "--writeback-delay", str(delay_s)]
    return start(source, mnt, *wb, "--log-level", log_level, *args, **kwargs)


def mount_cli(
    source: PathLike,
    mnt: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    python_flags: Sequence[str] = ISOLATED,
    cwd: PathLike = "/",
    timeout_s: float = 600,
) -> tuple[subprocess.CompletedProcess[str], Mount | None]:
    """``blobfs mount SOURCE MNT ARGS`` as a user runs it (it returns once the mount is
    live, the daemon in the background): its result, and the mount when there is one."""
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = daemon_argv(
        source, mnt, *args, foreground=False, python=python, python_flags=python_flags
    )
    done = subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
    # the daemon is the re-executed foreground child: its argv names the mount point
    pids = pids_with_args("blobfs", "mount", str(mnt), "--foreground")
    if not os.path.ismount(mnt) and not pids:
        return done, None
    return done, Mount(mnt, pid=pids[0] if pids else None)


def spawn_server(
    cmd: Sequence[str],
    mnt: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
    timeout_s: float = MOUNT_TIMEOUT_S,
) -> Mount:
    """Any foreground FUSE server ``cmd`` (blobfs with other flags, or another program a
    benchmark compares with), its output into ``log``, in its own session (Ctrl-C reaches
    only the caller, who unmounts in order); returned once ``mnt`` is served."""
    mnt.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = spawn(cmd, env, cpus=cpus, stdout=out, stderr=subprocess.STDOUT, new_session=True)
    mount = Mount(mnt, proc, log)
    try:
        wait_mounted(mnt, proc, log, timeout_s)
    except RuntimeError:
        mount.close()
        raise
    return mount


# ---- every mount of a test or a benchmark ------------------------------------------------


class Mounts:
    """The mounts one test (the ``mounts`` fixture) or one benchmark made, so that all of
    them go away however it ends.

    A test's tear-down kills what is left (fast, and a failed test may have left a busy or
    half-dead mount); a benchmark (``clean=True``) unmounts each in order so its daemon
    exits as a user's would. As a context manager with ``signals=True`` (benchmarks) it
    also turns SIGTERM/SIGHUP into KeyboardInterrupt, so a killed benchmark still unmounts
    on its way out.
    """

    def __init__(self, signals: bool = False, clean: bool = False) -> None:
        self._live: dict[Path, Mount] = {}
        self._signals = signals
        self._clean = clean
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Mounts:
        if self._signals:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @staticmethod
    def _on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def add(self, mount: Mount) -> Mount:
        self._live[mount.mnt] = mount
        return mount

    def start(self, source: PathLike, mnt: Path, *args: str, **kwargs: Any) -> Mount:
        """:func:`start`, registered."""
        return self.add(start(source, mnt, *args, **kwargs))

    def start_remote(
        self, url: str, project_id: int, mnt: Path, *args: str, **kwargs: Any
    ) -> Mount:
        """:func:`start_remote`, registered."""
        return self.add(start_remote(url, project_id, mnt, *args, **kwargs))

    def start_writeback(
        self, source: PathLike, mnt: Path, spool: Path, *args: str, **kwargs: Any
    ) -> Mount:
        """:func:`start_writeback`, registered."""
        return self.add(start_writeback(source, mnt, spool, *args, **kwargs))

    def mount_cli(
        self, source: PathLike, mnt: Path, *args: str, **kwargs: Any
    ) -> tuple[subprocess.CompletedProcess[str], Mount | None]:
        """:func:`mount_cli`, registered when it mounted."""
        done, mount = mount_cli(source, mnt, *args, **kwargs)
        if mount is not None:
            self.add(mount)
        return done, mount

    def spawn_server(self, cmd: Sequence[str], mnt: Path, log: Path, **kwargs: Any) -> Mount:
        """:func:`spawn_server`, registered."""
        return self.add(spawn_server(cmd, mnt, log, **kwargs))

    def release(self, mount: Mount | Path, timeout_s: float = UNMOUNT_TIMEOUT_S) -> int | None:
        """Unmount now, wait for the daemon (killed if it outlives ``timeout_s``) and
        remove the mount point when it is empty; returns the daemon's exit status."""
        mnt = mount.mnt if isinstance(mount, Mount) else mount
        found = self._live.pop(mnt, None)
        try:
            unmount(mnt, found.pid if found else None, timeout_s)
            return found.wait_exit(timeout_s) if found is not None else None
        finally:
            if found is not None and found.alive():
                found.close()
            with suppress(OSError):
                mnt.rmdir()

    @contextmanager
    def mounted(self, mount: Mount | Path) -> Iterator[Mount]:
        """``mount`` (or the one registered on that folder) for the block's duration;
        unmounted when the block ends."""
        found = self.add(mount) if isinstance(mount, Mount) else self._live[mount]
        try:
            yield found
        finally:
            self.release(found)

    def close_all(self) -> None:
        """End every mount still here (a Ctrl-C pressed meanwhile waits its turn)."""
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for mount in list(self._live.values()):
                try:
                    if self._clean:
                        self.release(mount)
                    else:
                        self._live.pop(mount.mnt, None)
                        mount.close()
                except Exception as exc:  # keep cleaning the others
                    print(f"warning: could not unmount {mount.mnt}: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)
