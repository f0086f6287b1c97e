"""Emulated REST methods for images (blob and ordinary) and annotations.

Blob images are registered by ``images.bulk.add`` with ``teamFileId`` + ``sourceBlob``
(the SDK's ``upload_by_offsets``); their info carries ``relatedDataId`` (the Team Files
id), ``downloadId`` (``tf<file id>``) and the half-open ``offsetStart``/``offsetEnd``.
Ordinary images go up by hash (``images.bulk.upload``, then ``images.bulk.add``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import IO, Any

from sly_emulator._api import file_body
from sly_emulator._common import (
    FileBody,
    Raw,
    Registry,
    as_dict,
    filtered,
    list_fields,
    need,
    page_args,
    paged,
    paged_json,
    project,
    raw_list,
    sorted_docs,
)
from sly_emulator._store import ApiError, Store, image_dims, mime_of, sly_hash

logger = logging.getLogger(__name__)

REGISTRY = Registry()
method = REGISTRY.method

#: How much of an image is read to find its width and height (JPEG EXIF can be long).
HEAD_BYTES = 256 << 10
#: ``annotations.bulk.info`` refuses more ids than this, as the server does (the SDK's
#: ``BULK_INFO_MAX_BATCH_SIZE``).
ANN_BULK_MAX = 100
#: From this many ids up the server returns the tags inside an object in no stable order
#: (the SDK's note on ``BULK_INFO_DEFAULT_BATCH_SIZE``: "from about 60 ids up"), so the
#: same request can answer other bytes. The emulator turns each object's tags one step
#: further on every such request: a client that sends batches this big sees it.
ANN_UNSTABLE_FROM = 60
_unstable_turns = itertools.count(1)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\0" in name:
        raise ApiError(400, f"image title {name!r} is not a valid file name")
    return name


def _image_doc(
    dataset: dict[str, Any], name: str, size: int, head: bytes, extra: dict[str, Any]
) -> dict[str, Any]:
    """Every field ``ImageInfo`` reads (``ImageApi.info_sequence``), blob ones None."""
    width, height = image_dims(head)
    return {
        "name": name,
        "link": None,
        "hash": None,
        "mime": mime_of(name),
        "ext": os.path.splitext(name)[1].lstrip(".").lower(),
        "size": size,
        "width": width,
        "height": height,
        "labelsCount": 0,
        "datasetId": dataset["id"],
        "projectId": dataset["projectId"],
        "meta": {},
        "pathOriginal": None,
        "fullStorageUrl": None,
        "tags": [],
        "createdBy": 1,
        "relatedDataId": None,
        "downloadId": None,
        "offsetStart": None,
        "offsetEnd": None,
        "aiSearchMeta": None,
        "embeddingsUpdatedAt": None,
        "description": "",
        "parentId": None,
        **extra,
    }


def _offsets(source: Any) -> tuple[int, int]:
    """(offsetStart, offsetEnd) of a ``sourceBlob``; (0, 0) when they are not integers."""
    if not isinstance(source, dict):
        return 0, 0
    start, end = source.get("offsetStart"), source.get("offsetEnd")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        return 0, 0
    return int(start), int(end)  # type: ignore[arg-type]


@dataclass
class _Blob:
    """A Team Files blob opened once for all the images one bulk call registers in it."""

    doc: dict[str, Any]
    size: int
    stream: IO[bytes]


class _BulkAdd:
    """One ``images.bulk.add`` call: open blobs are shared between its items."""

    def __init__(self, store: Store, dataset: dict[str, Any]) -> None:
        self.store = store
        self.dataset = dataset
        self.blobs: dict[int, _Blob] = {}

    def close(self) -> None:
        for blob in self.blobs.values():
            blob.stream.close()

    def _blob(self, file_id: Any) -> _Blob:
        if file_id not in self.blobs:
            doc = self.store.get("files", file_id)
            if doc["teamId"] != self.dataset["teamId"]:
                raise ApiError(403, f"file {file_id} belongs to another team")
            body = file_body(self.store, doc)
            self.blobs[file_id] = _Blob(doc, body.size, open(body.path, "rb"))  # noqa: SIM115
        return self.blobs[file_id]

    def blob_item(self, name: str, item: dict[str, Any]) -> dict[str, Any]:
        blob = self._blob(item["teamFileId"])
        source = item.get("sourceBlob")
        start, end = _offsets(source)
        if not 0 <= start < end <= blob.size:
            raise ApiError(400, f"{name}: sourceBlob {source!r} is not a range inside the file")
        blob.stream.seek(start)
        head = blob.stream.read(min(end - start, HEAD_BYTES))
        file_id = blob.doc["id"]
        extra = {
            "relatedDataId": file_id,
            "downloadId": f"tf{file_id}",
            "offsetStart": start,
            "offsetEnd": end,
        }
        return _image_doc(self.dataset, name, end - start, head, extra)

    def hash_item(self, name: str, digest: Any) -> dict[str, Any]:
        path = self.store.image_path(str(digest))
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise ApiError(400, f"{name}: no uploaded image with hash {digest}") from None
        return _image_doc(self.dataset, name, size, head, {"hash": digest})

    def item(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise ApiError(400, "each image must be an object")
        name = _check_name(raw.get("title") or raw.get("name"))
        if raw.get("teamFileId") is not None:
            doc = self.blob_item(name, raw)
        elif raw.get("hash") is not None:
            doc = self.hash_item(name, raw["hash"])
        else:
            raise ApiError(400, f"{name}: only teamFileId+sourceBlob or hash images")
        if isinstance(raw.get("meta"), dict):
            doc["meta"] = raw["meta"]
        if isinstance(raw.get("parentId"), int):
            doc["parentId"] = raw["parentId"]
        return doc


def _refuse_conflicts(store: Store, dataset_id: int, names: list[str]) -> None:
    """A name already in the dataset: 400 with ``details.type == "NONUNIQUE"`` and the
    clashing ``{name, id}`` pairs, which the SDK's ``conflict_resolution`` reads."""
    if len(set(names)) != len(names):
        raise ApiError(400, "image names in one request must be unique")
    clashes = store.image_ids_by_name(dataset_id, names)
    if clashes:
        errors = [{"name": n, "id": i} for n, i in clashes.items()]
        raise ApiError(
            400,
            f"{len(errors)} image name(s) already exist in the dataset",
            {"type": "NONUNIQUE", "errors": errors},
        )


@method("images.bulk.add")
def images_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    dataset = store.get("datasets", need(body, "datasetId"))
    items = need(body, "images")
    if not isinstance(items, list):
        raise ApiError(400, "images must be a list")
    names = [i.get("title") or i.get("name") if isinstance(i, dict) else None for i in items]
    _refuse_conflicts(store, dataset["id"], [_check_name(n) for n in names])
    bulk = _BulkAdd(store, dataset)
    try:
        docs = [bulk.item(raw) for raw in items]
    finally:
        bulk.close()
    return store.insert_many("images", dataset["id"], docs)


def _list_source(store: Store, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The images a filtered/sorted listing starts from: an ``id in`` filter is answered
    by id (``get_info_by_id_batch`` sends those), not by reading the whole dataset."""
    by_id = [
        f
        for f in body.get("filter") or []
        if isinstance(f, dict) and f.get("field") == "id" and f.get("operator") in ("=", "in")
    ]
    if by_id:
        value = by_id[0].get("value")
        ids: list[Any] = value if isinstance(value, list) else [value]
        docs = store.get_many("images", ids)
        if body.get("datasetId") is not None:
            return [d for d in docs if d["datasetId"] == body["datasetId"]]
        return [d for d in docs if d["projectId"] == body.get("projectId")]
    if body.get("datasetId") is not None:
        return store.all("images", store.get("datasets", body["datasetId"])["id"])
    project = store.get("projects", need(body, "projectId"))["id"]
    return [i for d in store.all("datasets", project) for i in store.all("images", d["id"])]


@method("images.list")
def images_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    body = as_dict(body)
    page, per_page = page_args(body)
    plain = (
        not body.get("filter")
        and str(body.get("sort") or "id") == "id"
        and str(body.get("sort_order") or "asc").lower() == "asc"
    )
    fields = list_fields(body)
    if body.get("datasetId") is not None and plain:  # the common case, paged in SQL
        dataset = store.get("datasets", body["datasetId"])["id"]
        offset = (page - 1) * per_page
        entities = store.page_json("images", dataset, offset, per_page, fields)
        return paged_json(store.count("images", dataset), per_page, entities)
    docs = sorted_docs(filtered(_list_source(store, body), body.get("filter")), body)
    cut = project(docs[(page - 1) * per_page : page * per_page], fields)
    return paged(len(docs), per_page, cut)


@method("images.info")
def images_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return store.get("images", need(body, "id"))


def _image_body(store: Store, image: dict[str, Any]) -> FileBody:
    """The bytes of one image: a slice of its blob, or its uploaded file."""
    if image.get("relatedDataId") is not None:
        blob = file_body(store, store.get("files", image["relatedDataId"]))
        start, end = image["offsetStart"], image["offsetEnd"]
        if end > blob.size:
            raise ApiError(500, f"image {image['id']} ends past its blob")
        etag = f'"i{image["id"]}-{blob.etag.strip(chr(34))}"'
        return FileBody(blob.path, end - start, etag, start, image["mime"])
    path = store.image_path(image["hash"])
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ApiError(404, f"the bytes of image {image['id']} are gone") from None
    return FileBody(path, size, f'"i{image["id"]}-{path.name[:16]}"', 0, image["mime"])


@method("images.download")
def images_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _image_body(store, store.get("images", need(body, "id")))


@method("images.bulk.download")
def images_bulk_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    """A multipart answer, one part per id named by the id (``MultipartDecoder`` in the
    SDK reads ``name="<id>"``). Parts are small images, so it is built in memory."""
    dataset = need(body, "datasetId")
    boundary = uuid.uuid4().hex
    parts = []
    for image_id in need(body, "imageIds"):
        image = store.get("images", image_id)
        if image["datasetId"] != dataset:
            raise ApiError(400, f"image {image_id} is not in dataset {dataset}")
        src = _image_body(store, image)
        with open(src.path, "rb") as f:
            f.seek(src.offset)
            data = f.read(src.size)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{image_id}"\r\n'
            f"Content-Type: {src.content_type}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Raw(data, f"multipart/form-data; boundary={boundary}")


@method("images.data.download")
def images_data_download(store: Store, body: Any, query: dict[str, str]) -> Any:
    """A whole blob, by the ``downloadId`` of any of its images, within a project of the
    team that owns the file."""
    project = store.get("projects", need(body, "projectId"))
    download_id = str(need(body, "downloadId"))
    if not download_id.startswith("tf") or not download_id[2:].isdigit():
        raise ApiError(404, "unknown downloadId")
    file_doc = store.get("files", int(download_id[2:]))
    if file_doc["teamId"] != project["teamId"]:
        raise ApiError(403, "blob belongs to another team")
    return file_body(store, file_doc)


@method("images.internal.hashes.list")
def images_hashes_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    if not isinstance(body, list):
        raise ApiError(400, "a list of hashes is required")
    return [h for h in body if isinstance(h, str) and store.image_path(h).exists()]


@method("images.bulk.upload")
def images_bulk_upload(store: Store, body: Any, query: dict[str, str]) -> Any:
    """Image bytes by multipart, one ``{"hash"}`` per file part, in order; the server
    computes the hash (the SDK's ``get_file_hash``) and keeps one copy per hash."""
    if not isinstance(body, list):
        raise ApiError(400, "a multipart body is required")
    out = []
    for _field, filename, path in body:
        if filename is None:
            continue
        digest = sly_hash(path)
        os.replace(path, store.image_path(digest))
        out.append({"hash": digest})
    return out


def _remove_images(store: Store, ids: Any) -> dict[str, Any]:
    if not isinstance(ids, list):
        raise ApiError(400, "a list of image ids is required")
    with store.transaction():
        for image in store.get_many("images", ids):
            _drop_annotation(store, image["id"])
            store.delete("images", image["id"])
    return {"success": True}


@method("images.bulk.remove")
def images_bulk_remove(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _remove_images(store, need(body, "imageIds"))


@method("images.remove")
def images_remove(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _remove_images(store, [need(body, "id")])


# ---- annotations ------------------------------------------------------------------------


def _empty_annotation(image: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "",
        "tags": [],
        "objects": [],
        "customBigData": {},
        "size": {"height": image.get("height"), "width": image.get("width")},
    }


def _ann_doc(
    image: dict[str, Any], rows: list[dict[str, Any]], labels: _Labels | None = None
) -> dict[str, Any]:
    """``AnnotationInfo`` of an image (an empty annotation of its size if none was set),
    with the figures and image tags added one by one merged in after the stored ones."""
    ann = rows[-1]["annotation"] if rows else _empty_annotation(image)
    updated = rows[-1]["updatedAt"] if rows else image["updatedAt"]
    if labels is not None and (labels.figures or labels.tags):
        ann = {
            **ann,
            "objects": [*ann.get("objects", []), *labels.figures],
            "tags": [*ann.get("tags", []), *labels.tags],
        }
    return {
        "imageId": image["id"],
        "imageName": image["name"],
        "annotation": ann,
        "datasetId": image["datasetId"],
        "createdAt": image["createdAt"],
        "updatedAt": updated,
    }


@dataclass
class _Labels:
    """The figures (as annotation objects) and image tags added to one image."""

    figures: list[dict[str, Any]]
    tags: list[dict[str, Any]]


def _ann_docs(store: Store, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [i["id"] for i in images]
    rows = store.children_of("anns", ids)
    figures = store.children_of("figures", ids)
    tags = store.children_of("imagetags", ids)
    return [
        _ann_doc(i, rows[i["id"]], _Labels([f["object"] for f in figures[i["id"]]], tags[i["id"]]))
        for i in images
    ]


def _drop_annotation(store: Store, image_id: int) -> None:
    """Everything labelled on an image: its stored annotation, figures and image tags."""
    for kind in ("anns", "figures", "imagetags"):
        store.delete_children(kind, image_id)


@method("annotations.bulk.add")
def annotations_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    """Replace the annotations of images of one dataset, all in one transaction."""
    dataset = store.get("datasets", need(body, "datasetId"))
    items = need(body, "annotations")
    if not isinstance(items, list):
        raise ApiError(400, "annotations must be a list")
    with store.transaction():
        for item in items:
            image = store.get("images", as_dict(item).get("imageId"))
            if image["datasetId"] != dataset["id"]:
                raise ApiError(400, f"image {image['id']} is not in dataset {dataset['id']}")
            ann = item.get("annotation")
            if not isinstance(ann, dict):
                raise ApiError(400, "annotation must be an object")
            _drop_annotation(store, image["id"])
            store.insert("anns", image["id"], {"annotation": ann})
            objects = ann.get("objects")
            image["labelsCount"] = len(objects) if isinstance(objects, list) else 0
            store.update("images", image)
    return {"success": True}


@method("annotations.info")
def annotations_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    return _ann_docs(store, [store.get("images", need(body, "imageId"))])[0]


@method("annotations.bulk.info")
def annotations_bulk_info(store: Store, body: Any, query: dict[str, str]) -> Any:
    ids = need(body, "imageIds")
    if not isinstance(ids, list):
        raise ApiError(400, "imageIds must be a list")
    if len(ids) > ANN_BULK_MAX:
        raise ApiError(400, f'"imageIds" must contain less than or equal to {ANN_BULK_MAX} items')
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ApiError(400, "imageIds must be integers")
    fields = ("name", "datasetId", "createdAt", "updatedAt", "width", "height")
    found = {row[0]: row for row in store.fields_in("images", "id", ids, fields)}
    missing = next((i for i in ids if i not in found), None)
    if missing is not None:
        raise ApiError(404, f"images {missing} not found")
    dataset = as_dict(body).get("datasetId")
    if dataset is not None and any(found[i][3] != dataset for i in ids):
        raise ApiError(400, f"some images are not in dataset {dataset}")
    labelled = {
        row[1]
        for kind in ("figures", "imagetags")
        for row in store.fields_in(kind, "parent", ids, ())
    }
    if labelled or len(ids) >= ANN_UNSTABLE_FROM:  # figures or tags merged in, or reordered
        docs = _ann_docs(store, [store.get("images", i) for i in ids])
        return _unstable_tags(docs) if len(ids) >= ANN_UNSTABLE_FROM else docs
    stored = {
        row[1]: row for row in store.fields_in("anns", "parent", ids, ("annotation", "updatedAt"))
    }
    return raw_list([_ann_doc_json(found[i], stored.get(i)) for i in ids])


def _unstable_tags(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``docs`` with the tags of every object turned by one more step than last time (new
    objects and lists: the stored ones are left as they are)."""
    turn = next(_unstable_turns)
    for doc in docs:
        ann = doc["annotation"]
        objects = ann.get("objects") if isinstance(ann, dict) else None
        if not isinstance(objects, list):
            continue
        turned = []
        for obj in objects:
            tags = obj.get("tags") if isinstance(obj, dict) else None
            if isinstance(tags, list) and len(tags) > 1:
                k = turn % len(tags)
                obj = {**obj, "tags": tags[k:] + tags[:k]}
            turned.append(obj)
        doc["annotation"] = {**ann, "objects": turned}
    return docs


def _ann_doc_json(image: tuple[Any, ...], stored: tuple[Any, ...] | None) -> str:
    """:func:`_ann_doc` of an image without added figures or tags, as JSON text: the
    stored annotation goes out as SQLite gave it, never decoded."""
    ident, _, name, dataset, created, updated, width, height = image
    if stored is None:
        ann = json.dumps(_empty_annotation({"height": height, "width": width}))
    else:
        ann, updated = stored[2], stored[3]
    head = json.dumps(
        {
            "imageId": ident,
            "imageName": name,
            "datasetId": dataset,
            "createdAt": created,
            "updatedAt": updated,
        }
    )
    return f'{head[:-1]}, "annotation": {ann}}}'


@method("annotations.list")
def annotations_list(store: Store, body: Any, query: dict[str, str]) -> Any:
    """Paged like ``images.list``: one page of images, then their annotations."""
    body = as_dict(body)
    dataset = store.get("datasets", need(body, "datasetId"))["id"]
    page, per_page = page_args(body)
    if body.get("filter"):
        images = filtered(store.all("images", dataset), body["filter"])
        total, images = len(images), images[(page - 1) * per_page : page * per_page]
    else:
        total = store.count("images", dataset)
        images = store.page("images", dataset, (page - 1) * per_page, per_page)
    return paged(total, per_page, _ann_docs(store, images))


# ---- figures and tags one by one (``upload_anns_async``, used by ``quick_import``) -------


def _meta_of(store: Store, project_id: int) -> tuple[dict[int, str], dict[int, str]]:
    """class id -> title and tag id -> name of a project's meta (ids the emulator gave)."""
    meta = store.get("projects", project_id).get("meta") or {}
    classes = {c["id"]: c.get("title", "") for c in meta.get("classes", []) if "id" in c}
    tags = {t["id"]: t.get("name", "") for t in meta.get("tags", []) if "id" in t}
    return classes, tags


@method("figures.bulk.add")
def figures_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    """Add labels to images; each becomes an object of the image's annotation.

    The geometry is stored exactly as sent: the server keeps figures in its own
    (subpixel) coordinates and the SDK's ``upload_anns_async`` sends ``to_json()`` of the
    geometry without converting it, so a download converts what was never converted.
    """
    figures = need(body, "figures")
    if not isinstance(figures, list):
        raise ApiError(400, "figures must be a list")
    default_entity = as_dict(body).get("entityId")
    out: list[dict[str, Any]] = []
    with store.transaction():
        for raw in figures:
            fig = as_dict(raw)
            image = store.get("images", fig.get("entityId", default_entity))
            classes, _ = _meta_of(store, image["projectId"])
            class_id = fig.get("classId")
            if class_id not in classes:
                raise ApiError(400, f"class {class_id!r} is not in the project's meta")
            geometry = fig.get("geometry")
            if not isinstance(geometry, dict) or not isinstance(fig.get("geometryType"), str):
                raise ApiError(400, "a figure needs geometryType and a geometry object")
            row = store.insert("figures", image["id"], {"object": {}})
            row["object"] = {
                "id": row["id"],
                "classId": class_id,
                "classTitle": classes[class_id],
                "geometryType": fig["geometryType"],
                "tags": [],
                **geometry,
            }
            store.update("figures", row)
            image["labelsCount"] = image.get("labelsCount", 0) + 1
            store.update("images", image)
            out.append({"id": row["id"]})
    return out


def _tag_value(tag_names: dict[int, str], tag: dict[str, Any]) -> dict[str, Any]:
    tag_id = tag.get("tagId")
    if tag_id not in tag_names:
        raise ApiError(400, f"tag {tag_id!r} is not in the project's meta")
    return {"tagId": tag_id, "name": tag_names[tag_id], "value": tag.get("value")}


@method("figures.tags.bulk.add")
def figures_tags_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    tags = need(body, "tags")
    if not isinstance(tags, list):
        raise ApiError(400, "tags must be a list")
    _, tag_names = _meta_of(store, need(body, "projectId"))
    with store.transaction():
        for raw in tags:
            tag = as_dict(raw)
            row = store.get("figures", tag.get("figureId"))
            row["object"]["tags"].append(_tag_value(tag_names, tag))
            store.update("figures", row)
    return {"success": True}


@method("image-tags.bulk.add-to-image")
def image_tags_bulk_add(store: Store, body: Any, query: dict[str, str]) -> Any:
    """One tag (with one value) on many images."""
    ids = need(body, "ids")
    if not isinstance(ids, list):
        raise ApiError(400, "ids must be a list of image ids")
    tag = {"tagId": need(body, "tagId"), "value": as_dict(body).get("value")}
    with store.transaction():
        for image_id in ids:
            image = store.get("images", image_id)
            _, tag_names = _meta_of(store, image["projectId"])
            store.insert("imagetags", image["id"], _tag_value(tag_names, tag))
    return {"success": True}
