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
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import assert_never

from blobfs.cache.blocks import BlockCache
from blobfs.errors import BlobfsError
from blobfs.model import (
    AnnRef,
    BlobMember,
    BlobRef,
    BytesRef,
    FileRecord,
    LocalFileRef,
    RemoteImageRef,
)
from blobfs.problems import Problems, show
from blobfs.safe_open import MAX_ANN_JSON_BYTES, describe
from blobfs.sources.project_dir import BLOB_DIR, LocalProjectSource

logger = logging.getLogger(__name__)


@dataclass
class Report:
    """What ``check`` found: counts and one line per problem (aggregated by file and cause)."""

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


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _tar_members(source: LocalProjectSource, stem: str) -> dict[str, BlobMember] | str:
    """Basename -> data range of each regular member, or the reason the tar is unreadable."""
    rel = f"{BLOB_DIR}/{stem}.tar"
    out: dict[str, BlobMember] = {}
    try:
        fd = source.fs.open_file(rel)
        with os.fdopen(fd, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    name = os.path.basename(m.name)
                    out[name] = BlobMember(name, m.offset_data, m.offset_data + m.size)
    except BlobfsError as exc:
        return str(exc)
    except Exception as exc:  # tarfile on hostile bytes: any failure is a finding
        return f"unreadable tar ({_why(exc)})"
    return out


def _check_tars(
    source: LocalProjectSource, blob_records: list[tuple[FileRecord, BlobRef]], found: Problems
) -> None:
    tars: dict[str, dict[str, BlobMember] | str] = {}
    for rec, ref in blob_records:
        if ref.blob_key not in tars:
            tars[ref.blob_key] = _tar_members(source, ref.blob_key)
        members = tars[ref.blob_key]
        where = source.fs.where(f"{BLOB_DIR}/{ref.blob_key}.tar")
        if isinstance(members, str):
            continue  # the source reports an unusable blob itself
        name = rec.relpath[4:]
        real = members.get(name)
        if real is None or (real.start, real.end) != (ref.start, ref.end):
            at = f"[{real.start}, {real.end})" if real else "absent"
            found.add(
                where,
                "offsets entry disagrees with the tar",
                f"{show(name)} at [{ref.start}, {ref.end}), the tar has it {at}",
            )
    for stem, members in tars.items():
        if isinstance(members, str) and not source.blob_problem(stem):
            found.add(source.fs.where(f"{BLOB_DIR}/{stem}.tar"), "tar not read", members)


def _check_annotation(source: LocalProjectSource, path: str, found: Problems) -> None:
    try:
        json.loads(source.fs.read_file(path, MAX_ANN_JSON_BYTES, "annotation"))
    except BlobfsError as exc:
        found.add(source.fs.where(path), "annotation not read", str(exc)[:200])
    except Exception as exc:  # ValueError, RecursionError on deep nesting, ...
        found.add(source.fs.where(path), "annotation does not parse", _why(exc))


def _check_annotations(files: dict[str, int], folder: str, found: Problems) -> None:
    images = [p[4:] for p in files if p.startswith("img/")]
    anns = {p[4:] for p in files if p.startswith("ann/")}
    for name in images:
        if f"{name}.json" not in anns and f"{os.path.splitext(name)[0]}.json" not in anns:
            found.add(folder, "image has no annotation in ann/", show(name))


def check_project(
    root: Path, deep: bool = True, progress: Callable[[int, int], None] | None = None
) -> Report:
    """Validate a local project folder; never raises for bad content, reports it.

    ``progress(done, total)`` is called after each dataset (for a progress bar). Every
    blob image is checked against its tar header (what a read would do); ``deep`` also
    reads each tar's member list and compares it with the offsets.
    """
    report = Report(root)
    found = Problems()
    try:
        source = LocalProjectSource(root, BlockCache(1 << 20, 1 << 20))
    except BlobfsError as exc:
        report.problems.append(str(exc))
        return report
    try:
        _check_source(source, report, found, deep, progress)
    except Exception as exc:  # a bug must still give a report, never a traceback
        logger.exception("check of %s failed", root)
        found.add(str(root), "check stopped by an internal error", _why(exc))
    finally:
        report.problems = source.problems() + found.lines()
        source.close()
    return report


def _check_record(
    source: LocalProjectSource,
    rec: FileRecord,
    report: Report,
    found: Problems,
    blob_records: list[tuple[FileRecord, BlobRef]],
) -> None:
    """Count one listed file and check what a read of it would meet."""
    ref = rec.ref
    match ref:
        case BlobRef():  # always an image
            report.images += 1
            report.blob_images += 1
            blob_records.append((rec, ref))
            with suppress(BlobfsError):  # noted by the source
                reader = source.open(rec)
                try:
                    reader.read(0, 0)  # the tar-header check of a first read
                finally:
                    reader.close()
        case LocalFileRef():
            if rec.relpath.startswith("img/"):
                report.images += 1
            elif rec.relpath.startswith("ann/"):
                _check_annotation(source, ref.path, found)
        case BytesRef() | RemoteImageRef() | AnnRef():
            pass  # never in a local project's listing
        case _:
            assert_never(ref)


def _check_source(
    source: LocalProjectSource,
    report: Report,
    found: Problems,
    deep: bool,
    progress: Callable[[int, int], None] | None,
) -> None:
    meta = source.meta_json()
    if meta is not None:
        try:
            json.loads(meta)
        except Exception as exc:
            found.add(source.fs.where("meta.json"), "meta.json does not parse", _why(exc))
    try:
        for item in source.fs.list_dir(BLOB_DIR):  # tars no offsets file names, too
            if not item.is_file:
                found.add(
                    source.fs.where(BLOB_DIR), f"{describe(item.mode)}; never read", show(item.name)
                )
    except BlobfsError:
        pass  # a symlinked or odd blob/ is reported by the source
    datasets = source.datasets()
    for done, ds in enumerate(datasets, 1):
        if progress is not None:
            progress(done, len(datasets))
        report.datasets += 1
        records = source.files(ds)
        sizes = {r.relpath: r.size or 0 for r in records}
        blob_records: list[tuple[FileRecord, BlobRef]] = []
        for rec in records:
            _check_record(source, rec, report, found, blob_records)
        _check_annotations(sizes, "/".join(ds.path), found)
        if deep:
            _check_tars(source, blob_records, found)
