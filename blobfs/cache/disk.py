"""A persistent second tier for the block cache (``--cache-dir``), so a later mount of the
same project reads nothing twice.

One file per block, named by a hash of ``(blob key, version, block number)``: a blob with a
new version never finds old blocks (they age out). Files are written to a temp name and
renamed, so a crash leaves whole blocks or nothing. The folder is created 0700: cached
image bytes are as private as the mount.

Each file starts with a small header: a magic, the payload length and a BLAKE2b digest of
the block's key and bytes. The file system under the cache is not trusted to keep bytes
(a bit flip, a tool or a person rewriting a file with the same length), and a name can be
reached by a copied or renamed file: a block is served only when its digest matches its
own key and bytes. Anything else is deleted, counted (``corrupt_blocks``) and treated as
missing, so the caller fetches the block again. Only the first such block is logged at
WARNING; the total is logged when the cache closes and is in ``blobfs stats``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

MAGIC = b"BLOBFSB1"
DIGEST_SIZE = 16
#: magic, payload length (little-endian u64), digest of key + payload
HEADER = struct.Struct(f"<8sQ{DIGEST_SIZE}s")


def _digest(key: tuple[str, str, int], data: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"blobfs-block")
    h.update(repr(key).encode())
    h.update(data)
    return h.digest()


class DiskBlockStore:
    """Blocks on disk within ``max_bytes``; least recently used files are deleted first."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        #: Blocks found damaged (bad header, length or digest) and dropped.
        self.corrupt_blocks = 0
        # INVARIANT: _sizes holds every block file under folder, _used their total size.
        self._sizes: dict[Path, int] = {}
        self._used = 0
        for path in sorted(self.folder.glob("*/*.blk"), key=lambda p: p.stat().st_atime_ns):
            size = path.stat().st_size
            self._sizes[path] = size
            self._used += size

    @property
    def used_bytes(self) -> int:
        return self._used

    def _path(self, key: tuple[str, str, int]) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.blk"

    def get(self, key: tuple[str, str, int], expected_size: int) -> bytes | None:
        """The block, or None when absent or damaged (a damaged file is removed)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        problem = self._problem(key, raw, expected_size)
        if problem is not None:
            self._drop_corrupt(path, problem)
            return None
        with self._lock:
            if path in self._sizes:  # move to the recent end of the LRU order
                self._sizes[path] = self._sizes.pop(path)
        return raw[HEADER.size :]

    @staticmethod
    def _problem(key: tuple[str, str, int], raw: bytes, expected_size: int) -> str | None:
        """Why ``raw`` is not a sound copy of block ``key``, or None."""
        if len(raw) < HEADER.size:
            return f"{len(raw)} bytes, shorter than its header"
        magic, length, digest = HEADER.unpack_from(raw)
        if magic != MAGIC:
            return "no block header (written by another version, or overwritten)"
        if length != len(raw) - HEADER.size or length != expected_size:
            return f"{len(raw) - HEADER.size} bytes, expected {expected_size}"
        if digest != _digest(key, memoryview(raw)[HEADER.size :]):
            return "checksum mismatch"
        return None

    def _drop_corrupt(self, path: Path, problem: str) -> None:
        with self._lock:
            self.corrupt_blocks += 1
            first = self.corrupt_blocks == 1
            self._used -= self._sizes.pop(path, 0)
        path.unlink(missing_ok=True)
        if first:
            logger.warning(
                "disk cache block %s: %s: removed and fetched again (further damaged blocks "
                "are counted in blobfs stats as disk_corrupt)",
                path.name,
                problem,
            )

    def put(self, key: tuple[str, str, int], data: bytes) -> None:
        """Store a block; errors (disk full) are logged and the block is just not kept."""
        if len(data) + HEADER.size > self.max_bytes:
            return
        path = self._path(key)
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        size = HEADER.size + len(data)
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(data), _digest(key, data)))
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("disk cache: cannot store a block: %s", exc.strerror)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._used += size - self._sizes.pop(path, 0)
            self._sizes[path] = size
            while self._used > self.max_bytes and self._sizes:
                victim = next(iter(self._sizes))
                self._used -= self._sizes.pop(victim)
                victim.unlink(missing_ok=True)

    def close(self) -> None:
        """Say how many damaged blocks were refetched during this mount, if any."""
        if self.corrupt_blocks:
            logger.warning(
                "disk cache: %d damaged blocks were removed and fetched again",
                self.corrupt_blocks,
            )
