"""A remote batch's annotations go up as its images are registered, chunk by chunk.

An annotation needs nothing but its image's id, so each registered chunk's annotations
are sent while the other chunks register, instead of after the last one. Annotations are
idempotent writes: a batch whose registration failed half-way sends every annotation again
on its retry, each with its image's id, and no image twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from blobfs.errors import RemoteError
from blobfs.sly.api import RemoteDataset
from blobfs.writeback import remote
from blobfs.writeback.remote import RemoteImporter
from blobfs.writeback.spool import Batch, Spool
from tests.helpers import stage_held
from tests.support.sample import png_bytes


class _Server:
    """The write API a batch's import reaches, one request at a time, keeping the order
    of the registrations and annotation uploads."""

    concurrency = 1

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        self.ids: dict[str, int] = {}
        self.anns: dict[int, Any] = {}
        self.fail_registration: int | None = None  # the registration request that fails

    def project_info(self, project_id: int) -> dict[str, Any]:
        return {"teamId": 1}

    def datasets(self, project_id: int) -> list[RemoteDataset]:
        return [RemoteDataset(7, "ds", None, "", None)]

    def images(self, dataset_id: int) -> list[Any]:
        return [SimpleNamespace(name=n, id=i) for n, i in self.ids.items()]

    def upload_team_file(self, team_id: int, remote_dir: str, name: str, source: Any) -> int:
        if not isinstance(source, str):
            b"".join(source)
        return 99

    def mark_blob_project(self, project_id: int) -> None:
        pass

    def add_blob_images(
        self, dataset_id: int, team_file_id: int, items: list[tuple[str, int, int]]
    ) -> dict[str, int]:
        names = [name for name, _, _ in items]
        self.calls.append(("register", names))
        if self.fail_registration == sum(kind == "register" for kind, _ in self.calls):
            raise RemoteError("images.bulk.add: 503")
        for name in names:
            assert name not in self.ids, f"{name} registered twice"
            self.ids[name] = 1000 + len(self.ids)
        return {name: self.ids[name] for name in names}

    def add_annotations(self, dataset_id: int, anns: list[tuple[int, Any]]) -> None:
        self.calls.append(("anns", [image_id for image_id, _ in anns]))
        self.anns.update(anns)


def _batch(spool: Spool, n: int) -> Batch:
    files: list[str] = []
    for i in range(n):
        ann = {"size": {"width": 8, "height": 8}, "tags": [], "objects": [], "description": str(i)}
        for path, data in (
            (f"/ds/img/{i}.png", png_bytes(i)),
            (f"/ds/ann/{i}.png.json", json.dumps(ann).encode()),
        ):
            stage_held(spool, path, data)
            files.append(path)
    return spool.create_batch(Batch("b1", ["ds"], files, "ds_stem"))


def _importer(server: _Server) -> RemoteImporter:
    importer = object.__new__(RemoteImporter)
    importer.api = server  # type: ignore[assignment]
    importer._team_id = None
    importer.project_id = 1
    return importer


def _described(server: _Server) -> dict[str, str]:
    """image name -> the description of the annotation its id got."""
    return {name: server.anns[image_id]["description"] for name, image_id in server.ids.items()}


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spool]:
    """A spool, and registration in chunks of two images."""
    monkeypatch.setattr(remote, "REGISTER_BATCH", 2)
    spool = Spool(tmp_path / "spool")
    yield spool
    spool.close()


def test_each_chunk_s_annotations_go_up_before_the_next_chunk_registers(spool: Spool) -> None:
    server = _Server()
    _importer(server).import_batch(spool, _batch(spool, 5))
    kinds = [kind for kind, _ in server.calls]
    assert kinds == ["register", "anns"] * 3
    for (_, names), (_, ids) in zip(server.calls[::2], server.calls[1::2], strict=True):
        assert ids == [server.ids[name] for name in names]  # the chunk's own images
    assert _described(server) == {f"{i}.png": str(i) for i in range(5)}


def test_a_registration_that_fails_half_way_sends_every_annotation_on_its_retry(
    spool: Spool,
) -> None:
    server = _Server()
    server.fail_registration = 2
    batch = _batch(spool, 5)
    with pytest.raises(RemoteError):
        _importer(server).import_batch(spool, batch)
    assert batch.state == "uploaded"
    # every chunk that registered had its annotations sent as it did
    assert len(server.ids) < 5
    assert sorted(server.anns) == sorted(server.ids.values())
    server.fail_registration = None
    _importer(server).import_batch(spool, batch)
    assert batch.state == "registered"
    assert _described(server) == {f"{i}.png": str(i) for i in range(5)}
    assert sorted(server.anns) == sorted(server.ids.values())
