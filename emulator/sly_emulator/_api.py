"""Emulated REST methods for teams, workspaces, projects, datasets and Team Files.

Payloads and answers follow the Supervisely SDK 6.74.51 (``supervisely/api/*_api.py``):
what each SDK call sends and which fields its ``*Info`` tuples read
(``info_sequence()``). Images and annotations are in :mod:`sly_emulator._images`.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Any

from sly_emulator._common import (
    FileBody,
    Registry,
    Upload,
    as_dict,
    need,
    page_of,
)
from sly_emulator._store import ApiError, Store

logger = logging.getLogger(__name__)

REGISTRY = Registry()
method = REGISTRY.method

#: What ``instance.version`` answers: the newest instance in the SDK 6.74.51's
#: ``versions.json`` (its ``MINIMUM_INSTANCE_VERSION_FOR_SDK``), so the SDK's version
#: check passes without a warning.
INSTANCE_VERSION = "6.18.3"
#: ``projectSettings`` of a new project's meta: ``ProjectSettings.from_json`` (used by
#: ``quick_import``) requires the ``multiView`` block.
DEFAULT_PROJECT_SETTINGS: dict[str, Any] = {
    "multiView": {"enabled": False, "tagName": None, "tagId": None, "isSynced": False}
}


@method("instance.version")
def instance_version(store: Store, body: Any, query: dict[str, str]) -> Any:
    return {"version": INSTANCE_VERSION}


# ---- teams and workspaces ---------------------------------------------------------------


@method("teams.list")
def teams_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    return page_of(store.all("teams"), body)


@method("teams.info")
def teams_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("teams", need(body, "id"))


@method("workspaces.list")
def workspaces_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    return page_of(store.all("workspaces", need(body, "teamId")), body)


@method("workspaces.info")
def workspaces_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("workspaces", need(body, "id"))


@method("workspaces.add")
def workspaces_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    team = store.get("teams", need(body, "teamId"))
    name = need(body, "name")
    if any(w["name"] == name for w in store.all("workspaces", team["id"])):
        raise ApiError(400, f"workspace {name!r} already exists")
    doc = {"name": name, "description": body.get("description") or "", "teamId": team["id"]}
    return store.insert("workspaces", team["id"], doc)


# ---- projects ---------------------------------------------------------------------------


def _project_doc(store: Store, project: dict[str, Any]) -> dict[str, Any]:
    """A project as ``projects.info`` shows it: live counts, no stored meta."""
    images, size = store.project_totals(project["id"])
    doc = {k: v for k, v in project.items() if k not in ("meta", "nextMetaId")}
    return {
        **doc,
        "size": str(size),
        "imagesCount": images,
        "itemsCount": images,
        "datasetsCount": store.count("datasets", project["id"]),
    }


@method("projects.add")
def projects_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    ws = store.get("workspaces", need(body, "workspaceId"))
    name = need(body, "name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "project name must be a non-empty string")
    if any(p["name"] == name for p in store.all("projects", ws["id"])):
        raise ApiError(400, f"project {name!r} already exists")
    kind = body.get("type") or "images"
    doc = store.insert(
        "projects",
        ws["id"],
        {
            "name": name,
            "description": body.get("description") or "",
            "type": kind,
            "workspaceId": ws["id"],
            "teamId": ws["teamId"],
            "customData": body.get("customData") or {},
            "settings": body.get("settings") or {},
            "importSettings": {},
            "readme": body.get("readme") or "",
            "referenceImageUrl": None,
            "backupArchive": None,
            "createdBy": 1,
            "meta": {
                "classes": [],
                "tags": [],
                "projectType": kind,
                "projectSettings": dict(DEFAULT_PROJECT_SETTINGS),
            },
        },
    )
    return _project_doc(store, doc)


@method("projects.info")
def projects_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _project_doc(store, store.get("projects", need(body, "id")))


@method("projects.list")
def projects_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    """By ``workspaceId``, or a whole team by ``groupId`` (``get_list(team_id=...)``)."""
    body = as_dict(body)
    if body.get("workspaceId") is not None:
        projects = store.all("projects", need(body, "workspaceId"))
    elif body.get("groupId") is not None:
        team = store.get("teams", body["groupId"])["id"]
        projects = [p for p in store.all("projects") if p.get("teamId") == team]
    else:
        raise ApiError(400, "field 'workspaceId' or 'groupId' is required")
    return page_of([_project_doc(store, p) for p in projects], body)


@method("projects.meta")
def projects_meta(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("projects", need(body, "id"))["meta"]


def _give_ids(items: list[Any], old: list[Any], key: str, next_id: int) -> int:
    """Keep the id of an item whose title was already there; number new ones from
    ``next_id``. The SDK needs class and tag ids (``sly_id``) for figures and tags."""
    known = {o.get(key): o.get("id") for o in old if isinstance(o, dict)}
    for item in items:
        if not isinstance(item, dict):
            raise ApiError(400, "meta classes and tags must be objects")
        if not isinstance(item.get("id"), int):
            item["id"] = known.get(item.get(key)) or next_id
            next_id = max(next_id, item["id"] + 1)
    return next_id


@method("projects.meta.update")
def projects_meta_update(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", need(body, "id"))
    meta = need(body, "meta")
    if not isinstance(meta, dict):
        raise ApiError(400, "meta must be an object")
    old = project.get("meta") or {}
    next_id = int(project.get("nextMetaId") or project["id"] * 100_000 + 1)
    next_id = _give_ids(meta.setdefault("classes", []), old.get("classes", []), "title", next_id)
    next_id = _give_ids(meta.setdefault("tags", []), old.get("tags", []), "name", next_id)
    meta.setdefault("projectType", project.get("type", "images"))
    meta.setdefault("projectSettings", old.get("projectSettings") or DEFAULT_PROJECT_SETTINGS)
    project["meta"], project["nextMetaId"] = meta, next_id
    store.update("projects", project)
    return meta


@method("projects.editInfo")
def projects_edit_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", need(body, "id"))
    for key in ("name", "description", "customData", "readme"):
        if key in body and body[key] is not None:
            project[key] = body[key]
    store.update("projects", project, touch=not body.get("silent"))
    return _project_doc(store, project)


@method("projects.settings.update")
def projects_settings_update(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", need(body, "id"))
    settings = need(body, "settings")
    if not isinstance(settings, dict):
        raise ApiError(400, "settings must be an object")
    project["settings"] = settings
    store.update("projects", project)
    return {"success": True}


# ---- datasets ---------------------------------------------------------------------------


def _dataset_doc(store: Store, ds: dict[str, Any], custom_data: bool = True) -> dict[str, Any]:
    """A dataset with live counts. ``datasets.list`` leaves ``customData`` out unless
    ``extraFields`` asks for it, as the server does: ``dataset.tree`` uses the
    ``DatasetInfo`` tuples as dict keys, and a dict field would make them unhashable."""
    count = store.count("images", ds["id"])
    doc = ds if custom_data else {k: v for k, v in ds.items() if k != "customData"}
    return {**doc, "size": "0", "imagesCount": count, "itemsCount": count}


@method("datasets.add")
def datasets_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", need(body, "projectId"))
    name, parent = need(body, "name"), body.get("parentId")
    if not isinstance(name, str) or not name or "/" in name:
        raise ApiError(400, "dataset name must be a non-empty string without '/'")
    if parent is not None and store.get("datasets", parent)["projectId"] != project["id"]:
        raise ApiError(400, f"dataset {parent} is in another project")
    siblings = [d for d in store.all("datasets", project["id"]) if d.get("parentId") == parent]
    if any(d["name"] == name for d in siblings):
        raise ApiError(400, f"dataset {name!r} already exists")
    doc = store.insert(
        "datasets",
        project["id"],
        {
            "name": name,
            "description": body.get("description") or "",
            "projectId": project["id"],
            "parentId": parent,
            "teamId": project["teamId"],
            "workspaceId": project["workspaceId"],
            "referenceImageUrl": None,
            "createdBy": 1,
            "customData": body.get("customData") or {},
        },
    )
    return _dataset_doc(store, doc)


@method("datasets.info")
def datasets_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _dataset_doc(store, store.get("datasets", need(body, "id")))


@method("datasets.list")
def datasets_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    """Top-level datasets, or all of them with ``recursive`` (nested ones by ``parentId``)."""
    project = store.get("projects", need(body, "projectId"))["id"]
    custom = "customData" in (body.get("extraFields") or [])
    docs = [_dataset_doc(store, d, custom) for d in store.all("datasets", project)]
    if not body.get("recursive"):
        docs = [d for d in docs if d.get("parentId") is None]
    return page_of(docs, body)


@method("datasets.editInfo")
def datasets_edit_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    ds = store.get("datasets", need(body, "id"))
    for key in ("name", "description", "customData"):
        if body.get(key) is not None:
            ds[key] = body[key]
    store.update("datasets", ds)
    return _dataset_doc(store, ds)


# ---- Team Files -------------------------------------------------------------------------


def _norm_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise ApiError(400, "path must be a non-empty string")
    return "/" + path.lstrip("/")


def _multipart_files(store: Store, parts: list[Any], team: int) -> list[dict[str, Any]]:
    """Each file part takes the ``name``/``path`` fields sent before it (the SDK sends
    ``name``, ``path``, ``file`` per file, repeated for a bulk upload)."""
    fields: dict[str, str] = {}
    out = []
    for name, filename, value in parts:
        if filename is None:
            fields[name] = str(value)
            continue
        directory = fields.get("path", "/")
        remote = directory.rstrip("/") + "/" + (fields.get("name") or filename)
        out.append(store.add_team_file(team, remote, Path(value)))
        fields = {}
    return out


def _uploaded_files(store: Store, body: Any, query: dict[str, str]) -> list[dict[str, Any]]:
    """Multipart uploads (``file.upload``/``upload_bulk``) and raw-body ones
    (``upload_async``: destination in the query string as ``teamId`` + ``path``)."""
    team = store.get("teams", int(query.get("teamId") or 0))["id"]
    if isinstance(body, Upload):
        return [store.add_team_file(team, _norm_path(query.get("path")), body.path)]
    if not isinstance(body, list):
        raise ApiError(400, "a multipart or application/octet-stream body is required")
    out = _multipart_files(store, body, team)
    if not out:
        raise ApiError(400, "no file in the upload")
    return out


@method("file-storage.upload")
def file_upload(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _uploaded_files(store, body, query)[0]


@method("file-storage.bulk.upload")
def file_bulk_upload(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _uploaded_files(store, body, query)


@method("file-storage.info")
def file_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("files", need(body, "id"))


def _folder_entry(team: int, path: str) -> dict[str, Any]:
    name = posixpath.basename(path.rstrip("/"))
    return {"teamId": team, "id": None, "name": name, "path": path, "isDir": True, "type": "folder"}


@method("file-storage.list")
def file_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    """Files at or under ``path``; with ``recursive: false`` the direct children only,
    sub-folders as ``isDir`` entries (which ``file.listdir`` and ``dir_exists`` count)."""
    team = store.get("teams", need(body, "teamId"))["id"]
    path = _norm_path(body.get("path") or "/")
    prefix = path.rstrip("/") + "/"
    files = store.all("files", team)
    docs = [f for f in files if f["path"] == path or f["path"].startswith(prefix)]
    if body.get("recursive", True):
        return docs
    out, folders = [], set()
    for f in docs:
        rest = f["path"][len(prefix) :] if f["path"] != path else ""
        if "/" in rest:
            folders.add(prefix + rest.split("/", 1)[0] + "/")
        else:
            out.append(f)
    return out + [_folder_entry(team, p) for p in sorted(folders)]


def _team_file(store: Store, body: Any) -> dict[str, Any]:
    """The file a download names, by ``id`` or by ``teamId`` + ``path``."""
    if isinstance(body, dict) and body.get("id") is not None:
        return store.get("files", body["id"])
    team = store.get("teams", need(body, "teamId"))["id"]
    doc = store.team_file_by_path(team, _norm_path(need(body, "path")))
    if doc is None:
        raise ApiError(404, "file not found")
    return doc


def file_body(store: Store, doc: dict[str, Any]) -> FileBody:
    """The bytes of a Team Files record. The ETag changes with the id, size and mtime, so
    a replaced or rewritten file never matches a cached one."""
    path = store.file_path(doc["id"])
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ApiError(404, f"the bytes of file {doc['id']} are gone") from None
    etag = f'"f{doc["id"]}-{st.st_size:x}-{st.st_mtime_ns:x}"'
    return FileBody(path, st.st_size, etag, 0, doc.get("mime") or "application/octet-stream")


@method("file-storage.download")
def file_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    return file_body(store, _team_file(store, body))


def _remove_path(store: Store, team: int, path: str) -> int:
    """Remove a file, or a folder and everything under it; returns how many went."""
    prefix = path.rstrip("/") + "/"
    gone = [f for f in store.all("files", team) if f["path"] in (path, prefix[:-1])]
    if not gone:
        gone = [f for f in store.all("files", team) if f["path"].startswith(prefix)]
    with store.transaction():
        for doc in gone:
            store.remove_team_file(doc)
    return len(gone)


@method("file-storage.remove")
def file_remove(store: Store, body: Any, query: dict[str, str]) -> Any:
    if isinstance(body, dict) and body.get("id") is not None:
        store.remove_team_file(store.get("files", body["id"]))
        return {"success": True}
    team = store.get("teams", need(body, "teamId"))["id"]
    if not _remove_path(store, team, _norm_path(need(body, "path"))):
        raise ApiError(404, "file not found")
    return {"success": True}


@method("file-storage.bulk.remove")
def file_bulk_remove(store: Store, body: Any, query: dict[str, str]) -> Any:
    team = store.get("teams", need(body, "teamId"))["id"]
    for path in need(body, "paths"):
        _remove_path(store, team, _norm_path(path))
    return {"success": True}
