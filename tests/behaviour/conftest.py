"""The projects the behaviour suite runs on, each served by both adapters.

A fixture named ``*_fs`` is parametrized over ``inprocess`` and ``mount``: the same test
runs against the FUSE operations object in this process and against a real mount of the
same project, built the way the daemon builds it (``blobfs.daemon``'s own builders, the
same :class:`MountConfig`). The read-only project is made and mounted once per session,
the writable one once per module; scenarios whose faults or caches would leak into other
tests (remote faults, a busy import, a full spool) get a fresh one per test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs import daemon
from blobfs.config import MountConfig
from blobfs.format.offsets import dumps_batch, read_offsets_file
from blobfs.format.pack import ProjectPacker
from blobfs.fuse.ops import BlobfsOperations
from blobfs.model import BlobMember
from tests.conftest import require_fuse
from tests.support import harness
from tests.support.sample import make_images, png_bytes

from .fs import FS, InProcessFS, MountFS

KINDS = ["inprocess", pytest.param("mount", marks=pytest.mark.fuse)]
TOKEN = "behaviour-token-5d1e"
#: The datasets of the read-only project whose blob is damaged, and how.
DAMAGED = ("gone", "cut", "dirtar", "past")


@dataclass
class Served:
    """One adapter over one project, and what the project must show."""

    fs: FS
    root: Path
    expected: dict[str, bytes] = field(default_factory=dict)
    mount: harness.Mount | None = None
    ops: BlobfsOperations | None = None
    emulator: Emulator | None = None

    @property
    def kind(self) -> str:
        return self.fs.kind

    def log_text(self) -> str:
        return self.mount.log_text() if self.mount is not None else ""


# ---- projects --------------------------------------------------------------------------


def _blob_of(project: Path, dataset: str) -> tuple[Path, Path]:
    """(offsets file, tar) of a dataset packed into one blob."""
    (offsets,) = (project / dataset).glob("*_offsets.pkl")
    stem = offsets.name[: -len("_offsets.pkl")]
    return offsets, project / "blob" / f"{stem}.tar"


def build_read_only(root: Path) -> tuple[Path, dict[str, bytes]]:
    """``train`` (12 blob images in several blobs, one plain image, a nested ``val`` of
    6), and one dataset per kind of damaged blob: its tar missing (``gone``), cut short
    (``cut``), a folder (``dirtar``), an entry whose range runs past the tar (``past``)."""
    project = root / "project"
    images = make_images(root / "images", 18)
    ProjectPacker(project, "train", blob_size=12_000).pack(images[:12])
    val = project / "train" / "datasets" / "val"
    ProjectPacker(project, "val", dataset_dir=val).pack(images[12:])
    (project / "train" / "img").mkdir()
    (project / "train" / "img" / "plain.png").write_bytes(png_bytes(999))
    (project / "train" / "ann" / "plain.png.json").write_text(
        '{"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}'
    )
    expected = {f"/train/img/{p.name}": p.read_bytes() for p in images[:12]}
    expected.update({f"/train/datasets/val/img/{p.name}": p.read_bytes() for p in images[12:]})
    expected["/train/img/plain.png"] = png_bytes(999)
    for n, name in enumerate(DAMAGED):
        ProjectPacker(project, name).pack(make_images(root / f"bad-{name}", 2, start_seed=50 + n))
        offsets, tar = _blob_of(project, name)
        if name == "gone":
            tar.unlink()
        elif name == "cut":
            with open(tar, "r+b") as f:
                f.truncate(600)  # the first member's header and a few bytes
        elif name == "dirtar":
            tar.unlink()
            tar.mkdir()
        else:
            members = read_offsets_file(str(offsets)).members
            last = members[-1]
            far = BlobMember(last.name, last.start, tar.stat().st_size + 4096)
            offsets.write_bytes(dumps_batch([*members[:-1], far]))
    return project, expected


def build_writable(root: Path) -> Path:
    """``ds`` of 10 imported images (``img_000000.png``..), plus ``img_000003.png``
    packed again in a second blob: a name the project holds but cannot serve."""
    project = root / "project"
    ProjectPacker(project, "ds").pack(make_images(root / "images", 10))
    twin = root / "twin" / "img_000003.png"
    twin.parent.mkdir()
    twin.write_bytes(png_bytes(99))
    ProjectPacker(project, "ds").pack([twin], check_existing=False)
    return project


# ---- adapters --------------------------------------------------------------------------


def _config(source: str, mnt: Path, args: dict[str, Any]) -> MountConfig:
    return MountConfig(source=source, mountpoint=str(mnt), **args)


def _cli_args(args: dict[str, Any]) -> list[str]:
    """The same options as ``blobfs mount`` flags."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + {"timeout_s": "timeout", "writeback_delay_s": "writeback-delay"}.get(
            key, key.replace("_", "-")
        )
        if key == "token_file":
            continue  # the daemon gets API_TOKEN from its environment
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


@contextmanager
def serve(
    kind: str,
    source: str,
    where: Path,
    env: dict[str, str] | None = None,
    **args: Any,
) -> Iterator[tuple[FS, harness.Mount | None, BlobfsOperations | None]]:
    """``source`` served by the adapter ``kind`` with the mount options ``args``
    (:class:`MountConfig` fields); torn down on leaving."""
    where.mkdir(parents=True, exist_ok=True)
    mnt = where / f"mnt-{kind}"
    if kind == "mount":
        require_fuse()
        flags = _cli_args(args)
        with harness.start(source, mnt, *flags, log=where / "mount.log", env=env) as mount:
            yield MountFS(mnt), mount, None
            mount.unmount(30)
        return
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    config = _config(source, mnt, args)
    queue = None
    try:
        view: Any
        if config.writeback:
            view, queue = daemon.build_writeback(config, daemon.build_source(config))
        else:
            view = daemon.build(config)
        ops = daemon._operations(config, view, queue, lambda: None, lambda: None)
        if queue is not None:
            queue.start()
        try:
            yield InProcessFS(ops), None, ops
        finally:
            if queue is not None:
                queue.stop(drain=False)
                queue.spool.close()
            view.source.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the emulator carry the ``remote`` mark (the ``fuse`` one comes with the
    ``mount`` parameter). A test marked ``only_on(kind, reason)`` is a case the other
    harness cannot produce (the reason says why): it is not collected there, rather than
    skipped, since under ``CI=true`` a skip fails."""
    here = Path(__file__).parent
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if here not in item.path.parents:
            kept.append(item)
            continue
        if "remote" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.remote)
        only = item.get_closest_marker("only_on")
        callspec = getattr(item, "callspec", None)
        kinds = (
            {v for v in callspec.params.values() if v in ("inprocess", "mount")}
            if callspec
            else set()
        )
        (dropped if only is not None and kinds and only.args[0] not in kinds else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def read_only_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    return build_read_only(tmp_path_factory.mktemp("ro"))


@pytest.fixture(scope="session", params=KINDS)
def ro(
    request: pytest.FixtureRequest,
    read_only_project: tuple[Path, dict[str, bytes]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """The read-only project, one mount (or one in-process tree) for the whole session."""
    project, expected = read_only_project
    where = tmp_path_factory.mktemp(f"ro-{request.param}")
    with serve(request.param, str(project), where) as (fs, mount, ops):
        yield Served(fs, project, expected, mount, ops)


@pytest.fixture(scope="module", params=KINDS)
def wb(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """A writeback mount of its own project (per module and adapter); nothing is imported
    unless a test flushes (``--writeback-delay 3600``)."""
    where = tmp_path_factory.mktemp(f"wb-{request.param}")
    project = build_writable(where)
    with serve(
        request.param,
        str(project),
        where,
        writeback=True,
        spool_dir=str(where / "spool"),
        writeback_delay_s=3600.0,
    ) as (fs, mount, ops):
        yield Served(fs, project, {}, mount, ops)


@pytest.fixture(params=KINDS)
def fresh_wb(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """``fresh_wb(env=..., spool=...)``: a writeback scenario of the test's own."""

    @contextmanager
    def make(env: dict[str, str] | None = None, spool: Path | None = None) -> Iterator[Served]:
        project = build_writable(tmp_path)
        with serve(
            request.param,
            str(project),
            tmp_path,
            env=env,
            writeback=True,
            spool_dir=str(spool or tmp_path / "spool"),
            writeback_delay_s=3600.0,
        ) as (fs, mount, ops):
            yield Served(fs, project, {}, mount, ops)

    return make


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, int, Path]]:
    """The emulator serving a small project, one image per blob (so a fault on one image
    is not hidden by another's cached block); (emulator, project id, local copy)."""
    root = tmp_path_factory.mktemp("remote")
    project = root / "project"
    ProjectPacker(project, "train", blob_size=1).pack(make_images(root / "images", 8))
    (project / "train" / "img").mkdir()
    (project / "train" / "img" / "plain.png").write_bytes(png_bytes(999))
    (project / "train" / "ann" / "plain.png.json").write_text(
        '{"description": "", "size": {"height": 32, "width": 32}, "tags": [], "objects": []}'
    )
    ProjectPacker(project, "other").pack(make_images(root / "other", 2, start_seed=70))
    with Emulator(root / "state", TOKEN) as emu:
        pid = upload_local_project(emu.url, TOKEN, project)
        yield emu, pid, project


@pytest.fixture(params=KINDS)
def remote(
    request: pytest.FixtureRequest, emulator: tuple[Emulator, int, Path], tmp_path: Path
) -> Callable[..., Any]:
    """``remote(timeout_s=...)``: a fresh mount (or tree) of the emulator's project; its
    caches are its own, so a fault a test sets is seen. Faults and token are reset after."""
    emu, pid, project = emulator
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)

    @contextmanager
    def make(**args: Any) -> Iterator[Served]:
        try:
            with serve(
                request.param,
                f"sly://{pid}",
                tmp_path,
                env={"API_TOKEN": TOKEN},
                server=emu.url,
                token_file=str(token_file),
                **args,
            ) as (fs, mount, ops):
                yield Served(fs, project, {}, mount, ops, emu)
        finally:
            emu.faults.reset()
            emu.token = TOKEN

    return make


def flush(fs: FS, timeout_s: float = 60) -> dict[str, Any]:
    """What ``blobfs flush`` does: read ``/.blobfs/flush-new-<nonce>``, then
    ``flush-<ticket>-<nonce>`` until the answer says ``done``."""
    answer: dict[str, Any] = json.loads(fs.read(f"/.blobfs/flush-new-{uuid.uuid4().hex}"))
    for _ in range(int(timeout_s)):
        if answer["done"]:
            return answer
        answer = json.loads(fs.read(f"/.blobfs/flush-{answer['ticket']}-{uuid.uuid4().hex}"))
    raise AssertionError(f"flush not done: {answer}")


def status(fs: FS) -> dict[str, Any]:
    """The writeback status, from a fresh ``/.blobfs/stats-<nonce>.json`` (a name read
    once has its size fixed, so the kernel's cached size never cuts it short)."""
    stats: dict[str, Any] = json.loads(fs.read(f"/.blobfs/stats-{uuid.uuid4().hex}.json"))
    result: dict[str, Any] = stats["writeback"]
    return result


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a file system that really fills up (root can mount it here); too
    small for the journal's zeroed space, so files are made durable the plain way."""
    where = tmp_path / "small-fs"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)
    shutil.rmtree(where, ignore_errors=True)
