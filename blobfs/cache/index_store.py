"""Index files kept between mounts, so a remount of an unchanged project parses no pickles.

One file per dataset folder (its name is a hash of the folder's path), holding a *key* that
says which input it was built from (for a local project: the device, inode, size and mtime
of every offsets file and tar it read, and a digest of the code that decided its entries)
and the payload. A file is used only when its key equals the key of the input now, and its
checksum matches: anything else (another project at that path, a changed tar, a torn write,
a flipped bit, a file that is not ours) is a miss, and the index is built again.

A file blobfs wrote carries, in place of that checksum, a MAC of everything before it,
keyed by a random secret kept in the folder (file ``key``, ``0600``): a file whose MAC
holds was written by blobfs from names it had already checked, so
:meth:`IndexStore.load_checked` says it may be trusted and its reader skips the pass over
every name (the structural checks that keep every read inside its buffers still run). A
file without a MAC is only as good as its checksum: it is loaded untrusted and its reader
checks all of it. A MAC that fails, or one this store has no secret for, is a miss. A
missing, short or unsafe secret is replaced by a new one, which simply turns the files of
the old one into misses.

Where: ``<--cache-dir>/index`` when a persistent block cache is configured, else
``$XDG_CACHE_HOME/blobfs/index`` (``~/.cache/blobfs/index``). The folder is created
``0700`` and used only when it belongs to this user and nobody else can write to it; files
are written ``0600`` through a temp file and a rename, and opened without following
symlinks. A file unused for :data:`MAX_AGE_S` is deleted when a store opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import stat
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

MAGIC = b"BLOBFSIX"
SUFFIX = ".idx"
#: Files not used for this long are deleted (a project removed long ago).
MAX_AGE_S = 30 * 24 * 3600.0
#: A cache file larger than this is not read (a dataset of 10M entries is ~400 MB).
MAX_FILE_BYTES = 4 << 30
_HEAD = struct.Struct("<8sQQQ")  # magic, key length, payload length, MAC length
_DIGEST = 32
#: the secret's file in the folder, and its size
SECRET_NAME = "key"
SECRET_BYTES = 32


def default_index_dir(cache_dir: str | None = None) -> Path | None:
    """Where index files live: under ``cache_dir``, or the user's XDG cache folder."""
    if cache_dir:
        return Path(cache_dir) / "index"
    base = os.environ.get("XDG_CACHE_HOME")
    if base and os.path.isabs(base):
        return Path(base) / "blobfs" / "index"
    try:
        return Path.home() / ".cache" / "blobfs" / "index"
    except (RuntimeError, KeyError):
        return None


class IndexStore:
    """Payloads by (name, key) in one private folder; a failing store is just a miss.

    Args:
        folder: where the files live (created ``0700`` when missing).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._secret: bytes | None = None
        self.usable = self._prepare()
        self.hits = 0
        self.misses = 0
        self.saves = 0

    def _prepare(self) -> bool:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.folder)
        except OSError as exc:
            logger.warning(
                "index cache %s unusable (%s); indexes are rebuilt at each mount",
                self.folder,
                exc.strerror,
            )
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            logger.warning(
                "index cache %s is not a private folder of this user; not used", self.folder
            )
            return False
        self._prune()
        self._secret = _secret_in(self.folder)
        return True

    def _path(self, name: str) -> Path:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]
        return self.folder / f"{digest}{SUFFIX}"

    def load(self, name: str, key: bytes) -> bytes | None:
        """The payload saved for ``name`` with exactly ``key``, or None."""
        loaded = self.load_checked(name, key)
        return None if loaded is None else loaded[0]

    def load_checked(self, name: str, key: bytes) -> tuple[bytes, bool] | None:
        """(payload, trusted) saved for ``name`` with exactly ``key``, or None; trusted
        when the file's MAC holds under this folder's secret (blobfs wrote it)."""
        if not self.usable:
            return None
        data = self._read(self._path(name))
        loaded = None if data is None else _unwrap(data, key, self._secret)
        if loaded is None:
            self.misses += 1
        else:
            self.hits += 1
        return loaded

    def _read(self, path: Path) -> bytes | None:
        return _read_file(path, _cache_file_ok, touch=True)

    def save(self, name: str, key: bytes, payload: bytes) -> None:
        """Keep ``payload`` for ``name`` under ``key``; failures are logged, never raised."""
        if not self.usable:
            return
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                secret = self._secret
                head = _HEAD.pack(MAGIC, len(key), len(payload), 0 if secret is None else _DIGEST)
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(head)
                    f.write(key)
                    f.write(payload)
                    # the MAC stands for the checksum too: one pass over the payload
                    if secret is None:
                        f.write(_digest(key, payload))
                    else:
                        f.write(_mac(secret, (head, key, payload)))
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self.saves += 1
        except OSError as exc:
            logger.warning("index cache: cannot save %s: %s", path, exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def forget(self, name: str) -> None:
        """Delete the file of ``name`` (found damaged after it was loaded)."""
        if self.usable:
            with contextlib.suppress(OSError):
                os.unlink(self._path(name))

    def _prune(self) -> None:
        cutoff = time.time() - MAX_AGE_S
        try:
            with os.scandir(self.folder) as it:
                for entry in it:
                    if not entry.name.endswith((SUFFIX, ".tmp")):
                        continue
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                    except OSError:
                        pass
        except OSError:
            pass

    def stats(self) -> dict[str, object]:
        return {
            "folder": str(self.folder) if self.usable else None,
            "hits": self.hits,
            "misses": self.misses,
            "saves": self.saves,
        }


def _digest(key: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST)
    h.update(key)
    h.update(payload)
    return h.digest()


def _mac(secret: bytes, parts: tuple[bytes | memoryview, ...]) -> bytes:
    """An HMAC of ``parts`` (everything of a file before its MAC) under ``secret``."""
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


def _unwrap(data: bytes, key: bytes, secret: bytes | None) -> tuple[bytes, bool] | None:
    """(payload, trusted) of a file's bytes when its key is ``key`` and either its MAC
    holds under ``secret`` (trusted) or it has no MAC and its checksum holds (not
    trusted)."""
    if len(data) < _HEAD.size + _DIGEST:
        return None
    magic, key_len, payload_len, mac_len = _HEAD.unpack_from(data)
    if magic != MAGIC or mac_len not in (0, _DIGEST):
        return None
    if _HEAD.size + key_len + payload_len + _DIGEST != len(data):
        return None
    at = _HEAD.size
    if data[at : at + key_len] != key:
        return None
    payload = data[at + key_len : at + key_len + payload_len]
    end = len(data) - _DIGEST
    if mac_len:
        # a MAC that fails is damage, or a file of an older secret: a miss either way
        if secret is None or not hmac.compare_digest(
            data[end:], _mac(secret, (memoryview(data)[:end],))
        ):
            return None
        return payload, True
    if data[end:] != _digest(key, payload):
        return None
    return payload, False


def _secret_in(folder: Path) -> bytes | None:
    """The folder's secret, made anew when missing, short or not safe to use; None when
    none can be read or made (files are then written without a MAC, never trusted)."""
    path = folder / SECRET_NAME
    for _ in range(3):
        secret = _read_secret(path)
        if secret is not None:
            return secret
        with contextlib.suppress(OSError):
            os.unlink(path)  # not a usable secret: whatever it is goes
        tmp = folder / f".{SECRET_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                # no fsync: a key torn by a crash is short, and simply replaced
                os.write(fd, os.urandom(SECRET_BYTES))
            finally:
                os.close(fd)
            # a link, not a rename: a secret another process made meanwhile is kept
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        except OSError as exc:
            logger.warning("index cache: cannot make its key (%s); files are not trusted", exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return None


def _read_secret(path: Path) -> bytes | None:
    """The secret in ``path`` when it is this user's private regular file of the right size."""
    secret = _read_file(path, _secret_file_ok, touch=False)
    return secret if secret is not None and len(secret) == SECRET_BYTES else None


def _cache_file_ok(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_size <= MAX_FILE_BYTES


def _secret_file_ok(st: os.stat_result) -> bool:
    private = st.st_uid == os.geteuid() and not st.st_mode & 0o077
    return stat.S_ISREG(st.st_mode) and private and st.st_size == SECRET_BYTES


def _read_file(path: Path, ok: Callable[[os.stat_result], bool], touch: bool) -> bytes | None:
    """The bytes of ``path``, opened without following a symlink, when ``ok`` accepts what
    it is; ``touch`` marks it recently used (kept by the pruning)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not ok(st):
            return None
        chunks = []
        left = st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 64 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if touch:
            with_time = time.time()
            os.utime(fd, (with_time, with_time))
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
