"""A power cut, played on a spool a killed daemon left behind.

A ``kill -9`` keeps the kernel's page cache; a power cut keeps only what a sync covered.
No real part cuts the power on demand, so this is the one fault the durability trials
play by hand, from what the daemon itself logged (``BLOBFS_POWER_CUT_LOG``, see
``blobfs/failpoints.py``): after each ``fsync`` of a folder its entries as they were, after
each ``syncfs`` every folder of the spool, after each flush of the journal how many of its
bytes are on disk. Then:

- an entry (file or folder) that no sync of its folder saw, with that inode, is removed
  (the entry, or a replacement of it, never reached the disk);
- the journal keeps its flushed bytes; past them each 4 KiB page is kept (the kernel may
  have written it back on its own), zeroed (the prepared zeros, or an older generation's
  bytes, which never replay either) or filled with noise (a torn sector), and a file that
  grew since its last flush may be cut back to its flushed size.

Not played: a removal or rename that was not synced coming undone (the old entry would
be back), and bytes rewritten in place in a file after its folder was synced.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from blobfs.failpoints import POWER_CUT_ENV

PAGE = 4096


@dataclass
class Cut:
    """What the cut dropped: entries removed, journal bytes written past the flushed mark."""

    removed: list[str]
    unflushed_bytes: int


def env(log: Path) -> dict[str, str]:
    """The daemon's environment that makes it log its syncs to ``log``."""
    return {POWER_CUT_ENV: str(log)}


def _events(log: Path) -> tuple[dict[str, dict[str, int]], dict[str, tuple[int, int]]]:
    """The last synced listing of each folder, and each journal's (flushed, size)."""
    listings: dict[str, dict[str, int]] = {}
    journals: dict[str, tuple[int, int]] = {}
    if not log.exists():
        return listings, journals
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # the last line, torn by the kill
            continue
        if "dirs" in event:
            listings.update(event["dirs"])
        elif "journal" in event:
            journals[event["journal"]] = (event["durable"], event["size"])
    return listings, journals


def cut_power(spool: Path, log: Path, rng: random.Random | None = None) -> Cut:
    """Leave ``spool`` as a power cut may: the worst case (every unflushed journal byte
    zeroed, the file cut back) without ``rng``, else a random mix of what may survive."""
    listings, journals = _events(log)
    removed: list[str] = []

    def prune(folder: str) -> None:
        durable = listings.get(folder, {})
        with os.scandir(folder) as entries:
            found = list(entries)
        for entry in found:
            if durable.get(entry.name) != entry.inode():
                removed.append(os.path.relpath(entry.path, spool))
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                prune(entry.path)

    prune(os.path.abspath(spool))
    unflushed = 0
    for path, (flushed, size) in journals.items():
        if os.path.exists(path):
            unflushed += _garble(path, flushed, size, rng)
    return Cut(removed, unflushed)


def _garble(path: str, flushed: int, flushed_size: int, rng: random.Random | None) -> int:
    """Play the cut on one journal file; returns how many bytes were written past
    ``flushed`` (up to the last one that is not zero: the zeros ahead of use do not
    count)."""
    size = os.path.getsize(path)
    flushed = min(flushed, size)
    with open(path, "rb") as f:
        f.seek(flushed)
        written = len(f.read().rstrip(b"\0"))
    keep = size
    if size > flushed_size and (rng is None or rng.random() < 0.5):
        keep = max(flushed, flushed_size)  # the growth was never flushed
    with open(path, "r+b") as f:
        f.truncate(keep)
        offset = flushed
        while offset < keep:
            end = min(keep, (offset // PAGE + 1) * PAGE)
            fate = "zero" if rng is None else rng.choice(["keep", "zero", "noise"])
            if fate != "keep":
                f.seek(offset)
                f.write(bytes(end - offset) if fate == "zero" else rng_bytes(rng, end - offset))
            offset = end
    return written


def rng_bytes(rng: random.Random | None, n: int) -> bytes:
    return (rng or random.Random(0)).randbytes(n)
