"""Build a mount from its configuration and run it until it is unmounted.

``build`` wires source -> view; ``run`` hands the view to libfuse in the foreground and
reports readiness (a pipe to the parent CLI process, and sd_notify) only once the kernel
has really mounted the file system. libfuse installs its own SIGTERM/SIGINT/SIGHUP handlers
in the foreground loop, which end the loop and unmount cleanly.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from blobfs import deadline
from blobfs.cache.blocks import BlockCache, ReadPattern
from blobfs.cache.disk import DiskBlockStore
from blobfs.cache.index_store import IndexStore, default_index_dir
from blobfs.config import DEFAULT_ATTR_TIMEOUT_S, DEFAULT_REMOTE_TTL_S, MountConfig
from blobfs.errors import BlobfsError, InvalidInput, NotFound, RemoteError, RemoteNotFound
from blobfs.fuse.compat import FUSE_MAJOR, BlobfsFUSE
from blobfs.fuse.ops import BlobfsOperations
from blobfs.notify import sd_notify
from blobfs.sources.base import Source
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView

if TYPE_CHECKING:  # annotations only: a read-only mount loads none of the writeback layer,
    # a local one none of the remote source (nor ``requests``)
    from blobfs.sly.api import SuperviselyApi
    from blobfs.sources.remote import RemoteProjectSource
    from blobfs.writeback.fs import WritebackFS
    from blobfs.writeback.importer import Importer
    from blobfs.writeback.queue import WritebackQueue

logger = logging.getLogger(__name__)

READY_MESSAGE = b"READY\n"
#: The background index in the daemon starts this long after the mount is ready: what a
#: user or job asks first (a ``stat``, an ``ls``) then has the interpreter to itself
#: instead of sharing it with the build of another folder. A local project's index worker
#: is another process and starts at once.
INDEX_START_DELAY_S = 0.5


def build_source(config: MountConfig) -> Source:
    """The source named by ``config.source``: a local project folder (or ``sly://`` id)."""
    block_size = config.effective_block_size()
    cache = BlockCache(
        block_size,
        max(config.effective_cache_bytes(), block_size),
        # Readahead keeps up to --concurrency blocks in flight: at 100 ms a scan needs
        # several MB on the way to read at the speed it reads from memory.
        prefetch_workers=config.concurrency if config.is_remote else 0,
        disk=DiskBlockStore(config.cache_dir, config.disk_cache_bytes)
        if config.cache_dir
        else None,
    )
    if config.is_remote:
        return build_remote_source(config, cache)
    check_local_project(config.source)
    index_dir = default_index_dir(config.cache_dir)
    return LocalProjectSource(
        config.source, cache, index_store=IndexStore(index_dir) if index_dir else None
    )


def check_local_project(path: str) -> None:
    """Refuse a folder that is not a project before anything is mounted or reported ready.

    A folder of images (or a typo'd path one level too high) would otherwise mount as an
    empty tree with exit status 0. ``meta.json`` is what makes a folder a project for the
    SDK; whether its content is sound is for the source to judge (and report), not this.

    Raises:
        NotFound: no such folder, or no ``meta.json`` in it.
    """
    if not os.path.isdir(path):
        raise NotFound(f"{path} is not a project folder")
    if not os.path.lexists(os.path.join(path, "meta.json")):
        raise NotFound(f"{path}: not a Supervisely project: no meta.json")


def parse_project_id(source: str) -> int:
    """``sly://123`` -> 123."""
    text = source.removeprefix("sly://").strip("/")
    if not text.isdigit():
        raise InvalidInput(f"{source!r}: expected sly://PROJECT_ID")
    return int(text)


def build_remote_source(config: MountConfig, cache: BlockCache) -> RemoteProjectSource:
    """Resolve credentials, check the project exists, and return its source.

    The remote source, the REST client and the HTTP stack under them are imported here,
    not at the top: a local mount never loads them, nor ``requests``.
    """
    from blobfs.credentials import resolve
    from blobfs.sly.api import SuperviselyApi, pool_size
    from blobfs.sources.prefetch import start_prefetch
    from blobfs.sources.remote import READAHEAD_MAX_BYTES, RemoteProjectSource
    from blobfs.transport.http import HttpClient

    project_id = parse_project_id(config.source)
    server, token = resolve(config.server, config.token_file)
    client = HttpClient(server, token, pool_size=pool_size(config.concurrency))
    api = SuperviselyApi(client, config.concurrency)
    check_remote_project(api, project_id, server, config.timeout_s)
    readahead = ReadPattern(cache.block_size, READAHEAD_MAX_BYTES)
    source = RemoteProjectSource(api, project_id, cache, readahead, config.cache_dir)
    if config.prefetch:
        start_prefetch(source)
    return source


def check_remote_project(
    api: SuperviselyApi, project_id: int, server: str, timeout_s: float
) -> None:
    """Fail the mount now, in words a user can act on, when the project cannot be read.

    Runs under the mount's ``--timeout`` like any operation. The server answers 404 both
    for a project that does not exist and for one the token may not see, so the message
    says both; no message carries the token.
    """
    from blobfs.transport.http import safe_url

    try:
        with deadline.within(timeout_s):
            api.project_info(project_id)
    except RemoteNotFound:
        api.client.close()
        raise RemoteError(
            f"project {project_id} not found or not visible to this token (on {safe_url(server)})"
        ) from None
    except BlobfsError as exc:
        api.client.close()
        raise RemoteError(f"project {project_id} on {safe_url(server)}: {exc}") from None


#: The kernel's entry and attribute timeouts on a writeback mount: staged files change
#: size while written, and imports replace annotations by the server's copies.
WRITEBACK_ATTR_TIMEOUT_S = 1.0


def build(config: MountConfig) -> ProjectView:
    """Source and view for ``config``."""
    source = build_source(config)
    ttl = DEFAULT_REMOTE_TTL_S if not source.is_immutable() else float("inf")
    return ProjectView(source, listing_ttl_s=ttl)


def fuse_kwargs(config: MountConfig, immutable: bool) -> dict[str, object]:
    """libfuse options: read-only, private, kernel caches as long as the data allows."""
    timeout = config.attr_timeout_s
    if timeout is None:
        timeout = DEFAULT_ATTR_TIMEOUT_S if immutable else DEFAULT_REMOTE_TTL_S
    kwargs: dict[str, object] = {
        "foreground": True,
        "ro": True,
        "fsname": f"blobfs:{config.source}" if not config.is_remote else config.source,
        "subtype": "blobfs",
        "default_permissions": True,
        "kernel_cache": True,
        "attr_timeout": timeout,
        "entry_timeout": timeout,
        "negative_timeout": min(timeout, 60.0),
        **({"max_read": 1 << 20} if FUSE_MAJOR == 2 else {}),
        # libfuse 3.12-3.14 default this to -1 and then log "Ignoring invalid max threads
        # value 4294967295" at error level on every mount; 10 is libfuse's own old default.
        **({"max_idle_threads": 10} if FUSE_MAJOR >= 3 else {}),
    }
    if config.allow_other:
        kwargs["allow_other"] = True
    if config.debug_fuse:
        kwargs["debug"] = True
    for key, value in config.fuse_options.items():
        if key in ("foreground", "debug"):
            flag = "--foreground" if key == "foreground" else "--debug-fuse"
            raise InvalidInput(f"-o {key} is not a FUSE option here: use {flag}")
        if key == "nonempty" and FUSE_MAJOR >= 3:
            continue  # libfuse 3 mounts over files by itself (and rejects the option)
        kwargs[key] = value
    return kwargs


def build_writeback(config: MountConfig, source: Source) -> tuple[WritebackFS, WritebackQueue]:
    """The writable layer over the read-only view of ``source``, and the queue that imports
    what is written; each part gets what it uses when it is made."""
    from blobfs.writeback.fs import WritebackFS
    from blobfs.writeback.importer import LocalImporter
    from blobfs.writeback.queue import WritebackQueue
    from blobfs.writeback.spool import Spool
    from blobfs.writeback.validate import Validator

    spool = Spool(config.effective_spool_dir())
    ttl = DEFAULT_REMOTE_TTL_S if not source.is_immutable() else float("inf")
    project = ProjectView(source, listing_ttl_s=ttl)
    importer: Importer
    if config.is_remote:
        from blobfs.sources.remote import RemoteProjectSource
        from blobfs.writeback.remote import RemoteImporter

        assert isinstance(source, RemoteProjectSource)
        importer = RemoteImporter(source.api, source.project_id)
        if not config.import_in_daemon:
            importer = _remote_importer(config, importer)
    else:
        importer = LocalImporter(config.source)
    queue = WritebackQueue(
        spool,
        importer,
        Validator(spool, project),
        delay_s=config.writeback_delay_s,
        blob_size=config.writeback_blob_size,
        batch_files=config.effective_batch_files(),
    )
    return WritebackFS(project, spool, queue, sync_close=config.sync_close), queue


def _remote_importer(config: MountConfig, inner: Importer) -> Importer:
    """``inner``, run in a worker process of its own (``inner`` when it cannot start):
    see :mod:`blobfs.writeback.import_worker`."""
    from blobfs.credentials import resolve
    from blobfs.writeback.import_worker import (
        BATCH_DEADLINE_S,
        DEADLINE_ENV,
        ImportWorker,
        WorkerImporter,
    )

    server, token = resolve(config.server, config.token_file)
    project = parse_project_id(config.source)
    deadline_s = float(os.environ.get(DEADLINE_ENV) or BATCH_DEADLINE_S)
    return WorkerImporter(
        inner, lambda: ImportWorker(server, token, config.concurrency, project, deadline_s)
    )


def run(config: MountConfig, ready_fd: int | None = None) -> None:
    """Mount and serve until unmounted; raises before mounting when the source is bad."""
    started = time.monotonic()
    # A core dump of the daemon would hold the API token (and cached image bytes).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    queue: WritebackQueue | None = None
    view: ProjectView | WritebackFS
    if config.writeback:
        view, queue = build_writeback(config, build_source(config))
    else:
        view = build(config)
    problems = view.source.problems()

    def on_ready() -> None:
        # the count is of what was found before mounting (meta.json, remote set-up); the
        # entries are judged later, and the "indexed" line (local) reports those
        logger.info(
            "mounted %s on %s in %.2f s (%d problems so far%s)",
            config.source,
            config.mountpoint,
            time.monotonic() - started,
            len(problems),
            ", writeback" if queue is not None else "",
        )
        if ready_fd is not None:
            try:
                os.write(ready_fd, READY_MESSAGE)
                os.close(ready_fd)
            except OSError:
                pass
        if queue is not None:
            queue.start()
        if view.source.is_immutable():
            threading.Thread(
                target=_index_all,
                args=(view if isinstance(view, ProjectView) else view.project,),
                name="blobfs-index",
                daemon=True,
            ).start()
        sd_notify("READY=1")

    def on_exit() -> None:
        sd_notify("STOPPING=1")
        logger.info("unmounting %s", config.mountpoint)
        if queue is not None:
            _drain(queue)

    ops = _operations(config, view, queue, on_ready, on_exit)
    kwargs = fuse_kwargs(config, view.source.is_immutable())
    if config.writeback:
        del kwargs["ro"], kwargs["kernel_cache"]  # staged and control files change
        kwargs["attr_timeout"] = kwargs["entry_timeout"] = WRITEBACK_ATTR_TIMEOUT_S
        if not config.allow_other:
            # Only the mounting user can reach this mount, and the overlay itself decides
            # what may be written. The kernel's own mode checks would cost a round trip
            # per file copied in: each create drops the folder's cached attributes, and
            # the next lookup in it fetches them again just to check them.
            del kwargs["default_permissions"]
    try:
        BlobfsFUSE(
            ops,
            config.mountpoint,
            raw_fi=False,
            readdirplus_auto=config.readdirplus == "auto",
            **kwargs,
        )
    except RuntimeError as exc:
        # libfuse 3's loop reports an exit by SIGTERM/SIGINT as an error code (mfusepy
        # raises it); after a served mount that is the normal, clean way to stop.
        if not ops.served:
            raise
        logger.debug("libfuse exited with %s after a clean unmount", exc)
    finally:
        view.source.close()
        logger.info("unmounted %s", config.mountpoint)


def _operations(
    config: MountConfig,
    view: ProjectView | WritebackFS,
    queue: WritebackQueue | None,
    on_ready: Callable[[], None],
    on_exit: Callable[[], None],
) -> BlobfsOperations:
    """The FUSE adapter for ``view``: the writable one only for a writeback mount."""
    if queue is not None:
        from blobfs.fuse.writeback_ops import WritebackOperations
        from blobfs.writeback.fs import WritebackFS

        assert isinstance(view, WritebackFS)
        view.project.refresh_timeout_s = config.timeout_s
        return WritebackOperations(
            view,
            queue,
            on_ready=on_ready,
            on_exit=on_exit,
            timeout_s=config.timeout_s,
            attr_timeout_s=WRITEBACK_ATTR_TIMEOUT_S,
        )
    assert isinstance(view, ProjectView)
    view.refresh_timeout_s = config.timeout_s
    # direct_io is set per open: it needs the open round trips no-open mode removes
    no_open = "direct_io" not in config.fuse_options
    return BlobfsOperations(
        view, on_ready=on_ready, on_exit=on_exit, no_open=no_open, timeout_s=config.timeout_s
    )


def _drain(queue: WritebackQueue) -> None:
    """Import what is pending before exiting; failures stay in the spool for the next mount."""
    status = queue.status
    logger.info("writeback: importing %d pending files before exit", status.pending)
    ok = queue.stop(drain=True)
    close = getattr(queue.importer, "close", None)
    if callable(close):  # an import worker: killed at unmount
        close()
    queue.spool.close()  # a clean exit leaves no journal to replay
    logger.info(
        "writeback: %d files imported in %d batches; %d pending, %d failed%s",
        status.imported,
        status.batches_done,
        status.pending,
        len(status.failed),
        "" if ok else " (kept in the spool for the next mount)",
    )


def _index_all(view: ProjectView) -> None:
    """Index every folder once after mounting, so bad entries are logged now.

    The mount is ready before this runs (folders are lazy); it fills one folder at a time
    under that folder's own lock and waits while a request is filling one, so it never
    delays a ``stat`` or ``ls``. It also leaves the index cache warm for the next mount.
    """
    started = time.monotonic()
    try:
        source = view.source
        worker = None
        if isinstance(source, LocalProjectSource):
            # the indexes are built in a process of their own, off this interpreter, from
            # the moment of the mount; the preload then loads them from the index cache
            keys = [ds.key for ds in source.datasets() if isinstance(ds.key, str)]
            worker = source.start_index_worker(keys)  # a walk's order: by name
            if worker is not None:
                worker.wait()
        if worker is None:
            time.sleep(max(0.0, INDEX_START_DELAY_S - (time.monotonic() - started)))
        folders, files = view.preload()
    except Exception:  # a failure here must not take the mount down
        logger.exception("indexing the project failed")
        return
    problems = view.source.problems()
    logger.info(
        "indexed %d files in %d folders in %.2f s; %d entries not served%s",
        files,
        folders,
        time.monotonic() - started,
        len(problems),
        " (blobfs check PROJECT lists them)" if problems else "",
    )
