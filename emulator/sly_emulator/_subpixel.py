"""Pixel -> subpixel coordinates of annotation JSON, the conversion the SDK applies to every
annotation it uploads (``Annotation._to_subpixel_coordinate_system_json``).

Annotation files on disk are in pixel coordinates; a server keeps the subpixel form, and a
client that reads annotations back (the SDK, or any mount of the project) converts to pixels
again. The seeder therefore uploads what the SDK would, so a seeded project reads back equal
to its local files. The emulator itself never converts: it stores what it is sent.

The rule, per object by ``geometryType``:

* ``rectangle`` (``points.exterior``) and ``oriented_bbox`` (``points``), two corners: sort
  each axis, then push the far (right, bottom) edges out by one.
* anything else: every ``[x, y]`` of ``points.exterior``/``points.interior`` and of
  multipolygon ``parts`` gets +0.5 on both axes; graph ``nodes[*].loc`` become
  ``floor + 0.5``; a bitmap ``origin`` is floored.

Input is a user's file: anything not of that shape raises ``ValueError`` saying where.
"""

from __future__ import annotations

import math
from typing import Any


def _point(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or len(value) < 2:
        raise ValueError(f"{where}: {value!r} is not an [x, y] point")
    for v in value[:2]:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{where}: {v!r} is not a finite number")
    return value


def _points(value: Any, where: str) -> list[list[Any]]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of points")
    return [_point(p, where) for p in value]


def _rings(value: Any, where: str) -> list[list[Any]]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of point lists")
    return [p for ring in value for p in _points(ring, where)]


def _box(value: Any, where: str) -> list[list[Any]]:
    corners = _points(value, where)
    if len(corners) < 2:
        raise ValueError(f"{where}: a box needs two corners")
    (x0, y0), (x1, y1) = corners[0][:2], corners[1][:2]
    left, right = sorted([x0, x1])
    top, bottom = sorted([y0, y1])
    return [[left, top], [right + 1, bottom + 1]]


def _is_parts(parts: Any) -> bool:
    """Multipolygon ``parts`` as the SDK recognises them (other geometries reuse the key)."""
    return isinstance(parts, list) and all(
        isinstance(part, dict)
        and isinstance(part.get("exterior"), list)
        and (part.get("interior") is None or isinstance(part.get("interior"), list))
        for part in parts
    )


def _generic(label: dict[str, Any], where: str) -> None:
    found: list[list[Any]] = []
    points = label.get("points")
    if points is not None:
        if not isinstance(points, dict):
            raise ValueError(f"{where}.points is not an object")
        found += _points(points.get("exterior", []), f"{where}.points.exterior")
        found += _rings(points.get("interior", []), f"{where}.points.interior")
    parts = label.get("parts")
    if parts is not None and _is_parts(parts):
        for n, part in enumerate(parts):
            found += _points(part["exterior"], f"{where}.parts[{n}].exterior")
            part.setdefault("interior", [])
            found += _rings(part["interior"] or [], f"{where}.parts[{n}].interior")
    for p in found:
        p[0], p[1] = p[0] + 0.5, p[1] + 0.5
    bitmap = label.get("bitmap")
    if bitmap is not None:
        if not isinstance(bitmap, dict):
            raise ValueError(f"{where}.bitmap is not an object")
        x, y = _point(bitmap.get("origin"), f"{where}.bitmap.origin")[:2]
        bitmap["origin"] = [math.floor(x), math.floor(y)]
    nodes = label.get("nodes")
    if nodes is not None:
        if not isinstance(nodes, dict):
            raise ValueError(f"{where}.nodes is not an object")
        for key, node in nodes.items():
            if not isinstance(node, dict):
                raise ValueError(f"{where}.nodes[{key!r}] is not an object")
            x, y = _point(node.get("loc"), f"{where}.nodes[{key!r}].loc")[:2]
            node["loc"] = [math.floor(x) + 0.5, math.floor(y) + 0.5]


def to_subpixel(ann: Any) -> dict[str, Any]:
    """Convert pixel annotation JSON to the server's subpixel form, in place; returns it."""
    if not isinstance(ann, dict):
        raise ValueError("annotation is not a JSON object")
    labels = ann.get("objects", [])
    if not isinstance(labels, list):
        raise ValueError("annotation 'objects' is not a list")
    for i, label in enumerate(labels):
        where = f"objects[{i}]"
        if not isinstance(label, dict) or not isinstance(label.get("geometryType"), str):
            raise ValueError(f"{where} is not an object with a geometryType")
        kind = label["geometryType"]
        if kind == "rectangle":
            points = label.get("points")
            if not isinstance(points, dict):
                raise ValueError(f"{where}.points is not an object")
            points["exterior"] = _box(points.get("exterior"), f"{where}.points.exterior")
        elif kind == "oriented_bbox":
            label["points"] = _box(label.get("points"), f"{where}.points")
        else:
            _generic(label, where)
    return ann
