"""blobfs is one distribution; the API emulator (``emulator/``) and the test fixtures
(``tests/support/``) are not part of it, so the installed package must never need them."""

from __future__ import annotations

import ast
from pathlib import Path

import blobfs

PACKAGE = Path(blobfs.__file__).parent


def _top_level_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_blobfs_module_imports_the_emulator_or_the_tests() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    offending = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in sources
        for name in _top_level_imports(path)
        if name in ("sly_emulator", "tests", "pytest", "hypothesis", "supervisely")
    }
    assert offending == set()


def test_the_package_holds_no_emulator_or_fixtures() -> None:
    assert not (PACKAGE / "testing").exists()
    names = {path.stem for path in PACKAGE.rglob("*.py")}
    assert not names & {"emulator", "seed", "sample", "hostile", "scale"}
