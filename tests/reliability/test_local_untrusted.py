"""An untrusted local project: nothing outside it is read or written, nothing blocks, bad
entries never hide good ones, and problems are logged once per file and cause.

The corpus (``test_hostile_corpus.py``) covers each class of input case by case; these
tests pin the mechanisms underneath: :class:`ProjectRoot`, the :class:`Problems`
collector, the tar-header verdict and the writers of ``pack`` and writeback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from blobfs.cache.blocks import BlockCache
from blobfs.errors import BlobfsError, NotFound, to_errno
from blobfs.format.offsets import OFFSETS_SUFFIX, dumps_batch, parse_offsets
from blobfs.format.pack import ProjectPacker
from blobfs.format.tarhead import (
    FIELDS_END,
    NAME_DIFFERS,
    NO_HEADER,
    SIZE_DIFFERS,
    TAIL,
    fields_problem,
    member_problem,
)
from blobfs.model import BlobMember
from blobfs.problems import Problems, show
from blobfs.safe_open import ProjectRoot, UnsafeFile
from blobfs.sources.project_dir import LocalProjectSource
from blobfs.view.tree import ProjectView
from tests.support import harness
from tests.support.hostile import SECRET
from tests.support.sample import make_images, png_bytes


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    ProjectPacker(root, "ds").pack(make_images(tmp_path / "images", 4))
    return root


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    (out / "secret").write_bytes(SECRET)
    (out / "secret").chmod(0o600)
    return out


# ---- ProjectRoot ---------------------------------------------------------------------


def test_a_symlink_anywhere_on_the_path_is_refused_not_followed(tmp_path: Path) -> None:
    out = _outside(tmp_path)
    root_dir = tmp_path / "p"
    (root_dir / "real").mkdir(parents=True)
    (root_dir / "real" / "f").write_bytes(b"inside")
    (root_dir / "file-link").symlink_to(out / "secret")
    (root_dir / "dir-link").symlink_to(out)
    root = ProjectRoot(root_dir)
    assert root.read_file("real/f", 100) == b"inside"
    for rel in ("file-link", "dir-link/secret"):
        with pytest.raises(UnsafeFile, match="symlink"):
            root.read_file(rel, 100)
    with pytest.raises(UnsafeFile, match="symlink"):
        root.list_dir("dir-link")
    with pytest.raises(UnsafeFile):
        root.read_file("real/../file-link", 100)
    with pytest.raises(NotFound):
        root.read_file("real/missing", 100)


def test_a_fifo_is_never_opened_so_nothing_waits_on_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    root = ProjectRoot(tmp_path)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            root.read_file("fifo", 100)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert isinstance(outcome[0], UnsafeFile) and "FIFO" in str(outcome[0])


def test_listings_of_the_project_folder_at_once_each_see_every_entry(tmp_path: Path) -> None:
    # a request's listing and the background index's may run at the same moment: each
    # must read the whole folder (a shared directory position once hid datasets)
    for i in range(100):
        (tmp_path / f"ds{i:03}").mkdir()
    root = ProjectRoot(tmp_path)
    seen: list[int] = []

    def lister() -> None:
        for _ in range(25):
            seen.append(len(root.list_dir("")))

    threads = [threading.Thread(target=lister) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [100] * 100


def test_whole_file_reads_are_capped(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 1000)
    root = ProjectRoot(tmp_path)
    with pytest.raises(UnsafeFile, match="larger than"):
        root.read_file("big", 999, "meta.json")
    assert len(root.read_file("big", 1000)) == 1000


def test_writes_never_go_through_a_symlinked_folder(tmp_path: Path) -> None:
    out = _outside(tmp_path)
    root_dir = tmp_path / "p"
    root_dir.mkdir()
    (root_dir / "ann").symlink_to(out)
    root = ProjectRoot(root_dir)
    with pytest.raises(UnsafeFile):
        root.write_atomic("ann/new.json", b"{}")
    (root_dir / "x.json").symlink_to(out / "secret")
    root.write_atomic("x.json", b"{}")  # replaces the link, never writes through it
    assert (out / "secret").read_bytes() == SECRET
    assert sorted(p.name for p in out.iterdir()) == ["secret"]
    assert (root_dir / "x.json").read_bytes() == b"{}" and not (root_dir / "x.json").is_symlink()


def test_pack_into_a_project_with_a_symlinked_blob_folder_writes_nothing_outside(
    project: Path, tmp_path: Path
) -> None:
    out = _outside(tmp_path)
    (project / "blob").rename(out / "blob")
    (project / "blob").symlink_to(out / "blob")
    before = sorted(p.name for p in (out / "blob").iterdir())
    with pytest.raises(UnsafeFile):
        ProjectPacker(project, "ds").pack(make_images(tmp_path / "more", 2, start_seed=50))
    assert sorted(p.name for p in (out / "blob").iterdir()) == before


# ---- problems ------------------------------------------------------------------------


def test_problems_keep_a_count_and_the_first_names_in_bounded_memory() -> None:
    found = Problems(names_kept=3, max_groups=100)
    for i in range(100_000):
        found.add("f.pkl", "bad range", show(f"n{i}"))
    for i in range(500):
        found.add(f"file{i}", "other")
    assert found.total == 100_500
    assert len(found) == 101  # 100 pairs kept, plus one line counting the rest
    assert found.lines()[0] == "f.pkl: bad range: 100000 entries (e.g. 'n0', 'n1', 'n2')"


def test_show_never_raises_on_hostile_values() -> None:
    assert show(10**5000) == "<int of 16610 bits>"
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    assert show(deep) == "<list>"
    assert len(show("x" * 10_000)) < 100


def test_outside_a_listing_a_repeated_problem_is_logged_at_tenfold_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    found = Problems(logging.getLogger("t"))
    with caplog.at_level(logging.WARNING, "t"):
        for _ in range(1000):
            found.add("blob.tar", "not a member", "'a.png'")
    assert [r.getMessage().split(": ")[-1] for r in caplog.records] == [
        "'a.png'",
        "10 entries (e.g. 'a.png')",
        "100 entries (e.g. 'a.png')",
        "1000 entries (e.g. 'a.png')",
    ]


def test_a_listing_met_again_counts_and_logs_only_what_is_new(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A source re-lists a folder whenever it may have changed (remote TTL, an import):
    the same bad entries again are not news, a fixed one stops counting, a new one is."""
    found = Problems(logging.getLogger("t"))

    def listing(*names: str) -> None:
        with found.listing(("dataset", 5)):
            for name in names:
                found.add("dataset 5", "name appears twice", show(name))

    with caplog.at_level(logging.WARNING, "t"):
        listing("a", "b")
        listing("a", "b")
        listing("a", "b")
        assert found.total == 2 and len(caplog.records) == 1
        listing("a")  # b was fixed on the server
        assert found.total == 1 and found.lines() == ["dataset 5: name appears twice: 'a'"]
        listing("a", "b", "c")  # more than was ever logged: one new line
    assert [r.getMessage() for r in caplog.records] == [
        "dataset 5: name appears twice: 2 entries ('a', 'b')",
        "dataset 5: name appears twice: 3 entries ('a', 'b', 'c')",
    ]
    with found.listing(("dataset", 6)):  # another scope counts on its own
        found.add("dataset 5", "name appears twice", show("a"))
    assert found.total == 4
    with pytest.raises(TimeoutError), found.listing(("dataset", 5)):
        raise TimeoutError  # a listing that fails part way: the last finds stay
    assert found.total == 4


def test_a_file_of_many_bad_entries_is_one_log_line(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [BlobMember(f"neg_{i}.png", 0, 0) for i in range(50_000)]
    data = dumps_batch(bad).replace(b"J\x00\x00\x00\x00ub", b"J\xff\xff\xff\xffub")
    (project / "ds" / f"many{OFFSETS_SUFFIX}").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        view = ProjectView(LocalProjectSource(project, BlockCache(4096, 1 << 20)))
        assert len(view.readdir("/ds/img")) == 4
    lines = [r.getMessage() for r in caplog.records if "many_offsets" in r.getMessage()]
    assert len(lines) == 1 and "50000 entries" in lines[0], lines


def test_a_reference_bomb_is_refused_by_its_size() -> None:
    one = (
        b"csupervisely.api.image_api\nBlobImageInfo\n)\x81}(X\x04\x00\x00\x00name"
        b"X\x05\x00\x00\x00b.pngX\x0c\x00\x00\x00offset_startJ\xff\xff\xff\xff"
        b"X\n\x00\x00\x00offset_endJ\x00\x00\x00\x00ub"
    )
    data = b"\x80\x02](" + one + b"q\x05" + b"h\x05" * 3_000_000 + b"e."
    parsed = parse_offsets(data, "bomb")
    assert parsed.members == [] and parsed.problems.total == 1
    assert "more entries than a file of its size can hold" in parsed.problems.lines()[0]


# ---- tar headers ---------------------------------------------------------------------


def _tar_with(tmp_path: Path, fmt: int, names: list[str]) -> tuple[bytes, list[BlobMember]]:
    path = tmp_path / f"t{fmt}.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = png_bytes(i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            members.append(BlobMember(m.name, m.offset_data, m.offset_data + m.size))
    return path.read_bytes(), members


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_real_member_passes_the_header_check(tmp_path: Path, fmt: int) -> None:
    names = ["a.png", "é" * 40 + ".png", "n" * 99 + ".png", "日本.png"]
    if fmt == tarfile.USTAR_FORMAT:
        names = ["a.png", "n" * 95 + ".png"]
    blob, members = _tar_with(tmp_path, fmt, names)
    for m in members:
        base = BlobMember(m.name.rsplit("/", 1)[-1], m.start, m.end)
        assert member_problem(blob[m.start - 512 : m.start], base) is None, m.name
        assert _fields(blob, base) is None, m.name


def _fields(blob: bytes, m: BlobMember) -> str | None:
    """The verdict from the header's first fields only, as a first read asks it."""
    at = max(0, m.start - 512)
    return fields_problem(blob[at : at + FIELDS_END], m, lambda: blob[at + TAIL[0] : at + TAIL[1]])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_fields_check_gives_the_whole_header_verdict_at_every_offset(
    tmp_path: Path, fmt: int
) -> None:
    """At every offset of a tar, with the name and size of every real member: the first
    fields accept exactly what the whole header accepts (the reason of a refusal may
    differ: without the checksum, a block shifted onto other numeric fields is refused
    for its size or name instead)."""
    names = ["a.png", "b" * 99 + ".png", "c.png"]
    if fmt == tarfile.USTAR_FORMAT:
        names = ["a.png", "d/" + "n" * 95 + ".png"]
    blob, members = _tar_with(tmp_path, fmt, names)
    for start in range(len(blob)):
        for m in members:
            claim = BlobMember(m.name.rsplit("/", 1)[-1], start, start + m.end - m.start)
            whole = member_problem(blob[max(0, start - 512) : start], claim)
            assert (_fields(blob, claim) is None) == (whole is None), (start, claim)


def test_the_fields_check_refuses_what_is_no_header() -> None:
    good = bytearray(tarfile.TarInfo("a.png").tobuf(tarfile.USTAR_FORMAT))
    good[124:136] = b"%011o\0" % 8
    m = BlobMember("a.png", 512, 520)

    def verdict(block: bytes | bytearray) -> str | None:
        return fields_problem(bytes(block[:FIELDS_END]), m, lambda: bytes(block[257:500]))

    def fix_checksum(block: bytearray) -> bytearray:
        block[148:156] = b"        "
        block[148:156] = b"%06o\0 " % sum(block)
        return block

    assert verdict(fix_checksum(good)) is None
    garbled = bytearray(good)
    garbled[100:108] = b"rw-r--r-"  # a mode that is no number
    assert verdict(fix_checksum(garbled)) == NO_HEADER
    impossible = bytearray(good)
    impossible[148:156] = b"7777777\0"  # more than any block with these fields sums to
    assert verdict(impossible) == NO_HEADER
    assert verdict(bytes(512)) == NO_HEADER  # zeros: the end of a tar
    assert fields_problem(b"short", m, bytes) == NO_HEADER


def test_an_entry_the_tar_disowns_says_why(tmp_path: Path) -> None:
    blob, members = _tar_with(tmp_path, tarfile.PAX_FORMAT, ["a.png", "b.png"])
    a, b = members

    def header(m: BlobMember) -> bytes:
        return blob[max(0, m.start - 512) : m.start]

    assert member_problem(header(BlobMember("x.png", 0, 512)), BlobMember("x", 0, 512)) == NO_HEADER
    inside = BlobMember("a.png", a.start + 512, a.end)
    assert member_problem(header(inside), inside) == NO_HEADER
    assert member_problem(header(a), BlobMember("a.png", a.start, a.end - 1)) == SIZE_DIFFERS
    assert member_problem(header(b), BlobMember("a.png", b.start, b.end)) == NAME_DIFFERS
    for claim in (
        inside,
        BlobMember("a.png", a.start, a.end - 1),
        BlobMember("a.png", b.start, b.end),
    ):
        assert _fields(blob, claim) == member_problem(header(claim), claim)


def test_a_first_read_reads_the_image_and_the_header_fields_only(project: Path) -> None:
    """A first read costs the image plus the header's first fields, not a whole header:
    images are often smaller than a header."""
    source = LocalProjectSource(project, BlockCache(4096, 1 << 20))
    view = ProjectView(source)
    (name, *_) = sorted(view.readdir("/ds/img"))
    size = view.getattr(f"/ds/img/{name}")["st_size"]
    before = source.stats()["blob_reads"]["bytes_read"]  # type: ignore[index]
    assert len(view.read_path(f"/ds/img/{name}", 0, size)) == size
    read = source.stats()["blob_reads"]["bytes_read"] - before  # type: ignore[index]
    assert read == size + FIELDS_END


# ---- through a real mount ------------------------------------------------------------


@pytest.mark.fuse
def test_a_bogus_entry_is_eio_logged_once_and_hides_no_real_image(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    """The issue's case: ``img_3 [512, 520)`` once hid ``img_0``; ``[0, 512)`` served a header."""
    from blobfs.format.offsets import read_offsets_file

    (offsets,) = (project / "ds").glob(f"*{OFFSETS_SUFFIX}")
    real = read_offsets_file(str(offsets)).members
    bogus = BlobMember(real[-1].name, real[0].start, real[0].start + 8)
    offsets.write_bytes(dumps_batch([*real, bogus]))
    stem = offsets.name[: -len(OFFSETS_SUFFIX)]
    os.link(project / "blob" / f"{stem}.tar", project / "blob" / "extra.tar")
    (project / "ds" / f"extra{OFFSETS_SUFFIX}").write_bytes(
        dumps_batch([BlobMember("header.png", 0, 512)])
    )
    mnt, log = tmp_path / "mnt", tmp_path / "log"
    proc = mounts.start(project, mnt, log=log)
    try:
        images = make_images(tmp_path / "again", 4)
        for m, src in zip(real, images, strict=True):
            assert (mnt / "ds" / "img" / m.name).read_bytes() == src.read_bytes()
        for _ in range(5):
            with pytest.raises(OSError) as info:
                (mnt / "ds" / "img" / "header.png").read_bytes()
            assert info.value.errno == errno.EIO
    finally:
        assert proc.unmount(20) == 0
    text = log.read_text()
    assert text.count("'header.png'") == 1, text
    assert "no tar member starts there" in text


@pytest.mark.fuse
def test_writeback_never_writes_through_a_symlinked_ann_folder(
    project: Path, tmp_path: Path, mounts: harness.Mounts
) -> None:
    out = _outside(tmp_path)
    (project / "ds" / "ann").rename(out / "ann")
    (project / "ds" / "ann").symlink_to(out / "ann")
    before = sorted(p.name for p in (out / "ann").iterdir())
    mnt = tmp_path / "mnt"
    d = mounts.start_writeback(project, mnt, tmp_path / "spool", log=tmp_path / "wb.log")
    (mnt / "ds" / "img" / "new.png").write_bytes(png_bytes(77))
    subprocess.run(
        [sys.executable, "-m", "blobfs", "flush", str(mnt)], capture_output=True, timeout=60
    )
    d.unmount()
    assert sorted(p.name for p in (out / "ann").iterdir()) == before
    assert not any(p.name.endswith(".tar") for p in out.rglob("*"))
    assert "symlink" in (tmp_path / "wb.log").read_text()


def test_check_reports_hostile_offsets_without_a_traceback(project: Path) -> None:
    (project / "ds" / f"nobuild{OFFSETS_SUFFIX}").write_bytes(
        b"\x80\x02](csupervisely.api.image_api\nBlobImageInfo\n)\x81e."
    )
    big = 10**5000
    raw = big.to_bytes((big.bit_length() + 8) // 8, "little", signed=True)
    name = b"\x8b" + len(raw).to_bytes(4, "little") + raw
    (project / "ds" / f"bigname{OFFSETS_SUFFIX}").write_bytes(
        b"\x80\x02](csupervisely.api.image_api\nBlobImageInfo\n)\x81}(X\x04\x00\x00\x00name"
        + name
        + b"X\x0c\x00\x00\x00offset_startJ\x00\x02\x00\x00X\n\x00\x00\x00offset_endJ\x00\x03\x00\x00ube."
    )
    (project / "ds" / "img").mkdir()
    (project / "ds" / "img" / "link.png").symlink_to("/etc/hostname")
    os.mkfifo(project / "ds" / "img" / "fifo.png")
    done = subprocess.run(
        [sys.executable, "-m", "blobfs", "check", str(project)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    for needle in ("nobuild_offsets.pkl", "bigname_offsets.pkl", "'link.png'", "'fifo.png'"):
        assert needle in done.stdout, done.stdout
    view = ProjectView(LocalProjectSource(project, BlockCache(4096, 1 << 20)))
    assert len(view.readdir("/ds/img")) == 4  # every good image still listed
    with pytest.raises(BlobfsError) as info:
        view.read_path("/ds/img/link.png", 0, 10)
    assert to_errno(info.value) == errno.ENOENT
    assert json.loads(view.read_path("/meta.json", 0, 1 << 20))
