"""Fixtures: one project, served locally and by the emulator, mounted for real."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs.format.pack import ProjectPacker
from tests.support import harness
from tests.support.sample import make_images, png_bytes

TOKEN = "remote-test-token-3f9a"


@dataclass
class Mounted:
    """A live mount and what it must show."""

    kind: str
    mnt: Path
    log: Path
    proc: harness.Mount
    expected: dict[str, bytes]
    emulator: Emulator | None = None

    def unmount(self) -> int | None:
        return self.proc.unmount(30)


def build_project(root: Path, count: int = 40) -> tuple[Path, dict[str, bytes]]:
    """Two datasets (one nested), several blobs, one ordinary image."""
    project = root / "project"
    images = make_images(root / "images", count)
    ProjectPacker(project, "train", blob_size=40_000).pack(images[: count // 2])
    nested = project / "train" / "datasets" / "val"
    ProjectPacker(project, "val", blob_size=40_000, dataset_dir=nested).pack(images[count // 2 :])
    (project / "train" / "img").mkdir()
    (project / "train" / "img" / "plain.png").write_bytes(png_bytes(9999))
    (project / "train" / "ann" / "plain.png.json").write_text(
        '{"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}'
    )
    expected = {f"train/img/{p.name}": p.read_bytes() for p in images[: count // 2]}
    expected.update(
        {f"train/datasets/val/img/{p.name}": p.read_bytes() for p in images[count // 2 :]}
    )
    expected["train/img/plain.png"] = png_bytes(9999)
    return project, expected


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    with Emulator(tmp_path / "emu-state", TOKEN) as emu:
        yield emu


def mount_remote(
    emu: Emulator, project_id: int, mnt: Path, log: Path, *extra: str
) -> harness.Mount:
    return harness.start_remote(emu.url, project_id, mnt, *extra, token=TOKEN, log=log)


@pytest.fixture(params=["local", "remote"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mounted]:
    project, expected = build_project(tmp_path)
    log = tmp_path / "daemon.log"
    if request.param == "local":
        proc = harness.start(project, tmp_path / "mnt", log=log)
        m = Mounted("local", tmp_path / "mnt", log, proc, expected)
    else:
        emu = Emulator(tmp_path / "emu-state", TOKEN).start()
        pid = upload_local_project(emu.url, TOKEN, project)
        proc = mount_remote(emu, pid, tmp_path / "mnt", log)
        m = Mounted("remote", tmp_path / "mnt", log, proc, expected, emu)
    yield m
    m.proc.close()
    if m.emulator is not None:
        m.emulator.stop()
