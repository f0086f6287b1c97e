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
import logging
import os
import re
import shutil
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: ``figures`` and ``imagetags`` are labels and image tags added one by one (the SDK's
#: ``upload_anns_async``, behind ``quick_import``), children of their image.
KINDS = (
    "teams",
    "workspaces",
    "projects",
    "datasets",
    "files",
    "images",
    "anns",
    "figures",
    "imagetags",
)
#: Rows per ``IN (...)`` list: well under SQLite's bound-parameter limit.
SQL_BATCH = 500
COPY_CHUNK = 1 << 20


class ApiError(Exception):
    """An error answer: HTTP status plus a JSON body like the real server's.

    ``details`` is merged into the body's ``details`` object, so handlers can give the
    machine-readable fields the SDK reads (``type: NONUNIQUE`` and ``errors`` on a name
    conflict in ``images.bulk.add``).
    """

    def __init__(self, status: int, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.details = details or {}

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "details": {"message": str(self), **self.details}}


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _json_key(name: str) -> str:
    """``name`` as one key of a SQLite JSON path (a field a list call asked for)."""
    if not isinstance(name, str) or not _FIELD.fullmatch(name):
        raise ApiError(400, f"fields: {name!r} is not a field name")
    return f'"{name}"'


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _jpeg_dims(head: bytes) -> tuple[int | None, int | None]:
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            i += 1
            continue
        marker = head[i + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD9 or marker == 0x01:  # fill byte, RSTn, SOI
            i += 1 if marker == 0xFF else 2
            continue
        length = struct.unpack(">H", head[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", head[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None, None


def image_dims(head: bytes) -> tuple[int | None, int | None]:
    """(width, height) from the first bytes of a PNG or JPEG; (None, None) otherwise.

    The real server decodes every image; the emulator has no Pillow, and PNG/JPEG headers
    are enough for the SDK's ``ImageInfo.width/height`` in the flows it is tested with.
    """
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head[:2] == b"\xff\xd8":
        return _jpeg_dims(head)
    return None, None


MIME_BY_EXT = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "mpo": "image/jpeg",
    "png": "image/png",
    "bmp": "image/bmp",
    "webp": "image/webp",
    "gif": "image/gif",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "tar": "application/x-tar",
    "json": "application/json",
    "pkl": "application/octet-stream",
}


def mime_of(name: str) -> str:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return MIME_BY_EXT.get(ext, "application/octet-stream")


def sly_hash(path: str | Path) -> str:
    """The SDK's hash (``sly.fs.get_file_hash``): base64 of the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


class Store:
    """All records and files of one emulated instance.

    One SQLite connection behind a re-entrant lock: requests are short, and a single
    writer keeps WAL simple. ``transaction()`` groups a bulk call into one commit (one
    fsync for a 1000-image ``images.bulk.add`` instead of thousands).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for sub in ("files", "images", "uploads"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._clear_uploads()
        self._lock = threading.RLock()
        self._depth = 0
        self._db = sqlite3.connect(
            self.root / "state.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for kind in KINDS:
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {kind} "
                "(id INTEGER PRIMARY KEY, parent INTEGER, doc TEXT NOT NULL)"
            )
            self._db.execute(f"CREATE INDEX IF NOT EXISTS {kind}_parent ON {kind}(parent)")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS images_name ON images(parent, json_extract(doc, '$.name'))"
        )
        if not self.all("teams"):
            self._seed()

    def _seed(self) -> None:
        """A fresh instance: one team and one workspace, like a new Supervisely account."""
        team = self.insert(
            "teams", None, {"name": "team", "description": "", "role": "admin", "usage": None}
        )
        self.insert(
            "workspaces", team["id"], {"name": "workspace", "description": "", "teamId": team["id"]}
        )

    def _clear_uploads(self) -> None:
        """Partial uploads left by a killed emulator are garbage: nothing refers to them."""
        for leftover in (self.root / "uploads").iterdir():
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together (or not at all); nests."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0

    # ---- generic records -------------------------------------------------------------

    def insert(self, kind: str, parent: int | None, doc: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            stamp = now_iso()
            doc = {"createdAt": stamp, "updatedAt": stamp, **doc}
            sql = f"INSERT INTO {kind} (parent, doc) VALUES (?, ?)"
            cur = self._db.execute(sql, (parent, "{}"))
            doc["id"] = cur.lastrowid
            self._write_doc(kind, doc)
            return doc

    def _write_doc(self, kind: str, doc: dict[str, Any]) -> None:
        self._db.execute(f"UPDATE {kind} SET doc = ? WHERE id = ?", (json.dumps(doc), doc["id"]))

    def insert_many(
        self, kind: str, parent: int | None, docs: Iterable[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        with self.transaction():
            return [self.insert(kind, parent, d) for d in docs]

    def update(self, kind: str, doc: dict[str, Any], touch: bool = True) -> None:
        with self._lock:
            if touch:
                doc["updatedAt"] = now_iso()
            self._write_doc(kind, doc)

    def get(self, kind: str, ident: Any) -> dict[str, Any]:
        if not isinstance(ident, int) or isinstance(ident, bool):
            raise ApiError(400, f"{kind}: id must be an integer")
        with self._lock:
            row = self._db.execute(f"SELECT doc FROM {kind} WHERE id = ?", (ident,)).fetchone()
        if row is None:
            raise ApiError(404, f"{kind} {ident} not found")
        doc: dict[str, Any] = json.loads(row[0])
        return doc

    def get_many(self, kind: str, ids: Iterable[int]) -> list[dict[str, Any]]:
        """The records among ``ids`` that exist, in id order."""
        wanted = sorted({i for i in ids if isinstance(i, int) and not isinstance(i, bool)})
        return [json.loads(r[0]) for r in self._select_in(f"SELECT doc FROM {kind}", "id", wanted)]

    def _select_in(self, select: str, column: str, values: list[int]) -> list[tuple[Any, ...]]:
        """``select ... WHERE column IN (values) ORDER BY id``, in SQLite-sized batches."""
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(values), SQL_BATCH):
            part = values[i : i + SQL_BATCH]
            marks = ",".join("?" * len(part))
            with self._lock:
                rows.extend(
                    self._db.execute(
                        f"{select} WHERE {column} IN ({marks}) ORDER BY id", part
                    ).fetchall()
                )
        return rows

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

    def page_json(
        self, kind: str, parent: int, offset: int, limit: int, fields: Sequence[str] | None
    ) -> list[str]:
        """One page of children in id order as JSON text, cut to ``fields`` when given.

        The documents are not decoded: a listing page of a large dataset is served by
        SQLite alone (the projection is ``json_object`` in SQL), so the emulator's share
        of a remote ``ls`` stays small next to the client's.
        """
        params: tuple[str, ...] = ()
        if fields is None:
            column = "doc"
        else:
            pairs = ", ".join("?, json_extract(doc, ?)" for _ in fields)
            column = f"json_object({pairs})"
            params = tuple(v for f in fields for v in (f, f"$.{_json_key(f)}"))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {column} FROM {kind} WHERE parent = ? ORDER BY id LIMIT ? OFFSET ?",
                (*params, parent, limit, offset),
            ).fetchall()
        return [r[0] for r in rows]

    def fields_in(
        self, kind: str, column: str, values: Iterable[int], fields: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        """``(id, parent, *fields)`` of the records whose ``column`` (``id`` or ``parent``)
        is among ``values``, in id order; an object or list field comes as JSON text.

        Nothing is decoded in Python: the annotation answers of a large dataset are
        served from SQLite's own JSON functions (see ``_images.annotations_bulk_info``).
        """
        assert column in ("id", "parent")
        wanted = sorted({v for v in values if isinstance(v, int) and not isinstance(v, bool)})
        picks = "".join(f", json_extract(doc, '$.{_json_key(f)}')" for f in fields)
        return self._select_in(f"SELECT id, parent{picks} FROM {kind}", column, wanted)

    def children_of(self, kind: str, parents: Iterable[int]) -> dict[int, list[dict[str, Any]]]:
        """parent id -> its records (id order), for many parents in a few queries."""
        wanted = sorted(set(parents))
        out: dict[int, list[dict[str, Any]]] = {p: [] for p in wanted}
        for parent, doc in self._select_in(f"SELECT parent, doc FROM {kind}", "parent", wanted):
            out[int(parent)].append(json.loads(doc))
        return out

    def delete(self, kind: str, ident: int) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {kind} WHERE id = ?", (ident,))

    def delete_children(self, kind: str, parent: int) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {kind} WHERE parent = ?", (parent,))

    def image_ids_by_name(self, dataset_id: int, names: Iterable[str]) -> dict[str, int]:
        """name -> id of the images of ``dataset_id`` among ``names`` (one indexed query per
        batch, so a 1000-image bulk add does not read the whole dataset)."""
        wanted = list(dict.fromkeys(names))
        out: dict[str, int] = {}
        for i in range(0, len(wanted), SQL_BATCH):
            part = wanted[i : i + SQL_BATCH]
            marks = ",".join("?" * len(part))
            with self._lock:
                rows = self._db.execute(
                    "SELECT json_extract(doc, '$.name'), id FROM images "
                    f"WHERE parent = ? AND json_extract(doc, '$.name') IN ({marks})",
                    (dataset_id, *part),
                ).fetchall()
            out.update({str(name): int(ident) for name, ident in rows})
        return out

    def project_totals(self, project_id: int) -> tuple[int, int]:
        """(image count, total image bytes) of a project, summed in SQL."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(json_extract(doc, '$.size')), 0) FROM images "
                "WHERE parent IN (SELECT id FROM datasets WHERE parent = ?)",
                (project_id,),
            ).fetchone()
        return int(row[0]), int(row[1])

    # ---- files -----------------------------------------------------------------------

    def file_path(self, file_id: int) -> Path:
        return self.root / "files" / str(file_id)

    def image_path(self, digest: str) -> Path:
        return self.root / "images" / hashlib.sha1(digest.encode()).hexdigest()

    def team_file_by_path(self, team_id: int, remote_path: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT doc FROM files WHERE parent = ? AND json_extract(doc, '$.path') = ?",
                (team_id, remote_path),
            ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def add_team_file(self, team_id: int, remote_path: str, src: Path) -> dict[str, Any]:
        """Move ``src`` into Team Files at ``remote_path``.

        A file already at that path is overwritten in place: same id, new bytes, hash, size
        and ``updatedAt``. Team Files addresses its objects by path (``storagePath``) and the
        SDK's own ``replace_if_conflict`` uploads onto existing paths, so images registered
        against the old id keep resolving - to the new bytes. Re-uploading the same tar (the
        usual re-run of ``upload_project``) therefore keeps earlier projects working, and a
        *different* tar under the same name silently moves their offsets (see the docs).
        """
        remote_path = "/" + remote_path.lstrip("/")
        digest, size = sly_hash(src), src.stat().st_size
        name = os.path.basename(remote_path)
        ext = os.path.splitext(name)[1].lstrip(".")
        fields = {
            "teamId": team_id,
            "userId": 1,
            "name": name,
            "path": remote_path,
            "hash": digest,
            "mime": mime_of(name),
            "ext": ext,
            "size": size,
            "meta": {"mime": mime_of(name), "ext": ext, "size": size},
            "storagePath": f"/teams_storage/{team_id}{remote_path}",
            "fullStorageUrl": f"/teams_storage/{team_id}{remote_path}",
            "isDir": False,
            "type": "file",
        }
        with self.transaction():
            doc = self.team_file_by_path(team_id, remote_path)
            if doc is None:
                doc = self.insert("files", team_id, fields)
            else:
                doc.update(fields)
                self.update("files", doc)
            shutil.move(str(src), self.file_path(doc["id"]))
        return doc

    def remove_team_file(self, doc: dict[str, Any]) -> None:
        self.delete("files", doc["id"])
        self.file_path(doc["id"]).unlink(missing_ok=True)

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


class _BodyStream:
    """A request body read as it arrives, consumed up to tokens (multipart delimiters) that
    may straddle two chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = bytearray()

    def _more(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._buf += chunk
        return True

    def skip_past(self, token: bytes) -> bool:
        """Drop everything up to and including ``token``; False if the body has none."""
        while True:
            found = self._buf.find(token)
            if found >= 0:
                del self._buf[: found + len(token)]
                return True
            del self._buf[: max(0, len(self._buf) - len(token) + 1)]
            if not self._more():
                return False

    def peek(self, n: int) -> bytes:
        while len(self._buf) < n and self._more():
            pass
        return bytes(self._buf[:n])

    def copy_until(self, token: bytes, write: Callable[[bytes], object]) -> None:
        """Hand everything before ``token`` to ``write`` as it arrives, then drop the token;
        a body that ends first is truncated."""
        keep = len(token) - 1
        while True:
            found = self._buf.find(token)
            if found >= 0:
                if found:
                    write(bytes(self._buf[:found]))
                del self._buf[: found + len(token)]
                return
            if len(self._buf) > keep:
                write(bytes(self._buf[: len(self._buf) - keep]))
                del self._buf[: len(self._buf) - keep]
            if not self._more():
                raise ApiError(400, "truncated multipart body")

    def drain(self) -> None:
        self._buf.clear()
        for _ in self._chunks:
            pass


def parse_multipart(chunks: Iterable[bytes], content_type: str, store: Store) -> list[Part]:
    """Split a multipart body into its parts, in order, as it arrives.

    A file part goes straight into a file of its own while the body is read: the upload
    is written once, never held in memory whole nor saved as a body to be split after.
    """
    delim = b"--" + _boundary(content_type)
    parts: list[Part] = []
    body = _BodyStream(chunks)
    try:
        if not body.skip_past(delim):
            return parts
        while body.peek(2) != b"--":
            head = bytearray()
            body.copy_until(b"\r\n\r\n", head.extend)
            name, filename = _disposition(head.decode("utf-8", "replace"))
            if filename is None:
                value = bytearray()
                body.copy_until(b"\r\n" + delim, value.extend)
                parts.append((name, None, value.decode("utf-8", "replace")))
            else:
                out = store.new_upload_path()
                try:
                    with open(out, "wb") as dst:
                        body.copy_until(b"\r\n" + delim, dst.write)
                except BaseException:
                    out.unlink(missing_ok=True)
                    raise
                parts.append((name, filename, out))
    except BaseException:
        for _, filename, saved in parts:
            if filename is not None and isinstance(saved, Path):
                saved.unlink(missing_ok=True)
        raise
    body.drain()
    return parts
