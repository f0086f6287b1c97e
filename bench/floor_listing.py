"""Listing floor of the design's stack: ``find MNT | wc -l`` over a Python + mfusepy file
system that does nothing but list the scale project's names, precomputed.

    python bench/floor_listing.py [--rounds 5] [--reader-cpus 0] [--daemon-cpus 0]
                                  [--tree LABEL=VENV] [--drop-dentries] [--json out.json]

The file system (``--serve``, started by this script) is blobfs's own FUSE layer
(:class:`~blobfs.fuse.compat.BlobfsFUSE`: the same filler calls, attributes with a folder's
first page and names only after it, as ``--readdirplus auto`` serves them) over a tree of
the scale project's shape (``bench/scale.py``: datasets of ``img/`` and ``ann/``) whose
names are encoded before the mount returns: no index, no pickle, no lookup. Each round
times, in rotating order, ``find`` over it, over blobfs's mount (``--readdirplus auto``,
empty index cache: the first mount of the project, then with the cache it left) and over
the plain folder; plus, in this process, the seconds to only unpickle every dataset's
offsets files. The floor plus the unpickle is what a cold ``find`` costs at least with this
stack when the pickles are parsed while the listing waits for them.

The state each ``find`` starts from: every mount is new, so the kernel holds no dentry or
inode of the FUSE trees; the plain tree is walked once before the first round, so every
plain ``find`` finds its dentries and directory blocks cached (the state of a tree in use),
or, with ``--drop-dentries`` (root), each plain ``find`` follows ``echo 2 >
/proc/sys/vm/drop_caches`` (dentries and inodes dropped, as for a new mount; directory
blocks stay cached). The output says which. Each ratio is taken within one round (the
plain ``find`` of the same round), shown as median (min-max) over the rounds: the
plain denominator's own noise shows in the spread.

``--tree before=/tmp/venv`` adds blobfs run by the interpreter of the virtual environment
``/tmp/venv`` whose path holds another commit's package (``git archive``; a ``.pth`` file),
in the same rotation, with its own index cache. An environment of its own, not
``PYTHONPATH``: the index worker runs isolated (``python -I``), from the interpreter's
own path only.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
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
    spawn_foreground,
    table,
)

S_IFDIR = 0o040000
S_IFREG = 0o100000
PAGE = 1024


def serve(mnt: str, datasets: int, per_dataset: int) -> None:
    """Run the names-only file system on ``mnt`` in the foreground."""
    from blobfs.fuse.compat import BlobfsFUSE, FuseOSError, Operations
    from blobfs.view.tree import ListingRun
    from tests.support.scale import image_name

    images = [image_name(i).encode() for i in range(per_dataset)]
    anns = [n + b".json" for n in images]
    sizes = [400] * PAGE
    dirs: dict[str, list[bytes]] = {"/": [f"ds{d}".encode() for d in range(datasets)]}
    dirs["/"].append(b"meta.json")
    for d in range(datasets):
        dirs[f"/ds{d}"] = [b"ann", b"img"]
        dirs[f"/ds{d}/img"] = images
        dirs[f"/ds{d}/ann"] = anns
    big = {p for p in dirs if p.endswith(("/img", "/ann"))}
    now = int(time.time())
    file_attrs = {"st_mode": S_IFREG | 0o444, "st_nlink": 1, "st_mtime": now, "st_ctime": now}
    dir_attrs = {"st_mode": S_IFDIR | 0o555, "st_nlink": 2, "st_mtime": now, "st_ctime": now}

    class Names(Operations):  # type: ignore[misc]
        direct_io_prefix = None
        serves_readdir_plus = True

        def __init__(self) -> None:
            self.op_counts: dict[str, int] = {}  # what the adapter counts in

        def find_attrs(self, path: str, fh: Any = None) -> dict[str, int] | None:
            """The adapter's getattr: None for a missing path."""
            if path in dirs:
                return dir_attrs
            parent, _, name = path.rpartition("/")
            if parent in dirs or (not parent and name):
                return {**file_attrs, "st_size": 400}
            return None

        def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
            attrs = self.find_attrs(path)
            if attrs is None:
                raise FuseOSError(errno.ENOENT)
            return attrs

        def readdir(self, path: str, fh: Any) -> list[str]:
            """Registers the listing callback (it goes out through :meth:`readdir_plus`)."""
            return [".", "..", *(n.decode() for n in dirs[path])]

        def readdir_plus(self, path: str, start: int) -> Any:
            names = dirs[path]
            if path not in big:  # a small folder: entry by entry
                for n in names[start:]:
                    child = f"{path.rstrip('/')}/{n.decode()}"
                    yield n.decode(), dir_attrs if child in dirs else file_attrs
                return
            for lo in range(start, len(names), PAGE):  # runs, as blobfs's tree hands them
                run = names[lo : lo + PAGE]
                yield ListingRun(run, sizes[: len(run)], file_attrs)

    BlobfsFUSE(
        Names(),
        mnt,
        raw_fi=False,
        readdirplus_auto=True,
        foreground=True,
        ro=True,
        default_permissions=True,
        kernel_cache=True,
        attr_timeout=3600.0,
        entry_timeout=3600.0,
        negative_timeout=60.0,
        max_idle_threads=10,
    )


def timed(command: str, cpus: list[int], expected: int) -> float:
    argv = ["sh", "-c", command]
    if cpus:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    seconds = time.perf_counter() - started
    if int(out) != expected:
        raise RuntimeError(f"{command!r} counted {out}, expected {expected}")
    return seconds


def unpickle_all(project: Path, datasets: list[str]) -> float:
    """Seconds (best of 3) to only unpickle every dataset's offsets files."""
    from blobfs.format.offsets import iter_raw_batches

    datas = [f.read_bytes() for ds in datasets for f in sorted((project / ds).glob("*.pkl"))]
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for data in datas:
            for _batch in iter_raw_batches(io.BytesIO(data)):
                pass
        best = min(best, time.perf_counter() - started)
    return best


def measure(
    system: str, mounts: Mounts, args: argparse.Namespace, project: Any, plain: Path
) -> dict[str, float]:
    """One system's ``find`` figures (blobfs: its cold and its warm mount)."""
    expected = 2 + args.datasets * (3 + 2 * args.per_dataset)
    cpus = args.reader_cpus
    root = str(Path(__file__).resolve().parent.parent)
    got: dict[str, float] = {}
    if system == "plain":
        if args.drop_dentries:
            Path("/proc/sys/vm/drop_caches").write_text("2\n")
        got["plain find s"] = timed(f"find '{plain}' | wc -l", cpus, expected)
    elif system == "floor":
        mnt = mountpoint("floor-listing")
        cmd = [sys.executable, __file__, "--serve", str(mnt)]
        cmd += [
            "--datasets",
            str(args.datasets),
            "--per-dataset",
            str(args.per_dataset),
        ]
        if args.daemon_cpus:
            cmd = ["taskset", "-c", ",".join(map(str, args.daemon_cpus)), *cmd]
        env = {**os.environ, "PYTHONPATH": root}
        spawn_foreground(mounts, cmd, mnt, OUT / "floor-listing.log", env=env)
        got["floor find s"] = timed(f"find '{mnt}' | wc -l", cpus, expected)
        mounts.release(mnt)
    else:
        label, _, tree = system.partition("=")
        cache = Path(tempfile.mkdtemp(prefix="floor-xdg-", dir=OUT))
        # the environment's own path only (this process's PYTHONPATH would be inherited)
        env = {"XDG_CACHE_HOME": str(cache), "PYTHONPATH": "" if tree else root}
        python = str(Path(tree, "bin", "python")) if tree else sys.executable
        for phase in ("cold", "warm"):
            mnt = mountpoint(f"floor-{label}-{phase}")
            # pinned from its start (inherited from this process), not once it is ready:
            # what the daemon starts at the mount (its index worker) must not escape the pin
            mine = os.sched_getaffinity(0)
            if args.daemon_cpus:
                os.sched_setaffinity(0, set(args.daemon_cpus))
            try:
                _, pid = blobfs_mount_cli(
                    mounts, str(project.root), mnt, ["--readdirplus", "auto"], python, env
                )
            finally:
                os.sched_setaffinity(0, mine)
            if args.daemon_cpus:
                pin(pid, set(args.daemon_cpus))
            got[f"{label} auto {phase} find s"] = timed(f"find '{mnt}' | wc -l", cpus, expected)
            mounts.release(mnt)
        shutil.rmtree(cache, ignore_errors=True)
    return got


def root_of() -> str:
    """This checkout's folder (the package the ``blobfs`` system runs)."""
    return str(Path(__file__).resolve().parent.parent)


def _tree_pythons(trees: list[str]) -> list[tuple[str, str]]:
    """``(label, interpreter)`` of each ``--tree LABEL=VENV``."""
    return [(t.partition("=")[0], str(Path(t.partition("=")[2], "bin", "python"))) for t in trees]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", metavar="MNT")
    parser.add_argument("--per-dataset", type=int, default=250_000)
    parser.add_argument("--datasets", type=int, default=4)
    parser.add_argument("--tars", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="at least 3")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=VENV")
    parser.add_argument("--drop-dentries", action="store_true")
    parser.add_argument("--daemon-cpus", type=lambda s: [int(c) for c in s.split(",")], default=[])
    parser.add_argument("--reader-cpus", type=lambda s: [int(c) for c in s.split(",")], default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.datasets, args.per_dataset)
        return 0
    from bench.scale import build

    if args.rounds < 3:
        parser.error("--rounds: at least 3 (the plain find's own noise must show)")
    for tree in args.tree:
        if not Path(tree.partition("=")[2], "bin", "python").exists():
            parser.error(f"--tree {tree}: not a virtual environment")
    project, plain = build(args)
    samples: dict[str, list[float]] = {}
    clean_stale_mounts()
    state = "dropped before each (echo 2)" if args.drop_dentries else "cached (walked before)"
    print(f"plain tree: dentries and inodes {state}; FUSE trees: each a new mount", flush=True)
    print(load_note(), flush=True)
    timed(f"find '{plain}' | wc -l", [], 2 + args.datasets * (3 + 2 * args.per_dataset))
    labels = ["blobfs", *(t.partition("=")[0] for t in args.tree)]
    for label, python in [("blobfs", sys.executable), *_tree_pythons(args.tree)]:
        env = {**os.environ, "PYTHONPATH": "" if label != "blobfs" else root_of()}
        where = subprocess.run(
            [python, "-c", "import blobfs; print(blobfs.__file__)"],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(f"{label}: {where}", flush=True)
    with Mounts() as mounts:
        for r in range(args.rounds):
            systems = ["floor", "blobfs", *args.tree, "plain"]
            at = r % len(systems)
            for system in systems[at:] + systems[:at]:
                got = measure(system, mounts, args, project, plain)
                for k, v in got.items():
                    samples.setdefault(k, []).append(v)
            print(f"round {r + 1}/{args.rounds} done; {load_note()}", flush=True)
    samples["unpickle every offsets file s"] = [unpickle_all(project.root, project.datasets)]
    ratios = ["floor find s", "floor + unpickle s"]
    ratios += [f"{label} auto {phase} find s" for label in labels for phase in ("cold", "warm")]
    for r in range(args.rounds):
        floor = samples["floor find s"][r] + samples["unpickle every offsets file s"][0]
        samples.setdefault("floor + unpickle s", []).append(floor)
        for k in ratios:
            samples.setdefault(f"{k} / plain", []).append(
                samples[k][r] / samples["plain find s"][r]
            )
    rows = [["figure", "median", "min", "max"]]
    for k, vs in samples.items():
        rows.append([k, fmt(statistics.median(vs)), fmt(min(vs)), fmt(max(vs))])
    print(table(rows))
    print(f"plain tree: dentries and inodes {state}; ratios within each round")
    print(load_note())
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
