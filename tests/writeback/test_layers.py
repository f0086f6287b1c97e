"""Writeback is a layer over the read-only mount, not part of it: a read-only mount loads
none of ``blobfs.writeback`` (nor the writable FUSE adapter), and the layer below the
overlay knows nothing of it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from blobfs.blob.pack import ProjectPacker
from blobfs.testing.sample import make_images
from tests.support import harness

ROOT = Path(__file__).resolve().parents[2]
WRITEBACK = ("blobfs.writeback", "blobfs.fuse.writeback_ops")


def test_a_read_only_mount_imports_nothing_of_writeback(tmp_path: Path) -> None:
    """A real mount under ``python -X importtime``, which logs every module it loads:
    mounted, listed, read and unmounted, it never loaded a writeback module."""
    project = tmp_path / "project"
    images = make_images(tmp_path / "seed", 3)
    ProjectPacker(project, "ds").pack(images)
    mnt = tmp_path / "mnt"
    err = tmp_path / "imports"
    with open(err, "wb") as stderr:
        proc = harness.start(project, mnt, python_flags=("-X", "importtime"), stderr=stderr)
        with proc:
            assert (mnt / "ds" / "img" / images[0].name).read_bytes() == images[0].read_bytes()
            assert sorted(os.listdir(mnt / "ds" / "img")) == sorted(p.name for p in images)
            assert proc.unmount(30) == 0
    loaded = {line.rsplit("|", 1)[-1].strip() for line in err.read_text().splitlines()}
    assert "blobfs.view.tree" in loaded  # the log is what it claims to be
    assert not [m for m in loaded if m.startswith(WRITEBACK)], sorted(loaded)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_layers_below_writeback_import_none_of_it() -> None:
    """Data flows one way: the view, sources, cache, transport, format and the read-only
    FUSE adapter never import the writeback layer (it imports them)."""
    below = ["view", "sources", "cache", "transport", "blob", "fuse/ops.py", "fuse/compat.py"]
    offenders = []
    for part in below:
        target = ROOT / "blobfs" / part
        for path in [target] if target.is_file() else sorted(target.rglob("*.py")):
            bad = [m for m in _imports(path) if m.startswith(WRITEBACK)]
            if bad:
                offenders.append((str(path.relative_to(ROOT)), bad))
    assert offenders == []
