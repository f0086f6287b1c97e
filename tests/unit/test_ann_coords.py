"""Annotation coordinates: blobfs converts exactly as the SDK does at its API boundary."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blobfs.format.ann_coords import AnnotationFormatError, to_pixel, to_subpixel

W, H = 40, 30
coord_x = st.one_of(st.integers(0, W), st.floats(0, W, allow_nan=False).map(lambda v: round(v, 3)))
coord_y = st.one_of(st.integers(0, H), st.floats(0, H, allow_nan=False).map(lambda v: round(v, 3)))
point = st.tuples(coord_x, coord_y).map(list)
ring = st.lists(point, min_size=1, max_size=5)


def _label(kind: str, **geometry: Any) -> dict[str, Any]:
    return {"classTitle": "c", "geometryType": kind, "tags": [], **geometry}


labels = st.one_of(
    st.tuples(point, point).map(
        lambda c: _label("rectangle", points={"exterior": list(c), "interior": []})
    ),
    st.tuples(point, point).map(lambda c: _label("oriented_bbox", points=list(c), angle=0.3)),
    st.tuples(ring, st.lists(ring, max_size=2)).map(
        lambda r: _label("polygon", points={"exterior": r[0], "interior": r[1]})
    ),
    point.map(lambda p: _label("point", points={"exterior": [p], "interior": []})),
    st.lists(
        st.tuples(ring, st.lists(ring, max_size=1)).map(
            lambda r: {"exterior": r[0], "interior": r[1]}
        ),
        min_size=1,
        max_size=2,
    ).map(lambda parts: _label("multipolygon", parts=parts)),
    point.map(lambda p: _label("bitmap", bitmap={"origin": p, "data": "eJw="})),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), point.map(lambda p: {"loc": p})).map(
        lambda nodes: _label("graph", nodes=nodes)
    ),
)
annotations = st.lists(labels, max_size=6).map(
    lambda objs: {"size": {"height": H, "width": W}, "tags": [], "description": "", "objects": objs}
)


@pytest.fixture(scope="module")
def sdk_annotation() -> Any:
    return pytest.importorskip("supervisely.annotation.annotation").Annotation


@settings(max_examples=300, deadline=None)
@given(ann=annotations)
def test_download_conversion_equals_the_sdks(sdk_annotation: Any, ann: dict[str, Any]) -> None:
    expected = sdk_annotation._to_pixel_coordinate_system_json(copy.deepcopy(ann))
    assert to_pixel(copy.deepcopy(ann)) == expected


@settings(max_examples=300, deadline=None)
@given(ann=annotations)
def test_upload_conversion_equals_the_sdks(sdk_annotation: Any, ann: dict[str, Any]) -> None:
    expected = sdk_annotation._to_subpixel_coordinate_system_json(copy.deepcopy(ann))
    assert to_subpixel(copy.deepcopy(ann)) == expected


def test_a_pixel_rectangle_survives_upload_and_download() -> None:
    ann = {
        "size": {"height": 10, "width": 10},
        "objects": [_label("rectangle", points={"exterior": [[2, 1], [3, 4]], "interior": []})],
    }
    server = to_subpixel(copy.deepcopy(ann))
    assert server["objects"][0]["points"]["exterior"] == [[2, 1], [4, 5]]
    assert to_pixel(server) == ann


@pytest.mark.parametrize(
    ("ann", "reason"),
    [
        ([], "not a JSON object"),
        ({"objects": []}, "no image size"),
        ({"size": {"height": "x", "width": 1}, "objects": []}, "size.height"),
        ({"size": {"height": 1, "width": 1}, "objects": {}}, "not a list"),
        ({"size": {"height": 1, "width": 1}, "objects": [7]}, "objects[0] is not an object"),
        ({"size": {"height": 1, "width": 1}, "objects": [{}]}, "no geometryType"),
        (
            {"size": {"height": 9, "width": 9}, "objects": [_label("rectangle", points=[1])]},
            "points is not an object",
        ),
        (
            {
                "size": {"height": 9, "width": 9},
                "objects": [_label("polygon", points={"exterior": [[1, True]], "interior": []})],
            },
            "is not a number",
        ),
        (
            {
                "size": {"height": 9, "width": 9},
                "objects": [_label("point", points={"exterior": [[float("nan"), 1]]})],
            },
            "not a finite number",
        ),
        (
            {"size": {"height": 9, "width": 9}, "objects": [_label("graph", nodes={"a": 1})]},
            "nodes['a'] is not an object",
        ),
        (
            {
                "size": {"height": 9, "width": 9},
                "objects": [_label("oriented_bbox", points=[[1, 1]])],
            },
            "two corners",
        ),
    ],
)
def test_malformed_geometry_is_a_clear_error(ann: Any, reason: str) -> None:
    with pytest.raises(AnnotationFormatError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        to_pixel(ann)
