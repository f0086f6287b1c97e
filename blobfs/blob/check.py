"""``blobfs check``: everything that would keep a file of a local project from being served.

The mount itself only trusts what it can verify cheaply (names, ranges, conflicts). The
check also reads each tar's headers (``--deep``) and every annotation, the way a careful
user would before a long training run.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from blobfs.blob.index import OFFSETS_SUFFIX, read_offsets_file
from blobfs.cache.blocks import BlockCache
from blobfs.errors import BlobfsError
from blobfs.model import BlobMember
from blobfs.sources.project_dir import BLOB_DIR, LocalProjectSource

logger = logging.getLogger(__name__)


@dataclass
class Report:
    """What ``check`` found: counts and one line per problem."""

    project: Path
    datasets: int = 0
    images: int = 0
    blob_images: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = (
            f"{self.project}: {_count(self.datasets, 'dataset')}, {_count(self.images, 'image')} "
            f"({self.blob_images} in blobs), {_count(len(self.problems), 'problem')}"
        )
        return [head, *(f"  problem: {p}" for p in self.problems)] + (
            ["OK"] if not self.problems else []
        )


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tar_members(path: Path) -> dict[str, BlobMember] | str:
    """Basename -> data range of each regular member, or the reason the tar is unreadable."""
    out: dict[str, BlobMember] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    name = os.path.basename(m.name)
                    out[name] = BlobMember(name, m.offset_data, m.offset_data + m.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"{path}: unreadable tar ({exc})"
    return out


def _check_tar_against_offsets(root: Path, report: Report) -> None:
    tars: dict[str, dict[str, BlobMember] | str] = {}
    for offsets in sorted(root.rglob(f"*{OFFSETS_SUFFIX}")):
        stem = offsets.name[: -len(OFFSETS_SUFFIX)]
        tar_path = root / BLOB_DIR / f"{stem}.tar"
        index = read_offsets_file(str(offsets))
        if not index.members:
            continue  # nothing to compare (a refused file is reported by the source)
        if stem not in tars:
            tars[stem] = _tar_members(tar_path) if tar_path.is_file() else f"{tar_path}: missing"
        members = tars[stem]
        if isinstance(members, str):
            report.problems.append(members)
            continue
        for m in index.members:
            real = members.get(m.name)
            if real is None or (real.start, real.end) != (m.start, m.end):
                where = f"[{real.start}, {real.end})" if real else "absent"
                report.problems.append(
                    f"{offsets}: {m.name!r} at [{m.start}, {m.end}) but the tar has it {where}"
                )


def _check_annotations(files: dict[str, int], folder: str, report: Report) -> None:
    images = [p[4:] for p in files if p.startswith("img/")]
    anns = {p[4:] for p in files if p.startswith("ann/")}
    for name in images:
        if f"{name}.json" not in anns and f"{os.path.splitext(name)[0]}.json" not in anns:
            report.problems.append(f"{folder}: image {name!r} has no annotation in ann/")


def check_project(
    root: Path, deep: bool = True, progress: Callable[[int, int], None] | None = None
) -> Report:
    """Validate a local project folder; never raises for bad content, reports it.

    ``progress(done, total)`` is called after each dataset (for a progress bar).
    """
    report = Report(root)
    try:
        source = LocalProjectSource(root, BlockCache(1 << 20, 1 << 20))
    except BlobfsError as exc:
        report.problems.append(str(exc))
        return report
    meta = source.meta_json()
    if meta is not None:
        try:
            json.loads(meta)
        except ValueError as exc:
            report.problems.append(f"{root}/meta.json does not parse: {exc}")
    datasets = source.datasets()
    for done, ds in enumerate(datasets, 1):
        if progress is not None:
            progress(done, len(datasets))
        report.datasets += 1
        records = source.files(ds)
        sizes = {r.relpath: r.size or 0 for r in records}
        for rec in records:
            if rec.relpath.startswith("img/"):
                report.images += 1
                report.blob_images += not isinstance(rec.ref, str)
            elif rec.relpath.startswith("ann/") and isinstance(rec.ref, str):
                try:
                    json.loads(Path(rec.ref).read_bytes())
                except (ValueError, OSError) as exc:
                    report.problems.append(f"{rec.ref}: annotation does not parse ({exc})")
        _check_annotations(sizes, "/".join(ds.path), report)
    report.problems[:0] = source.problems()
    if deep:
        _check_tar_against_offsets(root, report)
    source.close()
    return report
