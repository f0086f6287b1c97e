"""RemoteImporter: a batch becomes a blob in Team Files plus images registered by offsets.

The SDK's "optimized import" flow, made restartable. Each step's result is saved in the
batch manifest before the next starts:

1. ``packed``: the batch's images are written into ``spool/batches/<id>/<stem>.tar`` and
   their ranges recorded in the manifest;
2. ``uploaded``: the tar is in Team Files under ``/blob-files/`` and its id is recorded,
   with ``<stem>_offsets.pkl`` beside it (the SDK's own layout: the stock SDK's
   ``upload_blob_images(dataset, blob_file)`` then registers the same blob into any other
   dataset or project without uploading the images again);
3. ``registered``: images are added by offsets; names the dataset already has are skipped,
   so a retried or repeated registration never creates duplicates;
4. annotations (staged or empty ones with the right size) and meta are uploaded; both are
   idempotent writes.

A crash between upload and the manifest save uploads the tar again on restart: an orphan
file in Team Files, never a duplicate image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from blobfs.errors import RemoteError
from blobfs.failpoints import failpoint
from blobfs.format.ann_coords import to_subpixel
from blobfs.format.images import image_size_of_file
from blobfs.format.offsets import OFFSETS_SUFFIX, write_offsets
from blobfs.format.pack import TarBlobWriter, empty_annotation, finish_tar
from blobfs.model import BlobMember
from blobfs.sly.api import SuperviselyWriteApi
from blobfs.writeback.importer import split_batch
from blobfs.writeback.spool import Batch, Spool

logger = logging.getLogger(__name__)

TEAM_FILES_BLOB_DIR = "/blob-files/"


class RemoteImporter:
    """Imports batches into one remote project."""

    def __init__(self, api: Any, project_id: int) -> None:
        self.api = SuperviselyWriteApi(api.client)
        self.project_id = project_id
        self._team_id: int | None = None

    def team_id(self) -> int:
        if self._team_id is None:
            info = self.api.project_info(self.project_id)
            team = info.get("teamId")
            if not isinstance(team, int):
                raise RemoteError("projects.info has no teamId")
            self._team_id = team
        return self._team_id

    def dataset_id(self, path: list[str]) -> int:
        """Id of the dataset at ``path``, creating missing levels (by name: idempotent)."""
        parent: int | None = None
        remote = self.api.datasets(self.project_id)
        for name in path:
            found = next((d.id for d in remote if d.name == name and d.parent_id == parent), None)
            if found is None:
                found = self.api.create_dataset(self.project_id, name, parent)
                remote = self.api.datasets(self.project_id)
            parent = found
        assert parent is not None
        return parent

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        images, anns, meta = split_batch(batch)
        if meta is not None:
            self.api.update_meta(
                self.project_id, json.loads(spool.batch_file(batch, meta).read_bytes())
            )
        if not batch.dataset:
            return
        dataset = self.dataset_id(batch.dataset)
        sizes: dict[str, tuple[int, int]] = {}
        if images:
            sizes = self._import_images(spool, batch, images, dataset)
        existing = dict(batch.image_ids)
        if any(name not in existing for name in [*sizes, *anns]):
            existing = {img.name: img.id for img in self.api.images(dataset)}
        payload: list[tuple[int, Any]] = []
        for name, (width, height) in sizes.items():
            if name not in anns:
                payload.append((existing[name], empty_annotation(width, height)))
        for name, ann_path in anns.items():
            if name not in existing:
                raise RemoteError(f"annotation for {name!r}: no such image in the dataset")
            ann = json.loads(spool.batch_file(batch, ann_path).read_bytes())
            payload.append((existing[name], to_subpixel(ann)))
        self.api.add_annotations(dataset, payload)
        logger.info(
            "imported %d images and %d annotations into dataset %d",
            len(images),
            len(payload),
            dataset,
        )

    def _import_images(
        self, spool: Spool, batch: Batch, images: list[str], dataset: int
    ) -> dict[str, tuple[int, int]]:
        tar_path = spool.batches_dir / batch.id / f"{batch.stem}.tar"
        sizes: dict[str, tuple[int, int]] = {}
        for view_path in images:
            sizes[view_path.rsplit("/", 1)[1]] = image_size_of_file(
                spool.batch_file(batch, view_path), view_path
            )
        if batch.state == "new":
            batch.members = self._pack(spool, batch, images, tar_path)
            batch.state = "packed"
            spool.save_batch(batch)
        if batch.state == "packed":
            batch.team_file_id = self.api.upload_team_file(
                self.team_id(), TEAM_FILES_BLOB_DIR, tar_path.name, str(tar_path)
            )
            offsets = self._write_offsets(batch, tar_path)
            self.api.upload_team_file(
                self.team_id(), TEAM_FILES_BLOB_DIR, offsets.name, str(offsets)
            )
            failpoint("remote-after-upload")
            batch.state = "uploaded"
            spool.save_batch(batch)
        if batch.state == "uploaded":
            assert batch.team_file_id is not None
            have = {img.name: img.id for img in self.api.images(dataset)}
            todo = [
                (str(n), int(str(s)), int(str(e))) for n, s, e in batch.members if n not in have
            ]
            self.api.mark_blob_project(self.project_id)
            added = self.api.add_blob_images(dataset, batch.team_file_id, todo)
            failpoint("remote-after-register")
            # the ids the annotations need: no second listing of the dataset
            batch.image_ids = {
                str(n): added[str(n)] if str(n) in added else have[str(n)]
                for n, _, _ in batch.members
                if str(n) in added or str(n) in have
            }
            batch.state = "registered"
            spool.save_batch(batch)
        return sizes

    @staticmethod
    def _write_offsets(batch: Batch, tar_path: Path) -> Path:
        """The batch's offsets file, made from the manifest's members (no flush: it can be
        made again from them, and is only read by the upload that follows)."""
        path = tar_path.with_name(f"{batch.stem}{OFFSETS_SUFFIX}")
        with open(path, "wb") as stream:
            write_offsets(
                stream, (BlobMember(str(n), int(str(s)), int(str(e))) for n, s, e in batch.members)
            )
        return path

    def _pack(
        self, spool: Spool, batch: Batch, images: list[str], tar_path: Path
    ) -> list[list[object]]:
        """Write the batch's tar; it is whole and durable before the manifest says ``packed``
        (an upload after a power cut must never send a torn tar)."""
        tmp = tar_path.with_name(f".{tar_path.name}.tmp")
        try:
            with open(tmp, "wb") as stream:
                writer = TarBlobWriter(stream)
                for view_path in images:
                    path = spool.batch_file(batch, view_path)
                    st = path.stat()
                    with open(path, "rb") as src:
                        writer.add(path.name, src, st.st_size, st.st_mtime)
                finish_tar(writer, stream, tmp, tar_path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full spool: the retry starts afresh
            raise
        return [[m.name, m.start, m.end] for m in writer.members]
