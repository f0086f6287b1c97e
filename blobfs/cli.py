"""The ``blobfs`` command line: argument handling only, the work lives in other modules."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import click

from blobfs import __version__
from blobfs.config import (
    DEFAULT_BATCH_FILES,
    DEFAULT_CACHE_BYTES,
    DEFAULT_LOCAL_BLOCK_SIZE,
    DEFAULT_LOCAL_CACHE_BYTES,
    DEFAULT_REMOTE_BLOCK_SIZE,
    READDIRPLUS_MODES,
    MountConfig,
    parse_fuse_options,
    parse_size,
)
from blobfs.credentials import token_file_warning
from blobfs.deadline import DEFAULT_TIMEOUT_S
from blobfs.errors import BlobfsError, InvalidInput
from blobfs.fstab import BOOL_FLAGS, VALUE_FLAGS, daemon_command
from blobfs.layout import CONTROL_DIR
from blobfs.logs import setup_logging
from blobfs.mountpoint import (
    DEAD_ERRNOS,
    Kind,
    MountState,
    check_mount_target,
    dead_mount_advice,
    inspect,
)

READY_TIMEOUT_S = 120.0
CONTROL_NAME = CONTROL_DIR.lstrip("/")  # the mount's control folder, relative
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _size_text(n: int) -> str:
    """``256 << 20`` -> ``"256M"``: a default as the user would type it."""
    for unit in "TGMK":
        scale = 1 << (10 * (" KMGT".index(unit)))
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _fail(message: str) -> NoReturn:
    click.echo(f"blobfs: {message}", err=True)
    sys.exit(1)


#: The mount point of a running (or dead) mount. Not checked for readability here: a dead
#: mount's root may still stat from the kernel's attribute cache while access() fails, and
#: the command itself says what is wrong with it (``mountpoint.inspect``).
MOUNTED = click.Path(file_okay=False, readable=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blobfs")
def main() -> None:
    """Mount Supervisely blob projects (tar blobs + offsets) as ordinary folders."""


@main.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground.")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPTS",
    help="Comma-separated options, as in fstab: blobfs's (cache_size=1G, server=URL, "
    "token_file=PATH, writeback, ...: the flags' names with _) and FUSE's (attr_timeout=5, "
    "nonempty to mount over a non-empty folder).",
)
@click.option(
    "--cache-size",
    default=None,
    metavar="SIZE",
    help="Memory for cached blob blocks (default "
    f"{_size_text(DEFAULT_LOCAL_CACHE_BYTES)} local, {_size_text(DEFAULT_CACHE_BYTES)} remote).",
)
@click.option(
    "--block-size",
    default=None,
    metavar="SIZE",
    help=f"Cache block size (default {_size_text(DEFAULT_LOCAL_BLOCK_SIZE)} local, "
    f"{_size_text(DEFAULT_REMOTE_BLOCK_SIZE)} remote).",
)
@click.option(
    "--server",
    default=None,
    metavar="URL",
    help="Supervisely server (default: SERVER_ADDRESS, then ~/supervisely.env).",
)
@click.option(
    "--token-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="File holding the API token (default: API_TOKEN, then ~/supervisely.env).",
)
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Persistent disk cache for remote blob blocks.",
)
@click.option(
    "--disk-cache-size",
    default="10G",
    show_default=True,
    metavar="SIZE",
    help="Bound of the --cache-dir cache.",
)
@click.option("--allow-other", is_flag=True, help="Let other users see the mount.")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)
@click.option(
    "--log-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Append the log here (created 0600); in the background without it, the log after "
    "start-up is dropped.",
)
@click.option("--writeback", is_flag=True, help="Make the mount writable; import what is written.")
@click.option(
    "--spool-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where written files wait for import (default ~/.cache/blobfs/spool/<hash of SOURCE>).",
)
@click.option(
    "--writeback-delay",
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds without new writes before staged files are imported.",
)
@click.option(
    "--sync-close",
    is_flag=True,
    help="With --writeback: every close() of a written file waits until it would survive "
    "a power cut (default: like a local file system, only fsync(), sync, blobfs flush and "
    "unmount do). -o sync_close or -o sync.",
)
@click.option(
    "--blob-size",
    default="256M",
    show_default=True,
    metavar="SIZE",
    help="Import a dataset's staged images once they reach this size.",
)
@click.option(
    "--batch-files",
    default=None,
    metavar="N",
    help="Import a dataset's staged files once N are staged, while writes go on "
    f"(0: only by --blob-size, --writeback-delay or blobfs flush; default {DEFAULT_BATCH_FILES} "
    "for a remote project, 0 for a local folder).",
)
@click.option(
    "--debug-fuse",
    is_flag=True,
    help="Print libfuse's log of every kernel request to stderr (with --foreground).",
)
@click.option(
    "--timeout",
    default=None,
    type=float,
    metavar="SECONDS",
    help="Seconds each file operation may take, retries included; then it fails "
    "with ETIMEDOUT (default 30; -o timeout=).",
)
@click.option(
    "--import-in-daemon",
    is_flag=True,
    help="Remote --writeback: import batches in the daemon itself, not in a worker "
    "process of their own (which leaves the daemon's CPU to the writes meanwhile).",
)
@click.option(
    "--prefetch",
    is_flag=True,
    help="Remote: warm the whole project (blobs, annotations) in the background.",
)
@click.option(
    "--concurrency",
    default=16,
    show_default=True,
    type=click.IntRange(1, 16),
    metavar="N",
    help="Remote: requests in flight for one listing or prefetch (annotation batches: twice).",
)
@click.option(
    "--readdirplus",
    default=None,
    metavar="MODE",
    help="When listings carry file attributes: always (every page: no lookup per file for a "
    "reader that lists, then stats or opens every file) or auto (the kernel's choice: "
    "names only after the first page unless files were looked up; faster find and ls). "
    "Default always; -o readdirplus=.",
)
@click.option("--ready-fd", default=None, type=int, hidden=True)
def mount(
    source: str,
    mountpoint: str,
    foreground: bool,
    options: tuple[str, ...],
    cache_size: str | None,
    block_size: str | None,
    server: str | None,
    token_file: str | None,
    cache_dir: str | None,
    disk_cache_size: str,
    allow_other: bool,
    log_level: str,
    log_file: str | None,
    ready_fd: int | None,
    writeback: bool,
    spool_dir: str | None,
    writeback_delay: float,
    blob_size: str,
    batch_files: object,
    sync_close: bool,
    debug_fuse: bool,
    timeout: float | None,
    import_in_daemon: bool,
    prefetch: bool,
    concurrency: int,
    readdirplus: str | None,
) -> None:
    """Mount SOURCE (a project folder or sly://PROJECT_ID) on MOUNTPOINT.

    Read-only unless --writeback: then files written into the mount are packed into new
    blobs and imported into the project. Refuses a MOUNTPOINT that is mounted already or
    not empty (unless -o nonempty), and a folder without meta.json; a dead blobfs mount
    there (its daemon was killed) is unmounted first.
    """
    given: dict[str, Any] = {
        "cache_size": cache_size,
        "block_size": block_size,
        "server": server,
        "token_file": token_file,
        "cache_dir": cache_dir,
        "disk_cache_size": disk_cache_size,
        "log_level": log_level,
        "log_file": log_file,
        "spool_dir": spool_dir,
        "writeback_delay": writeback_delay,
        "blob_size": blob_size,
        "batch_files": batch_files,
        "allow_other": allow_other,
        "writeback": writeback,
        "timeout": timeout,
        "prefetch": prefetch,
        "concurrency": concurrency,
        "sync_close": sync_close,
        "readdirplus": readdirplus,
    }
    try:
        fuse_opts = parse_fuse_options(options)
        opt = {**given, **_blobfs_options(fuse_opts)}
        config = MountConfig(
            source=source if source.startswith("sly://") else os.path.abspath(source),
            mountpoint=os.path.abspath(mountpoint),
            block_size=parse_size(opt["block_size"]) if opt["block_size"] else None,
            cache_bytes=_size_or_none(opt["cache_size"]),
            allow_other=bool(opt["allow_other"]),
            fuse_options=fuse_opts,
            server=opt["server"],
            token_file=opt["token_file"],
            cache_dir=opt["cache_dir"],
            disk_cache_bytes=parse_size(opt["disk_cache_size"]),
            writeback=bool(opt["writeback"]),
            spool_dir=os.path.abspath(str(opt["spool_dir"])) if opt["spool_dir"] else None,
            writeback_delay_s=_seconds(opt["writeback_delay"]),
            writeback_blob_size=parse_size(opt["blob_size"]),
            writeback_batch_files=None
            if opt["batch_files"] is None
            else _files(opt["batch_files"]),
            sync_close=bool(opt["sync_close"] or opt.get("sync")),
            debug_fuse=debug_fuse,
            timeout_s=_timeout(opt["timeout"]),
            prefetch=bool(opt["prefetch"]),
            import_in_daemon=import_in_daemon,
            concurrency=_concurrency(opt["concurrency"]),
            readdirplus=_readdirplus(opt["readdirplus"]),
        )
        log_level = _log_level(opt["log_level"])
        _clear_dead_blobfs_mount(config.mountpoint)
        check_mount_target(config.mountpoint, nonempty=bool(fuse_opts.get("nonempty")))
    except BlobfsError as exc:
        _fail(str(exc))
    if not foreground:
        _spawn_background(sys.argv[1:], config.mountpoint)
        if config.is_remote and config.token_file:
            warning = token_file_warning(config.token_file)
            if warning:  # the daemon logged it too, but its start-up output is not shown
                click.echo(f"blobfs: warning: {warning}", err=True)
        return
    try:
        setup_logging(log_level, opt["log_file"])
    except OSError as exc:
        _fail(f"cannot open log file {opt['log_file']}: {exc.strerror}")
    from blobfs.daemon import run

    try:
        run(config, ready_fd=ready_fd)
    except BlobfsError as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        _fail(f"mount failed: {exc}")


def _blobfs_options(fuse_opts: dict[str, str | bool]) -> dict[str, str | bool]:
    """Take the blobfs options (``server=URL``, ``writeback`` ...) out of ``-o``.

    They are the options an fstab line accepts (``blobfs.fstab``), so ``-o`` means the same on
    the command line as in fstab; what is left goes to FUSE. An ``-o`` value wins over the
    flag's.
    """
    out: dict[str, str | bool] = {}
    for key in list(fuse_opts):
        if key in VALUE_FLAGS:
            value = fuse_opts.pop(key)
            if value is True or value == "":
                raise InvalidInput(f"-o {key} needs a value ({key}=...)")
            out[key] = value
        elif key in BOOL_FLAGS:
            out[key] = bool(fuse_opts.pop(key))
    return out


def _seconds(value: object) -> float:
    try:
        return float(str(value))
    except ValueError:
        raise InvalidInput(f"not a number of seconds: {value!r}") from None


def _log_level(value: object) -> str:
    level = str(value).upper()
    if level not in LOG_LEVELS:
        raise InvalidInput(f"log level {value!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _timeout(value: object) -> float:
    """``--timeout`` / ``-o timeout=`` in seconds (default 30)."""
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(str(value))
    except ValueError:
        raise InvalidInput(f"timeout {value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise InvalidInput(f"timeout must be more than 0 seconds, not {value!r}")
    return seconds


def _concurrency(value: object) -> int:
    """``-o concurrency=N`` (text) or ``--concurrency N``: 1..16 (sizes the HTTP pool)."""
    text = str(value)
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise InvalidInput(f"concurrency must be 1..16, not {text!r}")
    return int(text)


def _readdirplus(value: object) -> str:
    """``--readdirplus MODE`` / ``-o readdirplus=MODE``: one of ``READDIRPLUS_MODES``."""
    if value is None:
        return MountConfig.readdirplus
    mode = str(value).lower()
    if mode not in READDIRPLUS_MODES:
        raise InvalidInput(
            f"readdirplus must be one of {', '.join(READDIRPLUS_MODES)}, not {value!r}"
        )
    return mode


def _files(value: object) -> int:
    """``-o batch_files=N`` (text) or ``--batch-files N``: a whole number, 0 or more."""
    text = str(value)
    if not text.isdigit():
        raise InvalidInput(f"not a number of files: {text!r}")
    return int(text)


def _size_or_none(value: object) -> int | None:
    return None if value is None else parse_size(str(value))


def _spawn_background(argv: list[str], mountpoint: str) -> None:
    """Re-run this command in the foreground in a new session; return once it is mounted.

    The child reports readiness through a pipe from libfuse's ``init``; its stderr comes to
    us until then, so a failing mount prints its reason here, like sshfs.
    """
    read_fd, write_fd = os.pipe()
    cmd = [*daemon_command(), *argv, "--foreground", "--ready-fd", str(write_fd)]
    err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"blobfs-{os.getpid()}-{time.time_ns()}.err"
    with open(err_path, "w+b") as err:
        os.chmod(err_path, 0o600)
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        os.close(write_fd)
        ready = _wait_ready(read_fd, child)
        err.seek(0)
        output = err.read().decode(errors="replace")
    os.unlink(err_path)
    if not ready:
        sys.stderr.write(output)
        _fail(f"could not mount on {mountpoint}")


def _wait_ready(read_fd: int, child: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            if ready:
                return os.read(read_fd, 64).startswith(b"READY")
            if child.poll() is not None:
                return False
        child.terminate()
        return False
    finally:
        os.close(read_fd)


@main.command()
@click.argument("mountpoint", type=MOUNTED)
@click.option("-z", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
def unmount(mountpoint: str, lazy: bool) -> None:
    """Unmount MOUNTPOINT (fusermount -u); a writeback mount imports what is staged first.

    A dead mount (its daemon exited: Transport endpoint is not connected) is unmounted too,
    lazily if it is still in use."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        _fail("fusermount not found (install the fuse package)")
    state = _state(mountpoint)
    if state.kind is Kind.DEAD:
        _unmount_dead(tool, state.path)
        return
    if state.kind is Kind.MISSING:
        _fail(f"{state.path} does not exist")
    if state.kind is not Kind.MOUNTED:
        _fail(f"{state.path} is not mounted")
    if not lazy and state.is_blobfs and _exists(Path(mountpoint) / CONTROL_NAME / "writeback.json"):
        status = (
            _flush_with_progress(mountpoint) if sys.stderr.isatty() else _flush_and_wait(mountpoint)
        )
        if status.get("pending") or status.get("failed"):
            click.echo(
                f"blobfs: {_count(status.get('pending', 0), 'file')} still pending and "
                f"{len(status.get('failed') or {})} failed stay in the spool for the "
                "next mount",
                err=True,
            )
    result = _fusermount(tool, state.path, lazy)
    if result.returncode != 0:
        _fail(_fusermount_error(result, state.path))


def _fusermount(tool: str, path: str, lazy: bool) -> subprocess.CompletedProcess[str]:
    args = [tool, "-u", *(["-z"] if lazy else []), path]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _fusermount_error(result: subprocess.CompletedProcess[str], path: str) -> str:
    """fusermount's own words, without its program-name prefix, plus what to do when busy."""
    text = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
    text = text.split(": ", 1)[1] if text.startswith("fusermount") and ": " in text else text
    if "busy" in text.lower():
        return f"cannot unmount {path}: {text} (blobfs unmount -z {path} detaches lazily)"
    return f"cannot unmount {path}: {text}"


def _unmount_dead(tool: str, path: str) -> None:
    """Take away a mount whose daemon is gone; what it had staged stays in its spool."""
    result = _fusermount(tool, path, lazy=False)
    if result.returncode != 0:  # still open somewhere: detach it now, the kernel frees it later
        result = _fusermount(tool, path, lazy=True)
    if result.returncode != 0:
        _fail(_fusermount_error(result, path))
    click.echo(
        f"blobfs: {path} was a dead mount (its daemon had exited); unmounted. Anything it had "
        "staged for writeback stays in the spool for the next mount.",
        err=True,
    )


def _clear_dead_blobfs_mount(mountpoint: str) -> None:
    """Before mounting: a dead *blobfs* mount there is taken away (nothing can be read from
    it, and its spool is on disk); a dead mount of another kind is left for its owner
    (``check_mount_target`` then says what to run)."""
    try:
        state = inspect(mountpoint)
    except OSError:
        return  # check_mount_target reports it
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if state.kind is Kind.DEAD and state.is_blobfs and tool is not None:
        _unmount_dead(tool, state.path)


def _state(mountpoint: str) -> MountState:
    try:
        return inspect(mountpoint)
    except OSError as exc:
        _fail(f"{mountpoint}: {exc.strerror}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


@main.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("project_dir", type=click.Path(file_okay=False))
@click.option("--dataset", default="ds0", show_default=True, help="Dataset to create or extend.")
@click.option(
    "--blob-size",
    default="1G",
    show_default=True,
    metavar="SIZE",
    help="Start a new blob past this.",
)
def pack(images_dir: str, project_dir: str, dataset: str, blob_size: str) -> None:
    """Pack the images in IMAGES_DIR into blobs of PROJECT_DIR (created or extended).

    Hidden files (names starting with a dot, such as .DS_Store) and symlinks are skipped,
    as a shell's * skips hidden files."""
    from blobfs.commands.pack import images_in
    from blobfs.format.pack import ProjectPacker

    setup_logging("WARNING")
    files = images_in(Path(images_dir))
    try:
        packer = ProjectPacker(Path(project_dir), dataset, parse_size(blob_size))
        show = sys.stderr.isatty()
        with click.progressbar(
            length=len(files), label="packing", file=sys.stderr, hidden=not show
        ) as bar:
            result = packer.pack(files, progress=bar.update)
    except BlobfsError as exc:
        _fail(str(exc))
    click.echo(
        f"packed {_count(result.images, 'image')} ({result.bytes} bytes) into "
        f"{_count(len(result.blobs), 'blob')} in {project_dir}/{dataset}"
    )


@main.command()
@click.argument("project_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--deep/--no-deep",
    default=True,
    show_default=True,
    help="Also read each tar's headers and compare them with the offsets.",
)
def check(project_dir: str, deep: bool) -> None:
    """Validate PROJECT_DIR; exit status 1 when anything would not be served."""
    from blobfs.commands.check import check_project

    setup_logging("ERROR")
    with click.progressbar(
        length=1, label="checking datasets", file=sys.stderr, hidden=not sys.stderr.isatty()
    ) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        report = check_project(Path(project_dir), deep=deep, progress=progress)
    for line in report.lines():
        click.echo(line)
    sys.exit(1 if report.problems else 0)


@main.command()
@click.argument("mountpoint", type=MOUNTED)
def flush(mountpoint: str) -> None:
    """Import everything staged in a writeback MOUNTPOINT now, and wait for it."""
    _need_blobfs_mount(mountpoint, writeback="nothing to flush")
    status = (
        _flush_with_progress(mountpoint) if sys.stderr.isatty() else _flush_and_wait(mountpoint)
    )
    _print_status(status)
    sys.exit(1 if status.get("pending") or status.get("failed") else 0)


@main.command()
@click.argument("mountpoint", type=MOUNTED)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(mountpoint: str, as_json: bool) -> None:
    """Show writeback state of MOUNTPOINT: pending, importing, failed (with reasons)."""
    _need_blobfs_mount(mountpoint, writeback="no writeback state")
    data = _read_control(mountpoint, "writeback.json")
    if as_json:
        click.echo(json.dumps(data, indent=1))
    else:
        _print_status(data)


def _flush_and_wait(mountpoint: str) -> dict[str, Any]:
    """Ask the daemon for a flush and wait until it is done.

    Reading ``.blobfs/flush-new-<nonce>`` requests one, ``flush-<ticket>-<nonce>`` waits
    for it again: each read waits at most a second inside the daemon, so no request holds a
    FUSE thread for long; the answer says whether that flush is ``done``. A fresh name per
    read: the kernel caches a file's size and pages.
    """
    status = _read_control(mountpoint, f"flush-new-{uuid.uuid4().hex}")
    while status.get("done") is False:
        ticket = int(status.get("ticket") or 0)
        status = _read_control(mountpoint, f"flush-{ticket}-{uuid.uuid4().hex}")
    return status


def _flush_with_progress(mountpoint: str) -> dict[str, Any]:
    """Run the flush in a thread while a bar follows the daemon's pending count."""
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(_flush_and_wait(mountpoint)))
    start = _read_control(mountpoint, "writeback.json")
    total = max(1, int(start.get("pending") or 0))
    worker.start()
    with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
        while worker.is_alive():
            worker.join(0.5)
            now = _read_control(mountpoint, f"stats-{uuid.uuid4().hex}.json")
            pending = int((now.get("writeback") or {}).get("pending") or 0)
            bar.update(max(0, total - pending - bar.pos))
    return result


def _need_blobfs_mount(mountpoint: str, writeback: str | None = None) -> None:
    """Fail with what ``mountpoint`` is when it is not a live blobfs mount (with writeback,
    when ``writeback`` names what a read-only one lacks)."""
    state = _state(mountpoint)
    if state.kind is Kind.DEAD:
        _fail(dead_mount_advice(state.path))
    if state.kind is Kind.MISSING:
        _fail(f"{state.path} does not exist")
    if state.kind is not Kind.MOUNTED or not state.is_blobfs:
        _fail(f"{state.path} is not a blobfs mount")
    if writeback and not _exists(Path(state.path) / CONTROL_NAME / "writeback.json"):
        _fail(
            f"{state.path} is a read-only blobfs mount (mounted without --writeback): {writeback}"
        )


def _read_control(mountpoint: str, name: str) -> dict[str, Any]:
    path = Path(mountpoint) / CONTROL_NAME / name
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        _fail(f"cannot read {path}: the daemon does not serve it")
    except OSError as exc:
        if exc.errno in DEAD_ERRNOS:
            _fail(dead_mount_advice(os.path.abspath(mountpoint)))
        _fail(f"cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        _fail(f"cannot read {path}: {exc}")
    if not isinstance(data, dict):
        _fail(f"{path}: unexpected content")
    return data


def _print_status(data: dict[str, Any]) -> None:
    click.echo(f"pending: {data.get('pending', 0)} files ({data.get('pending_bytes', 0)} bytes)")
    click.echo(f"importing: {len(data.get('importing') or [])} files")
    done, batches = data.get("imported", 0), data.get("batches_done", 0)
    click.echo(f"imported: {done} files in {batches} batches")
    failed = data.get("failed") or {}
    click.echo(f"failed: {len(failed)} files")
    for path, reason in sorted(failed.items()):
        click.echo(f"  {path}: {reason}")
    if data.get("last_error"):
        click.echo(f"last error: {data['last_error']}")


@main.command()
@click.argument("mountpoint", type=MOUNTED)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def stats(mountpoint: str, as_json: bool) -> None:
    """Live statistics of MOUNTPOINT: cache hits/misses, bytes and requests, memory."""
    _need_blobfs_mount(mountpoint)
    # a fresh name each time: the kernel caches a file's size and pages (see view.tree)
    data = _read_control(mountpoint, f"stats-{uuid.uuid4().hex}.json")
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    for key, value in _flatten(data):
        click.echo(f"{key}: {value}")


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out
