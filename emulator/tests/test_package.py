"""The emulator as a distribution of its own: standard library only, a seeder with a
command line, and the one coordinate rule it applies (README, "Rules")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import TOKEN, LocalProject, call, ok, rectangle_ann

import sly_emulator
from sly_emulator import Emulator
from sly_emulator._subpixel import to_subpixel
from sly_emulator.seed import SeedError, upload_local_project

PACKAGE = Path(sly_emulator.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_only_the_standard_library_and_itself() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert len(sources) >= 8
    foreign = {
        f"{path.name}: {name}"
        for path in sources
        for name in _imported_modules(path)
        if name not in sys.stdlib_module_names and name not in ("sly_emulator", "__future__")
    }
    assert foreign == set()


def seed_command(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m sly_emulator.seed ARGS...``, as a user types it."""
    argv = [sys.executable, "-m", "sly_emulator.seed", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_python_m_seed_uploads_a_project_and_prints_its_id(
    emu: Emulator, local_project: LocalProject, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    done = seed_command(emu.url, local_project.root, "--token-file", token_file, "--name", "x")
    assert done.returncode == 0, done.stderr
    project_id = int(done.stdout.strip())
    info = ok(emu, "projects.info", {"id": project_id})
    assert (info["name"], info["imagesCount"]) == ("x", len(local_project.images))


def test_python_m_seed_says_what_is_wrong_without_a_traceback(
    emu: Emulator, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token")
    (tmp_path / "p").mkdir()
    done = seed_command(emu.url, tmp_path / "p", "--token-file", token_file)
    assert done.returncode == 1
    assert done.stderr.startswith("seed: ") and "401" in done.stderr
    assert "Traceback" not in done.stderr and "not-the-token" not in done.stderr


def test_seeded_annotations_are_stored_in_the_sdk_s_subpixel_form(
    emu: Emulator, local_project: LocalProject
) -> None:
    pid = upload_local_project(emu.url, TOKEN, local_project.root)
    [ds] = ok(emu, "datasets.list", {"projectId": pid})["entities"]
    image = ok(emu, "images.list", {"datasetId": ds["id"], "per_page": 1})["entities"][0]
    stored = ok(emu, "annotations.info", {"imageId": image["id"]})["annotation"]
    # the local file says [[3, 4], [31, 31]] in pixels: the far corner moves out by one
    assert stored["objects"][0]["points"]["exterior"] == [[3, 4], [32, 32]]


def test_a_malformed_annotation_file_is_a_seed_error_naming_it(
    emu: Emulator, local_project: LocalProject
) -> None:
    bad = local_project.root / "ds" / "ann" / "img_002.png.json"
    bad.write_text(json.dumps(rectangle_ann([[1, 1]])))
    with pytest.raises(SeedError, match=r"img_002\.png\.json: .*two corners"):
        upload_local_project(emu.url, TOKEN, local_project.root)
    assert call(emu, "teams.list").status_code == 200


def _label(kind: str, **geometry: Any) -> dict[str, Any]:
    return {"classTitle": "c", "geometryType": kind, "tags": [], **geometry}


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (
            _label("rectangle", points={"exterior": [[5, 6], [2, 1]], "interior": []}),
            _label("rectangle", points={"exterior": [[2, 1], [6, 7]], "interior": []}),
        ),
        (
            _label("oriented_bbox", points=[[2, 1], [3, 4]], angle=0.5),
            _label("oriented_bbox", points=[[2, 1], [4, 5]], angle=0.5),
        ),
        (
            _label("polygon", points={"exterior": [[1, 2], [3, 4]], "interior": [[[0, 0]]]}),
            _label(
                "polygon", points={"exterior": [[1.5, 2.5], [3.5, 4.5]], "interior": [[[0.5, 0.5]]]}
            ),
        ),
        (
            _label("multipolygon", parts=[{"exterior": [[1, 1]]}]),
            _label("multipolygon", parts=[{"exterior": [[1.5, 1.5]], "interior": []}]),
        ),
        (
            _label("graph", nodes={"a": {"loc": [2.7, 3]}}),
            _label("graph", nodes={"a": {"loc": [2.5, 3.5]}}),
        ),
        (
            _label("bitmap", bitmap={"origin": [2.9, 3.1], "data": "eJw="}),
            _label("bitmap", bitmap={"origin": [2, 3], "data": "eJw="}),
        ),
    ],
)
def test_the_subpixel_rule_per_geometry(label: dict[str, Any], expected: dict[str, Any]) -> None:
    ann = {"size": {"height": 9, "width": 9}, "objects": [label]}
    assert to_subpixel(ann)["objects"] == [expected]


@pytest.mark.parametrize(
    ("ann", "reason"),
    [
        ([], "not a JSON object"),
        ({"objects": {}}, "not a list"),
        ({"objects": [{}]}, "geometryType"),
        ({"objects": [_label("rectangle", points=[1])]}, "points is not an object"),
        ({"objects": [_label("point", points={"exterior": [[1, True]]})]}, "not a finite number"),
        ({"objects": [_label("point", points={"exterior": [[float("inf"), 1]]})]}, "finite"),
        ({"objects": [_label("graph", nodes={"a": 1})]}, "nodes['a'] is not an object"),
    ],
)
def test_malformed_geometry_is_a_value_error_saying_where(ann: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[")):
        to_subpixel(ann)
