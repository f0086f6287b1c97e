"""Local scan benchmark: blobfs vs a plain folder vs ratarmount vs the SDK, in one run.

    python bench/local_scan.py [--images 30000] [--repeat 1] [--skip-ratarmount]
                               [--skip-sdk] [--json out.json]

Builds once (cached in bench/out/, gitignored) a one-dataset blob project of N noise PNGs
(36x36 px, about 4 KB each) packed into one tar by ``ProjectPacker``, plus the same files
as a plain folder. Then, in one run and on the same files:

1. blobfs: ``python -m blobfs mount PROJECT MNT`` timed until it returns (it returns once
   the mount is live); a scan of ``ds/img`` on the fresh mount (cold) and again (warm,
   the second epoch); the daemon's VmRSS after both scans.
2. the plain folder, page cache warmed once, then scanned.
3. ratarmount on the same tar: first mount (builds its index, timed), cold and warm scan.
4. the SDK's ``sly.Dataset(...).get_blob_img_bytes(name)`` over a subset of the images
   (it re-reads every offsets batch per call: O(N) per image), extrapolated to all N.

A scan is ``os.listdir`` of the folder plus open/read/close of every file, one reader, in
Python. "Cold" means a fresh mount (no dentries, attributes or pages of the mount cached
by the kernel, nothing cached by the daemon) over a tar whose bytes are in the page cache,
so it measures the file system, not the disk; ``--drop-caches`` empties the page cache
before each cold scan instead (and adds a cold plain-folder row).

Prints one table (seconds, us per image, ratio to the plain folder, blobfs vs ratarmount)
and PASS/MISS for each target of the local-mount issue. Exits non-zero only on errors
(wrong bytes, failed mounts), never on a missed target. Everything mounted is unmounted
however the run ends (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.support
from _common import (
    OUT,
    Mounts,
    Scan,
    blobfs_mount_cli,
    clean_stale_mounts,
    drop_caches,
    fmt,
    load_note,
    mountpoint,
    peak_rss_mb,
    pin,
    rss_mb,
    scan,
    spawn_foreground,
    summary,
    table,
    warm_files,
)

DATASET = "ds"
# The targets for a local mount of 30,000 small images.
COLD_X_PLAIN = 8.0
WARM_X_PLAIN = 3.0
MOUNT_READY_S = 1.0
RSS_MB = 150.0

Results = dict[str, Any]


# ---- the data ----------------------------------------------------------------------------


def build(n: int, px: int) -> Path:
    """The cached benchmark data for ``n`` images of ``px`` x ``px``: ``project/`` (one tar)
    and ``plain/`` (the same image files). Built in a temporary folder, renamed when done."""
    root = OUT / f"scan-{n}-{px}px"
    if (root / "build.json").exists():
        return root
    from blobfs.format.pack import ProjectPacker
    from tests.support.sample import png_bytes

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{n}-", dir=OUT))
    try:
        print(f"building {n} images of {px}x{px} px in {root} (once)...", flush=True)
        started = time.perf_counter()
        plain = tmp / "plain"
        plain.mkdir()
        total = 0
        for i in range(n):
            data = png_bytes(i, px, px)
            (plain / f"img_{i:06d}.png").write_bytes(data)
            total += len(data)
        result = ProjectPacker(tmp / "project", DATASET).pack(sorted(plain.iterdir()))
        if len(result.blobs) != 1:
            raise RuntimeError(f"expected one tar, got {len(result.blobs)}")
        info = {
            "images": n,
            "px": px,
            "image_bytes": total,
            "tar": result.blobs[0].name,
            "tar_bytes": (tmp / "project" / "blob" / result.blobs[0].name).stat().st_size,
            "build_s": round(time.perf_counter() - started, 1),
        }
        (tmp / "build.json").write_text(json.dumps(info, indent=1))
        try:
            tmp.rename(root)
        except OSError:  # a concurrent run finished first: use its copy
            if not (root / "build.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built in {info['build_s']} s", flush=True)
    return root


def build_info(root: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((root / "build.json").read_text())
    info["tar_path"] = str(root / "project" / "blob" / info["tar"])
    return info


def check_scan(label: str, got: Scan, info: dict[str, Any]) -> None:
    """Every scan must see every image and every byte: anything else is an error."""
    if got.files != info["images"] or got.bytes != info["image_bytes"]:
        raise RuntimeError(
            f"{label}: read {got.files} files / {got.bytes} bytes, expected "
            f"{info['images']} / {info['image_bytes']}"
        )


def warm_inputs(root: Path, info: dict[str, Any], drop: bool) -> None:
    """Before a cold scan: page cache emptied (``--drop-caches``) or holding the tar."""
    if drop:
        if not drop_caches():
            print("warning: could not drop caches (not root?)", file=sys.stderr)
        return
    warm_files([Path(info["tar_path"]), *sorted((root / "project" / DATASET).glob("*.pkl"))])


# ---- the contenders ----------------------------------------------------------------------


def bench_plain(
    root: Path, info: dict[str, Any], r: Results, args: argparse.Namespace, first: bool
) -> None:
    """Scans of the plain folder; run before and after the mounts, so that a machine
    getting slower or faster during the run moves the reference too."""
    folder = root / "plain"
    if first and args.drop_caches:
        drop_caches()
        cold = scan(folder)
        check_scan("plain folder (cold)", cold, info)
        r["samples"]["plain_cold_s"] = [cold.seconds]
    scan(folder)  # warm the page cache (and the dentries) once, as the notes advise
    for _ in range(max(2, args.repeat)):
        got = scan(folder)
        check_scan("plain folder", got, info)
        r["samples"].setdefault("plain_s", []).append(got.seconds)
        unbuffered = scan(folder, buffering=0)
        check_scan("plain folder (unbuffered)", unbuffered, info)
        r["samples"].setdefault("plain_unbuffered_s", []).append(unbuffered.seconds)


def bench_blobfs(
    mounts: Mounts, root: Path, info: dict[str, Any], r: Results, args: argparse.Namespace
) -> None:
    env = {"FUSE_LIBRARY_PATH": args.fuse_library} if args.fuse_library else None
    extra = [a for opt in args.mount_option for a in ("-o", opt)]
    if args.blobfs_log:
        extra += ["--log-level", "INFO", "--log-file", args.blobfs_log]
    s = r["samples"]
    for _ in range(args.repeat):
        warm_inputs(root, info, args.drop_caches)
        mnt = mountpoint("blobfs")
        ready_s, pid = blobfs_mount_cli(
            mounts, str(root / "project"), mnt, extra, python=args.python, env=env
        )
        with mounts.mounted(mnt):
            if args.pin_cpu is not None:
                pin(pid, {args.pin_cpu})
            cold = scan(mnt / DATASET / "img")
            check_scan("blobfs cold scan", cold, info)
            warm = scan(mnt / DATASET / "img")
            check_scan("blobfs warm scan", warm, info)
            unbuffered = scan(mnt / DATASET / "img", buffering=0)
            check_scan("blobfs warm scan (unbuffered)", unbuffered, info)
            s.setdefault("blobfs_warm_unbuffered_s", []).append(unbuffered.seconds)
            s.setdefault("blobfs_mount_s", []).append(ready_s)
            s.setdefault("blobfs_listdir_cold_s", []).append(cold.listdir_s)
            s.setdefault("blobfs_cold_s", []).append(cold.seconds)
            s.setdefault("blobfs_warm_s", []).append(warm.seconds)
            s.setdefault("blobfs_rss_mb", []).append(rss_mb(pid))
            s.setdefault("blobfs_peak_rss_mb", []).append(peak_rss_mb(pid))


def ratarmount_exe(python: str) -> str | None:
    beside = Path(python).parent / "ratarmount"
    if beside.exists():
        return str(beside)
    return shutil.which("ratarmount")


def files_folder(mnt: Path) -> Path:
    """Where the images appear in a ratarmount mount: descend while there is one folder."""
    folder = mnt
    while True:
        names = os.listdir(folder)
        if len(names) != 1 or not (folder / names[0]).is_dir():
            return folder
        folder = folder / names[0]


def bench_ratarmount(
    mounts: Mounts, root: Path, info: dict[str, Any], r: Results, args: argparse.Namespace
) -> None:
    exe = ratarmount_exe(args.python)
    if exe is None:
        print("ratarmount not installed (pip install ratarmount): its rows are skipped")
        return
    # a private index: the first mount builds it (that is its mount time), later ones reuse it
    index = OUT / "ratarmount-index" / f"{info['tar']}.{os.getpid()}.index.sqlite"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.unlink(missing_ok=True)
    s = r["samples"]
    try:
        for rep in range(args.repeat):
            warm_inputs(root, info, args.drop_caches)
            mnt = mountpoint("ratarmount")
            log = OUT / f"ratarmount-{os.getpid()}.log"
            cmd = [exe, "-f", "--index-file", str(index), info["tar_path"], str(mnt)]
            ready_s, proc = spawn_foreground(mounts, cmd, mnt, log)
            with mounts.mounted(mnt):
                if args.pin_cpu is not None:
                    pin(proc.pid, {args.pin_cpu})
                folder = files_folder(mnt)
                cold = scan(folder)
                check_scan("ratarmount cold scan", cold, info)
                warm = scan(folder)
                check_scan("ratarmount warm scan", warm, info)
                key = "ratarmount_mount_s" if rep == 0 else "ratarmount_remount_s"
                s.setdefault(key, []).append(ready_s)
                s.setdefault("ratarmount_cold_s", []).append(cold.seconds)
                s.setdefault("ratarmount_warm_s", []).append(warm.seconds)
                s.setdefault("ratarmount_rss_mb", []).append(rss_mb(proc.pid))
            log.unlink(missing_ok=True)
    finally:
        index.unlink(missing_ok=True)


SDK_CODE = r"""
import json, os, sys, time
import supervisely as sly
ds_dir, subset = sys.argv[1], int(sys.argv[2])
ds = sly.Dataset(ds_dir, sly.OpenMode.READ)
names = sorted(ds.get_items_names())
pick = names[:: max(1, len(names) // subset)][:subset]
start = time.perf_counter()
total = 0
for name in pick:
    total += len(ds.get_blob_img_bytes(name))
seconds = time.perf_counter() - start
print("BENCH_RESULT " + json.dumps(
    {"seconds": seconds, "images": len(pick), "bytes": total, "names": pick, "of": len(names)}
))
"""


def bench_sdk(root: Path, info: dict[str, Any], r: Results, args: argparse.Namespace) -> None:
    """The SDK in a child process (its import is slow and noisy, and is not timed)."""
    done = subprocess.run(
        [args.python, "-c", SDK_CODE, str(root / "project" / DATASET), str(args.sdk_subset)],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        if "No module named 'supervisely'" in done.stderr:
            print("supervisely not installed: the SDK row is skipped")
            return
        raise RuntimeError(f"SDK run failed ({done.returncode}): {done.stderr[-2000:]}")
    out = json.loads(lines[-1][len("BENCH_RESULT ") :])
    expected = sum((root / "plain" / name).stat().st_size for name in out["names"])
    if out["of"] != info["images"] or out["bytes"] != expected:
        raise RuntimeError(
            f"SDK read {out['bytes']} bytes of {out['images']} images (of {out['of']}), "
            f"expected {expected} bytes"
        )
    r["samples"]["sdk_subset_s"] = [out["seconds"]]
    r["sdk_subset_n"] = out["images"]


# ---- the report --------------------------------------------------------------------------


def med(r: Results, key: str) -> float | None:
    got = r["summary"].get(key)
    return None if got is None else float(got["median"])


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


class Report:
    """The table: one row per measurement, with the targets it is checked against."""

    HEADER = ("what", "seconds", "us/image", "x plain", "vs ratarmount", "target", "")

    def __init__(self, r: Results) -> None:
        self.r = r
        self.n: int = r["images"]
        plain = med(r, "plain_s")
        assert plain is not None
        self.plain = plain
        self.rows: list[tuple[str, ...]] = [self.HEADER]
        self.targets: list[tuple[str, bool | None]] = []

    def note(self, label: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((label, value, "", "", "", target, verdict(ok)))

    def scan(
        self, label: str, key: str, target: float | None = None, vs: str | None = None
    ) -> bool | None:
        """A scan row: seconds, us per image, ratio to the plain folder, vs ratarmount."""
        sec = med(self.r, key)
        if sec is None:
            return None
        ratio = sec / self.plain
        ok = None if target is None else ratio <= target
        theirs = None if vs is None else med(self.r, vs)
        self.rows.append(
            (
                label,
                fmt(sec),
                fmt(sec / self.n * 1e6, ".0f"),
                fmt(ratio, ".1f", "x"),
                "" if theirs is None else f"{theirs / sec:.2f}x faster",
                "" if target is None else f"<= {target:g}x plain",
                verdict(ok),
            )
        )
        return ok

    def build(self) -> None:
        r, n = self.r, self.n
        self.scan("plain folder scan (page cache warm)", "plain_s")
        self.scan("plain folder scan (caches dropped)", "plain_cold_s")
        mount = med(r, "blobfs_mount_s")
        ok = None if mount is None else mount < MOUNT_READY_S
        self.note("blobfs mount -> ready (CLI returned)", fmt(mount), f"< {MOUNT_READY_S:g} s", ok)
        self.targets.append((f"blobfs mount ready < {MOUNT_READY_S:g} s", ok))
        for kind, label, limit in (
            ("cold", "cold (fresh mount)", COLD_X_PLAIN),
            ("warm", "warm (2nd epoch)", WARM_X_PLAIN),
        ):
            ok = self.scan(
                f"blobfs scan, {label}", f"blobfs_{kind}_s", limit, f"ratarmount_{kind}_s"
            )
            self.targets.append((f"blobfs {kind} scan within {limit:g}x of the plain folder", ok))
        if med(r, "ratarmount_mount_s") is not None:
            self.note("ratarmount first mount (builds index)", fmt(med(r, "ratarmount_mount_s")))
            if med(r, "ratarmount_remount_s") is not None:
                self.note("ratarmount remount (index exists)", fmt(med(r, "ratarmount_remount_s")))
            for kind, label in (("cold", "cold (fresh mount)"), ("warm", "warm (2nd epoch)")):
                self.scan(f"ratarmount scan, {label}", f"ratarmount_{kind}_s")
                mine, theirs = med(r, f"blobfs_{kind}_s"), med(r, f"ratarmount_{kind}_s")
                if mine is not None and theirs is not None:
                    self.targets.append(
                        (f"blobfs {kind} scan faster than ratarmount", mine < theirs)
                    )
        sdk = med(r, "sdk_subset_s")
        if sdk is not None:
            k = r["sdk_subset_n"]
            per = sdk / k
            for label, sec in (
                (f"SDK get_blob_img_bytes, {k} images", sdk),
                (f"SDK extrapolated to all {n} images", per * n),
            ):
                self.rows.append(
                    (
                        label,
                        fmt(sec, ".3f" if sec < 100 else ".0f"),
                        fmt(per * 1e6, ".0f"),
                        fmt(per * n / self.plain, ".0f", "x"),
                        "",
                        "",
                        "",
                    )
                )
        rss = med(r, "blobfs_rss_mb")
        ok = None if rss is None else rss < RSS_MB
        self.note(
            "blobfs daemon VmRSS after the scans", fmt(rss, ".0f", " MB"), f"< {RSS_MB:g} MB", ok
        )
        self.targets.append((f"blobfs daemon RSS < {RSS_MB:g} MB", ok))
        if med(r, "ratarmount_rss_mb") is not None:
            self.note(
                "ratarmount VmRSS after the scans", fmt(med(r, "ratarmount_rss_mb"), ".0f", " MB")
            )

    def print(self) -> None:
        r, n = self.r, self.n
        print(table(self.rows))
        reps = r["repeat"]
        runs = f"median of {reps} runs" if reps > 1 else "one run"
        print(
            f"\n{n} images of ~{r['image_bytes'] // n} B in one {r['tar_bytes'] / 2**20:.0f} MiB"
            f" tar; {runs} per row (plain folder: median of {r['summary']['plain_s']['n']}"
            ", before and after);"
            f" before the run: {r['load_before']}"
        )
        mine, plain = med(r, "blobfs_warm_unbuffered_s"), med(r, "plain_unbuffered_s")
        if mine is not None and plain is not None:
            print(
                f"warm scan with open(..., buffering=0), which skips isatty() and so the one"
                f" FUSE request (IOCTL) a warm file costs: blobfs {mine:.3f} s, plain folder"
                f" {plain:.3f} s ({mine / plain:.1f}x)"
            )
        listing = med(r, "blobfs_listdir_cold_s")
        if listing is not None:
            print(f"blobfs first listdir of {n} names (part of the cold scan): {listing:.3f} s")
        if r["mount_options"] or r["fuse_library"] or r["pin_cpu"] is not None:
            print(
                f"blobfs options: -o {r['mount_options']} "
                f"FUSE_LIBRARY_PATH={r['fuse_library']}; pinned to CPU {r['pin_cpu']}"
            )
        print()
        for label, met in self.targets:
            if met is not None:
                print(f"{verdict(met)}  {label}")


# ---- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="blobfs vs plain folder vs ratarmount vs SDK on N small images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=30_000, help="number of images")
    parser.add_argument("--px", type=int, default=36, help="image width and height (~4 KB)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh mounts per contender")
    parser.add_argument("--skip-ratarmount", action="store_true")
    parser.add_argument("--skip-sdk", action="store_true")
    parser.add_argument("--sdk-subset", type=int, default=2000, help="images read via the SDK")
    parser.add_argument("--json", default=None, help="also write every sample to this file")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="empty the page cache before each cold scan (default: tar kept in it)",
    )
    parser.add_argument(
        "-o",
        "--mount-option",
        action="append",
        default=[],
        help="extra blobfs -o option (repeatable), e.g. -o nothreads",
    )
    parser.add_argument("--fuse-library", default=None, help="FUSE_LIBRARY_PATH for blobfs")
    parser.add_argument("--blobfs-log", default=None, help="blobfs log file (INFO level)")
    parser.add_argument(
        "--pin-cpu",
        type=int,
        default=None,
        help="run the scans and the daemons on this one CPU: less noise for A/B tests "
        "(cross-CPU wakeups dominate FUSE round trips on small VMs)",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter that runs blobfs/ratarmount/SDK"
    )
    args = parser.parse_args()
    if args.images < 1 or args.repeat < 1 or args.sdk_subset < 1:
        parser.error("--images, --repeat and --sdk-subset must be positive")
    return args


def main() -> int:
    args = parse_args()
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})
    for path in clean_stale_mounts():
        print(f"unmounted {path}, left behind by an earlier run")
    root = build(args.images, args.px)
    info = build_info(root)
    r: Results = {
        "images": info["images"],
        "image_bytes": info["image_bytes"],
        "tar_bytes": info["tar_bytes"],
        "repeat": args.repeat,
        "drop_caches": args.drop_caches,
        "mount_options": args.mount_option,
        "fuse_library": args.fuse_library,
        "pin_cpu": args.pin_cpu,
        "python": args.python,
        "blobfs_proto": os.environ.get("BLOBFS_PROTO"),
        "platform": platform.platform(),
        "load_before": load_note(),
        "samples": {},
    }
    try:
        with Mounts() as mounts:
            bench_plain(root, info, r, args, first=True)
            bench_blobfs(mounts, root, info, r, args)
            if not args.skip_ratarmount:
                bench_ratarmount(mounts, root, info, r, args)
            bench_plain(root, info, r, args, first=False)
        if not args.skip_sdk:
            bench_sdk(root, info, r, args)
    except KeyboardInterrupt:
        print("interrupted: everything was unmounted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    r["summary"] = {k: summary(v) for k, v in r["samples"].items()}
    rep = Report(r)
    rep.build()
    rep.print()
    r["targets"] = dict(rep.targets)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
