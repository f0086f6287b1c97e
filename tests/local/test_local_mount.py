"""The local mount, read with real tools, in-process on the view, and by the SDK."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from blobfs.cache.blocks import BlockCache
from blobfs.errors import NotADirectory
from blobfs.format.pack import ProjectPacker
from blobfs.fuse.compat import FUSE_MAJOR
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from tests.support import harness
from tests.support.sample import make_images, png_bytes


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Two blobs in ``train``, a nested ``val``, an ordinary image, an img_info file."""
    imgs = make_images(tmp_path / "images", 24)
    root = tmp_path / "project"
    ProjectPacker(root, "train", blob_size=30_000).pack(imgs[:16])
    ProjectPacker(root, "val", dataset_dir=root / "train" / "datasets" / "val").pack(imgs[16:])
    (root / "train" / "img").mkdir()
    (root / "train" / "img" / "plain.png").write_bytes(png_bytes(777))
    (root / "train" / "ann" / "plain.png.json").write_text(
        '{"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}'
    )
    (root / "train" / "img_info").mkdir()
    (root / "train" / "img_info" / "plain.png.json").write_text("{}")
    expected = {f"train/img/{p.name}": p.read_bytes() for p in imgs[:16]}
    expected.update({f"train/datasets/val/img/{p.name}": p.read_bytes() for p in imgs[16:]})
    expected["train/img/plain.png"] = png_bytes(777)
    return root, expected


@pytest.fixture
def mnt(project: tuple[Path, dict[str, bytes]], tmp_path: Path, mounts: harness.Mounts) -> Path:
    """The project mounted by ``blobfs mount`` as a user runs it (daemon in the background)."""
    done, mount = mounts.mount_cli(project[0], tmp_path / "mnt")
    assert done.returncode == 0 and mount is not None, done.stderr
    return mount.mnt


@pytest.mark.fuse
def test_real_tools_see_the_exact_bytes(
    mnt: Path, project: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    _, expected = project
    subprocess.run(["cp", "-r", str(mnt), str(tmp_path / "copy")], check=True)
    for rel, data in expected.items():
        assert (tmp_path / "copy" / rel).read_bytes() == data
        with Image.open(mnt / rel) as img:
            assert img.size == (32, 32)
    listed = subprocess.run(
        ["find", str(mnt), "-name", "*.png", "-type", "f"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(listed) == len(expected)
    subprocess.run(["tar", "cf", str(tmp_path / "all.tar"), "-C", str(mnt), "."], check=True)
    with tarfile.open(tmp_path / "all.tar") as t:
        for rel, data in expected.items():
            assert t.extractfile(f"./{rel}").read() == data  # type: ignore[union-attr]
    md5 = subprocess.run(
        ["md5sum", str(mnt / "train/img/plain.png")], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    import hashlib

    assert md5 == hashlib.md5(png_bytes(777)).hexdigest()


@pytest.mark.fuse
@pytest.mark.sdk
@pytest.mark.filterwarnings("ignore")
def test_the_sdk_reads_the_mount_like_a_downloaded_project(
    mnt: Path, project: tuple[Path, dict[str, bytes]]
) -> None:
    sly = pytest.importorskip("supervisely")
    _, expected = project
    proj = sly.Project(str(mnt), sly.OpenMode.READ)
    assert proj.total_items == len(expected)
    for ds in proj.datasets:
        for name in ds.get_items_names():
            paths = ds.get_item_paths(name)
            rel = os.path.relpath(paths.img_path, mnt)
            assert Path(paths.img_path).read_bytes() == expected[rel]
            assert ds.get_ann(name, proj.meta).img_size == (32, 32)


@pytest.mark.sdk
@pytest.mark.filterwarnings("ignore")
def test_the_sdk_opens_a_packed_project(project: tuple[Path, dict[str, bytes]]) -> None:
    sly = pytest.importorskip("supervisely")
    root, expected = project
    proj = sly.Project(str(root), sly.OpenMode.READ)
    train = proj.datasets.get("train")
    for rel, data in expected.items():
        if rel.startswith("train/img/img_"):
            assert train.get_blob_img_bytes(rel.rsplit("/", 1)[1]) == data


def test_listing_with_attributes_pages_from_any_entry(
    project: tuple[Path, dict[str, bytes]],
) -> None:
    """readdirplus asks for a listing page by page, from an entry index. Blob images come
    with their attributes; an ordinary file comes without (it is stat-ed when looked up,
    so listing 250,000 annotations costs no 250,000 stats)."""
    root, _ = project
    view = ProjectView(LocalProjectSource(root, BlockCache(4096, 1 << 20)))
    whole = list(view.readdir_attrs("/train/img"))
    assert [name for name, _ in whole] == list(view.readdir("/train/img"))
    for name, attrs in whole:
        if name == "plain.png":
            assert attrs is None
            assert view.getattr(f"/train/img/{name}")["st_size"] == len(png_bytes(777))
        else:
            assert attrs == view.getattr(f"/train/img/{name}")
    assert list(view.readdir_attrs("/train/img", 5)) == whole[5:]
    assert list(view.readdir_attrs("/train/img", len(whole))) == []
    with pytest.raises(NotADirectory):
        view.readdir_attrs("/meta.json")


def test_listing_runs_say_what_the_attributes_say(
    project: tuple[Path, dict[str, bytes]],
) -> None:
    """The FUSE hot path lists a table as runs of files sharing all attributes but the
    size: entry by entry they must say what ``readdir_attrs`` says, from any entry on."""
    root, _ = project
    view = ProjectView(LocalProjectSource(root, BlockCache(4096, 1 << 20)))
    whole = list(view.readdir_attrs("/train/img"))
    for start in (0, 1, 5, len(whole) - 1, len(whole)):
        flat: list[tuple[str, dict[str, int] | None]] = []
        for run in view.readdir_runs("/train/img", start):
            assert not isinstance(run, tuple)  # a table comes as runs only
            for name, size in zip(run.names, run.sizes, strict=True):
                attrs = None
                if run.attrs is not None:
                    attrs = {**run.attrs, "st_size": size, "st_blocks": (size + 511) // 512}
                flat.append((name.decode("utf-8", "surrogateescape"), attrs))
        assert flat == whole[start:]
    # small folders (the root, a dataset) keep coming entry by entry
    assert list(view.readdir_runs("/train")) == list(view.readdir_attrs("/train"))
    with pytest.raises(NotADirectory):
        view.readdir_runs("/meta.json")


def test_a_folder_above_the_attributes_limit_is_listed_with_names_only(
    project: tuple[Path, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``LISTING_ATTRS_MAX`` files a listing hands out names and types only (the
    kernel would make an inode per entry at once); lookups still answer every file."""
    import blobfs.view.tree as tree

    root, _ = project
    view = ProjectView(LocalProjectSource(root, BlockCache(4096, 1 << 20)))
    small = [run for run in view.readdir_runs("/train/img") if not isinstance(run, tuple)]
    assert any(run.attrs is not None for run in small)
    monkeypatch.setattr(tree, "LISTING_ATTRS_MAX", 3)
    runs = [run for run in view.readdir_runs("/train/img") if not isinstance(run, tuple)]
    assert all(run.attrs is None for run in runs)
    names = [n.decode() for run in runs for n in run.names]
    assert names == list(view.readdir("/train/img")) and len(names) > 3
    assert all(view.getattr(f"/train/img/{n}")["st_size"] > 0 for n in names)


@pytest.mark.fuse
@pytest.mark.skipif(FUSE_MAJOR < 3, reason="readdirplus needs libfuse 3")
def test_a_listed_folder_is_read_without_lookups(tmp_path: Path) -> None:
    """With libfuse 3 the listing carries every file's attributes (readdirplus): reading
    all files after ``listdir`` costs no getattr (lookup) in the daemon, and neither does a
    second listing, which carries names only."""
    imgs = make_images(tmp_path / "images", 300)
    root = tmp_path / "project"
    ProjectPacker(root, "ds").pack(imgs)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run([sys.executable, "-m", "blobfs", "mount", str(root), str(mnt)], check=True)
    try:

        def ops() -> dict[str, int]:
            out = subprocess.run(
                [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            return dict(json.loads(out)["fuse_ops"])

        folder = mnt / "ds" / "img"
        names = os.listdir(folder)
        before = ops()
        for p in imgs:
            assert (folder / p.name).read_bytes() == p.read_bytes()
            assert (folder / p.name).stat().st_size == p.stat().st_size
        after = ops()
        assert sorted(names) == sorted(p.name for p in imgs)
        assert after.get("read", 0) - before.get("read", 0) == 300 + 1  # + the stats file
        assert after.get("getattr", 0) - before.get("getattr", 0) < 5  # the stats file's own
        # listed again (names only now: the kernel holds the entries), nothing is looked up
        assert sorted(os.listdir(folder)) == sorted(names)
        for p in imgs:
            assert (folder / p.name).stat().st_size == p.stat().st_size
        assert ops().get("getattr", 0) - after.get("getattr", 0) < 5
    finally:
        subprocess.run([sys.executable, "-m", "blobfs", "unmount", str(mnt)], check=True)


@pytest.mark.fuse
@pytest.mark.skipif(FUSE_MAJOR < 3, reason="readdirplus needs libfuse 3")
def test_each_readdirplus_mode_lists_the_same_names_and_stats_them_right(
    tmp_path: Path, mounts: harness.Mounts
) -> None:
    """``--readdirplus always`` and ``auto`` differ only in which listing pages carry
    attributes (auto: the kernel's choice, names only after the first page unless files
    were looked up); a folder of several pages lists the same names in both, and a
    ``stat`` or read of each file after the listing is right in both."""
    imgs = make_images(tmp_path / "images", 600)
    root = tmp_path / "project"
    ProjectPacker(root, "ds").pack(imgs)
    expected = {p.name: p.read_bytes() for p in imgs}
    for mode in ("always", "auto"):
        done, mount = mounts.mount_cli(root, tmp_path / f"mnt-{mode}", "--readdirplus", mode)
        assert done.returncode == 0 and mount is not None, done.stderr
        folder = mount.mnt / "ds" / "img"
        names = os.listdir(folder)
        assert sorted(names) == sorted(expected)
        assert sorted(e.name for e in os.scandir(folder) if e.is_file()) == sorted(expected)
        for name in names:
            st = (folder / name).stat()
            assert st.st_size == len(expected[name]) and stat.S_ISREG(st.st_mode), name
        for name in names[::50]:
            assert (folder / name).read_bytes() == expected[name]
        assert sorted(os.listdir(mount.mnt / "ds" / "ann")) == sorted(f"{n}.json" for n in names)
        mount.unmount()


@pytest.mark.fuse
def test_sigterm_unmounts_cleanly(
    project: tuple[Path, dict[str, bytes]], tmp_path: Path, mounts: harness.Mounts
) -> None:
    root, _ = project
    point = tmp_path / "m2"
    proc = mounts.start(root, point)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not os.path.ismount(point)


def test_pack_and_check_commands(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"hidden files are not images to pack")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blobfs",
            "pack",
            str(tmp_path / "imgs"),
            str(tmp_path / "p"),
            "--dataset",
            "d",
            "--blob-size",
            "8K",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "packed 5 images" in out
    assert len(list((tmp_path / "p" / "blob").iterdir())) >= 2
    ok = subprocess.run(
        [sys.executable, "-m", "blobfs", "check", str(tmp_path / "p")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "0 problems" in ok.stdout
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "blobfs",
            "pack",
            str(tmp_path / "imgs"),
            str(tmp_path / "p"),
            "--dataset",
            "d",
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "already in d" in again.stderr
