"""Scale benchmark: a million-image blob project, mounted, listed and read in shuffled order.

    python bench/scale.py [--per-dataset 250000] [--datasets 4] [--tars 10] [--rounds 3]
                          [--reads 100000] [--epoch 100000] [--workers 4]
                          [--cache-size 64M] [--daemon-cpus 0] [--reader-cpus 1]
                          [--index-only] [--json out.json]

Builds once (cached in ``bench/out/scale-<N>/``, gitignored) the project of the scale issue:
``datasets x per-dataset`` PNGs of 200-600 bytes in ``tars`` tars shared by the datasets in
order, one annotation per image (:mod:`tests.support.scale`), plus the same tree as a plain
folder (images written, annotations hard-linked). Then, in interleaved rounds (blobfs, then
the plain folder, each round), with median / min / max over the rounds:

1. ``blobfs mount`` until it returns (mount ready), with an empty index cache ("cold", the
   first mount of a project) and again with the cache the first mount left ("warm").
2. ``stat`` of one image of a random dataset right after the mount returned.
3. the first ``ls DIR | wc -l`` of another dataset's ``img/`` right after that.
4. ``find MNT | wc -l``.
5. (warm mount) ``--reads`` random image reads by this process, every byte checked, then the
   daemon's RSS (it has listed every folder by then).
6. (warm mount) a shuffled epoch over ``--epoch`` other images by ``--workers`` processes
   (``open(p, 'rb').read()``), then the same with a PIL decode of each image; images/s and
   the bytes the daemon read from blobs per byte delivered.

The plain folder's figures come from a warm dentry cache (dropping caches would disturb
everybody else on a shared machine); they are the floor, not a cold-disk figure.
``--index-only`` instead measures, in this process, building every folder's index from the
pickles (time, RSS growth, bytes of the tables) and loading it back from the index cache.
Exits non-zero only on errors (wrong bytes, failed mounts).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    OUT,
    Mounts,
    blobfs_mount_cli,
    clean_stale_mounts,
    fmt,
    load_note,
    mountpoint,
    pin,
    rss_mb,
    table,
)
from tests.support.scale import ScaleProject, image_name, image_pool, write_scale_project


def build(args: argparse.Namespace) -> tuple[ScaleProject, Path]:
    """The project and its plain copy, written once per shape."""
    names = [f"ds{i}" for i in range(args.datasets)]
    folder = OUT / f"scale-{args.datasets}x{args.per_dataset}-{args.tars}"
    project, plain = folder / "project", folder / "plain"
    marker = folder / "done"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        write_scale_project(project, names, args.per_dataset, args.tars, anns=True)
        print(f"wrote the blob project in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        _plain_copy(project, plain, names, args.per_dataset)
        print(f"wrote the plain copy in {time.perf_counter() - started:.0f} s", flush=True)
        marker.write_text("ok\n")
    return ScaleProject(project, names, args.per_dataset, image_pool()), plain


def _plain_copy(project: Path, plain: Path, names: list[str], per_dataset: int) -> None:
    pool = image_pool()
    plain.mkdir(parents=True)
    shutil.copy(project / "meta.json", plain / "meta.json")
    for d, ds in enumerate(names):
        (plain / ds / "img").mkdir(parents=True)
        (plain / ds / "ann").mkdir()
        for i in range(per_dataset):
            name = image_name(i)
            fd = os.open(plain / ds / "img" / name, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, pool[(d * per_dataset + i) % len(pool)])
            os.close(fd)
            os.link(project / ds / "ann" / f"{name}.json", plain / ds / "ann" / f"{name}.json")


# ---- one measurement each ------------------------------------------------------------


def timed_shell(command: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout.strip()


def daemon_stats(mnt: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def blob_bytes(mnt: Path) -> int:
    reads = daemon_stats(mnt).get("blob_reads", {})
    return int(reads.get("bytes_read", 0))


def _default_signals() -> None:
    """Workers are ended by SIGTERM when the pool closes: not the benchmark's handler."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _worker(job: tuple[list[str], bool, list[int]]) -> tuple[int, int]:
    paths, decode, cpus = job
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    total = 0
    if decode:
        import io

        from PIL import Image

    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        total += len(data)
        if decode:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    return len(paths), total


def epoch(
    root: Path, rel: list[str], workers: int, decode: bool, cpus: list[int]
) -> tuple[float, int]:
    """Seconds for ``workers`` processes to read their shard of ``rel`` under ``root``."""
    shards = [[str(root / p) for p in rel[w::workers]] for w in range(workers)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_default_signals) as pool:
        started = time.perf_counter()
        done = pool.map(_worker, [(s, decode, cpus) for s in shards])
        seconds = time.perf_counter() - started
    return seconds, sum(b for _, b in done)


def sample_sets(project: ScaleProject, sizes: list[int], seed: int) -> list[list[tuple[int, int]]]:
    """Disjoint random (dataset, image) sets, as far as the project has images."""
    total = len(project.datasets) * project.per_dataset
    picks = random.Random(seed).sample(range(total), min(total, sum(sizes)))
    out, at = [], 0
    for size in sizes:
        chunk = picks[at : at + size] or picks[:size]
        at += size
        out.append([divmod(g, project.per_dataset) for g in chunk])
    return out


# ---- rounds ----------------------------------------------------------------------------


def one_round(
    args: argparse.Namespace, project: ScaleProject, plain: Path, r: int, mounts: Mounts
) -> dict[str, float]:
    got: dict[str, float] = {}
    rng = random.Random(r)
    # two different datasets where there are two (one dataset: both in it)
    d_stat, d_ls = (
        rng.sample(range(len(project.datasets)), 2) if len(project.datasets) > 1 else (0, 0)
    )
    stat_rel = project.path(d_stat, rng.randrange(project.per_dataset))
    ls_rel = f"{project.datasets[d_ls]}/img"
    # the mount point, meta.json, and per dataset its folder, img/, ann/ and their files
    expected_files = 2 + len(project.datasets) * (3 + 2 * project.per_dataset)
    cache = Path(tempfile.mkdtemp(prefix="scale-xdg-", dir=OUT))
    env = {"XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        for phase in ("cold", "warm"):
            mnt = mountpoint(f"scale-{phase}")
            opts = ["--cache-size", args.cache_size]
            got[f"{phase} mount ready s"], pid = blobfs_mount_cli(
                mounts, str(project.root), mnt, opts, env=env
            )
            if args.daemon_cpus:
                pin(pid, set(args.daemon_cpus))
            started = time.perf_counter()
            os.stat(mnt / stat_rel)
            got[f"{phase} stat after mount s"] = time.perf_counter() - started
            got[f"{phase} first ls s"], count = timed_shell(f"ls '{mnt / ls_rel}' | wc -l")
            assert int(count) == project.per_dataset, count
            got[f"{phase} find s"], count = timed_shell(f"find '{mnt}' | wc -l")
            assert int(count) == expected_files, (count, expected_files)
            if phase == "warm":
                got.update(reads_and_epochs(args, project, mnt, pid, r))
            mounts.release(mnt)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    os.stat(plain / stat_rel)
    got["plain stat s"] = time.perf_counter() - started
    got["plain first ls s"], _ = timed_shell(f"ls '{plain / ls_rel}' | wc -l")
    got["plain find s"], _ = timed_shell(f"find '{plain}' | wc -l")
    _, epoch_set, pil_set = sample_sets(project, [args.reads, args.epoch, args.epoch], r)
    rel = [project.path(d, i) for d, i in epoch_set]
    got["plain epoch img/s"] = (
        len(rel) / epoch(plain, rel, args.workers, False, args.reader_cpus)[0]
    )
    rel = [project.path(d, i) for d, i in pil_set]
    got["plain PIL epoch img/s"] = (
        len(rel) / epoch(plain, rel, args.workers, True, args.reader_cpus)[0]
    )
    return got


def reads_and_epochs(
    args: argparse.Namespace, project: ScaleProject, mnt: Path, pid: int, r: int
) -> dict[str, float]:
    got: dict[str, float] = {}
    reads, epoch_set, pil_set = sample_sets(project, [args.reads, args.epoch, args.epoch], r)
    wrong = 0
    before = blob_bytes(mnt)
    started = time.perf_counter()
    delivered = 0
    for d, i in reads:
        with open(mnt / project.path(d, i), "rb", buffering=0) as f:
            data = f.read()
        delivered += len(data)
        wrong += data != project.expected(d, i)
    got["random reads/s"] = len(reads) / (time.perf_counter() - started)
    got["random read bytes/delivered"] = (blob_bytes(mnt) - before) / max(1, delivered)
    if wrong:
        raise RuntimeError(f"{wrong} wrong images in {len(reads)} reads")
    got["daemon RSS MB"] = rss_mb(pid)
    for name, chosen, decode in (("epoch", epoch_set, False), ("PIL epoch", pil_set, True)):
        rel = [project.path(d, i) for d, i in chosen]
        before = blob_bytes(mnt)
        seconds, delivered = epoch(mnt, rel, args.workers, decode, args.reader_cpus)
        got[f"{name} img/s"] = len(rel) / seconds
        got[f"{name} bytes/delivered"] = (blob_bytes(mnt) - before) / max(1, delivered)
    got["daemon RSS end MB"] = rss_mb(pid)
    return got


def unpickle_floor(project: ScaleProject) -> float:
    """Seconds (best of 3) to only unpickle one dataset's offsets files, bytes in memory:
    what any index of that folder built from the pickles costs at least."""
    import io

    from blobfs.format.offsets import iter_raw_batches

    datas = [f.read_bytes() for f in sorted((project.root / project.datasets[0]).glob("*.pkl"))]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for data in datas:
            for _batch in iter_raw_batches(io.BytesIO(data)):
                pass
        best = min(best, time.perf_counter() - started)
    return best


def index_only(project: ScaleProject) -> dict[str, float]:
    """Build every folder's index in this process, then load it back from the cache."""
    from blobfs.cache.blocks import BlockCache
    from blobfs.cache.index_store import IndexStore
    from blobfs.sources.project_dir import LocalProjectSource
    from blobfs.view.tree import ProjectView

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    got: dict[str, float] = {}
    got["floor: unpickle one dataset's offsets s"] = unpickle_floor(project)
    store = Path(tempfile.mkdtemp(prefix="scale-index-", dir=OUT))
    try:
        for phase in ("cold", "warm"):
            base = rss()
            source = LocalProjectSource(project.root, BlockCache(4096, 1 << 20), IndexStore(store))
            started = time.perf_counter()
            _, files = ProjectView(source).preload()
            got[f"{phase} index s"] = time.perf_counter() - started
            got[f"{phase} RSS growth MB"] = rss() - base
            index = source.stats()["index"]
            assert isinstance(index, dict)
            got[f"{phase} table MB"] = index["bytes"] / 2**20
            got["files"] = files
            del source
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-dataset", type=int, default=250_000)
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--tars", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reads", type=int, default=100_000)
    parser.add_argument("--epoch", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cache-size", default="64M")
    parser.add_argument("--daemon-cpus", type=lambda s: [int(c) for c in s.split(",")], default=[])
    parser.add_argument("--reader-cpus", type=lambda s: [int(c) for c in s.split(",")], default=[])
    parser.add_argument("--index-only", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    clean_stale_mounts()
    project, plain = build(args)
    print(load_note(), flush=True)
    samples: dict[str, list[float]] = {}
    if args.index_only:
        samples = {k: [v] for k, v in index_only(project).items()}
    else:
        with Mounts() as mounts:
            for r in range(args.rounds):
                for key, value in one_round(args, project, plain, r, mounts).items():
                    samples.setdefault(key, []).append(value)
                print(f"round {r + 1}/{args.rounds} done; {load_note()}", flush=True)
    rows = [["figure", "median", "min", "max"]]
    for key, values in samples.items():
        rows.append([key, fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))])
    print(table(rows))
    print(load_note())
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "samples": samples},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
