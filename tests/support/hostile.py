"""A generated corpus of hostile and broken local projects (issue: reliability campaign).

Every case is a small project with good images (``good_*.png``) next to something bad. A
case says which view paths must read back exactly, which must be absent (not served),
which must fail with EIO, and whether ``blobfs check`` must fail. Nothing in a case may
run code or touch a file outside its folder: hostile pickles aim at a sentinel path the
tests check afterwards.

Run ``python -m tests.support.hostile OUT_DIR`` to write the corpus for manual poking.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import socket
import stat
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from blobfs.format.offsets import OFFSETS_SUFFIX, dumps_batch
from blobfs.format.pack import ProjectPacker, empty_annotation
from blobfs.model import BlobMember
from blobfs.safe_open import MAX_META_JSON_BYTES, MAX_OFFSETS_FILE_BYTES
from tests.support.sample import png_bytes

GOOD = 3  # good images per case, seeds 0..2
#: The content of files outside the projects that must never be served.
SECRET = b"secret outside the project\n"


@dataclass
class Case:
    """One hostile project and what blobfs must do with it."""

    name: str
    root: Path
    good: dict[str, bytes] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    eio: list[str] = field(default_factory=list)
    check_fails: bool = True
    #: What ``blobfs mount`` says when it refuses the whole project ("": it mounts).
    mount_refused: str = ""


class _Evil:
    """Pickles into a call of ``func(*args)`` when unpickled by a naive reader."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


def _base(root: Path, stem_images: int = GOOD) -> tuple[Case, Path, str]:
    """A good project with one dataset ``ds`` and one blob; returns (case, dataset dir, stem)."""
    src = root / "_src"
    src.mkdir(parents=True)
    paths = []
    for i in range(stem_images):
        p = src / f"good_{i}.png"
        p.write_bytes(png_bytes(i))
        paths.append(p)
    project = root / "project"
    result = ProjectPacker(project, "ds").pack(paths)
    stem = result.blobs[0].name[: -len(".tar")]
    case = Case(root.name, project, {f"/ds/img/good_{i}.png": png_bytes(i) for i in range(GOOD)})
    for p in paths:
        p.unlink()
    src.rmdir()
    return case, project / "ds", stem


def _raw_pickle(objs: list[object]) -> bytes:
    return pickle.dumps(objs, protocol=2)


def _entry_pickle(name: object, start: object, end: object) -> bytes:
    """A list with one SDK-shaped entry whose fields may have any type."""
    state = pickle.dumps({"name": name, "offset_start": start, "offset_end": end}, protocol=2)
    body = state[2:-1]  # the dict's opcodes, without PROTO and STOP
    cls = b"csupervisely.api.image_api\nBlobImageInfo\n"
    return b"\x80\x02](" + cls + b")\x81" + body + b"be."


def _extra_offsets(ds: Path, name: str, data: bytes) -> None:
    (ds / f"{name}{OFFSETS_SUFFIX}").write_bytes(data)


def build_corpus(out: Path, sentinel: Path) -> list[Case]:
    """Write every case under ``out``; hostile pickles aim at ``sentinel``."""
    cases: list[Case] = []

    def case(name: str) -> tuple[Case, Path, str]:
        c, ds, stem = _base(out / name)
        cases.append(c)
        return c, ds, stem

    _pickle_cases(case, sentinel)
    _entry_cases(case)
    _project_cases(case)
    _hostile_pickle_cases(case)
    _tar_header_cases(case)
    _symlink_cases(case, out)
    _special_file_cases(case)
    _size_cap_cases(case)
    _name_form_cases(case, out)
    return cases


MakeCase = Callable[[str], tuple[Case, Path, str]]


def _pickle_cases(case: MakeCase, sentinel: Path) -> None:
    """Offsets files that are hostile or broken as a whole."""
    touch = f"touch {sentinel}"
    for label, evil in [
        ("pickle-os-system", _Evil(os.system, touch)),
        ("pickle-eval", _Evil(eval, f"open({str(sentinel)!r}, 'w')")),
        ("pickle-exec", _Evil(exec, f"open({str(sentinel)!r}, 'w')")),
        ("pickle-open", _Evil(open, str(sentinel), "w")),
        ("pickle-import", _Evil(__import__, "os")),
        ("pickle-bytes-bomb", _Evil(bytes, 10**12)),
    ]:
        _c, ds, _ = case(label)
        _extra_offsets(ds, "evil", _raw_pickle([evil]))
    _c, ds, _ = case("pickle-subprocess")
    _extra_offsets(ds, "evil", b"\x80\x02csubprocess\nPopen\n(X\x04\x00\x00\x00true\x85tR.")
    _c, ds, _ = case("pickle-copyreg-reconstructor")
    _extra_offsets(
        ds, "evil", b"\x80\x02ccopyreg\n_reconstructor\n(cos\n_wrap_close\ncbuiltins\nobject\nNtR."
    )
    _c, ds, _ = case("pickle-truncated")
    good = dumps_batch([BlobMember("never.png", 512, 600)])
    _extra_offsets(ds, "trunc", good[: len(good) // 2])
    _c, ds, _ = case("pickle-garbage")
    _extra_offsets(ds, "garbage", os.urandom(4096))
    c, ds, _ = case("pickle-empty-file")
    _extra_offsets(ds, "empty", b"")
    c.check_fails = False
    _c, ds, _ = case("pickle-non-list-object")
    _extra_offsets(ds, "odd", pickle.dumps({"not": "a list"}, protocol=2))
    _c, ds, _ = case("pickle-deep-nesting")
    _extra_offsets(ds, "deep", b"\x80\x02" + b"](" * 100_000 + b"e" * 100_000 + b".")


def _entry_cases(case: MakeCase) -> None:
    """One bad entry (name or range) next to the good ones."""
    for label, name, start, end in [
        ("offset-past-end", "past.png", 512, 10**9),
        ("offset-start-after-end", "backwards.png", 2048, 1024),
        ("offset-negative", "negative.png", -512, 100),
        ("offset-bool", "bool.png", True, 100),
        ("offset-float", "float.png", 512.0, 1024.0),
        ("offset-string", "string.png", "512", "1024"),
        ("offset-none", "none.png", None, None),
        ("name-slash", "../../etc/passwd", 512, 600),
        ("name-dotdot", "..", 512, 600),
        ("name-dot", ".", 512, 600),
        ("name-nul", "a\0b.png", 512, 600),
        ("name-too-long", "x" * 300 + ".png", 512, 600),
        ("name-not-utf8", "bad\udcff.png", 512, 600),
        ("name-empty", "", 512, 600),
        ("name-backslash", "..\\..\\x.png", 512, 600),
        ("name-not-a-string", 12345, 512, 600),
    ]:
        c, ds, stem = case(label)
        data = _entry_pickle(name, start, end)
        os.link(c.root / "blob" / f"{stem}.tar", c.root / "blob" / "extra.tar")
        _extra_offsets(ds, "extra", data)
        if label == "offset-past-end":
            c.eio.append("/ds/img/past.png")  # listed: the blob may be truncated; reads fail
        elif isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
            c.absent.append(f"/ds/img/{name}")


def _project_cases(case: MakeCase) -> None:
    """Conflicts, broken blobs and broken project files."""
    c, ds, stem = case("duplicate-names")  # the very same entry twice: served once
    good_range = _first_member(c)
    all_members = [_member(c, p) for p in sorted(c.good)]
    (ds / f"{stem}{OFFSETS_SUFFIX}").write_bytes(dumps_batch([*all_members, good_range]))
    c, ds, stem = case("duplicate-names-across-files")  # two real members, one name
    os.link(c.root / "blob" / f"{stem}.tar", c.root / "blob" / "twin.tar")
    (ds / f"twin{OFFSETS_SUFFIX}").write_bytes(dumps_batch([good_range]))
    c.absent.append(f"/ds/img/{good_range.name}")
    del c.good[f"/ds/img/{good_range.name}"]
    c, ds, stem = case("overlapping-ranges")  # the tar disowns the overlap: the real one serves
    m = _first_member(c)
    all_members = [_member(c, p) for p in sorted(c.good)]
    (ds / f"{stem}{OFFSETS_SUFFIX}").write_bytes(
        dumps_batch([*all_members, BlobMember("overlap.png", m.start + 10, m.end + 10)])
    )
    c.absent.append("/ds/img/overlap.png")
    _blob_cases(case)
    _file_cases(case)


def _blob_cases(case: MakeCase) -> None:
    """Blobs that are truncated, missing or not files."""
    c, _ds, stem = case("truncated-tar")
    tar = c.root / "blob" / f"{stem}.tar"
    last = sorted(c.good)[-1]
    with open(tar, "r+b") as f:
        f.truncate(_member(c, last).start + 10)
    c.eio.append(last)
    del c.good[last]
    c, _ds, stem = case("tar-is-a-directory")
    tar = c.root / "blob" / f"{stem}.tar"
    tar.unlink()
    tar.mkdir()
    c.eio += list(c.good)
    c.good = {}
    c, _ds, stem = case("tar-missing")
    (c.root / "blob" / f"{stem}.tar").unlink()
    c.eio += list(c.good)
    c.good = {}


def _file_cases(case: MakeCase) -> None:
    """Broken project files around the blobs."""
    c, _ds, _stem = case("meta-json-missing")
    (c.root / "meta.json").unlink()
    c.absent.append("/meta.json")
    c.mount_refused = "not a Supervisely project: no meta.json"
    c, ds, _stem = case("annotation-does-not-parse")
    (ds / "ann" / "good_0.png.json").write_text("{not json")
    c.good["/ds/ann/good_0.png.json"] = b"{not json"  # served as stored; check reports it
    c, ds, _stem = case("blob-and-plain-image-same-name")
    (ds / "img").mkdir()
    (ds / "img" / "good_0.png").write_bytes(b"plain file")
    c.absent.append("/ds/img/good_0.png")
    del c.good["/ds/img/good_0.png"]
    c, ds, _stem = case("symlink-out-of-project")
    (ds / "img").mkdir()
    (ds / "img" / "escape.png").symlink_to("/etc/hostname")
    (ds / "ann" / "escape.png.json").write_text(json.dumps(empty_annotation(1, 1)))
    c.absent.append("/ds/img/escape.png")
    c, ds, _stem = case("offsets-symlink-to-system-file")
    (ds / f"sys{OFFSETS_SUFFIX}").symlink_to("/etc/hostname")
    c, ds, _stem = case("image-without-annotation")
    (ds / "ann" / "good_1.png.json").unlink()
    c.absent.append("/ds/ann/good_1.png.json")


def _raw_entry(name_ops: bytes, start_ops: bytes, end_ops: bytes) -> bytes:
    """A one-entry offsets pickle from raw opcodes for each field (any value, any depth)."""
    key = _short_str
    return (
        b"\x80\x02](csupervisely.api.image_api\nBlobImageInfo\n)\x81}("
        + key("name")
        + name_ops
        + key("offset_start")
        + start_ops
        + key("offset_end")
        + end_ops
        + b"ube."
    )


def _short_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _long_int(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + len(raw).to_bytes(4, "little") + raw  # LONG4


def _hostile_pickle_cases(case: MakeCase) -> None:
    """Offsets files that broke the parser (one file must never take its dataset down)."""
    big = 10**5000  # str() refuses ints of more than 4,300 digits
    _c, ds, _ = case("pickle-newobj-without-build")
    _extra_offsets(ds, "nobuild", b"\x80\x02](csupervisely.api.image_api\nBlobImageInfo\n)\x81e.")
    _c, ds, _ = case("pickle-name-huge-int")
    _extra_offsets(
        ds, "bigname", _raw_entry(_long_int(big), b"J\x00\x02\x00\x00", b"J\x00\x03\x00\x00")
    )
    _c, ds, _ = case("pickle-offsets-huge-int")
    _extra_offsets(ds, "bigoff", _raw_entry(_short_str("big.png"), _long_int(big), _long_int(-big)))
    _c, ds, _ = case("pickle-name-deeply-nested")
    deep = b"](" * 50_000 + b"]" + b"e" * 50_000
    _extra_offsets(ds, "deepname", _raw_entry(deep, b"J\x00\x02\x00\x00", b"J\x00\x03\x00\x00"))
    _c, ds, _ = case("pickle-state-wrong-shape")
    _extra_offsets(
        ds,
        "shape",
        b"\x80\x02](csupervisely.api.image_api\nBlobImageInfo\n)\x81(K\x01K\x02tbe.",
    )
    _c, ds, _ = case("pickle-reference-bomb")
    # one bad entry memoised, then referenced 300,000 times (2 bytes per reference)
    one = _raw_entry(_short_str("bomb.png"), b"J\xff\xff\xff\xff", b"J\x00\x00\x00\x00")
    entry = one[len(b"\x80\x02](") : -len(b"e.")]
    _extra_offsets(ds, "bomb", b"\x80\x02](" + entry + b"q\x05" + b"h\x05" * 300_000 + b"e.")
    c, ds, _ = case("many-bad-entries-one-log-line")
    bad = [BlobMember(f"neg_{i}.png", 0, 0) for i in range(20_000)]
    data = dumps_batch(bad).replace(b"J\x00\x00\x00\x00ub", b"J\xff\xff\xff\xffub")
    _extra_offsets(ds, "many", data)
    c.absent.append("/ds/img/neg_0.png")


def _tar_header_cases(case: MakeCase) -> None:
    """Entries the tar itself disowns: its header before the data says otherwise."""
    c, ds, stem = case("entry-is-the-tar-header")
    _link_extra(c, stem)
    _extra_offsets(ds, "extra", dumps_batch([BlobMember("header.png", 0, 512)]))
    c.eio.append("/ds/img/header.png")
    c, ds, stem = case("entry-in-the-end-of-archive-zeros")
    tar_size = (c.root / "blob" / f"{stem}.tar").stat().st_size
    _link_extra(c, stem)
    _extra_offsets(
        ds, "extra", dumps_batch([BlobMember("zeros.png", tar_size - 600, tar_size - 100)])
    )
    c.eio.append("/ds/img/zeros.png")
    c, ds, stem = case("entry-with-another-members-range-and-name")
    m = _first_member(c)
    _link_extra(c, stem)
    _extra_offsets(ds, "extra", dumps_batch([BlobMember("renamed.png", m.start, m.end)]))
    c.eio.append("/ds/img/renamed.png")
    c, ds, stem = case("bogus-duplicate-hides-nothing")
    # a bogus entry named like the last member, overlapping the first: both real ones serve
    first, last = _first_member(c), _member(c, sorted(c.good)[-1])
    members = [_member(c, p) for p in sorted(c.good)]
    (ds / f"{stem}{OFFSETS_SUFFIX}").write_bytes(
        dumps_batch([*members, BlobMember(last.name, first.start, first.start + 8)])
    )
    c, ds, stem = case("bogus-short-entry-over-a-member")
    members = [_member(c, p) for p in sorted(c.good)]
    (ds / f"{stem}{OFFSETS_SUFFIX}").write_bytes(
        dumps_batch([*members, BlobMember("short.png", first.start, first.end - 1)])
    )
    c.absent.append("/ds/img/short.png")
    c, ds, stem = case("bogus-duplicate-in-another-file")
    _link_extra(c, stem)
    _extra_offsets(ds, "extra", dumps_batch([BlobMember(first.name, 1024, 2048)]))


def _link_extra(c: Case, stem: str) -> None:
    os.link(c.root / "blob" / f"{stem}.tar", c.root / "blob" / "extra.tar")


def _secret(out: Path, name: str) -> Path:
    """A file outside every project, readable only by its owner, that must never be served."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def _symlink_cases(case: MakeCase, out: Path) -> None:
    """Symlinks anywhere in a project: never followed, reported by ``blobfs check``."""
    outside = out / "_outside"
    c, _ds, _ = case("meta-json-symlink-out")
    (c.root / "meta.json").unlink()
    (c.root / "meta.json").symlink_to(_secret(outside, "meta.json"))
    c.absent.append("/meta.json")
    c, _ds, _ = case("meta-json-symlink-to-dev-zero")
    (c.root / "meta.json").unlink()
    (c.root / "meta.json").symlink_to("/dev/zero")
    c.absent.append("/meta.json")
    c, ds, _ = case("img-dir-symlink-out")
    secret_dir = outside / "imgdir"
    secret_dir.mkdir(parents=True)
    (secret_dir / "secret.png").write_bytes(SECRET)
    (ds / "img").symlink_to(secret_dir)
    c.absent.append("/ds/img/secret.png")
    c, ds, _ = case("ann-dir-symlink-out")
    moved = outside / "anndir"
    (ds / "ann").rename(moved)
    (ds / "ann").symlink_to(moved)
    c.absent += ["/ds/ann/good_0.png.json", "/ds/ann/good_1.png.json"]
    c, ds, _ = case("ann-file-symlink-out")
    (ds / "ann" / "good_0.png.json").unlink()
    (ds / "ann" / "good_0.png.json").symlink_to(_secret(outside, "ann.json"))
    c.absent.append("/ds/ann/good_0.png.json")
    _symlinked_folder_cases(case, outside)


def _symlinked_folder_cases(case: MakeCase, outside: Path) -> None:
    """Folders of the layout (blob/, a dataset, datasets/) that are symlinks."""
    c, _ds, stem = case("blob-dir-symlink-out")
    moved = outside / "blobdir"
    (c.root / "blob").rename(moved)
    (c.root / "blob").symlink_to(moved)
    c.eio += list(c.good)
    c.good = {}
    c, _ds, stem = case("tar-symlink-out")
    tar = c.root / "blob" / f"{stem}.tar"
    tar.rename(outside / f"{stem}.tar")
    tar.symlink_to(outside / f"{stem}.tar")
    c.eio += list(c.good)
    c.good = {}
    c, ds, _ = case("dataset-dir-symlink-out")
    other = outside / "otherds"
    shutil.copytree(ds, other)
    (c.root / "linked").symlink_to(other)
    c.absent += ["/linked", "/linked/img/good_0.png"]
    c, ds, _ = case("nested-datasets-dir-symlink-out")
    nested = outside / "nested"
    shutil.copytree(ds, nested / "child")
    (ds / "datasets").symlink_to(nested)
    c.absent.append("/ds/datasets/child/img/good_0.png")
    c, ds, _ = case("img-file-symlink-loop")
    (ds / "img").mkdir()
    (ds / "img" / "loop.png").symlink_to("loop.png")
    c.absent.append("/ds/img/loop.png")


def _special_file(path: Path, kind: str) -> None:
    """A FIFO, socket or character device (``/dev/zero``) at ``path``; FIFO where not allowed."""
    try:
        if kind == "socket":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(path))
            return
        if kind == "device":
            os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))
            return
    except OSError:
        pass
    os.mkfifo(path)


def _special_file_cases(case: MakeCase) -> None:
    """FIFOs, sockets and devices: never opened for reading, never waited on."""
    for kind in ("fifo", "socket", "device"):
        c, _ds, _ = case(f"meta-json-{kind}")
        (c.root / "meta.json").unlink()
        _special_file(c.root / "meta.json", kind)
        c.absent.append("/meta.json")
    c, ds, _ = case("img-file-fifo")
    (ds / "img").mkdir()
    _special_file(ds / "img" / "fifo.png", "fifo")
    c.absent.append("/ds/img/fifo.png")
    c, ds, _ = case("ann-file-device")
    (ds / "ann" / "good_0.png.json").unlink()
    _special_file(ds / "ann" / "good_0.png.json", "device")
    c.absent.append("/ds/ann/good_0.png.json")
    c, ds, _ = case("ann-file-is-a-directory")
    (ds / "ann" / "good_0.png.json").unlink()
    (ds / "ann" / "good_0.png.json").mkdir()
    c.absent.append("/ds/ann/good_0.png.json")
    c, ds, _ = case("offsets-file-fifo")
    _special_file(ds / f"fifo{OFFSETS_SUFFIX}", "fifo")
    c, _ds, stem = case("tar-is-a-fifo")
    tar = c.root / "blob" / f"{stem}.tar"
    tar.unlink()
    _special_file(tar, "fifo")
    c.eio += list(c.good)
    c.good = {}


def _size_cap_cases(case: MakeCase) -> None:
    """Files past their size cap (sparse: no disk used), refused before reading."""
    c, _ds, _ = case("meta-json-over-its-cap")
    with open(c.root / "meta.json", "r+b") as f:
        f.truncate(MAX_META_JSON_BYTES + 1)
    c.absent.append("/meta.json")
    _c, ds, _ = case("offsets-file-over-its-cap")
    with open(ds / f"huge{OFFSETS_SUFFIX}", "wb") as f:
        f.truncate(MAX_OFFSETS_FILE_BYTES + 1)


def _name_form_cases(case: MakeCase, out: Path) -> None:
    """Names the tar stores in pax or GNU long-name headers: still verified and served."""
    c, _ds, _ = case("long-and-non-ascii-names-served")
    src = out / "_names"
    src.mkdir()
    names = ["é" * 60 + ".png", "x" * 150 + ".png", "日本語の画像.png"]
    for i, name in enumerate(names):
        (src / name).write_bytes(png_bytes(10 + i))
        c.good[f"/ds/img/{name}"] = png_bytes(10 + i)
    ProjectPacker(c.root, "ds").pack(sorted(src.iterdir()))
    c.check_fails = False
    c, ds, _ = case("gnu-long-name-tar-served")
    name = "g" * 120 + ".png"
    data = png_bytes(20)
    tar_path = c.root / "blob" / "gnu.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(name)
        entry = BlobMember(name, member.offset_data, member.offset_data + member.size)
    _extra_offsets(ds, "gnu", dumps_batch([entry]))
    (ds / "ann" / f"{name}.json").write_text(json.dumps(empty_annotation(8, 8)))
    c.good[f"/ds/img/{name}"] = data
    c.check_fails = False


def _first_member(case: Case) -> BlobMember:
    return _member(case, sorted(case.good)[0])


def _member(case: Case, view_path: str) -> BlobMember:
    from blobfs.format.offsets import read_offsets_file

    name = view_path.rsplit("/", 1)[1]
    for f in (case.root / "ds").glob(f"*{OFFSETS_SUFFIX}"):
        for m in read_offsets_file(str(f)).members:
            if m.name == name:
                return m
    raise KeyError(name)


def main() -> None:
    out = Path(sys.argv[1])
    cases = build_corpus(out, out / "SENTINEL")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
