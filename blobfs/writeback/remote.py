"""RemoteImporter: a batch becomes a blob in Team Files plus images registered by offsets.

The SDK's "optimized import" flow, made restartable. Each step's result is saved in the
batch manifest before the next starts:

1. ``packed``: the ranges of the batch's images in its tar are recorded in the manifest.
   A batch whose images are all held (in its durable ``data`` file) has no tar on disk:
   the tar is made from those bytes as it uploads (:class:`HeldTar`), the same bytes at
   every attempt. Any other batch's images are first written into
   ``spool/batches/<id>/<stem>.tar``, durably;
2. ``uploaded``: the tar is in Team Files under ``/blob-files/`` and its id is recorded,
   with ``<stem>_offsets.pkl`` beside it (the SDK's own layout: the stock SDK's
   ``upload_blob_images(dataset, blob_file)`` then registers the same blob into any other
   dataset or project without uploading the images again);
3. ``registered``: images are added by offsets; names the dataset already has are skipped,
   so a retried or repeated registration never creates duplicates;
4. annotations (staged or empty ones with the right size) and meta are uploaded; both are
   idempotent writes. A chunk's annotations go up as soon as registration gave it its ids
   (while the other chunks register); those of images registered by an earlier attempt
   after the registration.

A crash between upload and the manifest save uploads the tar again on restart: an orphan
file in Team Files, never a duplicate image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from blobfs.errors import RemoteError
from blobfs.failpoints import failpoint
from blobfs.format.ann_coords import to_subpixel
from blobfs.format.images import image_size, image_size_of_file
from blobfs.format.offsets import OFFSETS_SUFFIX, write_offsets
from blobfs.format.pack import (
    BLOCK,
    RECORD,
    InlineFile,
    TarBlobWriter,
    empty_annotation,
    finish_tar,
    member_header,
    open_source,
)
from blobfs.model import BlobMember
from blobfs.sly.api import ANN_ADD_BATCH, DEFAULT_CONCURRENCY, SuperviselyWriteApi
from blobfs.transport.http import UPLOAD_CHUNK, UploadContent
from blobfs.writeback.importer import BatchFiles, PhaseTimes, split_batch
from blobfs.writeback.spool import Batch

logger = logging.getLogger(__name__)

TEAM_FILES_BLOB_DIR = "/blob-files/"
#: Images per ``images.bulk.add`` request.
REGISTER_BATCH = 500
T = TypeVar("T")
R = TypeVar("R")


class RemoteImporter:
    """Imports batches into one remote project."""

    def __init__(self, api: Any, project_id: int) -> None:
        concurrency = getattr(api, "concurrency", DEFAULT_CONCURRENCY)
        self.api = SuperviselyWriteApi(api.client, concurrency)
        self.project_id = project_id
        self._team_id: int | None = None

    def _each(self, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``work`` of every item, up to ``--concurrency`` requests in flight: a batch's
        requests are independent, and at 50 ms a request one after the other is what a
        flush of 30,000 images would wait for."""
        if len(items) <= 1:
            return [work(item) for item in items]
        workers = min(self.api.concurrency, len(items))
        with ThreadPoolExecutor(workers, thread_name_prefix="blobfs-import") as pool:
            return list(pool.map(work, items))

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

    def import_batch(self, spool: BatchFiles, batch: Batch) -> None:
        images, anns, meta = split_batch(batch)
        phases = PhaseTimes()  # for the batch's log line
        if meta is not None:
            with phases.timed("meta"):
                self.api.update_meta(self.project_id, json.loads(spool.batch_bytes(batch, meta)))
        if not batch.dataset:
            return
        with ThreadPoolExecutor(2, thread_name_prefix="blobfs-prepare") as pool:
            # the round trips that need no tar run while it is packed (at 50 ms each one
            # in turn is what the flush would otherwise wait for): the dataset and the
            # names it already has, and the team the tar goes to
            target = pool.submit(self._target, batch.dataset, bool(images))
            team = pool.submit(self.team_id) if images and batch.state != "registered" else None
            # what the annotations step sends, made while the tar uploads (the upload
            # waits on the network, this on the CPU): the staged annotations, and an empty
            # one with its image's size for an image without one
            by_name: dict[str, Any] = {}
            with phases.timed("sizes"):
                for view_path in images:
                    name = view_path.rsplit("/", 1)[1]
                    if name not in anns:
                        width, height = _image_size(spool.batch_source(batch, view_path), name)
                        by_name[name] = empty_annotation(width, height)
            annotated: set[str] = set()
            if images:
                annotated = self._import_images(
                    spool,
                    batch,
                    images,
                    target,
                    team,
                    lambda: _read_anns(spool, batch, anns, by_name),
                    phases,
                    by_name,
                )
            else:
                with phases.timed("read anns"):
                    _read_anns(spool, batch, anns, by_name)
            with phases.timed("dataset"):
                dataset, _ = target.result()
        rest = {name: ann for name, ann in by_name.items() if name not in annotated}
        existing = dict(batch.image_ids)
        if any(name not in existing for name in rest):
            with phases.timed("list"):
                existing = {img.name: img.id for img in self.api.images(dataset)}
        payload: list[tuple[int, Any]] = []
        for name, ann in rest.items():
            if name not in existing:
                raise RemoteError(f"annotation for {name!r}: no such image in the dataset")
            payload.append((existing[name], ann))
        chunks = [payload[i : i + ANN_ADD_BATCH] for i in range(0, len(payload), ANN_ADD_BATCH)]
        with phases.timed("anns"):
            self._each(lambda chunk: self.api.add_annotations(dataset, chunk), chunks)
        logger.info(
            "imported %d images and %d annotations into dataset %d (%s)",
            len(images),
            len(annotated) + len(payload),
            dataset,
            phases,
        )

    def _target(self, path: list[str], images: bool) -> tuple[int, dict[str, int]]:
        """(id of the dataset at ``path``, name -> id of the images it has now when the
        batch has images). The names are read before this batch registers anything: what
        an earlier attempt of it registered is then skipped."""
        dataset = self.dataset_id(path)
        if not images:
            return dataset, {}
        return dataset, {img.name: img.id for img in self.api.images(dataset)}

    def _import_images(
        self,
        spool: BatchFiles,
        batch: Batch,
        images: list[str],
        target: Future[tuple[int, dict[str, int]]],
        team: Future[int] | None,
        meanwhile: Callable[[], None] = lambda: None,
        phases: PhaseTimes | None = None,
        anns: dict[str, Any] | None = None,
    ) -> set[str]:
        """Pack, upload, register (each step once, saved in the manifest); ``meanwhile``
        runs on this thread while the tar and its offsets upload. ``target`` is the
        dataset and the names it had before this batch registered anything, ``team`` the
        team whose files get the tar (None once the batch is registered).

        Each registered chunk's annotations (from ``anns``, image name -> annotation,
        complete once ``meanwhile`` returned) are sent as soon as the chunk has its ids,
        by the request's own worker: they need nothing but those ids, and the requests of
        the other chunks go on meanwhile. Returns the names whose annotations were sent
        (uploading an annotation is an idempotent write: after a crash the retry sends
        it again)."""
        tar_path = spool.batches_dir / batch.id / f"{batch.stem}.tar"
        phases = phases or PhaseTimes()
        made: HeldTar | None = None  # the tar made as it uploads, laid out by the pack
        if batch.state == "new":
            with phases.timed("pack"):
                made = HeldTar.of(spool, batch, images)
                batch.members = (
                    made.members if made is not None else self._pack(spool, batch, images, tar_path)
                )
            batch.state = "packed"
            with phases.timed("manifest"):
                spool.save_batch(batch)
            failpoint("remote-after-pack")
        marked = False
        if batch.state != "packed":
            meanwhile()
        else:
            assert team is not None
            with phases.timed("team"):
                team_id = team.result()
            tar = made if made is not None else _tar_source(spool, batch, images, tar_path)

            def upload_offsets() -> int:  # made while the tar goes up: it waits on the network
                offsets = self._write_offsets(batch, tar_path)
                return self.api.upload_team_file(
                    team_id, TEAM_FILES_BLOB_DIR, offsets.name, str(offsets)
                )

            with ThreadPoolExecutor(3, thread_name_prefix="blobfs-upload") as pool:
                uploads: list[Future[int]] = [
                    pool.submit(
                        self.api.upload_team_file, team_id, TEAM_FILES_BLOB_DIR, tar_path.name, tar
                    ),
                    pool.submit(upload_offsets),
                ]
                # the flag the SDK's upload_by_offsets sets; idempotent, so set while the
                # tar uploads
                mark = pool.submit(self.api.mark_blob_project, self.project_id)
                with phases.timed("read anns"):
                    meanwhile()
                with phases.timed("upload"):
                    batch.team_file_id = uploads[0].result()
                    uploads[1].result()
                    mark.result()
                marked = True
            failpoint("remote-after-upload")
            batch.state = "uploaded"
            with phases.timed("manifest"):
                spool.save_batch(batch)
        if batch.state == "uploaded":
            return self._register(spool, batch, target, marked, anns or {}, phases)
        return set()

    def _register(
        self,
        spool: BatchFiles,
        batch: Batch,
        target: Future[tuple[int, dict[str, int]]],
        marked: bool,
        anns: dict[str, Any],
        phases: PhaseTimes,
    ) -> set[str]:
        """Register an uploaded batch's images, the names the dataset has skipped, and send
        each chunk's annotations once it has its ids; the names whose annotations went."""
        assert batch.team_file_id is not None
        with phases.timed("dataset"):
            dataset, have = target.result()
        todo = [(str(n), int(str(s)), int(str(e))) for n, s, e in batch.members if n not in have]
        if not marked:  # a batch resumed after its upload
            self.api.mark_blob_project(self.project_id)
        team_file = batch.team_file_id
        added: dict[str, int] = {}
        chunks = [todo[i : i + REGISTER_BATCH] for i in range(0, len(todo), REGISTER_BATCH)]

        def register(chunk: list[tuple[str, int, int]]) -> dict[str, int]:
            ids = self.api.add_blob_images(dataset, team_file, chunk)
            sent = [name for name, _, _ in chunk if name in anns and name in ids]
            payload = [(ids[name], anns[name]) for name in sent]
            self.api.add_annotations(dataset, payload)
            return ids

        with phases.timed("register + anns"):
            for part in self._each(register, chunks):
                added.update(part)
        failpoint("remote-after-register")
        # the ids the annotations need: no second listing of the dataset
        batch.image_ids = {
            str(n): added[str(n)] if str(n) in added else have[str(n)]
            for n, _, _ in batch.members
            if str(n) in added or str(n) in have
        }
        batch.state = "registered"
        with phases.timed("manifest"):
            spool.save_batch(batch)
        return {name for name, _, _ in todo if name in anns and name in added}

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
        self, spool: BatchFiles, batch: Batch, images: list[str], tar_path: Path
    ) -> list[list[object]]:
        """Write the batch's tar; it is whole and durable before the manifest says ``packed``
        (an upload after a power cut must never send a torn tar)."""
        tmp = tar_path.with_name(f".{tar_path.name}.tmp")
        try:
            with open(tmp, "wb") as stream:
                writer = TarBlobWriter(stream)
                for view_path in images:
                    source = spool.batch_source(batch, view_path)
                    src, size, mtime = open_source(source)
                    with src:
                        writer.add(source.name, src, size, mtime)
                finish_tar(writer, stream, tmp, tar_path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full spool: the retry starts afresh
            raise
        return [[m.name, m.start, m.end] for m in writer.members]


def _tar_source(
    spool: BatchFiles, batch: Batch, images: list[str], tar_path: Path
) -> str | UploadContent:
    """What a packed batch uploads as its tar: the tar on disk, or one made as it uploads."""
    if tar_path.exists():
        return str(tar_path)
    held = HeldTar.of(spool, batch, images)
    if held is None:
        raise RemoteError(f"batch {batch.id}: packed, but has no tar and not every image held")
    return held


class HeldTar:
    """The tar of a batch whose images are all held, made from their bytes in the batch's
    ``data`` file as it uploads.

    That file is durable before the batch's manifest exists, and its bytes never change,
    so every attempt of the upload sends the same tar: no copy of the images needs to be
    written and flushed first. Members are laid out as :class:`TarBlobWriter` lays them
    (the same headers, padding and end blocks): the offsets match the bytes either way."""

    def __init__(self, spool: BatchFiles, batch: Batch, images: list[str]) -> None:
        self._spool, self._batch = spool, batch
        self._plan: list[tuple[str, bytes, int]] = []  # (view path, header, size)
        self.members: list[list[object]] = []
        pos = 0
        for view_path in images:
            _, size, mtime_ns = (int(str(v)) for v in batch.held[view_path])
            name = view_path.rsplit("/", 1)[1]
            header = member_header(name, size, int(mtime_ns / 1e9))  # as InlineFile's mtime
            start = pos + len(header)
            self.members.append([name, start, start + size])
            self._plan.append((view_path, header, size))
            pos = start + size + (-size % BLOCK)
        pos += 2 * BLOCK
        #: Bytes of the whole tar.
        self.size = pos + (-pos % RECORD)

    @classmethod
    def of(cls, spool: BatchFiles, batch: Batch, images: list[str]) -> HeldTar | None:
        """The batch's tar made as it uploads, or None when an image is not held."""
        if images and all(path in batch.held for path in images):
            return cls(spool, batch, images)
        return None

    def __iter__(self) -> Iterator[bytes]:
        """The tar's bytes in chunks of about ``UPLOAD_CHUNK`` (one send each, not one per
        image)."""
        out = bytearray()
        sent = 0
        for view_path, header, size in self._plan:
            source = self._spool.batch_source(self._batch, view_path)
            assert isinstance(source, InlineFile)
            out += header
            out += source.data
            out += bytes(-size % BLOCK)
            if len(out) >= UPLOAD_CHUNK:
                sent += len(out)
                yield bytes(out)
                out.clear()
        out += bytes(self.size - sent - len(out))  # the end blocks
        yield bytes(out)


def _read_anns(spool: BatchFiles, batch: Batch, anns: dict[str, str], into: dict[str, Any]) -> None:
    """The batch's staged annotations, converted as the server stores them, into ``into``
    (image name -> annotation)."""
    for name, ann_path in anns.items():
        into[name] = to_subpixel(json.loads(spool.batch_bytes(batch, ann_path)))


def _image_size(source: Path | InlineFile, name: str) -> tuple[int, int]:
    """An image's size from its header: a held file's bytes, or a file (remembered by
    the file's identity, see ``image_size_of_file``)."""
    if isinstance(source, InlineFile):
        return image_size(source.open(), name)
    return image_size_of_file(source, name)
