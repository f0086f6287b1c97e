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
from blobfs.config import MountConfig, parse_fuse_options, parse_size
from blobfs.errors import BlobfsError, InvalidInput
from blobfs.logs import setup_logging

READY_TIMEOUT_S = 120.0


def _fail(message: str) -> NoReturn:
    click.echo(f"blobfs: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blobfs")
def main() -> None:
    """Mount Supervisely blob projects (tar blobs + offsets) as ordinary folders."""


@main.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground.")
@click.option("-o", "options", multiple=True, help="FUSE/blobfs options, comma separated.")
@click.option(
    "--cache-size",
    default=None,
    help="Memory for cached blob blocks (default 32M local, 256M remote).",
)
@click.option(
    "--block-size", default=None, help="Cache block size (default 256K local, 1M remote)."
)
@click.option("--server", default=None, help="Supervisely server (default: SERVER_ADDRESS).")
@click.option(
    "--token-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="File holding the API token (default: API_TOKEN, ~/supervisely.env).",
)
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Persistent disk cache for remote blob blocks.",
)
@click.option("--disk-cache-size", default="10G", show_default=True)
@click.option("--allow-other", is_flag=True, help="Let other users see the mount.")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option("--log-file", default=None, type=click.Path(dir_okay=False))
@click.option("--writeback", is_flag=True, help="Make the mount writable; import what is written.")
@click.option(
    "--spool-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where written files wait for import (default ~/.cache/blobfs/spool/...).",
)
@click.option(
    "--writeback-delay",
    default=5.0,
    show_default=True,
    help="Seconds without new writes before staged files are imported.",
)
@click.option(
    "--blob-size",
    default="256M",
    show_default=True,
    help="Import a dataset's staged images once they reach this size.",
)
@click.option(
    "--debug-fuse",
    is_flag=True,
    help="Print libfuse's log of every kernel request to stderr (with --foreground).",
)
@click.option(
    "--prefetch",
    is_flag=True,
    help="Remote: warm the whole project (blobs, annotations) in the background.",
)
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Remote: requests in flight for one listing, annotation walk or prefetch.",
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
    debug_fuse: bool,
    prefetch: bool,
    concurrency: int,
) -> None:
    """Mount SOURCE (a project folder or sly://PROJECT_ID) on MOUNTPOINT.

    Read-only unless --writeback: then files written into the mount are packed into new
    blobs and imported into the project.
    """
    try:
        fuse_opts = parse_fuse_options(options)
        config = MountConfig(
            source=source if source.startswith("sly://") else os.path.abspath(source),
            mountpoint=os.path.abspath(mountpoint),
            block_size=parse_size(block_size) if block_size else None,
            cache_bytes=_size_or_none(fuse_opts.pop("cache_size", cache_size)),
            allow_other=allow_other or bool(fuse_opts.pop("allow_other", False)),
            fuse_options=fuse_opts,
            server=server,
            token_file=token_file,
            cache_dir=cache_dir,
            disk_cache_bytes=parse_size(disk_cache_size),
            writeback=writeback or bool(fuse_opts.pop("writeback", False)),
            spool_dir=spool_dir,
            writeback_delay_s=writeback_delay,
            writeback_blob_size=parse_size(blob_size),
            debug_fuse=debug_fuse,
            prefetch=prefetch or bool(fuse_opts.pop("prefetch", False)),
            concurrency=_concurrency(fuse_opts.pop("concurrency", concurrency)),
        )
    except BlobfsError as exc:
        _fail(str(exc))
    if not os.path.isdir(config.mountpoint):
        _fail(f"mount point {config.mountpoint} is not a directory")
    if not foreground:
        _spawn_background(sys.argv[1:], config.mountpoint)
        return
    setup_logging(log_level, log_file)
    from blobfs.daemon import run

    try:
        run(config, ready_fd=ready_fd)
    except BlobfsError as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        _fail(f"mount failed: {exc}")


def _concurrency(value: object) -> int:
    """``-o concurrency=N`` (text) or ``--concurrency N``: 1..16 (the HTTP pool holds 32)."""
    text = str(value)
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise InvalidInput(f"concurrency must be 1..16, not {text!r}")
    return int(text)


def _size_or_none(value: object) -> int | None:
    return None if value is None else parse_size(str(value))


def _spawn_background(argv: list[str], mountpoint: str) -> None:
    """Re-run this command in the foreground in a new session; return once it is mounted.

    The child reports readiness through a pipe from libfuse's ``init``; its stderr comes to
    us until then, so a failing mount prints its reason here, like sshfs.
    """
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "blobfs", *argv, "--foreground", "--ready-fd", str(write_fd)]
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
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("-z", "--lazy", is_flag=True, help="Detach now, clean up when no longer busy.")
def unmount(mountpoint: str, lazy: bool) -> None:
    """Unmount MOUNTPOINT (fusermount -u); a writeback mount imports what is staged first."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        _fail("fusermount not found (install the fuse package)")
    if not lazy and (Path(mountpoint) / ".blobfs" / "writeback.json").exists():
        status = (
            _flush_with_progress(mountpoint)
            if sys.stderr.isatty()
            else _read_control(mountpoint, "flush")
        )
        if status.get("pending") or status.get("failed"):
            click.echo(
                f"blobfs: {status.get('pending', 0)} files still pending and "
                f"{len(status.get('failed') or {})} failed stay in the spool for the "
                "next mount",
                err=True,
            )
    args = [tool, "-u", *(["-z"] if lazy else []), mountpoint]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        _fail(result.stderr.strip() or f"{tool} failed")


@main.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("project_dir", type=click.Path(file_okay=False))
@click.option("--dataset", default="ds0", show_default=True)
@click.option("--blob-size", default="1G", show_default=True, help="Start a new blob past this.")
def pack(images_dir: str, project_dir: str, dataset: str, blob_size: str) -> None:
    """Pack the images in IMAGES_DIR into blobs of PROJECT_DIR (created or extended).

    Hidden files (``.name``, such as .DS_Store) are skipped, as a shell's ``*`` would."""
    from blobfs.blob.pack import ProjectPacker

    setup_logging("WARNING")
    files = sorted(
        p
        for p in Path(images_dir).iterdir()
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
    )
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
        f"packed {result.images} images ({result.bytes} bytes) into "
        f"{len(result.blobs)} blob(s) in {project_dir}/{dataset}"
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
    from blobfs.blob.check import check_project

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
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
def flush(mountpoint: str) -> None:
    """Import everything staged in a writeback MOUNTPOINT now, and wait for it."""
    status = (
        _flush_with_progress(mountpoint)
        if sys.stderr.isatty()
        else (_read_control(mountpoint, "flush"))
    )
    _print_status(status)
    sys.exit(1 if status.get("pending") or status.get("failed") else 0)


@main.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(mountpoint: str, as_json: bool) -> None:
    """Show writeback state of MOUNTPOINT: pending, importing, failed (with reasons)."""
    data = _read_control(mountpoint, "writeback.json")
    if as_json:
        click.echo(json.dumps(data, indent=1))
    else:
        _print_status(data)


def _flush_with_progress(mountpoint: str) -> dict[str, Any]:
    """Run the flush in a thread while a bar follows the daemon's pending count."""
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(_read_control(mountpoint, "flush")))
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


def _read_control(mountpoint: str, name: str) -> dict[str, Any]:
    path = Path(mountpoint) / ".blobfs" / name
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        _fail(f"{mountpoint} is not a blobfs mount (or not one with writeback)")
    except (OSError, ValueError) as exc:
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
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def stats(mountpoint: str, as_json: bool) -> None:
    """Live statistics of MOUNTPOINT: cache hits/misses, bytes and requests, memory."""
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
