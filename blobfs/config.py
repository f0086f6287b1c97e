"""Mount configuration: one frozen record built from CLI flags, ``-o`` options or fstab.

Sizes accept suffixes (``512M``, ``1G``) so fstab options such as ``cache_size=1G`` work.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from blobfs.deadline import DEFAULT_TIMEOUT_S
from blobfs.errors import InvalidInput

DEFAULT_LOCAL_BLOCK_SIZE = 256 << 10
DEFAULT_REMOTE_BLOCK_SIZE = 1 << 20
DEFAULT_CACHE_BYTES = 256 << 20
#: Locally the kernel's page cache already holds the tar; a small block cache suffices.
DEFAULT_LOCAL_CACHE_BYTES = 32 << 20
DEFAULT_ATTR_TIMEOUT_S = 3600.0
DEFAULT_REMOTE_TTL_S = 60.0
#: Staged files of a dataset that seal a writeback batch while writes go on (0: never by
#: count; an annotation with its image counts as two). A long copy is then imported while
#: it goes on and the flush at its end imports only the rest; the import runs in a worker
#: process, so it takes the daemon's interpreter lock from the copy's requests for little
#: more than the batch's seal and unstaging. Large, so that each batch's blob, upload and
#: registration are paid for many files, and a copy smaller than this stays one batch.
#: Remote mounts only: a local import runs in the daemon, and competes with the copy.
DEFAULT_BATCH_FILES = 30_000
#: The same for a local project folder: off.
DEFAULT_LOCAL_BATCH_FILES = 0

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``"1G"`` -> 1073741824; plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text.upper())
    if not match:
        raise InvalidInput(f"not a size: {text!r} (use e.g. 4096, 512M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2)]


#: ``--readdirplus`` values. ``always``: the kernel asks for attributes with every listing
#: page, so a reader that lists a folder and then stats or opens each file (``ls -l``,
#: ``du``, ``cp -r``, a data loader) needs no lookup per file. ``auto``: only with the
#: first page and after lookups in the folder (the kernel's own rule), so pages of a
#: listing that nothing stats carry names only and are several times smaller.
READDIRPLUS_MODES = ("always", "auto")


@dataclass(frozen=True)
class MountConfig:
    """Everything a mount needs; no secrets (the token is resolved by the daemon)."""

    source: str
    mountpoint: str
    block_size: int | None = None
    cache_bytes: int | None = None
    attr_timeout_s: float | None = None
    allow_other: bool = False
    debug_fuse: bool = False
    fuse_options: dict[str, str | bool] = field(default_factory=dict)
    server: str | None = None
    token_file: str | None = None
    cache_dir: str | None = None
    disk_cache_bytes: int = 0
    writeback: bool = False
    spool_dir: str | None = None
    writeback_delay_s: float = 5.0
    writeback_blob_size: int = 256 << 20
    #: ``--batch-files``; None: the source's default (see :meth:`effective_batch_files`).
    writeback_batch_files: int | None = None
    #: Deadline of every FUSE operation, retries included (``--timeout``, ``-o timeout=``).
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: Remote writeback: batches import in the daemon, not in a worker process
    #: (``--import-in-daemon``; see ``blobfs.writeback.import_worker``).
    import_in_daemon: bool = False
    #: Remote: warm the whole project in the background (``--prefetch``).
    prefetch: bool = False
    #: Remote: requests one listing, annotation walk or prefetch keeps in flight.
    concurrency: int = 16
    #: Every ``close()`` of a written file is durable (survives a power cut), not only
    #: ``fsync()``: the behaviour of ``-o sync`` on a local file system.
    sync_close: bool = False
    #: When the kernel asks for file attributes with a listing (``--readdirplus``):
    #: ``always`` (every page) or ``auto`` (the kernel's choice), see :data:`READDIRPLUS_MODES`.
    readdirplus: str = "always"

    @property
    def is_remote(self) -> bool:
        return self.source.startswith("sly://")

    def effective_batch_files(self) -> int:
        """Staged files of a dataset that seal a batch while writes go on (0: never)."""
        if self.writeback_batch_files is not None:
            return self.writeback_batch_files
        return DEFAULT_BATCH_FILES if self.is_remote else DEFAULT_LOCAL_BATCH_FILES

    def effective_spool_dir(self) -> str:
        """The spool for this source: one per source, so a remount finds its pending work."""
        if self.spool_dir:
            return self.spool_dir
        digest = hashlib.sha256(self.source.encode()).hexdigest()[:16]
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(base, "blobfs", "spool", digest)

    def effective_cache_bytes(self) -> int:
        if self.cache_bytes is not None:
            return self.cache_bytes
        return DEFAULT_CACHE_BYTES if self.is_remote else DEFAULT_LOCAL_CACHE_BYTES

    def effective_block_size(self) -> int:
        if self.block_size:
            return self.block_size
        return DEFAULT_REMOTE_BLOCK_SIZE if self.is_remote else DEFAULT_LOCAL_BLOCK_SIZE


def parse_fuse_options(items: tuple[str, ...]) -> dict[str, str | bool]:
    """``("ro,allow_other", "attr_timeout=5")`` -> ``{"ro": True, "allow_other": True, ...}``."""
    out: dict[str, str | bool] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            out[key.strip()] = value.strip() if sep else True
    return out
