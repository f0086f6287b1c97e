"""Writeback benchmark: images written into a remote mount vs the SDK's own upload paths.

    python bench/writeback_bench.py [--images 30000] [--latency-ms 2] [--per-image-subset 300]

Against the emulator (separate process, ``--latency-ms`` per request), side by side:
1. blobfs: copy N ~4 KB images into ``<mount>/ds/img`` (each close() is durable: fsync),
   then ``blobfs flush`` (pack, upload, register by offsets, annotations);
2. the SDK's blob path for the same files: tar them (``sly.fs.archive_directory``), write the
   offsets file (``sly.fs.get_file_offsets_batch_generator`` + ``BlobImageInfo.dump_to_pickle``),
   ``api.file.upload`` both, ``api.image.upload_blob_images``;
3. per-image ``api.image.upload_path`` on a subset, extrapolated to N.
Prints seconds, ratios and PASS/MISS for the targets (within 1.2x of the SDK blob path,
at least 10x faster than per-image upload).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, Mounts, mountpoint, spawn_foreground, table
from remote_scan import TOKEN, start_emulator

from blobfs.testing.sample import png_bytes


def api(url: str, method: str, body: dict) -> dict:  # type: ignore[type-arg]
    r = requests.post(f"{url}/public/api/v3/{method}", json=body, headers={"x-api-key": TOKEN})
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def new_project(url: str, name: str) -> tuple[int, int]:
    project = api(url, "projects.add", {"workspaceId": 1, "name": name})["id"]
    dataset = api(url, "datasets.add", {"projectId": project, "name": "ds"})["id"]
    return project, dataset


def images(n: int) -> Path:
    folder = OUT / f"wb-src-{n}"
    if not (folder / ".done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"w_{i:06d}.png").write_bytes(png_bytes(100_000 + i, 36, 36))
        (folder / ".done").write_text("ok")
    return folder


def bench_blobfs(url: str, src: Path, n: int) -> tuple[float, float, int]:
    project, _ = new_project(url, f"blobfs-{time.time_ns()}")
    spool = OUT / "wb-spool"
    shutil.rmtree(spool, ignore_errors=True)
    with Mounts() as mounts:
        mnt = mountpoint("writeback")
        cmd = [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            f"sly://{project}",
            str(mnt),
            "--foreground",
            "--server",
            url,
            "--writeback",
            "--spool-dir",
            str(spool),
            "--writeback-delay",
            "3600",
            "--blob-size",
            "1G",
            "--log-level",
            "WARNING",
        ]
        spawn_foreground(mounts, cmd, mnt, OUT / "wb-daemon.log", env={"API_TOKEN": TOKEN})
        start = time.perf_counter()
        target = mnt / "ds" / "img"
        for path in sorted(src.glob("*.png")):
            shutil.copyfile(path, target / path.name)
        copied = time.perf_counter() - start
        done = subprocess.run(
            [sys.executable, "-m", "blobfs", "flush", str(mnt)], capture_output=True, text=True
        )
        total = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(done.stdout + done.stderr)
    count = api(
        url,
        "images.list",
        {
            "datasetId": api(url, "datasets.list", {"projectId": project})["entities"][0]["id"],
            "per_page": 1,
        },
    )["total"]
    return copied, total, count


def bench_sdk(url: str, src: Path, n: int, subset: int) -> tuple[float, float] | None:
    try:
        import supervisely as sly
        from supervisely.api.image_api import BlobImageInfo
    except ImportError:
        return None
    os.environ["SUPERVISELY_PUBLIC_API_RETRIES"] = "1"
    sdk = sly.Api(server_address=url, token=TOKEN, ignore_task_id=True)
    _, dataset = new_project(url, f"sdk-{time.time_ns()}")
    work = OUT / "wb-sdk"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    start = time.perf_counter()
    tar = work / "blob.tar"
    staging = work / "staging"
    staging.mkdir()
    for path in src.glob("*.png"):
        os.link(path, staging / path.name)
    sly.fs.archive_directory(str(staging), str(tar))
    offsets = work / "blob_offsets.pkl"
    batches = sly.fs.get_file_offsets_batch_generator(str(tar), output_format="objects")
    BlobImageInfo.dump_to_pickle(batches, str(offsets))
    sdk.file.upload(1, str(tar), "/blob-files/blob.tar")
    sdk.file.upload(1, str(offsets), "/blob-files/blob_offsets.pkl")
    sdk.image.upload_blob_images(dataset, "/blob-files/blob.tar")
    blob_path = time.perf_counter() - start
    _, dataset2 = new_project(url, f"sdk-plain-{time.time_ns()}")
    files = sorted(src.glob("*.png"))[:subset]
    start = time.perf_counter()
    for path in files:
        sdk.image.upload_path(dataset2, path.name, str(path))
    per_image = (time.perf_counter() - start) / len(files) * n
    return blob_path, per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--per-image-subset", type=int, default=300)
    args = parser.parse_args()
    src = images(args.images)
    state = OUT / "wb-emu"
    shutil.rmtree(state, ignore_errors=True)
    emu, url = start_emulator(state, args.latency_ms)
    try:
        copied, total, count = bench_blobfs(url, src, args.images)
        sdk = bench_sdk(url, src, args.images, args.per_image_subset)
    finally:
        emu.terminate()
        emu.wait()
    rows = [("what", "seconds", "x SDK blob path")]
    base = sdk[0] if sdk else total
    rows.append(
        ("blobfs: cp into the mount (durable closes)", f"{copied:.2f}", f"{copied / base:.2f}")
    )
    rows.append(
        ("blobfs: cp + flush (pack, upload, register)", f"{total:.2f}", f"{total / base:.2f}")
    )
    if sdk:
        rows.append(
            ("SDK: archive + offsets + upload + upload_blob_images", f"{sdk[0]:.2f}", "1.00")
        )
        rows.append(
            (
                f"SDK: upload_path per image (x{args.images}, extrapolated)",
                f"{sdk[1]:.2f}",
                f"{sdk[1] / base:.2f}",
            )
        )
    print(f"{args.images} images, {args.latency_ms} ms per request; imported by blobfs: {count}\n")
    print(table(rows))
    if sdk:
        for label, ok in [
            ("within 1.2x of the SDK blob path", total <= 1.2 * sdk[0]),
            ("at least 10x faster than per-image upload", sdk[1] / total >= 10),
        ]:
            print(f"{'PASS' if ok else 'MISS'}  {label}")


if __name__ == "__main__":
    main()
