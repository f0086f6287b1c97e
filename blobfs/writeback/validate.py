"""What makes a staged file importable: images, annotation JSON, classes, geometry.

The queue asks before it puts a file into a batch; a refused file stays staged and the
reason shows in ``blobfs status``. Checks read the staged file, the staged ``meta.json``
and the read-only project below (does the image of an annotation exist, which classes
does the project know): all of it lies below the writeback layer, nothing calls up.
"""

from __future__ import annotations

import json
from typing import Any

from blobfs.errors import InvalidInput
from blobfs.format.ann_coords import AnnotationFormatError, to_subpixel
from blobfs.format.images import image_size
from blobfs.layout import IMG_DIR, META_PATH, dataset_of, image_of_ann, image_path
from blobfs.view.tree import DirNode, ProjectView
from blobfs.writeback.spool import Spool


class Validator:
    """``validator(view path) -> reason the staged file cannot be imported, or None``."""

    def __init__(self, spool: Spool, project: ProjectView) -> None:
        self.spool = spool
        self.project = project
        self._meta: bytes | None = None
        self._meta_read = False
        self._classes: tuple[bytes, set[object] | str] | None = None

    def __call__(self, path: str) -> str | None:
        if path == META_PATH:
            return self._json(path, "classes")[1]
        where = dataset_of(path)
        if where is None:
            return "not a dataset image or annotation"
        dataset, kind, name = where
        if kind == IMG_DIR:
            try:
                with self.spool.open_file(path) as f:
                    image_size(f, name)
            except InvalidInput as exc:
                return str(exc)
            except OSError as exc:
                return f"cannot be read: {exc}"
            return None
        ann, problem = self._json(path, "objects")
        if problem:
            return problem
        image = image_of_ann(name)
        img = image_path(dataset, image)
        if self.spool.stat(img) is None and not self._in_project(img):
            return f"no image named {image!r} in the dataset"
        return self._class_problem(ann)

    def _json(self, path: str, required_key: str) -> tuple[dict[str, Any], str | None]:
        try:
            data = self.spool.read_bytes(path)
        except OSError as exc:
            return {}, f"not valid JSON: {exc}"
        return parse_json(data, required_key)

    def _in_project(self, path: str) -> bool:
        node = self.project.lookup(path)
        return node is not None and not isinstance(node, DirNode)

    def new_pass(self) -> None:
        """The queue starts a pass over the spool: read the project's meta afresh (once
        for the pass, not once per annotation: a request each on a remote project)."""
        self._meta = None
        self._meta_read = False

    def _project_meta(self) -> bytes | None:
        if not self._meta_read:
            self._meta = self.project.source.meta_json()
            self._meta_read = True
        return self._meta

    def _known_classes(self, meta_bytes: bytes) -> set[object] | str:
        """The class titles of ``meta_bytes`` (or why they cannot be read), parsed once per
        version of meta.json rather than once per annotation checked against it."""
        if self._classes is not None and self._classes[0] == meta_bytes:
            return self._classes[1]
        try:
            meta = json.loads(meta_bytes)
            known: set[object] | str = {
                c.get("title") for c in meta.get("classes", []) if isinstance(c, dict)
            }
        except (ValueError, AttributeError) as exc:
            known = f"cannot read classes: {exc}"
        self._classes = (meta_bytes, known)
        return known

    def _class_problem(self, ann: dict[str, Any]) -> str | None:
        """Why the annotation ``ann`` (parsed) names classes meta.json lacks or holds
        geometry the remote import cannot convert, or None."""
        staged_meta = self.spool.stat(META_PATH)
        meta_bytes = self.spool.read_bytes(META_PATH) if staged_meta else self._project_meta()
        known = self._known_classes(meta_bytes or b"{}")
        if isinstance(known, str):
            return known
        try:
            used = {o.get("classTitle") for o in ann.get("objects", []) if isinstance(o, dict)}
        except AttributeError as exc:
            return f"cannot read classes: {exc}"
        unknown = sorted(str(u) for u in used - known)
        if unknown:
            return f"unknown classes {unknown} (add them to meta.json)"
        try:
            to_subpixel(ann)  # the conversion a remote import applies: refuse what it cannot
        except AnnotationFormatError as exc:
            return f"bad geometry: {exc}"
        return None


def parse_json(raw: bytes, required_key: str) -> tuple[dict[str, Any], str | None]:
    """``(the object, None)`` when ``raw`` is a Supervisely JSON object with a list under
    ``required_key``, else ``({}, why not)``: parsed once for every check."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return {}, f"not valid JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get(required_key, []), list):
        return {}, f"not a Supervisely JSON object with a '{required_key}' list"
    return data, None
