"""Writeback benchmark: a dataset written into a remote mount vs the SDK's whole blob flow.

    python bench/writeback_bench.py [--images 30000] [--latency-ms 2 50]
                                    [--per-image-subset 300]

The same N ~4 KB images, each with one annotation (``ann/<name>.json``, the image's size,
no objects), against the emulator (separate process, ``--latency-ms`` per request; each
latency is a separate emulator run):

1. anchor, the guide's whole flow with the stock SDK: ``sly.fs.archive_directory`` (tar),
   ``sly.fs.save_blob_offsets_pkl`` (offsets file), ``api.file.upload`` of both,
   ``api.image.upload_blob_images``, ``api.annotation.upload_paths``;
2. blobfs as a user gets it (``default``, the target row): ``cp -r`` of the dataset's
   ``img/`` and ``ann/`` into ``<mount>/ds/`` with the mount's defaults (batches of
   ``--batch-files 30000`` import, in the import worker, while the copy goes on), then
   ``blobfs flush`` (the rest: pack, upload tar + offsets, register, annotations);
3. ``one_batch``: ``--writeback-delay 3600 --blob-size 1G --batch-files 0`` (nothing is
   imported before the flush); ``streaming``: ``--batch-files N`` (``--batch-files`` of
   this script); ``*_daemon``: the same with ``--import-in-daemon``;
4. blobfs with ``--sync-close`` (every ``close()`` durable), one batch;
5. per-image ``api.image.upload_path`` on a subset, extrapolated to N;
6. ``cp -r`` of the same folder into a plain local folder on the disk holding the spool.

Prints seconds, per-file microseconds for the copies, ratios to the anchor and PASS/MISS
for the targets (cp + flush within 1.5x of the anchor at 2 ms and no slower than it at
50 ms; per-image upload at least 10x slower than blobfs). ``--breakdown`` adds where the
time goes: the anchor's steps, the daemon's log lines of each pass and import (its
phases), and the CPU seconds the emulator spent serving each part, the server's floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.support
from _common import OUT, Mounts, mountpoint, spawn_foreground, table
from remote_scan import TOKEN, start_emulator

from blobfs.config import DEFAULT_BATCH_FILES
from tests.support.sample import png_bytes

SIDE = 36  # 36x36 PNGs of noise: ~4 KB each


def api(url: str, method: str, body: dict) -> dict:  # type: ignore[type-arg]
    r = requests.post(f"{url}/public/api/v3/{method}", json=body, headers={"x-api-key": TOKEN})
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def new_project(url: str, name: str) -> tuple[int, int]:
    project = api(url, "projects.add", {"workspaceId": 1, "name": name})["id"]
    dataset = api(url, "datasets.add", {"projectId": project, "name": "ds"})["id"]
    return project, dataset


def dataset_folder(n: int) -> Path:
    """``img/`` with N images and ``ann/`` with one annotation each (made once, reused)."""
    root = OUT / f"wb-src-{n}"
    folder = root / "ds"
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        (folder / "img").mkdir(parents=True)
        (folder / "ann").mkdir()
        ann = json.dumps(
            {"description": "", "size": {"height": SIDE, "width": SIDE}, "tags": [], "objects": []}
        )
        for i in range(n):
            name = f"w_{i:06d}.png"
            (folder / "img" / name).write_bytes(png_bytes(100_000 + i, SIDE, SIDE))
            (folder / "ann" / f"{name}.json").write_text(ann)
        (root / ".done").write_text("ok")
    return folder


def count_images(url: str, project: int) -> int:
    ds = api(url, "datasets.list", {"projectId": project})["entities"][0]["id"]
    return int(api(url, "images.list", {"datasetId": ds, "per_page": 1})["total"])


#: Mount options of each blobfs row. ``default`` is what a user gets (the target row);
#: ``one_batch`` waits for the flush to import anything; ``streaming`` imports batches of
#: ``--batch-files`` while the copy goes on; ``_daemon`` rows import in the daemon itself.
ONE_BATCH = ["--writeback-delay", "3600", "--blob-size", "1G", "--batch-files", "0"]
MODES: dict[str, list[str]] = {
    "default": [],
    "one_batch": ONE_BATCH,
    "streaming": ["--batch-files", str(DEFAULT_BATCH_FILES)],
    "sync_close": [*ONE_BATCH, "--sync-close"],
    "one_batch_daemon": [*ONE_BATCH, "--import-in-daemon"],
    "streaming_daemon": ["--batch-files", str(DEFAULT_BATCH_FILES), "--import-in-daemon"],
}
LABELS = {
    "default": f"defaults: --batch-files {DEFAULT_BATCH_FILES}",
    "one_batch": "one batch",
    "streaming": "--batch-files N: batches during cp",
    "sync_close": "one batch, --sync-close",
    "one_batch_daemon": "one batch, --import-in-daemon",
    "streaming_daemon": "--batch-files N, --import-in-daemon",
}


def streaming(batch_files: int) -> None:
    """The streaming rows with ``--batch-files batch_files``."""
    for mode in ("streaming", "streaming_daemon"):
        MODES[mode][1] = str(batch_files)
        LABELS[mode] = LABELS[mode].replace("N", str(batch_files), 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def writeback_mount(
    project: int, mnt: Path, url: str, spool: Path, options: list[str]
) -> list[str]:
    """The command of a foreground writeback mount of remote ``project`` on ``mnt``."""
    return [
        *[sys.executable, "-m", "blobfs", "mount", f"sly://{project}", str(mnt)],
        *["--foreground", "--server", url, "--writeback", "--spool-dir", str(spool)],
        *options,
    ]


def bench_blobfs(
    url: str, src: Path, mode: str, emu: int, breakdown: list[str]
) -> tuple[float, float, int]:
    """(seconds of cp -r, seconds of cp -r + blobfs flush, images the project then has)."""
    project, _ = new_project(url, f"blobfs-{time.time_ns()}")
    spool = OUT / "wb-spool"
    shutil.rmtree(spool, ignore_errors=True)
    with Mounts() as mounts:
        mnt = mountpoint("writeback")
        cmd = writeback_mount(project, mnt, url, spool, [*MODES[mode], "--log-level", "INFO"])
        log = OUT / f"wb-daemon-{mode}.log"
        spawn_foreground(mounts, cmd, mnt, log, env={"API_TOKEN": TOKEN})
        seen = len(log.read_text().splitlines())
        cpu0 = cpu_seconds(emu)
        start = time.perf_counter()
        subprocess.run(["cp", "-r", f"{src}/.", str(mnt / "ds")], check=True)
        copied = time.perf_counter() - start
        cpu1 = cpu_seconds(emu)
        copy_lines = len(log.read_text().splitlines())
        done = subprocess.run(
            [sys.executable, "-m", "blobfs", "flush", str(mnt)], capture_output=True, text=True
        )
        total = time.perf_counter() - start
        cpu2 = cpu_seconds(emu)
        if done.returncode != 0:
            raise RuntimeError(done.stdout + done.stderr)
        lines = log.read_text().splitlines()
    breakdown.append(
        f"{mode}: cp {copied:.2f} s, flush {total - copied:.2f} s; emulator CPU "
        f"{cpu1 - cpu0:.2f} s during cp, {cpu2 - cpu1:.2f} s during flush"
    )
    for i, line in enumerate(lines[seen:], seen):
        if "writeback pass" in line or "imported" in line:
            when = "during cp" if i < copy_lines else "flush"
            breakdown.append(f"  [{when}] {line.split(' ', 3)[-1]}")
    return copied, total, count_images(url, project)


def bench_local_cp(src: Path) -> float:
    target = OUT / "wb-local-copy"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", f"{src}/.", str(target)], check=True)
    took = time.perf_counter() - start
    shutil.rmtree(target, ignore_errors=True)
    return took


def bench_sdk(
    url: str, src: Path, n: int, subset: int, emu: int, breakdown: list[str]
) -> tuple[float, float, int] | None:
    """(seconds of the whole flow, extrapolated seconds of per-image upload, images)."""
    try:
        import supervisely as sly
    except ImportError:
        return None
    os.environ["SUPERVISELY_PUBLIC_API_RETRIES"] = "1"
    os.environ["SUPERVISELY_SKIP_HTTPS_USER_HELPER_CHECK"] = "1"
    sdk = sly.Api(server_address=url, token=TOKEN, ignore_task_id=True)
    project, dataset = new_project(url, f"sdk-{time.time_ns()}")
    work = OUT / "wb-sdk"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    steps: list[tuple[str, float, float]] = []  # (step, wall seconds, emulator CPU seconds)
    start = last = time.perf_counter()
    last_cpu = cpu_seconds(emu)

    def step(name: str) -> None:
        nonlocal last, last_cpu
        now, cpu = time.perf_counter(), cpu_seconds(emu)
        steps.append((name, now - last, cpu - last_cpu))
        last, last_cpu = now, cpu

    tar = work / "blob.tar"
    sly.fs.archive_directory(str(src / "img"), str(tar))
    step("archive_directory")
    offsets = sly.fs.save_blob_offsets_pkl(str(tar), str(work))
    step("save_blob_offsets_pkl")
    sdk.file.upload(1, str(tar), "/blob-files/blob.tar")
    sdk.file.upload(1, offsets, f"/blob-files/{Path(offsets).name}")
    step("file.upload x2")
    infos = [
        info
        for batch in sdk.image.upload_blob_images(
            dataset, "/blob-files/blob.tar", return_image_infos_generator=True
        )
        for info in batch
    ]
    step("upload_blob_images")
    ann_paths = [str(src / "ann" / f"{info.name}.json") for info in infos]
    sdk.annotation.upload_paths([info.id for info in infos], ann_paths)
    step("annotation.upload_paths")
    whole = time.perf_counter() - start
    breakdown.append(
        "anchor: "
        + ", ".join(f"{name} {wall:.2f} s (emulator CPU {cpu:.2f} s)" for name, wall, cpu in steps)
    )
    _, dataset2 = new_project(url, f"sdk-plain-{time.time_ns()}")
    if not subset:  # the whole flow alone
        return whole, 0.0, count_images(url, project)
    files = sorted((src / "img").glob("*.png"))[:subset]
    start = time.perf_counter()
    for path in files:
        sdk.image.upload_path(dataset2, path.name, str(path))
    per_image = (time.perf_counter() - start) / len(files) * n
    return whole, per_image, count_images(url, project)


def run_latency(
    src: Path, n: int, latency_ms: float, subset: int, breakdown: list[str], modes: list[str]
) -> dict[str, float]:
    state = OUT / "wb-emu"
    shutil.rmtree(state, ignore_errors=True)
    emu, url = start_emulator(state, latency_ms)
    out: dict[str, float] = {}
    try:
        sdk = bench_sdk(url, src, n, subset, emu.pid, breakdown) if subset else None
        if sdk:
            out["anchor"], out["per_image"], imported = sdk
            assert imported == n, f"the SDK flow registered {imported} of {n} images"
        for mode in modes:
            copied, total, imported = bench_blobfs(url, src, mode, emu.pid, breakdown)
            assert imported == n, f"blobfs ({mode}) imported {imported} of {n} images"
            out[f"cp_{mode}"], out[f"total_{mode}"] = copied, total
    finally:
        emu.terminate()
        emu.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[2.0, 50.0])
    parser.add_argument("--per-image-subset", type=int, default=300)
    parser.add_argument("--breakdown", action="store_true", help="where the time goes")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=["default", "one_batch", "sync_close"],
        help="blobfs rows to run",
    )
    parser.add_argument(
        "--batch-files",
        type=int,
        default=DEFAULT_BATCH_FILES,
        help="--batch-files of the streaming rows",
    )
    args = parser.parse_args()
    streaming(args.batch_files)
    n = args.images
    src = dataset_folder(n)
    local = bench_local_cp(src)
    files = 2 * n  # images and annotations
    for latency in args.latency_ms:
        breakdown: list[str] = []
        r = run_latency(src, n, latency, args.per_image_subset, breakdown, args.modes)
        base = r.get("anchor", 1.0)
        rows = [("what", "seconds", "us per file", "x anchor")]

        def row(
            label: str,
            seconds: float,
            per_file: bool = False,
            rows: list = rows,
            base: float = base,
        ) -> None:
            per = f"{seconds / files * 1e6:.0f}" if per_file else ""
            rows.append((label, f"{seconds:.2f}", per, f"{seconds / base:.2f}"))

        if "anchor" in r:
            row("SDK: archive + offsets + file.upload x2 + upload_blob_images + ann", base)
        for mode in args.modes:
            row(f"blobfs: cp -r + blobfs flush ({LABELS[mode]})", r[f"total_{mode}"])
        for mode in args.modes:
            row(f"blobfs: cp -r alone ({LABELS[mode]})", r[f"cp_{mode}"], per_file=True)
        row("cp -r into a plain local folder", local, per_file=True)
        if "per_image" in r:
            row(f"SDK: upload_path per image (x{n}, from {args.per_image_subset})", r["per_image"])
        print(f"\n{n} images + {n} annotations, {latency:g} ms per request\n")
        print(table(rows))
        if args.breakdown:
            print("\n" + "\n".join(breakdown))
        if "anchor" in r:
            limit = 1.5 if latency <= 2 else 1.0
            checks = [
                (
                    f"cp + flush within {limit}x of the anchor ({mode})",
                    r[f"total_{mode}"] <= limit * base,
                )
                for mode in args.modes
                if mode != "sync_close"
            ] + [
                ("per-image upload >= 10x slower", r["per_image"] >= 10 * r[f"total_{mode}"])
                for mode in args.modes[:1]
            ]
            for label, ok in checks:
                print(f"{'PASS' if ok else 'MISS'}  {label}")


if __name__ == "__main__":
    main()
