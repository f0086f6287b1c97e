"""Put a local blob project on a server (the emulator) the way the optimized import does.

Used by tests, benchmarks and ``make demo``-style scripts: create the project and its
datasets (nested too), upload each tar to Team Files ``/blob-files/``, register its images
by offsets, upload ordinary images by hash, upload the annotations and the meta. It goes
through blobfs's own HTTP client and write API, so it needs no SDK.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from blobfs.blob.index import OFFSETS_SUFFIX, read_offsets_file
from blobfs.cache.blocks import BlockCache
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.transport.api import SuperviselyWriteApi
from blobfs.transport.http import HttpClient


def _workspace(client: HttpClient) -> tuple[int, int]:
    team = client.post_json("teams.list", {})["entities"][0]["id"]
    ws = client.post_json("workspaces.list", {"teamId": team})["entities"][0]["id"]
    return team, ws


def upload_local_project(
    server: str, token: str, project_dir: str | Path, project_name: str | None = None
) -> int:
    """Upload ``project_dir`` and return the new project's id."""
    root = Path(project_dir)
    client = HttpClient(server, token)
    api = SuperviselyWriteApi(client)
    try:
        team, ws = _workspace(client)
        name = project_name or f"{root.name}-{uuid.uuid4().hex[:6]}"
        project = client.post_json(
            "projects.add", {"workspaceId": ws, "name": name, "description": "", "type": "images"}
        )["id"]
        meta = root / "meta.json"
        if meta.is_file():
            api.update_meta(project, json.loads(meta.read_bytes()))
        source = LocalProjectSource(root, BlockCache(1 << 20, 1 << 20))
        ids: dict[tuple[str, ...], int] = {}
        uploaded: dict[str, int] = {}
        for ds in sorted(source.datasets(), key=lambda d: len(d.path)):
            parent = ids.get(ds.path[:-1]) if len(ds.path) > 1 else None
            ids[ds.path] = api.create_dataset(project, ds.name, parent)
            _upload_dataset(api, client, team, root, Path(str(ds.key)), ids[ds.path], uploaded)
        api.mark_blob_project(project)
        return int(project)
    finally:
        client.close()


def _upload_dataset(
    api: SuperviselyWriteApi,
    client: HttpClient,
    team: int,
    root: Path,
    folder: Path,
    dataset: int,
    uploaded: dict[str, int],
) -> None:
    names: dict[str, int] = {}
    for offsets in sorted(folder.glob(f"*{OFFSETS_SUFFIX}")):
        stem = offsets.name[: -len(OFFSETS_SUFFIX)]
        tar = root / "blob" / f"{stem}.tar"
        if stem not in uploaded:
            uploaded[stem] = api.upload_team_file(team, "/blob-files/", tar.name, str(tar))
        members = read_offsets_file(str(offsets)).members
        names.update(
            api.add_blob_images(
                dataset, uploaded[stem], [(m.name, m.start, m.end) for m in members]
            )
        )
    img_dir = folder / "img"
    plain = sorted(p for p in img_dir.iterdir() if p.is_file()) if img_dir.is_dir() else []
    if plain:
        names.update(_upload_plain(client, dataset, plain))
    anns: list[tuple[int, Any]] = []
    for name, image_id in names.items():
        ann = folder / "ann" / f"{name}.json"
        if ann.is_file():
            anns.append((image_id, json.loads(ann.read_bytes())))
    api.add_annotations(dataset, anns)


def _upload_plain(client: HttpClient, dataset: int, paths: list[Path]) -> dict[str, int]:
    """Ordinary images: upload bytes by hash, then add them by hash (the SDK's upload_paths)."""
    items = []
    for path in paths:
        digest = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
        client.post_multipart("images.bulk.upload", {}, ("0-file", "0", str(path)))
        items.append({"title": path.name, "hash": digest})
    answer = client.post_json("images.bulk.add", {"datasetId": dataset, "images": items})
    return {info["name"]: info["id"] for info in answer}
