"""Pixel <-> subpixel coordinates of annotation JSON, exactly as the SDK converts them.

The Supervisely server keeps geometry in a *subpixel* system (the labeling tool draws between
pixel centres), while annotation files on disk and everything the SDK hands to a program use
*pixel* coordinates. The SDK converts at its API boundary: ``Annotation.
_to_pixel_coordinate_system_json`` after every annotation download and ``Annotation.
_to_subpixel_coordinate_system_json`` before every upload (``api/annotation_api.py``,
SDK 6.74.51). A mount that served the server's JSON raw would show a rectangle one pixel
larger than ``sly.download`` writes, so blobfs applies the same two functions: the remote
source on the way in, the remote importer on the way out. Local project folders are already
in pixel coordinates and are never converted.

The rules (per label, by ``geometryType``):

* ``rectangle`` (``points.exterior`` = [[left, top], [right, bottom]]) and ``oriented_bbox``
  (``points`` = the same two corners): to pixels, sort each axis, round the near edges up from
  .7 and the far edges up from .3 (all inside one pixel: truncate), then pull the far edges in
  by one; to subpixels, push the far edges out by one.
* every other geometry: points of ``points`` and of multipolygon ``parts`` and graph ``nodes``
  are floored (a point exactly on the image's right/bottom edge goes one pixel in); bitmap
  origins are floored. To subpixels, points get +0.5, node locations floor + 0.5, bitmap
  origins are floored.

Annotation JSON is untrusted input (a server, or a file a user wrote into a writeback mount):
anything that is not the shape above raises :class:`AnnotationFormatError` with a readable
reason instead of a ``TypeError`` from deep inside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from blobfs.errors import BlobfsError

_RIGHT_OVERLAP = 0.3
_LEFT_OVERLAP = 1 - _RIGHT_OVERLAP


class AnnotationFormatError(BlobfsError):
    """Annotation JSON whose geometry cannot be converted (wrong shape, not a number)."""


Number = int | float


def _num(value: Any, where: str) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AnnotationFormatError(f"{where}: {value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise AnnotationFormatError(f"{where}: {value!r} is not a finite number")
    return value


def _point(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or len(value) < 2:
        raise AnnotationFormatError(f"{where}: {value!r} is not an [x, y] point")
    _num(value[0], where)
    _num(value[1], where)
    return value


def _points(value: Any, where: str) -> list[list[Any]]:
    if not isinstance(value, list):
        raise AnnotationFormatError(f"{where}: expected a list of points")
    return [_point(p, where) for p in value]


def _rings(value: Any, where: str) -> list[list[list[Any]]]:
    if not isinstance(value, list):
        raise AnnotationFormatError(f"{where}: expected a list of point lists")
    return [_points(ring, where) for ring in value]


def _corners(value: Any, where: str) -> tuple[Number, Number, Number, Number]:
    """(top, left, bottom, right) of a two-corner box, each axis sorted."""
    pts = _points(value, where)
    if len(pts) < 2:
        raise AnnotationFormatError(f"{where}: a box needs two corners")
    top, bottom = sorted([pts[0][1], pts[1][1]])
    left, right = sorted([pts[0][0], pts[1][0]])
    return top, left, bottom, right


def _round_box(top: Number, left: Number, bottom: Number, right: Number) -> tuple[int, ...]:
    if int(top) == int(bottom) and int(left) == int(right):
        return int(top), int(left), int(bottom), int(right)

    def near(v: Number) -> int:
        return math.ceil(v) if v % 1 >= _LEFT_OVERLAP else math.floor(v)

    def far(v: Number) -> int:
        return math.ceil(v) if v % 1 >= _RIGHT_OVERLAP else math.floor(v)

    return near(top), near(left), far(bottom), far(right)


def _box_to_pixel(value: Any, where: str) -> list[list[Number]]:
    top, left, bottom, right = _round_box(*_corners(value, where))
    return [[left, top], [max(left, right - 1), max(top, bottom - 1)]]


def _box_to_subpixel(value: Any, where: str) -> list[list[Number]]:
    top, left, bottom, right = _corners(value, where)
    return [[left, top], [max(left, right + 1), max(top, bottom + 1)]]


def _is_parts(parts: Any) -> bool:
    """The SDK's test for multipolygon ``parts`` (other geometries use the key differently)."""
    return (
        isinstance(parts, list)
        and all(isinstance(part, dict) for part in parts)
        and all(isinstance(part.get("exterior"), list) for part in parts)
        and all(
            part.get("interior") is None or isinstance(part.get("interior"), list) for part in parts
        )
    )


def _label(label: Any, index: int) -> dict[str, Any]:
    if not isinstance(label, dict):
        raise AnnotationFormatError(f"objects[{index}] is not an object")
    if not isinstance(label.get("geometryType"), str):
        raise AnnotationFormatError(f"objects[{index}] has no geometryType")
    return label


def _polygon_points(label: dict[str, Any], where: str) -> list[list[Any]]:
    """Every [x, y] of ``points`` (exterior and holes) and of multipolygon ``parts``."""
    found: list[list[Any]] = []
    points = label.get("points")
    if points is not None:
        if not isinstance(points, dict):
            raise AnnotationFormatError(f"{where}.points is not an object")
        found += _points(points.get("exterior", []), f"{where}.points.exterior")
        for ring in _rings(points.get("interior", []), f"{where}.points.interior"):
            found += ring
    parts = label.get("parts")
    if parts is not None and _is_parts(parts):
        for n, part in enumerate(parts):
            found += _points(part["exterior"], f"{where}.parts[{n}].exterior")
            interior = part.get("interior", [])
            for ring in _rings(interior or [], f"{where}.parts[{n}].interior"):
                found += ring
            part["interior"] = interior
    return found


def _convert_generic(
    label: dict[str, Any],
    where: str,
    point: Callable[[list[Any]], None],
    node: Callable[[list[Any]], list[Number]],
) -> None:
    """Apply ``point`` to every polygon point, ``node`` to every node; floor bitmap origins."""
    for p in _polygon_points(label, where):
        point(p)
    bitmap = label.get("bitmap")
    if bitmap is not None:
        if not isinstance(bitmap, dict):
            raise AnnotationFormatError(f"{where}.bitmap is not an object")
        origin = _point(bitmap.get("origin"), f"{where}.bitmap.origin")
        bitmap["origin"] = [math.floor(origin[0]), math.floor(origin[1])]
    nodes = label.get("nodes")
    if nodes is not None:
        if not isinstance(nodes, dict):
            raise AnnotationFormatError(f"{where}.nodes is not an object")
        for key, value in nodes.items():
            if not isinstance(value, dict):
                raise AnnotationFormatError(f"{where}.nodes[{key!r}] is not an object")
            value["loc"] = node(_point(value.get("loc"), f"{where}.nodes[{key!r}].loc"))


def _convert_labels(
    labels: list[Any],
    box: Callable[[Any, str], list[list[Number]]],
    point: Callable[[list[Any]], None],
    node: Callable[[list[Any]], list[Number]],
) -> None:
    """One pass over the objects: boxes (rectangle, oriented bbox) are converted as a pair
    of corners by ``box``, every other geometry point by point (``_convert_generic``)."""
    for i, raw in enumerate(labels):
        label = _label(raw, i)
        where = f"objects[{i}]"
        kind = label["geometryType"]
        if kind == "rectangle":
            points = label.get("points")
            if not isinstance(points, dict):
                raise AnnotationFormatError(f"{where}.points is not an object")
            points["exterior"] = box(points.get("exterior"), f"{where}.points.exterior")
        elif kind == "oriented_bbox":
            label["points"] = box(label.get("points"), f"{where}.points")
        else:
            _convert_generic(label, where, point, node)


def _labels(ann: Any) -> tuple[dict[str, Any], list[Any]]:
    if not isinstance(ann, dict):
        raise AnnotationFormatError("annotation is not a JSON object")
    labels = ann.get("objects", [])
    if not isinstance(labels, list):
        raise AnnotationFormatError("annotation 'objects' is not a list")
    return ann, labels


def to_pixel(ann: Any) -> dict[str, Any]:
    """Server (subpixel) annotation JSON -> pixel coordinates, in place; returns ``ann``."""
    doc, labels = _labels(ann)
    size = doc.get("size")
    if not isinstance(size, dict):
        raise AnnotationFormatError("annotation has no image size")
    height = _num(size.get("height"), "size.height")
    width = _num(size.get("width"), "size.width")

    def edge(v: Number, limit: Number) -> int:
        return math.floor(v) - 1 if v == limit else math.floor(v)

    def point(p: list[Any]) -> None:
        p[0] = edge(p[0], width)
        p[1] = edge(p[1], height)

    def node(loc: list[Any]) -> list[Number]:
        return [edge(loc[0], width), edge(loc[1], height)]

    _convert_labels(labels, _box_to_pixel, point, node)
    return doc


def to_subpixel(ann: Any) -> dict[str, Any]:
    """Pixel annotation JSON (files, SDK objects) -> the server's subpixel system, in place."""
    doc, labels = _labels(ann)

    def point(p: list[Any]) -> None:
        p[0] = p[0] + 0.5
        p[1] = p[1] + 0.5

    def node(loc: list[Any]) -> list[Number]:
        return [math.floor(loc[0]) + 0.5, math.floor(loc[1]) + 0.5]

    _convert_labels(labels, _box_to_subpixel, point, node)
    return doc
