"""Helpers shared by the test packages: starting a daemon and waiting for its mount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MOUNT_TIMEOUT_S = 30.0


def wait_mount(
    mnt: Path, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    """Return once ``mnt`` is a mount point; fail if the daemon exits or time runs out."""
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log is not None and log.exists() else ""
            raise RuntimeError(f"daemon exited with {proc.returncode}: {text[-2000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            raise RuntimeError(f"{mnt} did not mount")
        time.sleep(0.02)


def start_mount(
    source: str, mnt: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``blobfs mount SOURCE MNT --foreground`` in a subprocess, once the mount is live."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            source,
            str(mnt),
            "--foreground",
            "--log-file",
            str(log),
            *extra,
        ],
        env={**os.environ, **(env or {})},
    )
    wait_mount(mnt, proc, log)
    return proc


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
