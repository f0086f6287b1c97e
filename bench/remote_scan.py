"""Remote scan benchmark: blobfs over HTTP vs the physical limit vs the SDK, in one run.

    python bench/remote_scan.py [--images 30000] [--latency-ms 2] [--sdk-subset 1000]
    python bench/remote_scan.py --latency-runs --latency-ms 50 [--epoch-images 2000]

The emulator (a separate process) adds ``--latency-ms`` to every request, like a near
network. Measured side by side on one 30,000-image dataset of ~4 KB images:
a full scan through a blobfs mount (cold, then warm) with its HTTP request count; the
physical limit (one GET of the whole blob, then reading every member out of the tar);
the SDK's per-image ``download_bytes`` (on a subset, extrapolated); the SDK's
``download_blob_file``; cold and warm latency of one random image through the mount.

``--latency-runs`` measures what latency costs instead (fresh mount per row): the cold
scan at 0 ms and at ``--latency-ms``; the first ``ls`` of the dataset and reading every
annotation file; a shuffled epoch over ``--epoch-images`` images by 4 worker processes
(bytes fetched / bytes delivered); the same epoch with ``--prefetch`` (requests in its
second half); and 20 random reads while ``images.data.download`` ignores Range (then
while ``file-storage.download`` ignores it too).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, Mounts, load_note, mountpoint, scan, spawn_foreground, table
from local_scan import DATASET, build
from sly_emulator import start_process
from sly_emulator.seed import upload_local_project

TOKEN = "bench-token"


def start_emulator(state: Path, latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    token_file = OUT / "bench-token"
    token_file.write_text(TOKEN)
    return start_process(state, token_file, latency_ms=latency_ms)


def control(url: str, path: str, body: dict | None = None) -> dict:  # type: ignore[type-arg]
    r = requests.post(f"{url}/_emulator/{path}", json=body or {}, headers={"x-api-key": TOKEN})
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def api(url: str, method: str, body: dict) -> dict:  # type: ignore[type-arg]
    r = requests.post(f"{url}/public/api/v3/{method}", json=body, headers={"x-api-key": TOKEN})
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--sdk-subset", type=int, default=1000)
    parser.add_argument("--latency-runs", action="store_true", help="measure latency hiding")
    parser.add_argument("--epoch-images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--listing-only",
        action="store_true",
        help="with --latency-runs: only the first ls and the ann files (no scan, epochs, Range)",
    )
    parser.add_argument(
        "--no-epochs",
        action="store_true",
        help="with --latency-runs: the scans, ls and ann files only (no epochs, Range)",
    )
    args = parser.parse_args()
    root = build(args.images, 36)
    state = OUT / f"emu-{args.images}"
    fresh = not (state / "seeded").exists()
    emu, url = start_emulator(state, 0.0 if fresh else args.latency_ms)
    try:
        if fresh:
            pid = upload_local_project(url, TOKEN, root / "project", "bench")
            (state / "seeded").write_text(str(pid))
            emu.terminate()
            emu.wait()
            emu, url = start_emulator(state, args.latency_ms)
        pid = int((state / "seeded").read_text())
        if args.latency_runs:
            latency_runs(url, pid, root, args)
        else:
            run(url, pid, root, args)
    finally:
        emu.terminate()
        emu.wait()


def run(url: str, pid: int, root: Path, args: argparse.Namespace) -> None:
    r: dict[str, float] = {}
    [ds] = api(url, "datasets.list", {"projectId": pid})["entities"]
    first = api(url, "images.list", {"datasetId": ds["id"], "per_page": 1})["entities"][0]
    blob_bytes = api(url, "file-storage.info", {"id": first["relatedDataId"]})["size"]
    env = {"API_TOKEN": TOKEN}

    n, cold_stats, warm_stats = scan_through_blobfs(url, pid, root, env, r)
    # 3. the physical limit: one GET of the blob, then every member out of the tar
    t = time.perf_counter()
    body = requests.post(
        f"{url}/public/api/v3/images.data.download",
        json={"projectId": pid, "downloadId": first["downloadId"]},
        headers={"x-api-key": TOKEN},
    ).content
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for member in tar:
            if member.isfile():
                tar.extractfile(member).read()  # type: ignore[union-attr]
    r["limit_s"] = time.perf_counter() - t
    # 4. the SDK's own paths
    try:
        import supervisely as sly
    except ImportError:
        sly = None
    if sly is not None:
        os.environ["SUPERVISELY_PUBLIC_API_RETRIES"] = "1"
        sdk = sly.Api(server_address=url, token=TOKEN, ignore_task_id=True)
        infos = sdk.image.get_list(ds["id"])
        subset = infos[: args.sdk_subset]
        t = time.perf_counter()
        for info in subset:
            sdk.image.download_bytes(ds["id"], [info.id])
        r["sdk_per_image_s"] = (time.perf_counter() - t) / len(subset) * n
        t = time.perf_counter()
        sdk.image.download_blob_file(pid, first["downloadId"])
        r["sdk_blob_s"] = time.perf_counter() - t
    report(r, n, blob_bytes, cold_stats, warm_stats, args)


def scan_through_blobfs(
    url: str, pid: int, root: Path, env: dict[str, str], r: dict[str, float]
) -> tuple[int, dict, dict]:  # type: ignore[type-arg]
    """Full scan cold then warm, and one random image cold then warm, on fresh mounts."""
    # 1. full scan through blobfs, cold then warm; 2. one random image, cold and warm
    with Mounts() as mounts:
        mnt = mountpoint("remote")
        cmd = [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            f"sly://{pid}",
            str(mnt),
            "--foreground",
            "--server",
            url,
            "--log-level",
            "WARNING",
        ]
        control(url, "stats/reset")
        spawn_foreground(mounts, cmd, mnt, OUT / "remote-daemon.log", env=env)
        img = mnt / DATASET / "img"
        cold_scan = scan(img)
        r["cold_s"], n = cold_scan.seconds, cold_scan.files
        cold_stats = control(url, "stats")
        control(url, "stats/reset")
        r["warm_s"] = scan(img).seconds
        warm_stats = control(url, "stats")
        mounts.release(mnt)
        mnt = mountpoint("remote-one")
        spawn_foreground(
            mounts, [*cmd[:5], str(mnt), *cmd[6:]], mnt, OUT / "remote-daemon-2.log", env=env
        )
        name = random.Random(1).choice(sorted(os.listdir(root / "plain")))
        path = mnt / DATASET / "img" / name
        os.listdir(path.parent)
        t = time.perf_counter()
        path.read_bytes()
        r["one_cold_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        path.read_bytes()
        r["one_warm_ms"] = (time.perf_counter() - t) * 1e3
    return n, cold_stats, warm_stats


def report(
    r: dict[str, float],
    n: int,
    blob_bytes: int,
    cold: dict,
    warm: dict,  # type: ignore[type-arg]
    args: argparse.Namespace,
) -> None:
    block = 1 << 20
    pages = -(-n // 1000)
    rows = [("what", "seconds", "x one-GET limit", "HTTP requests")]
    rows.append(("one GET of the blob + read every member", f"{r['limit_s']:.2f}", "1.00", "1"))
    rows.append(
        (
            "blobfs scan, cold",
            f"{r['cold_s']:.2f}",
            f"{r['cold_s'] / r['limit_s']:.2f}",
            str(cold["requests"]),
        )
    )
    rows.append(
        (
            "blobfs scan, warm",
            f"{r['warm_s']:.2f}",
            f"{r['warm_s'] / r['limit_s']:.2f}",
            str(warm["requests"]),
        )
    )
    if "sdk_per_image_s" in r:
        rows.append(
            (
                f"SDK download_bytes per image (x{n}, from {args.sdk_subset})",
                f"{r['sdk_per_image_s']:.2f}",
                f"{r['sdk_per_image_s'] / r['limit_s']:.2f}",
                str(n),
            )
        )
        rows.append(
            (
                "SDK download_blob_file",
                f"{r['sdk_blob_s']:.2f}",
                f"{r['sdk_blob_s'] / r['limit_s']:.2f}",
                "1",
            )
        )
    print(f"{n} images, blob {blob_bytes / 1e6:.1f} MB, latency {args.latency_ms} ms/request\n")
    print(table(rows))
    print(f"\ncold requests by method: {cold['methods']}")
    print(f"one random image: cold {r['one_cold_ms']:.1f} ms, warm {r['one_warm_ms']:.2f} ms")
    budget = blob_bytes / block + pages
    targets = [
        ("scan within 1.5x of the one-GET limit", r["cold_s"] <= 1.5 * r["limit_s"]),
        (
            f"requests <= blob/block + pages + 5% ({budget * 1.05:.0f})",
            cold["requests"] <= budget * 1.05,
        ),
        ("warm scan makes zero requests", warm["requests"] == 0),
    ]
    if "sdk_per_image_s" in r:
        speedup = r["sdk_per_image_s"] / r["cold_s"]
        print(f"blobfs vs SDK per-image download: {speedup:.1f}x faster")
        targets.append(("at least 10x faster than per-image download", speedup >= 10))
    for label, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {label}")


# ---- --latency-runs ----------------------------------------------------------------------


def _read_one(path: str) -> int:
    with open(path, "rb") as f:  # the DataLoader idiom
        return len(f.read())


def _sent(url: str, method: str | None = None) -> tuple[int, int]:
    """(requests, body bytes) the emulator answered since its last reset (one method)."""
    if method is None:
        stats = control(url, "stats")
        return stats["requests"], stats["bytes_sent"]
    log = requests.get(f"{url}/_emulator/log", headers={"x-api-key": TOKEN}).json()
    picked = [e for e in log if e["method"] == method]
    return len(picked), sum(e["bytes"] for e in picked)


def _mount(mounts: Mounts, url: str, pid: int, name: str, *extra: str) -> Path:
    mnt = mountpoint(name)
    cmd = [sys.executable, "-m", "blobfs", "mount", f"sly://{pid}", str(mnt), "--foreground"]
    cmd += ["--server", url, "--log-level", "WARNING", *extra]
    spawn_foreground(mounts, cmd, mnt, OUT / f"{name}-daemon.log", env={"API_TOKEN": TOKEN})
    return mnt


def _epoch(paths: list[str], workers: int) -> tuple[float, int]:
    import multiprocessing

    t = time.perf_counter()
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        delivered = sum(pool.map(_read_one, paths, chunksize=8))
    finally:
        pool.close()
        pool.join()
    return time.perf_counter() - t, delivered


def latency_runs(url: str, pid: int, root: Path, args: argparse.Namespace) -> None:  # noqa: PLR0915
    lat = args.latency_ms
    names = sorted(os.listdir(root / "plain"))
    rows = [("what", "latency ms", "seconds", "requests", "MB fetched", "note")]
    figures: dict[str, float] = {}

    def faults(**values: object) -> None:
        control(url, "faults/reset")
        control(url, "faults", {"latency_ms": lat, **values})

    with Mounts() as mounts:
        for ms in (lat,) if args.listing_only else (0.0, lat):  # cold sequential scans; at
            control(url, "faults/reset")  # lat also the first ls and every annotation
            control(url, "faults", {"latency_ms": ms})
            mnt = _mount(mounts, url, pid, f"lat-scan-{int(ms)}")
            control(url, "stats/reset")
            img, ann = mnt / DATASET / "img", mnt / DATASET / "ann"
            t = time.perf_counter()
            n = len(os.listdir(img))
            ls_s = time.perf_counter() - t
            if args.listing_only:
                req, sent = _sent(url)
                rows.append(("first ls", f"{ms:g}", f"{ls_s:.3f}", str(req), "", f"{n} images"))
            else:
                got = scan(img)
                req, sent = _sent(url)
                figures[f"scan_{ms}"] = got.seconds
                rows.append(
                    (
                        "cold scan (listdir + read all)",
                        f"{ms:g}",
                        f"{got.seconds:.2f}",
                        str(req),
                        f"{sent / 1e6:.1f}",
                        f"{n} images",
                    )
                )
            if ms == lat:
                if not args.listing_only:
                    rows.append(("  of which first ls", f"{ms:g}", f"{ls_s:.3f}", "", "", ""))
                control(url, "stats/reset")
                t = time.perf_counter()
                listed = os.listdir(ann)
                ann_ls_s = time.perf_counter() - t
                total = sum(len((ann / a).read_bytes()) for a in listed)
                ann_s = time.perf_counter() - t
                req, sent = _sent(url)
                figures["ann_s"], figures["ls_s"] = ann_s, ls_s
                rows.append(
                    (
                        "read every ann file (ls + read)",
                        f"{ms:g}",
                        f"{ann_s:.2f}",
                        str(req),
                        f"{sent / 1e6:.1f}",
                        f"{total / 1e6:.1f} MB of JSON",
                    )
                )
                rows.append(("  of which ls ann/", f"{ms:g}", f"{ann_ls_s:.2f}", "", "", ""))
                control(url, "stats/reset")
                t = time.perf_counter()
                for a in os.listdir(ann):  # every answer in memory: what FUSE alone costs
                    (ann / a).read_bytes()
                again_s = time.perf_counter() - t
                rows.append(
                    (
                        "  the same again (no request: the FUSE floor)",
                        f"{ms:g}",
                        f"{again_s:.2f}",
                        str(_sent(url)[0]),
                        "",
                        "",
                    )
                )
            mounts.release(mnt)
        if args.listing_only or args.no_epochs:
            print(f"{len(names)} images; {load_note()}\n")
            print(table(rows))
            return

        epoch = random.Random(1).sample(names, min(args.epoch_images, len(names)))
        faults()
        mnt = _mount(mounts, url, pid, "lat-epoch")
        os.listdir(mnt / DATASET / "img")
        control(url, "stats/reset")
        secs, delivered = _epoch([str(mnt / DATASET / "img" / p) for p in epoch], args.workers)
        req, fetched = _sent(url, "images.data.download")
        figures["ratio"] = fetched / delivered
        rows.append(
            (
                f"shuffled epoch, {len(epoch)} images, {args.workers} workers",
                f"{lat:g}",
                f"{secs:.2f}",
                str(req),
                f"{fetched / 1e6:.2f}",
                f"fetched/delivered {fetched / delivered:.2f}, {len(epoch) / secs:.0f} img/s",
            )
        )
        mounts.release(mnt)

        faults()
        cache_dir = OUT / f"lat-cache-{os.getpid()}"
        mnt = _mount(mounts, url, pid, "lat-prefetch", "--prefetch", "--cache-dir", str(cache_dir))
        os.listdir(mnt / DATASET / "img")
        control(url, "stats/reset")
        paths = [str(mnt / DATASET / "img" / p) for p in epoch]
        half = len(paths) // 2
        s1, _ = _epoch(paths[:half], args.workers)
        first_half, _ = _sent(url)
        control(url, "stats/reset")
        s2, _ = _epoch(paths[half:], args.workers)
        second_half, _ = _sent(url)
        figures["second_half_requests"] = second_half
        rows.append(
            (
                "--prefetch epoch, first half",
                f"{lat:g}",
                f"{s1:.2f}",
                str(first_half),
                "",
                "includes the prefetch's own requests",
            )
        )
        rows.append(
            ("--prefetch epoch, second half", f"{lat:g}", f"{s2:.2f}", str(second_half), "", "")
        )
        mounts.release(mnt)
        shutil.rmtree(cache_dir, ignore_errors=True)

        picks = random.Random(2).sample(names, 20)
        for label, methods in (
            ("images.data.download ignores Range", {"images.data.download": "ignore_range"}),
            (
                "... and file-storage.download too",
                {"images.data.download": "ignore_range", "file-storage.download": "ignore_range"},
            ),
        ):
            faults(methods=methods)
            mnt = _mount(mounts, url, pid, "lat-range")
            os.listdir(mnt / DATASET / "img")
            control(url, "stats/reset")
            t = time.perf_counter()
            got_bytes = sum(len((mnt / DATASET / "img" / p).read_bytes()) for p in picks)
            secs = time.perf_counter() - t
            req, sent = _sent(url)
            rows.append(
                (
                    f"20 random reads, {label}",
                    f"{lat:g}",
                    f"{secs:.2f}",
                    str(req),
                    f"{sent / 1e6:.2f}",
                    f"{got_bytes / 1e3:.1f} KB delivered",
                )
            )
            mounts.release(mnt)
        control(url, "faults/reset")

    print(f"{len(names)} images; {load_note()}\n")
    print(table(rows))
    targets = [
        (f"first ls <= 1 s at {lat:g} ms", figures["ls_s"] <= 1.0),
        (f"every ann file read <= 5 s at {lat:g} ms", figures["ann_s"] <= 5.0),
        ("shuffled epoch fetched <= 2x delivered", figures["ratio"] <= 2.0),
        (
            f"cold scan at {lat:g} ms within 1.3x of 0 ms",
            figures[f"scan_{lat}"] <= 1.3 * figures["scan_0.0"],
        ),
        (
            "--prefetch: second half of the epoch makes no request",
            figures["second_half_requests"] == 0,
        ),
    ]
    print()
    for label, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {label}")


if __name__ == "__main__":
    main()
