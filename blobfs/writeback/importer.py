"""Importers: turn one staged batch into part of the project, idempotently.

A batch is the staged files of one dataset: images (``/<ds>/img/<name>``), annotations
(``/<ds>/ann/<name>.json``) and maybe ``/meta.json``. Its images go into one new blob named
by ``batch.stem``, chosen before anything is written, so a rerun after a crash can tell what
already landed:

- local: the offsets file ``<ds>/<stem>_offsets.pkl`` is written last and atomically; if it
  exists the blob is in, otherwise the batch is packed again from the start (the temp tar of
  the crashed attempt is overwritten).
- remote: the batch's manifest records the Team Files id after upload and the image ids after
  registration; registration first lists the dataset and skips names already there, so a
  retried ``images.bulk.add`` never makes a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from blobfs.format.offsets import OFFSETS_SUFFIX
from blobfs.format.pack import InlineFile, ProjectPacker, empty_annotation
from blobfs.layout import ANN_DIR, META_PATH, dataset_dir, dataset_of, image_of_ann
from blobfs.safe_open import ProjectRoot, split_rel, write_atomic_at
from blobfs.writeback.spool import Batch, Spool, lock_project

logger = logging.getLogger(__name__)


class PhaseTimes:
    """Wall seconds per named phase, for one log line: where an import's (or a pass's)
    time goes, without a profiler."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.3f} s" for k, v in self.seconds.items())


#: A blob size no batch reaches: a batch is one blob by construction (the queue sizes it).
BATCH_BLOB_SIZE = 1 << 62


class BatchFiles(Protocol):
    """What a remote import reads of the spool, and how it saves each step: the spool
    itself in the daemon; a batch's durable files, read only, in an import worker (which
    hands each step to the daemon to save)."""

    batches_dir: Path

    def batch_source(self, batch: Batch, view_path: str) -> Path | InlineFile:
        """The batch's snapshot of ``view_path`` (see :meth:`Spool.batch_source`)."""
        ...

    def batch_bytes(self, batch: Batch, view_path: str) -> bytes:
        """The bytes of that snapshot."""
        ...

    def save_batch(self, batch: Batch) -> None:
        """Make the batch's state durable in its manifest."""
        ...


class Importer(Protocol):
    """Where batches go. Every method must be safe to call again after a crash."""

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        """Bring the whole batch into the project (or raise, leaving it to be retried)."""
        ...


def split_batch(batch: Batch) -> tuple[list[str], dict[str, str], str | None]:
    """``(image view paths, {image name: ann view path}, meta view path or None)``."""
    images: list[str] = []
    anns: dict[str, str] = {}
    meta = None
    for path in batch.files:
        where = dataset_of(path)
        if path == META_PATH:
            meta = path
        elif where is not None and where[1] == ANN_DIR:
            anns[image_of_ann(where[2])] = path
        elif where is not None:
            images.append(path)
    return images, anns, meta


class LocalImporter:
    """Imports into a project folder; readers see the old or the new project, never half."""

    def __init__(self, project_dir: str | Path) -> None:
        self.project = Path(project_dir)
        self._lock_fd = lock_project(self.project)  # held while the mount lives

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        images, anns, meta = split_batch(batch)
        # Every file is created through ProjectRoot: nothing is written through a symlink.
        root = ProjectRoot(self.project)
        try:
            if meta is not None:
                root.write_atomic("meta.json", spool.batch_bytes(batch, meta))
            if not batch.dataset:
                return
            folder = dataset_dir(self.project, batch.dataset)
            rel = "/".join(split_rel(str(folder.relative_to(self.project))))
            image_names = {p.rsplit("/", 1)[1] for p in images}
            with root.dir(f"{rel}/ann", create=True) as ann_dir:
                for name, ann_path in anns.items():  # annotations of images imported earlier
                    if name not in image_names:
                        data = spool.batch_bytes(batch, ann_path)
                        write_atomic_at(ann_dir, f"{name}.json", data)
            if not images or root.lstat(f"{rel}/{batch.stem}{OFFSETS_SUFFIX}") is not None:
                return
        finally:
            root.close()

        def ann_for(path: Path | InlineFile, width: int, height: int) -> bytes:
            staged = anns.get(path.name)
            if staged is not None:
                return spool.batch_bytes(batch, staged)
            return json.dumps(empty_annotation(width, height)).encode()

        packer = ProjectPacker(self.project, batch.dataset[-1], BATCH_BLOB_SIZE, dataset_dir=folder)
        files = (spool.batch_source(batch, p) for p in images)  # one at a time: held bytes
        packer.pack(files, ann_for=ann_for, stem=batch.stem, check_existing=False)
        logger.info("imported %d images into %s as blob %s", len(images), folder, batch.stem)
