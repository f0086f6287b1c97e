"""Fixtures for writeback tests: a small local project; real mounts come from the
suite's ``mounts`` fixture (``mounts.start_writeback``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobfs.format.pack import ProjectPacker
from tests.conftest import require_fuse
from tests.support.sample import make_images


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with dataset ``ds`` of 10 blob images (seeds 0..9)."""
    root = tmp_path / "project"
    images = make_images(tmp_path / "seed-images", 10)
    ProjectPacker(root, "ds").pack(images)
    return root
