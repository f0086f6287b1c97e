"""Large generated projects for scale tests and ``bench/scale.py``, written quickly.

A million images cannot go through :class:`blobfs.format.pack.ProjectPacker` in a test's time
budget (it writes one annotation file and one ``TarInfo`` per image), so this writer emits
ustar headers from a template, cycles a small pool of tiny distinct PNGs (the expected bytes
of image ``i`` are ``pool[i % len(pool)]``, so a reader can check every byte it gets), and
writes each offsets file with the same SDK-compatible pickles as ``blobfs pack``.

Blobs are laid out like the issue that asked for this: ``tars`` blobs in ``blob/`` shared by
the datasets in image order, so a blob may hold the end of one dataset and the start of the
next (each dataset then has an offsets file for that blob).
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blobfs.format.offsets import OFFSETS_SUFFIX, write_offsets
from blobfs.format.pack import EMPTY_META, empty_annotation
from blobfs.model import BlobMember
from tests.support.sample import png_bytes

BLOCK = tarfile.BLOCKSIZE
POOL_SIZE = 997  # prime, so image i and i + len(dataset) rarely share bytes by accident


def image_pool(count: int = POOL_SIZE, seed: int = 12) -> list[bytes]:
    """Distinct valid PNGs of 200-600 bytes (6 to 13 pixels square of noise)."""
    rng = random.Random(seed)
    pool = []
    for i in range(count):
        side = rng.randint(6, 13)
        pool.append(png_bytes(seed * 100_000 + i, side, side))
    return pool


def image_name(i: int) -> str:
    """The name of image ``i``, as the SDK guide's blob example names them."""
    return f"small-image-{i:07d}.png"


class _Headers:
    """ustar header blocks (what ``tar`` writes for a regular file), from a template.

    Only the name and size vary, so the checksum is the template's plus theirs.
    """

    def __init__(self, mtime: int) -> None:
        self._mid = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
        self._mtime = b"%011o\x00" % mtime
        self._tail = (b"0" + b"\0" * 100 + b"ustar\x0000").ljust(BLOCK - 156, b"\0")
        self._const = sum(self._mid) + sum(self._mtime) + 8 * 32 + sum(self._tail)
        self._sizes: dict[int, tuple[bytes, int]] = {}

    def header(self, name: bytes, size: int) -> bytes:
        field = self._sizes.get(size)
        if field is None:
            raw = b"%011o\x00" % size
            field = self._sizes[size] = (raw, sum(raw))
        check = self._const + sum(name) + field[1]
        return b"".join(
            (
                name.ljust(100, b"\0"),
                self._mid,
                field[0],
                self._mtime,
                b"%06o\x00 " % check,
                self._tail,
            )
        )


@dataclass
class ScaleProject:
    """What :func:`write_scale_project` made: where, and how to know each image's bytes."""

    root: Path
    datasets: list[str]
    per_dataset: int
    pool: list[bytes]

    def expected(self, dataset_index: int, i: int) -> bytes:
        """The bytes of image ``i`` of dataset number ``dataset_index``."""
        return self.pool[(dataset_index * self.per_dataset + i) % len(self.pool)]

    def path(self, dataset_index: int, i: int) -> str:
        """``<dataset>/img/<name>`` of that image, relative to the project (or a mount)."""
        return f"{self.datasets[dataset_index]}/img/{image_name(i)}"


def write_scale_project(
    root: Path,
    datasets: Sequence[str],
    per_dataset: int,
    tars: int,
    anns: bool = False,
    plain_copy: Path | None = None,
    mtime: int = 1_700_000_000,
) -> ScaleProject:
    """Write a blob project of ``len(datasets) * per_dataset`` images in ``tars`` blobs.

    With ``anns`` every image gets its (empty) annotation file; ``plain_copy`` also writes
    the same tree as an ordinary downloaded project there, for side-by-side benchmarks.
    """
    pool = image_pool()
    total = len(datasets) * per_dataset
    per_tar = -(-total // tars)
    (root / "blob").mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps(EMPTY_META))
    if plain_copy is not None:
        plain_copy.mkdir(parents=True, exist_ok=True)
        (plain_copy / "meta.json").write_text(json.dumps(EMPTY_META))
    for ds in datasets:
        (root / ds / "ann").mkdir(parents=True, exist_ok=True)
        if plain_copy is not None:
            (plain_copy / ds / "img").mkdir(parents=True, exist_ok=True)
            (plain_copy / ds / "ann").mkdir(parents=True, exist_ok=True)
    ann_cache: dict[int, bytes] = {}
    headers = _Headers(mtime)
    for t in range(tars):
        stem = f"blob_{t:03d}"
        lo, hi = t * per_tar, min(total, (t + 1) * per_tar)
        members: dict[int, list[BlobMember]] = {}
        with open(root / "blob" / f"{stem}.tar", "wb", buffering=1 << 20) as f:
            pos = 0
            for g in range(lo, hi):
                d, i = divmod(g, per_dataset)
                name = image_name(i)
                data = pool[g % len(pool)]
                f.write(headers.header(name.encode(), len(data)))
                pos += BLOCK
                f.write(data)
                f.write(b"\0" * (-len(data) % BLOCK))
                members.setdefault(d, []).append(BlobMember(name, pos, pos + len(data)))
                pos += len(data) + (-len(data) % BLOCK)
                if anns or plain_copy is not None:
                    ann = ann_cache.get(len(data))
                    if ann is None:
                        ann = json.dumps(empty_annotation(8, 8)).encode()
                        ann_cache[len(data)] = ann
                    if anns:
                        _write(root / datasets[d] / "ann" / f"{name}.json", ann)
                    if plain_copy is not None:
                        _write(plain_copy / datasets[d] / "img" / name, data)
                        if anns:
                            _write(plain_copy / datasets[d] / "ann" / f"{name}.json", ann)
            f.write(b"\0" * (2 * BLOCK))
            f.write(b"\0" * (-(pos + 2 * BLOCK) % tarfile.RECORDSIZE))
        for d, entries in members.items():
            with open(root / datasets[d] / f"{stem}{OFFSETS_SUFFIX}", "wb") as out:
                write_offsets(out, entries)
    return ScaleProject(root, list(datasets), per_dataset, pool)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
