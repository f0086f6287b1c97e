"""A remote batch's tar is whole on disk before its manifest says ``packed``.

After a power cut, a manifest that says ``packed`` sends the tar as it is to Team Files:
a tar whose bytes were still only in the page cache would be uploaded torn and registered.
A power cut cannot be produced on demand, so the test records the order of the flushes
that make the tar durable and the manifest save that relies on them.
"""

from __future__ import annotations

import os
import tarfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blobfs.writeback.remote import RemoteImporter
from blobfs.writeback.spool import Batch, Spool
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
        os.write(fd, png_bytes(i))
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
