"""The REST methods of the emulator: ``method name -> handler(store, body, query)``.

Payloads and answers follow the Supervisely SDK 6.74.51 (``supervisely/api/*_api.py``):
what each SDK call sends and which fields its ``*Info`` tuples read. A handler returns a
JSON-able value, a :class:`FileBody` (bytes on disk, served with Range), or :class:`Raw`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blobfs.testing._emu_store import ApiError, Store, image_dims, mime_of, sly_hash

DEFAULT_PER_PAGE = 500


@dataclass
class FileBody:
    """Bytes ``[0, size)`` of a file on disk, to be served with Range support."""

    path: Path
    size: int
    etag: str
    offset: int = 0
    content_type: str = "application/octet-stream"


@dataclass
class Raw:
    """A ready body (multipart answers)."""

    data: bytes
    content_type: str


Handler = Callable[[Store, Any, dict[str, str]], Any]
METHODS: dict[str, Handler] = {}
BLOB_METHODS = frozenset({"images.data.download", "file-storage.download", "images.download"})


def method(name: str) -> Callable[[Handler], Handler]:
    def register(func: Handler) -> Handler:
        METHODS[name] = func
        return func

    return register


def _need(body: Any, key: str) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise ApiError(400, f"field '{key}' is required")
    return body[key]


def _filtered(docs: list[dict[str, Any]], filters: Any) -> list[dict[str, Any]]:
    for f in filters or []:
        if not isinstance(f, dict):
            continue
        field, op, value = str(f.get("field")), f.get("operator", "="), f.get("value")
        if op == "=":
            docs = [d for d in docs if d.get(field) == value]
        elif op == "in":
            docs = [d for d in docs if d.get(field) in (value or [])]
        elif op == "!=":
            docs = [d for d in docs if d.get(field) != value]
    return docs


def _page(docs: list[dict[str, Any]], body: Any) -> dict[str, Any]:
    body = body if isinstance(body, dict) else {}
    per_page = body.get("per_page") or DEFAULT_PER_PAGE
    page = body.get("page") or 1
    if not isinstance(per_page, int) or not isinstance(page, int) or per_page < 1 or page < 1:
        raise ApiError(400, "page and per_page must be positive integers")
    pages = max(1, -(-len(docs) // per_page))
    return {
        "total": len(docs),
        "perPage": per_page,
        "pagesCount": pages,
        "entities": docs[(page - 1) * per_page : page * per_page],
    }


# ---- teams, workspaces, projects, datasets ----------------------------------------------


@method("teams.list")
def teams_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _page(_filtered(store.all("teams"), (body or {}).get("filter")), body)


@method("teams.info")
def teams_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("teams", _need(body, "id"))


@method("workspaces.list")
def workspaces_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    docs = store.all("workspaces", _need(body, "teamId"))
    return _page(_filtered(docs, body.get("filter")), body)


@method("workspaces.info")
def workspaces_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("workspaces", _need(body, "id"))


@method("workspaces.add")
def workspaces_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    team = store.get("teams", _need(body, "teamId"))
    return store.insert(
        "workspaces",
        team["id"],
        {
            "name": _need(body, "name"),
            "description": body.get("description", ""),
            "teamId": team["id"],
        },
    )


def _project_doc(store: Store, project: dict[str, Any]) -> dict[str, Any]:
    images = [i for d in store.all("datasets", project["id"]) for i in store.all("images", d["id"])]
    return {
        **project,
        "imagesCount": len(images),
        "itemsCount": len(images),
        "datasetsCount": len(store.all("datasets", project["id"])),
    }


@method("projects.add")
def projects_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    ws = store.get("workspaces", _need(body, "workspaceId"))
    name = _need(body, "name")
    if any(p["name"] == name for p in store.all("projects", ws["id"])):
        raise ApiError(400, f"project {name!r} already exists")
    meta = {
        "classes": [],
        "tags": [],
        "projectType": body.get("type", "images"),
        "projectSettings": {},
    }
    doc = store.insert(
        "projects",
        ws["id"],
        {
            "name": name,
            "description": body.get("description", ""),
            "type": body.get("type", "images"),
            "workspaceId": ws["id"],
            "teamId": ws["teamId"],
            "customData": body.get("customData") or {},
            "settings": body.get("settings") or {},
            "meta": meta,
            "readme": body.get("readme", ""),
        },
    )
    return _project_doc(store, doc)


@method("projects.info")
def projects_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _project_doc(store, store.get("projects", _need(body, "id")))


@method("projects.list")
def projects_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    docs = [_project_doc(store, p) for p in store.all("projects", _need(body, "workspaceId"))]
    return _page(_filtered(docs, body.get("filter")), body)


@method("projects.meta")
def projects_meta(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("projects", _need(body, "id"))["meta"]


@method("projects.meta.update")
def projects_meta_update(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", _need(body, "id"))
    meta = _need(body, "meta")
    if not isinstance(meta, dict):
        raise ApiError(400, "meta must be an object")
    for i, cls in enumerate(meta.get("classes", [])):  # the server gives classes ids
        cls.setdefault("id", project["id"] * 1000 + i + 1)
    project["meta"] = meta
    store.update("projects", project)
    return meta


@method("projects.editInfo")
def projects_edit_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", _need(body, "id"))
    for key in ("name", "description", "customData", "readme"):
        if key in body:
            project[key] = body[key]
    store.update("projects", project)
    return _project_doc(store, project)


@method("projects.settings.update")
def projects_settings_update(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", _need(body, "id"))
    project["settings"] = {**project.get("settings", {}), **(body.get("settings") or {})}
    store.update("projects", project)
    return {"success": True}


def _dataset_doc(store: Store, ds: dict[str, Any]) -> dict[str, Any]:
    """A dataset as the server lists it: no ``customData`` unless asked for (the SDK hashes
    ``DatasetInfo`` tuples in ``dataset.tree``, so a dict field would break it)."""
    count = len(store.all("images", ds["id"]))
    doc = {k: v for k, v in ds.items() if k != "customData"}
    return {**doc, "imagesCount": count, "itemsCount": count}


@method("datasets.add")
def datasets_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", _need(body, "projectId"))
    name, parent = _need(body, "name"), body.get("parentId")
    if parent is not None:
        store.get("datasets", parent)
    siblings = [d for d in store.all("datasets", project["id"]) if d.get("parentId") == parent]
    if any(d["name"] == name for d in siblings):
        raise ApiError(400, f"dataset {name!r} already exists")
    doc = store.insert(
        "datasets",
        project["id"],
        {
            "name": name,
            "description": body.get("description", ""),
            "projectId": project["id"],
            "parentId": parent,
            "teamId": project["teamId"],
            "workspaceId": project["workspaceId"],
            "customData": body.get("customData") or {},
        },
    )
    return _dataset_doc(store, doc)


@method("datasets.info")
def datasets_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _dataset_doc(store, store.get("datasets", _need(body, "id")))


@method("datasets.list")
def datasets_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    docs = [_dataset_doc(store, d) for d in store.all("datasets", _need(body, "projectId"))]
    if not body.get("recursive"):
        docs = [d for d in docs if d.get("parentId") is None]
    return _page(_filtered(docs, body.get("filter")), body)


# ---- Team Files ---------------------------------------------------------------------


def _uploaded_files(store: Store, parts: Any, query: dict[str, str]) -> list[dict[str, Any]]:
    """Team Files uploads: each file part takes the ``name``/``path`` fields before it."""
    if not isinstance(parts, list):
        raise ApiError(400, "a multipart body is required")
    team = store.get("teams", int(query.get("teamId", "0") or 0))
    fields: dict[str, str] = {}
    out = []
    for name, filename, value in parts:
        if filename is None:
            fields[name] = str(value)
            continue
        directory = fields.get("path", "/")
        remote = directory.rstrip("/") + "/" + (fields.get("name") or filename)
        out.append(store.add_team_file(team["id"], remote, Path(value)))
        fields = {}
    if not out:
        raise ApiError(400, "no file in the upload")
    return out


@method("file-storage.upload")
def file_upload(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _uploaded_files(store, body, query)[0]


@method("file-storage.bulk.upload")
def file_bulk_upload(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _uploaded_files(store, body, query)


@method("instance.version")
def instance_version(store: Store, body: Any, query: dict[str, str]) -> Any:
    return {"version": "6.14.4"}


@method("file-storage.info")
def file_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("files", _need(body, "id"))


@method("file-storage.list")
def file_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    team = store.get("teams", _need(body, "teamId"))
    path = "/" + str(body.get("path", "/")).strip("/")
    prefix = path.rstrip("/") + "/"
    docs = [
        f
        for f in store.all("files", team["id"])
        if f["path"] == path or f["path"].startswith(prefix)
    ]
    if not body.get("recursive", True):
        docs = [f for f in docs if "/" not in f["path"][len(prefix) :]]
    return docs


def _team_file(store: Store, body: Any) -> dict[str, Any]:
    if isinstance(body, dict) and "id" in body:
        return store.get("files", body["id"])
    team = store.get("teams", _need(body, "teamId"))
    path = "/" + str(_need(body, "path")).lstrip("/")
    for f in store.all("files", team["id"]):
        if f["path"] == path:
            return f
    raise ApiError(404, "file not found")


def _file_body(store: Store, doc: dict[str, Any]) -> FileBody:
    path = store.file_path(doc["id"])
    st = path.stat()
    return FileBody(path, st.st_size, f'"f{doc["id"]}-{st.st_size}-{st.st_mtime_ns}"')


@method("file-storage.download")
def file_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _file_body(store, _team_file(store, body))


@method("file-storage.remove")
def file_remove(store: Store, body: Any, query: dict[str, str]) -> Any:
    doc = _team_file(store, body)
    store.delete("files", doc["id"])
    store.file_path(doc["id"]).unlink(missing_ok=True)
    return {"success": True}


# ---- images -------------------------------------------------------------------------


def _image_doc(
    store: Store, dataset: dict[str, Any], name: str, size: int, extra: dict[str, Any], head: bytes
) -> dict[str, Any]:
    width, height = image_dims(head)
    return {
        "name": name,
        "link": None,
        "mime": mime_of(name),
        "ext": os.path.splitext(name)[1].lstrip(".").lower(),
        "size": size,
        "width": width,
        "height": height,
        "labelsCount": 0,
        "datasetId": dataset["id"],
        "projectId": dataset["projectId"],
        "meta": {},
        "tags": [],
        "description": "",
        "pathOriginal": None,
        "fullStorageUrl": None,
        "relatedDataId": None,
        "downloadId": None,
        "offsetStart": None,
        "offsetEnd": None,
        **extra,
    }


def _blob_item(
    store: Store, dataset: dict[str, Any], name: str, item: dict[str, Any]
) -> dict[str, Any]:
    file_doc = store.get("files", item["teamFileId"])
    blob = item.get("sourceBlob") or {}
    start, end = blob.get("offsetStart"), blob.get("offsetEnd")
    size = store.file_path(file_doc["id"]).stat().st_size
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= size):
        raise ApiError(400, f"{name}: sourceBlob range outside the file")
    with open(store.file_path(file_doc["id"]), "rb") as f:
        f.seek(start)
        head = f.read(min(end - start, 64 << 10))
    return _image_doc(
        store,
        dataset,
        name,
        end - start,
        {
            "hash": None,
            "relatedDataId": file_doc["id"],
            "downloadId": f"tf{file_doc['id']}",
            "offsetStart": start,
            "offsetEnd": end,
        },
        head,
    )


def _hash_item(store: Store, dataset: dict[str, Any], name: str, digest: str) -> dict[str, Any]:
    path = store.image_path(digest)
    if not path.exists():
        raise ApiError(400, f"{name}: no uploaded image with hash {digest}")
    with open(path, "rb") as f:
        head = f.read(64 << 10)
    return _image_doc(store, dataset, name, path.stat().st_size, {"hash": digest}, head)


@method("images.bulk.add")
def images_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    dataset = store.get("datasets", _need(body, "datasetId"))
    items = _need(body, "images")
    existing = {i["name"] for i in store.all("images", dataset["id"])}
    docs = []
    for item in items:
        name = item.get("title") or item.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "image title is required")
        if name in existing:
            raise ApiError(400, f"image with name {name!r} already exists in the dataset")
        existing.add(name)
        if "teamFileId" in item:
            doc = _blob_item(store, dataset, name, item)
        elif "hash" in item:
            doc = _hash_item(store, dataset, name, item["hash"])
        else:
            raise ApiError(400, f"{name}: only teamFileId+sourceBlob or hash images")
        if isinstance(item.get("meta"), dict):
            doc["meta"] = item["meta"]
        docs.append(doc)
    return store.insert_many("images", dataset["id"], docs)


@method("images.list")
def images_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    plain = not body.get("filter") and body.get("sort_order") != "desc"
    if body.get("datasetId") is not None and plain:  # the common case, paged in SQL
        dataset = store.get("datasets", body["datasetId"])["id"]
        per_page = body.get("per_page") or DEFAULT_PER_PAGE
        page = body.get("page") or 1
        if not isinstance(per_page, int) or not isinstance(page, int) or min(per_page, page) < 1:
            raise ApiError(400, "page and per_page must be positive integers")
        total = store.count("images", dataset)
        return {
            "total": total,
            "perPage": per_page,
            "pagesCount": max(1, -(-total // per_page)),
            "entities": store.page("images", dataset, (page - 1) * per_page, per_page),
        }
    if body.get("datasetId") is not None:
        docs = store.all("images", _need(body, "datasetId"))
    else:
        project = _need(body, "projectId")
        docs = [i for d in store.all("datasets", project) for i in store.all("images", d["id"])]
    docs = _filtered(docs, body.get("filter"))
    if body.get("sort_order") == "desc":
        docs = docs[::-1]
    return _page(docs, body)


@method("images.info")
def images_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("images", _need(body, "id"))


def _image_body(store: Store, image: dict[str, Any]) -> FileBody:
    if image.get("relatedDataId") is not None:
        body = _file_body(store, store.get("files", image["relatedDataId"]))
        return FileBody(
            body.path,
            image["offsetEnd"] - image["offsetStart"],
            f'"i{image["id"]}-{image["updatedAt"]}"',
            image["offsetStart"],
            image["mime"],
        )
    path = store.image_path(image["hash"])
    return FileBody(path, path.stat().st_size, f'"i{image["id"]}"', 0, image["mime"])


@method("images.download")
def images_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _image_body(store, store.get("images", _need(body, "id")))


@method("images.bulk.download")
def images_bulk_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    boundary = uuid.uuid4().hex
    parts = []
    for image_id in _need(body, "imageIds"):
        src = _image_body(store, store.get("images", image_id))
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            data = f.read(src.size)
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{image_id}"\r\n'
            f"Content-Type: {src.content_type}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Raw(data, f"multipart/form-data; boundary={boundary}")


@method("images.data.download")
def images_data_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    project = store.get("projects", _need(body, "projectId"))
    download_id = str(_need(body, "downloadId"))
    if not download_id.startswith("tf") or not download_id[2:].isdigit():
        raise ApiError(404, "unknown downloadId")
    file_doc = store.get("files", int(download_id[2:]))
    if file_doc["teamId"] != project["teamId"]:
        raise ApiError(403, "blob belongs to another team")
    return _file_body(store, file_doc)


@method("images.internal.hashes.list")
def images_hashes_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    if not isinstance(body, list):
        raise ApiError(400, "a list of hashes is required")
    return [h for h in body if isinstance(h, str) and store.image_path(h).exists()]


@method("images.bulk.upload")
def images_bulk_upload(store: Store, body: Any, query: dict[str, str]) -> Any:
    out = []
    for _field, filename, path in body:
        if filename is None:
            continue
        digest = sly_hash(path)
        os.replace(path, store.image_path(digest))
        out.append({"hash": digest})
    return out


# ---- annotations --------------------------------------------------------------------


def _ann_doc(store: Store, image: dict[str, Any]) -> dict[str, Any]:
    rows = store.all("anns", image["id"])
    ann = (
        rows[-1]["annotation"]
        if rows
        else {
            "description": "",
            "tags": [],
            "objects": [],
            "customBigData": {},
            "size": {"height": image.get("height"), "width": image.get("width")},
        }
    )
    return {
        "imageId": image["id"],
        "imageName": image["name"],
        "annotation": ann,
        "datasetId": image["datasetId"],
        "createdAt": image["createdAt"],
        "updatedAt": rows[-1]["updatedAt"] if rows else image["updatedAt"],
    }


@method("annotations.bulk.add")
def annotations_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    dataset = store.get("datasets", _need(body, "datasetId"))
    for item in _need(body, "annotations"):
        image = store.get("images", item.get("imageId"))
        if image["datasetId"] != dataset["id"]:
            raise ApiError(400, f"image {image['id']} is not in dataset {dataset['id']}")
        if not isinstance(item.get("annotation"), dict):
            raise ApiError(400, "annotation must be an object")
        for old in store.all("anns", image["id"]):
            store.delete("anns", old["id"])
        store.insert("anns", image["id"], {"annotation": item["annotation"]})
        image["labelsCount"] = len(item["annotation"].get("objects", []))
        store.update("images", image)
    return {"success": True}


@method("annotations.info")
def annotations_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _ann_doc(store, store.get("images", _need(body, "imageId")))


@method("annotations.bulk.info")
def annotations_bulk_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    ids = _need(body, "imageIds")
    if not isinstance(ids, list) or len(ids) > 100:
        raise ApiError(400, "imageIds must contain less than or equal to 100 items")
    return [_ann_doc(store, store.get("images", i)) for i in ids]


@method("annotations.list")
def annotations_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    docs = [_ann_doc(store, i) for i in store.all("images", _need(body, "datasetId"))]
    return _page(docs, body)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()
