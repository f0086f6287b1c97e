"""State of the emulated Supervisely instance: SQLite records plus files on disk.

Records are JSON documents in one table per kind (``teams``, ``projects``, ``images``...),
so a restart on the same state folder keeps everything and tests can inspect what an
import really stored. File bytes (Team Files, uploaded images) live as plain files and are
served by ranges, never loaded whole.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import shutil
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("teams", "workspaces", "projects", "datasets", "files", "images", "anns")


class ApiError(Exception):
    """An error answer: HTTP status plus a JSON body like the real server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def image_dims(head: bytes) -> tuple[int | None, int | None]:
    """(width, height) from the first bytes of a PNG or JPEG; (None, None) otherwise."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            length = struct.unpack(">H", head[i + 2 : i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[i + 5 : i + 9])
                return width, height
            i += 2 + length
    return None, None


def mime_of(name: str) -> str:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return {
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "png": "image/png",
        "bmp": "image/bmp",
        "webp": "image/webp",
        "gif": "image/gif",
        "tif": "image/tiff",
        "tiff": "image/tiff",
    }.get(ext, "application/octet-stream")


def sly_hash(path: str | Path) -> str:
    """The SDK's image hash: base64 of SHA-256 of the bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


class Store:
    """All records and files of one emulated instance (thread-safe)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "images").mkdir(exist_ok=True)
        (self.root / "uploads").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "state.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        for kind in KINDS:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} "
                "(id INTEGER PRIMARY KEY, parent INTEGER, doc TEXT NOT NULL)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {kind}_parent ON {kind}(parent)")
        if not self.all("teams"):
            team = self.insert("teams", None, {"name": "team", "description": "", "role": "admin"})
            self.insert(
                "workspaces",
                team["id"],
                {"name": "workspace", "description": "", "teamId": team["id"]},
            )

    # ---- generic records -------------------------------------------------------------

    def insert(self, kind: str, parent: int | None, doc: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            stamp = now_iso()
            doc = {"createdAt": stamp, "updatedAt": stamp, **doc}
            cur = self._db.execute(
                f"INSERT INTO {kind} (parent, doc) VALUES (?, ?)", (parent, json.dumps(doc))
            )
            doc["id"] = cur.lastrowid
            self._db.execute(
                f"UPDATE {kind} SET doc = ? WHERE id = ?", (json.dumps(doc), doc["id"])
            )
            return doc

    def insert_many(
        self, kind: str, parent: int | None, docs: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                out = [self.insert(kind, parent, d) for d in docs]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return out

    def update(self, kind: str, doc: dict[str, Any]) -> None:
        with self._lock:
            doc["updatedAt"] = now_iso()
            self._db.execute(
                f"UPDATE {kind} SET doc = ? WHERE id = ?", (json.dumps(doc), doc["id"])
            )

    def get(self, kind: str, ident: Any) -> dict[str, Any]:
        if not isinstance(ident, int) or isinstance(ident, bool):
            raise ApiError(400, f"{kind}: id must be an integer")
        with self._lock:
            row = self._db.execute(f"SELECT doc FROM {kind} WHERE id = ?", (ident,)).fetchone()
        if row is None:
            raise ApiError(404, f"{kind} {ident} not found")
        doc: dict[str, Any] = json.loads(row[0])
        return doc

    def find(self, kind: str, ident: int) -> dict[str, Any] | None:
        try:
            return self.get(kind, ident)
        except ApiError:
            return None

    def all(self, kind: str, parent: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if parent is None:
                rows = self._db.execute(f"SELECT doc FROM {kind} ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT doc FROM {kind} WHERE parent = ? ORDER BY id", (parent,)
                ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count(self, kind: str, parent: int) -> int:
        with self._lock:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM {kind} WHERE parent = ?", (parent,)
            ).fetchone()
        return int(row[0])

    def page(self, kind: str, parent: int, offset: int, limit: int) -> list[dict[str, Any]]:
        """One page of children in id order, read by SQL (large datasets list fast)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT doc FROM {kind} WHERE parent = ? ORDER BY id LIMIT ? OFFSET ?",
                (parent, limit, offset),
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete(self, kind: str, ident: int) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {kind} WHERE id = ?", (ident,))

    # ---- files -----------------------------------------------------------------------

    def file_path(self, file_id: int) -> Path:
        return self.root / "files" / str(file_id)

    def image_path(self, digest: str) -> Path:
        return self.root / "images" / hashlib.sha1(digest.encode()).hexdigest()

    def add_team_file(self, team_id: int, remote_path: str, src: Path) -> dict[str, Any]:
        """Move ``src`` into Team Files at ``remote_path`` (replacing a file of that path)."""
        remote_path = "/" + remote_path.lstrip("/")
        for old in self.all("files", team_id):
            if old["path"] == remote_path:
                self.delete("files", old["id"])
                self.file_path(old["id"]).unlink(missing_ok=True)
        size = src.stat().st_size
        name = os.path.basename(remote_path)
        doc = self.insert(
            "files",
            team_id,
            {
                "teamId": team_id,
                "userId": 1,
                "name": name,
                "path": remote_path,
                "hash": sly_hash(src),
                "mime": mime_of(name),
                "ext": os.path.splitext(name)[1].lstrip("."),
                "size": size,
                "storagePath": f"/teams_storage/{team_id}{remote_path}",
                "isDir": False,
            },
        )
        doc["fullStorageUrl"] = doc["storagePath"]
        shutil.move(str(src), self.file_path(doc["id"]))
        self.update("files", doc)
        return doc

    def new_upload_path(self) -> Path:
        return self.root / "uploads" / f"{os.getpid()}-{threading.get_ident()}-{time.time_ns()}"


Part = tuple[str, str | None, "str | Path"]
"""(field name, file name or None, text value or path of the saved file)."""


def _boundary(content_type: str) -> bytes:
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode()
    raise ApiError(400, "multipart body without boundary")


def _disposition(headers: str) -> tuple[str, str | None]:
    name, filename = "", None
    for line in headers.split("\r\n"):
        if line.lower().startswith("content-disposition"):
            for item in line.split(";")[1:]:
                key, _, value = item.strip().partition("=")
                if key == "name":
                    name = value.strip('"')
                elif key == "filename":
                    filename = value.strip('"')
    return name, filename


def parse_multipart(body_path: Path, content_type: str, store: Store) -> list[Part]:
    """Split a multipart body saved at ``body_path`` into its parts, in order.

    File parts are copied out of the body through ``mmap`` in chunks, so a large upload never
    sits in memory whole.
    """
    delim = b"--" + _boundary(content_type)
    parts: list[Part] = []
    if body_path.stat().st_size == 0:
        return parts
    with open(body_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = mm.find(delim)
        while pos >= 0 and mm[pos + len(delim) : pos + len(delim) + 2] != b"--":
            head_end = mm.find(b"\r\n\r\n", pos)
            nxt = mm.find(b"\r\n" + delim, head_end)
            if head_end < 0 or nxt < 0:
                raise ApiError(400, "truncated multipart body")
            name, filename = _disposition(mm[pos:head_end].decode("utf-8", "replace"))
            if filename is None:
                parts.append((name, None, mm[head_end + 4 : nxt].decode("utf-8", "replace")))
            else:
                out = store.new_upload_path()
                with open(out, "wb") as dst:
                    for i in range(head_end + 4, nxt, 1 << 20):
                        dst.write(mm[i : min(i + (1 << 20), nxt)])
                parts.append((name, filename, out))
            pos = nxt + 2
    return parts
