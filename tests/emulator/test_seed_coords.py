"""The emulator's seeder converts annotations as the SDK's uploads do.

The emulator imports nothing from blobfs, so its seeder carries its own pixel -> subpixel
conversion (``sly_emulator._subpixel``). A seeded project must read back equal to its local
files through the SDK and through a remote mount, so that copy is pinned to the SDK's own
function here, on the same generated annotations that pin blobfs's (``tests/unit``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from sly_emulator._subpixel import to_subpixel

from tests.unit.test_ann_coords import annotations

pytestmark = pytest.mark.sdk


@pytest.fixture(scope="module")
def sdk_annotation() -> Any:
    return pytest.importorskip("supervisely.annotation.annotation").Annotation


@settings(max_examples=300, deadline=None)
@given(ann=annotations)
def test_the_seeders_upload_conversion_equals_the_sdks(
    sdk_annotation: Any, ann: dict[str, Any]
) -> None:
    expected = sdk_annotation._to_subpixel_coordinate_system_json(copy.deepcopy(ann))
    assert to_subpixel(copy.deepcopy(ann)) == expected
