"""Put a local blob project on a server (the emulator) with the REST calls the SDK makes.

``upload_local_project(url, token, folder)`` creates the project and its datasets
(nested ones too), uploads the project meta, each ``blob/<stem>.tar`` (and its offsets
file, as ``upload_blob_images`` expects them side by side) to Team Files under
``/blob-files/``, registers the blob images by offsets (``images.bulk.add`` with
``teamFileId`` + ``sourceBlob``), uploads ordinary ``img/`` images by hash, then the
annotations, and sets the project's ``is_blob_project`` flag.

Standard library only (``http.client``, ``pickle`` behind an allow-list): it neither
needs the SDK nor shares code with blobfs's own client, so a misreading of the API in
blobfs cannot hide behind the same misreading here. Bulk calls carry up to
:data:`BULK_ADD_BATCH` images, so 30,000 images take a few dozen requests.
Annotations go up in the server's subpixel coordinates, as the SDK's uploads send them;
that one conversion is shared with blobfs (:mod:`blobfs.format.ann_coords`, stdlib only)
because it is pinned to the SDK's own functions by ``tests/unit/test_ann_coords.py``.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import pickle
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from blobfs.format.ann_coords import to_subpixel

logger = logging.getLogger(__name__)

#: Images per ``images.bulk.add`` request.
BULK_ADD_BATCH = 1000
#: Annotations per ``annotations.bulk.add`` request.
ANN_BATCH = 500
#: Hashes per ``images.internal.hashes.list`` request (the SDK sends 900).
HASH_BATCH = 900
#: Ordinary images per ``images.bulk.upload`` request, and the bytes that close one early.
PLAIN_BATCH = 100
PLAIN_BATCH_BYTES = 32 << 20
TF_BLOB_DIR = "/blob-files/"
BLOB_DIR = "blob"
OFFSETS_SUFFIX = "_offsets.pkl"
#: Folders of a dataset that are never datasets (the SDK's ``Dataset`` layout).
NOT_DATASETS = frozenset({"img", "ann", "img_info", "seg", "meta", "datasets", "blob"})
BLOB_FLAG = "is_blob_project"
_SDK_CLASS = ("supervisely.api.image_api", "BlobImageInfo")
_COPY_CHUNK = 1 << 20


class SeedError(RuntimeError):
    """The project folder or the server refused the upload (message says which)."""


# ---- offsets files ------------------------------------------------------------------------


class _BlobImageInfo:
    """Inert local stand-in for the SDK's ``BlobImageInfo`` dataclass: it only keeps the
    state the pickle gives it; no SDK code is imported or run."""

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict state, slots state)
        self.state = state


class _OffsetsUnpickler(pickle.Unpickler):
    """Resolves exactly one global, the SDK class, to the stand-in; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _SDK_CLASS:
            return _BlobImageInfo
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in offsets")


@dataclass(frozen=True)
class Member:
    """One image of a blob: its name and half-open byte range in the tar."""

    name: str
    start: int
    end: int


def _member(obj: Any, source: Path) -> Member:
    state = obj.state if isinstance(obj, _BlobImageInfo) else None
    if not isinstance(state, dict):
        raise SeedError(f"{source}: an entry is not a BlobImageInfo")
    name, start, end = state.get("name"), state.get("offset_start"), state.get("offset_end")
    if not isinstance(name, str) or not name or "/" in name:
        raise SeedError(f"{source}: bad image name {name!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise SeedError(f"{source}: {name}: offsets are not integers")
    return Member(name, int(start), int(end))  # type: ignore[arg-type]


def read_offsets(path: str | os.PathLike[str]) -> list[Member]:
    """All entries of an offsets file: pickles of ``list[BlobImageInfo]`` one after
    another (a lone object per pickle is accepted too), read until EOF."""
    source = Path(path)
    out: list[Member] = []
    with open(source, "rb") as f:
        while True:
            try:
                batch = _OffsetsUnpickler(f).load()
            except EOFError:
                return out
            except (pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
                raise SeedError(f"{source}: not a valid offsets file: {exc}") from None
            items = batch if isinstance(batch, list) else [batch]
            out.extend(_member(item, source) for item in items)


# ---- HTTP ---------------------------------------------------------------------------------


class _Client:
    """POSTs to ``/public/api/v3/<method>`` over one keep-alive connection."""

    def __init__(self, server_url: str, token: str) -> None:
        parts = urlsplit(server_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SeedError(f"not an http(s) server address: {server_url!r}")
        conn_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._conn = conn_class(parts.netloc, timeout=600)
        self._root = parts.path.rstrip("/") + "/public/api/v3/"
        self._token = token

    def close(self) -> None:
        self._conn.close()

    def call(self, method: str, body: Any) -> Any:
        data = json.dumps(body).encode()
        return self._send(method, data, "application/json", len(data))

    def _send(
        self, method: str, body: bytes | Iterable[bytes], content_type: str, length: int
    ) -> Any:
        headers = {
            "x-api-key": self._token,
            "Content-Type": content_type,
            "Content-Length": str(length),
        }
        try:
            self._conn.request("POST", self._root + method, body=body, headers=headers)
            response = self._conn.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise SeedError(f"{method}: {type(exc).__name__}: {exc}") from None
        if response.status != 200:
            raise SeedError(f"{method}: HTTP {response.status}: {answer[:500]!r}")
        return json.loads(answer)

    def upload(self, method: str, parts: Sequence[tuple[str, str | Path]], query: str = "") -> Any:
        """A multipart POST streamed from disk: ``(field, text)`` for a form field,
        ``(field, Path)`` for a file (sent as ``filename`` = its name)."""
        boundary = uuid.uuid4().hex
        pieces: list[bytes | Path] = []
        for field, value in parts:
            if isinstance(value, Path):
                head = (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                    f'filename="{value.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                )
                pieces += [head.encode(), value, b"\r\n"]
            else:
                head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n'
                pieces += [head.encode() + value.encode() + b"\r\n"]
        pieces.append(f"--{boundary}--\r\n".encode())
        length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in pieces)
        content_type = f"multipart/form-data; boundary={boundary}"
        return self._send(method + query, _stream(pieces), content_type, length)


def _stream(pieces: list[bytes | Path]) -> Iterator[bytes]:
    for piece in pieces:
        if isinstance(piece, bytes):
            yield piece
            continue
        with open(piece, "rb") as f:
            yield from iter(lambda: f.read(_COPY_CHUNK), b"")


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _file_hash(path: Path) -> str:
    """The SDK's image hash (``sly.fs.get_file_hash``): base64 of SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


# ---- the upload ---------------------------------------------------------------------------


def _walk_datasets(
    folder: Path, parents: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], Path]]:
    """(dataset path, folder) for the datasets in ``folder``, parents before children."""
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_symlink() or not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name in NOT_DATASETS:
            continue
        path = (*parents, entry.name)
        yield path, entry
        yield from _walk_datasets(entry / "datasets", path)


class _Upload:
    """One project upload: the client, the ids made so far, the Team Files in use."""

    def __init__(self, client: _Client, root: Path) -> None:
        self.client = client
        self.root = root
        teams = client.call("teams.list", {})["entities"]
        if not teams:
            raise SeedError("the server has no team")
        self.team = int(teams[0]["id"])
        spaces = client.call("workspaces.list", {"teamId": self.team})["entities"]
        if not spaces:
            raise SeedError(f"team {self.team} has no workspace")
        self.workspace = int(spaces[0]["id"])
        self.blob_ids: dict[str, int] = {}
        listed = client.call(
            "file-storage.list", {"teamId": self.team, "path": TF_BLOB_DIR, "recursive": False}
        )
        self.taken = {f["path"] for f in listed if isinstance(f, dict)}

    def create_project(self, name: str) -> int:
        info = self.client.call(
            "projects.add",
            {"workspaceId": self.workspace, "name": name, "description": "", "type": "images"},
        )
        project = int(info["id"])
        meta = self.root / "meta.json"
        if meta.is_file():
            self.client.call("projects.meta.update", {"id": project, "meta": _json(meta)})
        return project

    def blob_file(self, stem: str, offsets: Path) -> int:
        """The Team Files id of ``blob/<stem>.tar``, uploaded once per project, next to
        its offsets file; a name already taken in ``/blob-files/`` gets a ``_N`` suffix
        (replacing it would orphan another project's images)."""
        if stem in self.blob_ids:
            return self.blob_ids[stem]
        tar = self.root / BLOB_DIR / f"{stem}.tar"
        if not tar.is_file():
            raise SeedError(f"{offsets} names blob {tar}, which is missing")
        remote, n = stem, 0
        while TF_BLOB_DIR + remote + ".tar" in self.taken:
            n += 1
            remote = f"{stem}_{n}"
        self.taken.add(TF_BLOB_DIR + remote + ".tar")
        answer = self.client.upload(
            "file-storage.bulk.upload",
            [
                ("name", remote + ".tar"),
                ("path", TF_BLOB_DIR),
                ("file", tar),
                ("name", remote + OFFSETS_SUFFIX),
                ("path", TF_BLOB_DIR),
                ("file", offsets),
            ],
            f"?teamId={self.team}",
        )
        self.blob_ids[stem] = int(answer[0]["id"])
        logger.info("uploaded %s as %s%s.tar", tar, TF_BLOB_DIR, remote)
        return self.blob_ids[stem]

    def bulk_add(self, dataset: int, items: list[dict[str, Any]]) -> dict[str, int]:
        """Register images in batches; name -> image id."""
        ids: dict[str, int] = {}
        for batch in _batches(items, BULK_ADD_BATCH):
            answer = self.client.call(
                "images.bulk.add",
                {
                    "datasetId": dataset,
                    "images": list(batch),
                    "forceMetadataForLinks": False,
                    "skipValidation": False,
                },
            )
            ids.update({info["name"]: int(info["id"]) for info in answer})
        return ids

    def upload_plain(self, paths: list[Path]) -> dict[Path, str]:
        """Ordinary images by hash: only those the server lacks are sent (the SDK's
        ``upload_paths``: ``images.internal.hashes.list``, then ``images.bulk.upload``)."""
        hashes = {p: _file_hash(p) for p in paths}
        unique = list(dict.fromkeys(hashes.values()))
        known: set[str] = set()
        for batch in _batches(unique, HASH_BATCH):
            known.update(self.client.call("images.internal.hashes.list", list(batch)))
        pending = [p for p in {h: p for p, h in hashes.items()}.values() if hashes[p] not in known]
        for group in _plain_groups(pending):
            parts = [(f"{i}-file", p) for i, p in enumerate(group)]
            answer = self.client.upload("images.bulk.upload", parts)
            got = [a.get("hash") for a in answer if isinstance(a, dict)]
            if got != [hashes[p] for p in group]:
                raise SeedError(f"images.bulk.upload stored other hashes than sent: {got}")
        return hashes

    def annotate(self, dataset: int, folder: Path, ids: dict[str, int]) -> None:
        anns = [
            {"imageId": image_id, "annotation": to_subpixel(_json(folder / "ann" / f"{name}.json"))}
            for name, image_id in ids.items()
            if (folder / "ann" / f"{name}.json").is_file()
        ]
        for batch in _batches(anns, ANN_BATCH):
            self.client.call(
                "annotations.bulk.add",
                {"datasetId": dataset, "annotations": list(batch), "skipBoundsValidation": False},
            )

    def mark_blob_project(self, project: int) -> None:
        """The custom-data flag the SDK's ``upload_by_offsets`` sets."""
        info = self.client.call("projects.info", {"id": project})
        custom = info.get("customData") if isinstance(info.get("customData"), dict) else {}
        self.client.call(
            "projects.editInfo",
            {"id": project, "customData": {**custom, BLOB_FLAG: True}, "silent": True},
        )


def _plain_groups(paths: list[Path]) -> Iterator[list[Path]]:
    group: list[Path] = []
    size = 0
    for path in paths:
        if group and (len(group) >= PLAIN_BATCH or size + path.stat().st_size > PLAIN_BATCH_BYTES):
            yield group
            group, size = [], 0
        group.append(path)
        size += path.stat().st_size
    if group:
        yield group


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:
        raise SeedError(f"{path}: not valid JSON: {exc}") from None


def _with_meta(item: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``item`` plus the image's ``meta/<name>.json`` (if the folder has one)."""
    path = folder / "meta" / f"{item['title']}.json"
    meta = _json(path) if path.is_file() else None
    return {**item, "meta": meta} if isinstance(meta, dict) and meta else item


def _blob_items(up: _Upload, folder: Path) -> list[dict[str, Any]]:
    items = []
    for offsets in sorted(folder.glob(f"*{OFFSETS_SUFFIX}")):
        file_id = up.blob_file(offsets.name[: -len(OFFSETS_SUFFIX)], offsets)
        items += [
            {
                "title": m.name,
                "teamFileId": file_id,
                "sourceBlob": {"offsetStart": m.start, "offsetEnd": m.end},
            }
            for m in read_offsets(offsets)
        ]
    return items


def _upload_dataset(up: _Upload, folder: Path, dataset: int) -> int:
    """Blob images, then ordinary ones, then the annotations; returns the image count."""
    items = _blob_items(up, folder)
    img_dir = folder / "img"
    plain = sorted(p for p in img_dir.iterdir() if p.is_file()) if img_dir.is_dir() else []
    hashes = up.upload_plain(plain)
    items += [{"title": p.name, "hash": hashes[p]} for p in plain]
    dupes = sorted(n for n, k in Counter(i["title"] for i in items).items() if k > 1)
    if dupes:
        raise SeedError(f"{folder}: image names used twice (blob and img/?): {dupes[:5]}")
    ids = up.bulk_add(dataset, [_with_meta(i, folder) for i in items])
    up.annotate(dataset, folder, ids)
    return len(ids)


def upload_local_project(
    server_url: str,
    token: str,
    project_dir: str | os.PathLike[str],
    project_name: str | None = None,
) -> int:
    """Upload the local project in ``project_dir``; returns the new project's id.

    ``project_name`` defaults to the folder name plus a random suffix, so seeding the same
    folder twice gives two projects. Raises :class:`SeedError` with what went wrong.
    """
    root = Path(project_dir)
    if not root.is_dir():
        raise SeedError(f"{root} is not a folder")
    client = _Client(server_url, token)
    try:
        up = _Upload(client, root)
        project = up.create_project(project_name or f"{root.name}-{uuid.uuid4().hex[:6]}")
        ids: dict[tuple[str, ...], int] = {}
        total = 0
        for path, folder in _walk_datasets(root, ()):
            parent = ids.get(path[:-1]) if len(path) > 1 else None
            info = client.call(
                "datasets.add",
                {"projectId": project, "name": path[-1], "description": "", "parentId": parent},
            )
            ids[path] = int(info["id"])
            total += _upload_dataset(up, folder, ids[path])
        if up.blob_ids:
            up.mark_blob_project(project)
        logger.info("seeded project %s: %s datasets, %s images", project, len(ids), total)
        return project
    finally:
        client.close()
