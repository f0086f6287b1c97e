"""What checking offsets entries against their tar headers costs, per entry and at scale.

    python bench/tar_verify.py [--entries 1000000] [--members 20000]

Writes one tar of ``--members`` small members, then checks ``--entries`` entries (the
members over and over) the way the local source does: one ``pread`` of the 512 bytes
before the entry, then :func:`member_problem`. Prints the time of both together and of the
header check alone (headers already in memory). The tar is in the page cache, so this is
the CPU cost; a cold disk adds one random read per entry unless the image is read anyway
(the header sits in the same page as the image's first bytes).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

from blobfs.format.pack import TarBlobWriter
from blobfs.format.tarhead import member_problem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--members", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.tar"
        with open(path, "wb") as f:
            writer = TarBlobWriter(f)
            for i in range(args.members):
                data = os.urandom(100)
                writer.add(f"img_{i:07d}.png", io.BytesIO(data), len(data), 0)
            writer.close()
        members = writer.members
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            bad = 0
            for i in range(args.entries):
                m = members[i % len(members)]
                bad += member_problem(os.pread(fd, 512, m.start - 512), m) is not None
            both = time.perf_counter() - t0
            headers = [os.pread(fd, 512, m.start - 512) for m in members]
        finally:
            os.close(fd)
        t0 = time.perf_counter()
        for i in range(args.entries):
            j = i % len(members)
            member_problem(headers[j], members[j])
        alone = time.perf_counter() - t0
    assert bad == 0
    print(
        f"{args.entries} entries: pread + check {both:.2f} s "
        f"({both / args.entries * 1e6:.2f} us/entry); check alone {alone:.2f} s "
        f"({alone / args.entries * 1e6:.2f} us/entry)"
    )


if __name__ == "__main__":
    main()
