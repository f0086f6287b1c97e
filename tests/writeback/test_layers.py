"""Writeback is a layer over the read-only mount, not part of it: a read-only mount loads
none of ``blobfs.writeback`` (nor the writable FUSE adapter), and the layer below the
overlay knows nothing of it. Likewise a local mount loads nothing of the remote side."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from blobfs.format.pack import ProjectPacker
from tests.support import harness
from tests.support.sample import make_images

ROOT = Path(__file__).resolve().parents[2]
WRITEBACK = ("blobfs.writeback", "blobfs.fuse.writeback_ops")
#: What only a remote mount needs: the remote source, the REST client, the HTTP stack.
REMOTE = ("blobfs.sources.remote", "blobfs.sly", "blobfs.transport.http", "requests")


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
    assert not [m for m in loaded if m.startswith(REMOTE)], sorted(loaded)


def test_a_local_source_and_view_are_built_without_the_remote_side(tmp_path: Path) -> None:
    """The daemon's composition imports the remote source lazily: in a fresh interpreter,
    ``import blobfs.daemon``, building a local project's source and view and reading a file
    through it load neither the remote source, the REST client nor ``requests``."""
    project = tmp_path / "project"
    images = make_images(tmp_path / "seed", 1)
    ProjectPacker(project, "ds").pack(images)
    code = """
import sys
from pathlib import Path
from blobfs import daemon
from blobfs.config import MountConfig
project, image = sys.argv[1:]
view = daemon.build(MountConfig(source=project, mountpoint="/nonexistent"))
assert view.read_path(f"/ds/img/{Path(image).name}", 0, 1 << 20) == Path(image).read_bytes()
print("\\n".join(sorted(sys.modules)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(project), str(images[0])],
        capture_output=True,
        text=True,
        env=os.environ,
        check=True,
    )
    loaded = set(out.stdout.split())
    assert "blobfs.sources.project_dir" in loaded  # the list is what it claims to be
    assert not [m for m in loaded if m.startswith(REMOTE)], sorted(loaded)


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
    below = [
        "view",
        "sources",
        "sly",
        "cache",
        "format",
        "transport",
        "fuse/ops.py",
        "fuse/compat.py",
    ]
    offenders = []
    for part in below:
        target = ROOT / "blobfs" / part
        for path in [target] if target.is_file() else sorted(target.rglob("*.py")):
            bad = [m for m in _imports(path) if m.startswith(WRITEBACK)]
            if bad:
                offenders.append((str(path.relative_to(ROOT)), bad))
    assert offenders == []
