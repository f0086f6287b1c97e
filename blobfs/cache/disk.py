"""A persistent second tier for the block cache (``--cache-dir``), so a later mount of the
same project reads nothing twice.

One file per block, named by a hash of ``(blob key, version, block number)``: a blob with a
new version never finds old blocks (they age out). Files are written to a temp name and
renamed, so a crash leaves whole blocks or nothing; a block whose length is not what the
caller expects is treated as missing. The folder is created 0700: cached image bytes are
as private as the mount.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)


class DiskBlockStore:
    """Blocks on disk within ``max_bytes``; least recently used files are deleted first."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
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
        """The block, or None when absent or not of the expected length."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) != expected_size:
            logger.info(
                "disk cache block %s has %d bytes, expected %d: ignored",
                path.name,
                len(data),
                expected_size,
            )
            return None
        with self._lock:
            if path in self._sizes:  # move to the recent end of the LRU order
                self._sizes[path] = self._sizes.pop(path)
        return data

    def put(self, key: tuple[str, str, int], data: bytes) -> None:
        """Store a block; errors (disk full) are logged and the block is just not kept."""
        if len(data) > self.max_bytes:
            return
        path = self._path(key)
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("disk cache: cannot store a block: %s", exc.strerror)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._used += len(data) - self._sizes.pop(path, 0)
            self._sizes[path] = len(data)
            while self._used > self.max_bytes and self._sizes:
                victim = next(iter(self._sizes))
                self._used -= self._sizes.pop(victim)
                victim.unlink(missing_ok=True)
