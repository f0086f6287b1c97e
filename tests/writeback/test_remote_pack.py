"""A remote batch's tar is whole on disk before its manifest says ``packed``, or is made
from held bytes that are.

After a power cut, a manifest that says ``packed`` sends the tar as it is to Team Files:
a tar whose bytes were still only in the page cache would be uploaded torn and registered.
A power cut cannot be produced on demand, so the test records the order of the flushes
that make the tar durable and the manifest save that relies on them.
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blobfs.writeback.remote import RemoteImporter
from blobfs.writeback.spool import INLINE_MAX, Batch, Spool
from tests.helpers import stage_held
from tests.support.sample import png_bytes

T = TypeVar("T")


class _StopAtUpload:
    """The part of the write API the packing step reaches; the upload ends the test."""

    def upload_team_file(self, *args: Any) -> int:
        raise RuntimeError("stop before upload")

    def mark_blob_project(self, project_id: int) -> None:
        pass


def _done(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


def test_the_tar_and_its_folder_are_flushed_before_the_manifest_says_packed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    for i in range(3):
        fd, tmp = spool.new_temp()
        # one file too large to be held: the batch's tar is written (see below for one
        # whose images are all held)
        os.write(fd, png_bytes(i) + bytes(INLINE_MAX if i == 1 else 0))
        spool.commit(fd, tmp, f"/ds/img/{i}.png")
        spool.drop_temp(fd, tmp)
    files = [f"/ds/img/{i}.png" for i in range(3)]
    batch = spool.create_batch(Batch("b1", ["ds"], files, "ds_stem"))
    events: list[tuple[str, str]] = []
    real_fsync, real_save = os.fsync, spool.save_batch

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def save_batch(b: Batch) -> None:
        events.append(("save", b.state))
        real_save(b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(spool, "save_batch", save_batch)
    importer = object.__new__(RemoteImporter)
    importer.api = _StopAtUpload()  # type: ignore[assignment]
    importer._team_id = 1
    importer.project_id = 1
    with pytest.raises(RuntimeError, match="stop before upload"):
        importer._import_images(spool, batch, files, _done((1, {})), _done(1))
    folder = str(spool.batches_dir / "b1")
    tar = f"{folder}/ds_stem.tar"
    saved = events.index(("save", "packed"))
    flushed = [path for kind, path in events[:saved] if kind == "fsync"]
    assert any(p.startswith(folder + "/") and "ds_stem.tar" in p for p in flushed), events
    assert flushed[-1] == folder, events  # the rename into place is durable too
    with tarfile.open(tar) as t:
        assert t.getnames() == ["0.png", "1.png", "2.png"]
    spool.close()


class _Uploaded:
    """The write API's upload step, keeping what each upload sent."""

    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}

    def upload_team_file(self, team_id: int, remote_dir: str, name: str, source: Any) -> int:
        self.sent[name] = Path(source).read_bytes() if isinstance(source, str) else _body(source)
        raise RuntimeError("stop after upload")

    def mark_blob_project(self, project_id: int) -> None:
        pass


def _body(content: Any) -> bytes:
    data = b"".join(content)
    assert len(data) == content.size
    assert b"".join(content) == data  # a retried upload sends the same bytes
    return data


def _held_batch(spool: Spool, n: int, stem: str) -> tuple[Batch, list[str], dict[str, bytes]]:
    files = {f"/ds/img/{i}.png": png_bytes(i) for i in range(n)}
    for path, data in files.items():
        stage_held(spool, path, data)
    batch = spool.create_batch(Batch(stem, ["ds"], list(files), stem))
    return batch, list(files), files


def _import_until_upload(
    spool: Spool, batch: Batch, files: list[str], api: _Uploaded
) -> RemoteImporter:
    importer = object.__new__(RemoteImporter)
    importer.api = api  # type: ignore[assignment]
    importer._team_id = 1
    importer.project_id = 1
    with pytest.raises(RuntimeError, match="stop after upload"):
        importer._import_images(spool, batch, files, _done((1, {})), _done(1))
    return importer


def test_a_batch_of_held_files_uploads_a_tar_made_as_it_goes_equal_to_a_packed_one(
    tmp_path: Path,
) -> None:
    """No tar is written for held images: the one uploaded is made from the batch's data
    file, byte for byte the tar the pack writes, its members where the manifest says."""
    spool = Spool(tmp_path / "spool")
    batch, files, data = _held_batch(spool, 700, "ds_held")  # a few upload chunks
    assert set(batch.held) == set(files)
    api = _Uploaded()
    importer = _import_until_upload(spool, batch, files, api)
    assert batch.state == "packed"
    assert not (spool.batches_dir / batch.id / "ds_held.tar").exists()
    sent = api.sent["ds_held.tar"]
    packed = importer._pack(spool, batch, files, tmp_path / "packed.tar")
    assert sent == (tmp_path / "packed.tar").read_bytes()
    assert batch.members == packed
    for name, start, end in batch.members:
        assert sent[int(str(start)) : int(str(end))] == data[f"/ds/img/{name}"]
    with tarfile.open(tmp_path / "packed.tar") as t:
        assert t.getnames() == [f"{i}.png" for i in range(700)]
    spool.close()


def test_a_held_batch_packed_before_a_restart_uploads_the_same_tar(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    batch, files, _ = _held_batch(spool, 5, "ds_again")
    first = _Uploaded()
    _import_until_upload(spool, batch, files, first)
    spool.close()
    again = Spool(tmp_path / "spool")
    [resumed] = again.open_batches()
    assert resumed.state == "packed"
    second = _Uploaded()
    _import_until_upload(again, resumed, files, second)
    assert second.sent["ds_again.tar"] == first.sent["ds_again.tar"]
    again.close()


def test_each_save_of_a_manifest_is_the_batch_as_it_is_then(tmp_path: Path) -> None:
    """Its large fields are encoded once; what changes (state, ids, a tar's members) is
    saved as it changes, and a field replaced by another of the same length too."""
    spool = Spool(tmp_path / "spool")
    batch, _, _ = _held_batch(spool, 4, "ds_saved")
    steps = [
        {"state": "packed", "members": [[f"{i}.png", 512 * i, 512 * i + 9] for i in range(4)]},
        {"state": "uploaded", "team_file_id": 5},
        {"state": "registered", "image_ids": {f"{i}.png": 10 + i for i in range(4)}},
        {"members": [[f"{i}.png", 0, 1] for i in range(4)]},
    ]
    for changes in steps:
        for name, value in changes.items():
            setattr(batch, name, value)
        spool.save_batch(batch)
        saved = json.loads((spool.batches_dir / batch.id / "manifest.json").read_bytes())
        assert saved == json.loads(json.dumps(batch.to_json()))
    [again] = spool.open_batches()
    assert again == batch
    spool.close()
