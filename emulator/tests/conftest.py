"""Fixtures of the emulator tests: an in-process emulator on a free port, a local project."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import TOKEN, LocalProject, build_local_project

from sly_emulator import Emulator


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[Emulator]:
    with Emulator(tmp_path / "state", TOKEN) as e:
        yield e


@pytest.fixture
def local_project(tmp_path: Path) -> LocalProject:
    return build_local_project(tmp_path / "project")
