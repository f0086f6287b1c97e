"""Local scan benchmark: blobfs vs a plain folder vs ratarmount vs the SDK, in one run.

    python bench/local_scan.py [--images 30000] [--skip-ratarmount] [--skip-sdk]

Builds (once, cached in bench/out/) a project of N ~3-4 KB PNGs in one tar, then measures
side by side: mount-to-ready; a scan (listdir + open/read/close of every image, one
reader) through a fresh blobfs mount (cold) and again (warm, a second epoch); the same
files extracted to a plain folder; ratarmount on the same tar (its first mount builds an
index); the SDK's ``Dataset.get_blob_img_bytes`` on a 2,000-image subset. Prints a table
with ratios and PASS/MISS against the targets of the local-mount issue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OUT, blobfs_mount, drop_caches, rss_mb, scan, table, unmount, wait_mounted

from blobfs.blob.pack import ProjectPacker
from blobfs.testing.sample import png_bytes


def build(n: int) -> Path:
    root = OUT / f"local-{n}"
    project = root / "project"
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(n):
        (src / f"img_{i:06d}.png").write_bytes(png_bytes(i, 36, 36))
    ProjectPacker(project, "ds").pack(sorted(src.iterdir()))
    plain = root / "plain"
    plain.mkdir()
    tar = next((project / "blob").iterdir())
    with tarfile.open(tar) as t:
        t.extractall(plain, filter="data")
    shutil.rmtree(src)
    (root / "done").write_text("ok")
    return root


def bench_blobfs(root: Path, results: dict[str, float]) -> None:
    mnt = OUT / "mnt-blobfs"
    drop_caches()
    with blobfs_mount(str(root / "project"), mnt) as (proc, ready_s):
        results["blobfs_mount_s"] = ready_s
        results["blobfs_cold_s"], results["files"], _ = scan(mnt / "ds" / "img")
        results["blobfs_warm_s"], _, _ = scan(mnt / "ds" / "img")
        results["blobfs_rss_mb"] = rss_mb(proc.pid)


def bench_plain(root: Path, results: dict[str, float]) -> None:
    scan(root / "plain")  # warm the page cache once, as the notes advise
    results["plain_s"], _, _ = scan(root / "plain")


def bench_ratarmount(root: Path, results: dict[str, float]) -> None:
    exe = shutil.which("ratarmount") or str(Path(sys.executable).parent / "ratarmount")
    if not os.path.exists(exe):
        print("ratarmount not installed (pip install ratarmount): skipped")
        return
    tar = next((root / "project" / "blob").iterdir())
    mnt = OUT / "mnt-ratarmount"
    mnt.mkdir(exist_ok=True)
    for index in tar.parent.glob("*.index.*"):
        index.unlink()
    drop_caches()
    start = time.perf_counter()
    log = open(OUT / "ratarmount.log", "w")  # noqa: SIM115 - closed when the mount ends
    proc = subprocess.Popen([exe, "-f", str(tar), str(mnt)], stdout=log, stderr=log)
    try:
        try:
            wait_mounted(mnt, proc)
        except RuntimeError:
            log.close()
            print((OUT / "ratarmount.log").read_text()[-3000:])
            raise
        results["ratarmount_mount_s"] = time.perf_counter() - start
        folder = mnt
        while len(os.listdir(folder)) == 1 and (folder / os.listdir(folder)[0]).is_dir():
            folder = folder / os.listdir(folder)[0]
        results["ratarmount_cold_s"], _, _ = scan(folder)
        results["ratarmount_warm_s"], _, _ = scan(folder)
    finally:
        unmount(mnt)
        proc.wait(60)


def bench_sdk(root: Path, results: dict[str, float], subset: int) -> None:
    try:
        import supervisely as sly
    except ImportError:
        print("supervisely not installed: SDK row skipped")
        return
    project = sly.Project(str(root / "project"), sly.OpenMode.READ)
    ds = project.datasets.get("ds")
    names = sorted(ds.get_items_names())[:subset]
    start = time.perf_counter()
    for name in names:
        ds.get_blob_img_bytes(name)
    results["sdk_subset_s"] = time.perf_counter() - start
    results["sdk_subset_n"] = len(names)


def report(r: dict[str, float]) -> None:
    n = int(r["files"])
    plain = r["plain_s"]
    rows = [("what", "seconds", "us/image", "x plain folder")]

    def row(label: str, key: str, count: float = n) -> None:
        if key in r:
            rows.append(
                (
                    label,
                    f"{r[key]:.3f}",
                    f"{r[key] / count * 1e6:.0f}",
                    f"{r[key] / plain * n / count:.1f}",
                )
            )

    row("plain folder scan (warm)", "plain_s")
    row("blobfs scan, cold mount", "blobfs_cold_s")
    row("blobfs scan, warm (2nd epoch)", "blobfs_warm_s")
    row("ratarmount scan, cold", "ratarmount_cold_s")
    row("ratarmount scan, warm", "ratarmount_warm_s")
    row("SDK get_blob_img_bytes (subset)", "sdk_subset_s", r.get("sdk_subset_n", 1))
    print(table(rows))
    print(
        f"\nimages: {n}; blobfs mount ready in {r['blobfs_mount_s']:.3f} s; "
        f"daemon RSS after scans {r['blobfs_rss_mb']:.0f} MB"
    )
    if "ratarmount_mount_s" in r:
        print(f"ratarmount first mount (builds its index): {r['ratarmount_mount_s']:.3f} s")
        print(
            f"blobfs vs ratarmount: cold {r['ratarmount_cold_s'] / r['blobfs_cold_s']:.2f}x "
            f"faster, warm {r['ratarmount_warm_s'] / r['blobfs_warm_s']:.2f}x faster"
        )
    if "sdk_subset_s" in r:
        per = r["sdk_subset_s"] / r["sdk_subset_n"]
        print(
            f"SDK per image: {per * 1e3:.2f} ms (O(N) per image); blobfs cold per image: "
            f"{r['blobfs_cold_s'] / n * 1e3:.3f} ms -> {per / (r['blobfs_cold_s'] / n):.0f}x"
        )
    targets = [
        ("cold scan within 8x of plain folder", r["blobfs_cold_s"] / plain <= 8),
        ("warm scan within 3x of plain folder", r["blobfs_warm_s"] / plain <= 3),
        ("mount ready < 1 s", r["blobfs_mount_s"] < 1),
        ("RSS < 150 MB", r["blobfs_rss_mb"] < 150),
    ]
    if "ratarmount_cold_s" in r:
        targets += [
            ("faster than ratarmount cold", r["blobfs_cold_s"] < r["ratarmount_cold_s"]),
            ("faster than ratarmount warm", r["blobfs_warm_s"] < r["ratarmount_warm_s"]),
        ]
    for label, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--sdk-subset", type=int, default=2000)
    parser.add_argument("--skip-ratarmount", action="store_true")
    parser.add_argument("--skip-sdk", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = build(args.images)
    results: dict[str, float] = {}
    bench_plain(root, results)
    bench_blobfs(root, results)
    if not args.skip_ratarmount:
        bench_ratarmount(root, results)
    if not args.skip_sdk:
        bench_sdk(root, results, args.sdk_subset)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
