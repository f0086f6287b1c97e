"""Helpers shared by the test packages (mounts: ``tests/support/harness.py``)."""

from __future__ import annotations

import json
from pathlib import Path

from blobfs.writeback.spool import Spool


def add_class_and_annotation(mnt: Path, ann_path: Path, class_title: str) -> dict[str, object]:
    """Through a writeback mount: add a rectangle class to meta.json, then write an
    annotation using it at ``ann_path``; returns the annotation."""
    meta = json.loads((mnt / "meta.json").read_bytes())
    meta["classes"] = [{"title": class_title, "shape": "rectangle", "color": "#FF0000"}]
    (mnt / "meta.json").write_text(json.dumps(meta))
    ann: dict[str, object] = {
        "description": "",
        "size": {"height": 32, "width": 32},
        "tags": [],
        "objects": [
            {
                "classTitle": class_title,
                "geometryType": "rectangle",
                "tags": [],
                "points": {"exterior": [[1, 1], [5, 5]], "interior": []},
            }
        ],
    }
    ann_path.write_text(json.dumps(ann))
    return ann


def stage_held(spool: Spool, view_path: str, data: bytes) -> None:
    """Commit ``data`` as ``view_path`` the way a small file's close() does: held in the
    spool's journal, with no file of its own."""
    scratch = spool.scratch()
    try:
        scratch.write(data, 0)
        spool.commit_scratch(scratch, view_path)
    finally:
        scratch.close()
