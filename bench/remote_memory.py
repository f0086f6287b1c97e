"""Memory and fill time of a remote dataset's listing, in process (no server, no FUSE).

Synthetic ``images.list`` entities go through the source's own path: the API's page
parsing (``SuperviselyApi.images``), the source's records or table, the ``img/`` and
``ann/`` loaders the view calls. Only the HTTP pages are stood in for (made on the fly,
so they are not held), and ``annotations.bulk.info`` answers nothing (its JSON is not the
index's cost).

One measurement per process, so that each starts from the same heap::

    python bench/remote_memory.py --images 250000            # RSS and fill time
    python bench/remote_memory.py --images 250000 --trace    # tracemalloc bytes too

``--rounds R --code DIR [--code DIR2]`` runs each measurement R times in fresh
processes, interleaving the code trees given (each a checkout whose ``blobfs`` is used),
and prints median (min-max) per figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STAMPS_PER = 500  # images uploaded together share their update time


def entities(n: int, plain_every: int) -> Iterator[dict[str, Any]]:
    """``n`` images of one blob, in id order; every ``plain_every``-th a plain image."""
    offset = 0
    for i in range(n):
        size = 200 + (i * 7919) % 400
        stamp = f"2026-11-{1 + i // STAMPS_PER % 28:02d}T10:{i // STAMPS_PER % 60:02d}:33.973Z"
        item: dict[str, Any] = {
            "id": 1_000_000 + i,
            "name": f"img_{i:07d}.png",
            "size": size,
            "updatedAt": stamp,
            "hash": f"{i:043d}=",
            "width": 32,
            "height": 32,
        }
        if not plain_every or i % plain_every:
            item.update(
                relatedDataId=77,
                downloadId="dl-77",
                offsetStart=offset,
                offsetEnd=offset + size,
            )
            offset += size + 512
        yield item


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(n: int, trace: bool, plain_every: int) -> dict[str, Any]:
    from blobfs.cache.blocks import BlockCache
    from blobfs.model import DatasetRecord
    from blobfs.sly.api import SuperviselyApi
    from blobfs.sources.compact import building
    from blobfs.sources.remote import RemoteProjectSource

    class Client:
        requests = retried = 0

        def close(self) -> None:
            pass

    api = SuperviselyApi(Client())  # type: ignore[arg-type]
    api._pages = lambda method, payload, expected=None: entities(n, plain_every)  # type: ignore[method-assign]
    api.annotations = lambda dataset_id, ids: {}  # type: ignore[method-assign]
    source = RemoteProjectSource(api, 1, BlockCache(1 << 20))
    dataset = DatasetRecord(("ds",), 5, 0)
    with building():
        pass  # trims the heap, as after every build
    gc.collect()
    base = rss()
    if trace:
        tracemalloc.start()
    loaders = source.listing(dataset)
    t0 = time.perf_counter()
    img = loaders["img"]()
    fill = time.perf_counter() - t0
    assert len(img) == n, len(img)
    gc.collect()
    out: dict[str, Any] = {"images": n, "fill_img_s": round(fill, 4)}
    out["rss_img_b"] = round((rss() - base) / n, 1)
    if trace:
        out["traced_img_b"] = round(tracemalloc.get_traced_memory()[0] / n, 1)
    t0 = time.perf_counter()
    ann = loaders["ann"]()
    out["fill_ann_s"] = round(time.perf_counter() - t0, 4)
    assert len(ann) == n, len(ann)
    gc.collect()
    out["rss_ann_b"] = round((rss() - base) / n, 1)
    if trace:
        out["traced_ann_b"] = round(tracemalloc.get_traced_memory()[0] / n, 1)
    name = next(iter(img))
    rec = img[name]
    out["sample"] = [name, rec.size, type(rec.ref).__name__]
    source.close()
    return out


def compare(args: argparse.Namespace) -> None:
    rows: dict[tuple[str, str], list[float]] = {}
    here = Path(__file__).resolve()
    for r in range(args.rounds):
        for code in args.code:
            for trace in (False, True):
                env = dict(os.environ, PYTHONPATH=f"{code}:{code}/emulator")
                cmd = [sys.executable, str(here), "--images", str(args.images)]
                cmd += ["--plain-every", str(args.plain_every)] + (["--trace"] if trace else [])
                run = subprocess.run(cmd, env=env, check=True, capture_output=True)
                got = json.loads(run.stdout)
                print(f"round {r + 1} {code} trace={trace}: {json.dumps(got)}", flush=True)
                for key, value in got.items():
                    if isinstance(value, float) and (trace or not key.startswith("traced")):
                        if trace and key.startswith(("rss", "fill")):
                            continue  # tracemalloc slows and grows the process
                        rows.setdefault((code, key), []).append(value)
    for (code, key), values in sorted(rows.items()):
        med = statistics.median(values)
        print(f"{code:40s} {key:14s} {med:10.4g} ({min(values):.4g}-{max(values):.4g})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=250_000)
    p.add_argument("--trace", action="store_true", help="count bytes with tracemalloc")
    p.add_argument("--plain-every", type=int, default=0, help="every k-th image not in a blob")
    p.add_argument("--rounds", type=int, default=0, help="compare in fresh processes")
    p.add_argument("--code", action="append", default=[], help="checkout to compare")
    args = p.parse_args()
    if args.rounds:
        compare(args)
    else:
        print(json.dumps(measure(args.images, args.trace, args.plain_every)))


if __name__ == "__main__":
    main()
