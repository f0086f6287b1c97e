"""What one durable close() costs in the spool, without FUSE: journal vs fsync + rename.

    python bench/durable_close.py [--files 3000] [--size 4096] [--threads 1] [--dir DIR]

Stages ``--files`` files of ``--size`` bytes through ``Spool`` (temp file, write, commit,
close, as ``WritebackFS`` does for each durable ``close()``), twice in the same folder:
1. the journal path (a file up to ``INLINE_MAX``: one append + ``fdatasync``);
2. ``INLINE_MAX = 0``, so every file takes the fsync + link + rename + fsync-of-folder path.
With ``--threads N`` the files are staged by N threads at once (a parallel copy); the
figure is then wall time per file. Prints microseconds per file and the ratio. Runs
against the disk that holds ``--dir`` (default: ``bench/out``), which should be the disk
the spool lives on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, table

from blobfs.writeback import spool as spool_module
from blobfs.writeback.spool import Spool


def stage_all(root: Path, files: int, size: int, threads: int = 1) -> float:
    """Wall seconds per file to stage ``files`` files through a fresh spool at ``root``."""
    shutil.rmtree(root, ignore_errors=True)
    spool = Spool(root)
    data = os.urandom(size)

    def stage(numbers: range) -> None:
        for i in numbers:
            fd, tmp = spool.new_temp()
            try:
                os.write(fd, data)
                spool.commit(fd, tmp, f"/ds/img/f_{i:06d}.png")
            finally:
                spool.drop_temp(fd, tmp)

    try:
        start = time.perf_counter()
        workers = [
            threading.Thread(target=stage, args=(range(t, files, threads),)) for t in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (time.perf_counter() - start) / files
    finally:
        spool.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=OUT)
    args = parser.parse_args()
    root = args.dir / "durable-close-spool"
    journal = stage_all(root, args.files, args.size, args.threads)
    inline_max = spool_module.INLINE_MAX
    spool_module.INLINE_MAX = 0  # every file: fsync, link, rename, fsync of the folder
    try:
        fsync = stage_all(root, args.files, args.size, args.threads)
    finally:
        spool_module.INLINE_MAX = inline_max
    rows = [
        ("durable close path", "us/file", "x journal"),
        ("journal: append + fdatasync, link", f"{journal * 1e6:.0f}", "1.00"),
        ("fsync + link + rename + fsync folder", f"{fsync * 1e6:.0f}", f"{fsync / journal:.2f}"),
    ]
    print(
        f"{args.files} files of {args.size} B staged through Spool by {args.threads}"
        f" thread(s) in {args.dir}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
