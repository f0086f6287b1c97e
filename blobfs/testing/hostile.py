"""A generated corpus of hostile and broken local projects (issue: reliability campaign).

Every case is a small project with good images (``good_*.png``) next to something bad. A
case says which view paths must read back exactly, which must be absent (not served),
which must fail with EIO, and whether ``blobfs check`` must fail. Nothing in a case may
run code or touch a file outside its folder: hostile pickles aim at a sentinel path the
tests check afterwards.

Run ``python -m blobfs.testing.hostile OUT_DIR`` to write the corpus for manual poking.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from blobfs.blob.index import OFFSETS_SUFFIX, dumps_batch
from blobfs.blob.pack import ProjectPacker, empty_annotation
from blobfs.model import BlobMember
from blobfs.testing.sample import png_bytes

GOOD = 3  # good images per case, seeds 0..2


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
    c, ds, stem = case("duplicate-names")
    good_range = _first_member(c)
    all_members = [_member(c, p) for p in sorted(c.good)]
    (ds / f"{stem}{OFFSETS_SUFFIX}").write_bytes(dumps_batch([*all_members, good_range]))
    c.absent.append(f"/ds/img/{good_range.name}")
    del c.good[f"/ds/img/{good_range.name}"]
    c, ds, stem = case("duplicate-names-across-files")
    os.link(c.root / "blob" / f"{stem}.tar", c.root / "blob" / "twin.tar")
    (ds / f"twin{OFFSETS_SUFFIX}").write_bytes(dumps_batch([good_range]))
    c.absent.append(f"/ds/img/{good_range.name}")
    del c.good[f"/ds/img/{good_range.name}"]
    c, ds, stem = case("overlapping-ranges")
    m = _first_member(c)
    all_members = [_member(c, p) for p in sorted(c.good)]
    (ds / f"{stem}{OFFSETS_SUFFIX}").write_bytes(
        dumps_batch([*all_members, BlobMember("overlap.png", m.start + 10, m.end + 10)])
    )
    c.absent += [f"/ds/img/{m.name}", "/ds/img/overlap.png"]
    del c.good[f"/ds/img/{m.name}"]
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
    c.check_fails = False
    c, ds, _stem = case("offsets-symlink-to-system-file")
    (ds / f"sys{OFFSETS_SUFFIX}").symlink_to("/etc/hostname")
    c, ds, _stem = case("image-without-annotation")
    (ds / "ann" / "good_1.png.json").unlink()
    c.absent.append("/ds/ann/good_1.png.json")


def _first_member(case: Case) -> BlobMember:
    return _member(case, sorted(case.good)[0])


def _member(case: Case, view_path: str) -> BlobMember:
    from blobfs.blob.index import read_offsets_file

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
