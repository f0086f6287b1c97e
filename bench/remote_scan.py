"""Remote scan benchmark: blobfs over HTTP vs the physical limit vs the SDK, in one run.

    python bench/remote_scan.py [--images 30000] [--latency-ms 2] [--sdk-subset 1000]

The emulator (a separate process) adds ``--latency-ms`` to every request, like a near
network. Measured side by side on one 30,000-image dataset of ~4 KB images:
a full scan through a blobfs mount (cold, then warm) with its HTTP request count; the
physical limit (one GET of the whole blob, then reading every member out of the tar);
the SDK's per-image ``download_bytes`` (on a subset, extrapolated); the SDK's
``download_blob_file``; cold and warm latency of one random image through the mount.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, Mounts, mountpoint, scan, spawn_foreground, table
from local_scan import DATASET, build

from blobfs.testing.emulator import start_process
from blobfs.testing.seed import upload_local_project

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


if __name__ == "__main__":
    main()
