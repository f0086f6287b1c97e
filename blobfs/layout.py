"""The Supervisely project layout as paths: one grammar for every layer that names things.

A project, on disk and as the mount shows it::

    meta.json
    <dataset>/img/<image>
    <dataset>/ann/<image>.json
    <dataset>/datasets/<child>/...     nested datasets (the SDK's layout)
    blob/<stem>.tar                    local blobs (referenced by <dataset>/<stem>_offsets.pkl)

and the mount adds ``/.blobfs`` (control and statistics files, hidden from listings). Paths
inside the mount ("view paths") are absolute and ``/``-separated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: Folder holding a dataset's nested datasets.
DATASETS_DIR = "datasets"
#: Folder of a local project holding its tar blobs.
BLOB_DIR = "blob"
IMG_DIR = "img"
ANN_DIR = "ann"
META_PATH = "/meta.json"
ANN_SUFFIX = ".json"
#: The mount's own folder: statistics and, with writeback, control files.
CONTROL_DIR = "/.blobfs"
#: Names a new top-level dataset may not take: they are not datasets in the layout.
RESERVED_NAMES = frozenset({BLOB_DIR, CONTROL_DIR.lstrip("/")})

DatasetPath = tuple[str, ...]
"""A dataset by its chain of names from the top: ``("train", "val")``."""


def split_path(path: str) -> list[str]:
    """``/a/b`` -> ``["a", "b"]``."""
    return [p for p in path.split("/") if p]


def dataset_view_path(dataset: DatasetPath | list[str]) -> str:
    """``("a", "b")`` -> ``/a/datasets/b``: the dataset's folder in the mount."""
    return "/" + f"/{DATASETS_DIR}/".join(dataset)


def dataset_dir(project: Path, dataset: DatasetPath | list[str]) -> Path:
    """``("a", "b")`` -> ``project/a/datasets/b``: the dataset's folder on disk."""
    folder = project / dataset[0]
    for name in dataset[1:]:
        folder = folder / DATASETS_DIR / name
    return folder


def image_path(dataset: DatasetPath | list[str], name: str) -> str:
    """The view path of image ``name`` of ``dataset``."""
    return f"{dataset_view_path(dataset)}/{IMG_DIR}/{name}"


def ann_path(dataset: DatasetPath | list[str], image: str) -> str:
    """The view path of the annotation of image ``image`` of ``dataset``."""
    return f"{dataset_view_path(dataset)}/{ANN_DIR}/{image}{ANN_SUFFIX}"


def dataset_of(view_path: str) -> tuple[DatasetPath, str, str] | None:
    """``/a/datasets/b/img/x.png`` -> ``(("a", "b"), "img", "x.png")``; None for a path
    that is not a dataset's image or annotation file."""
    parts = split_path(view_path)
    where = _dataset_folder(parts[:-1]) if len(parts) >= 3 else None
    return None if where is None else (*where, parts[-1])


def dataset_folder(folder: str) -> tuple[DatasetPath, str] | None:
    """``/a/datasets/b/img`` -> ``(("a", "b"), "img")``: the dataset and the kind of a
    folder that holds a dataset's files; None for any other folder."""
    return _dataset_folder(split_path(folder))


def _dataset_folder(parts: list[str]) -> tuple[DatasetPath, str] | None:
    if len(parts) < 2 or parts[-1] not in (IMG_DIR, ANN_DIR):
        return None
    names = [parts[0]]
    rest = parts[1:-1]
    while rest:
        if len(rest) < 2 or rest[0] != DATASETS_DIR:
            return None
        names.append(rest[1])
        rest = rest[2:]
    return tuple(names), parts[-1]


def image_of_ann(name: str) -> str:
    """``x.png.json`` -> ``x.png``."""
    return name[: -len(ANN_SUFFIX)] if name.endswith(ANN_SUFFIX) else name


#: Longest file name Linux accepts (NAME_MAX, bytes of UTF-8).
NAME_MAX = 255


def name_problem(name: object) -> str | None:
    """Say why ``name`` cannot be a file name in the mount, or None when it can.

    A name is one path component: no ``/`` (or ``\\``), no NUL, not ``.``/``..``, valid
    UTF-8, at most NAME_MAX bytes. Anything else could escape its folder or fail later.
    """
    if not isinstance(name, str):
        return f"name is {type(name).__name__}, not str"
    if name in ("", ".", ".."):
        return "name is empty, '.' or '..'"
    if "/" in name or "\\" in name or "\0" in name:
        return "name contains '/', '\\' or NUL"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if len(encoded) > NAME_MAX:
        return f"name is longer than {NAME_MAX} bytes"
    return None


#: A str of at most this many characters encodes to at most NAME_MAX bytes of UTF-8.
_SHORT_NAME = NAME_MAX // 4
_ODD_NAMES = frozenset({"", ".", ".."})


def names_fit(names: Sequence[str]) -> bool:
    """Whether :func:`name_problem` accepts every one of ``names`` (all ``str``).

    The same rules checked for a whole listing at once, in C-level passes (one join, one
    encode), so that the usual listing of a million good names runs no Python code per
    name. False says only that some name fails: :func:`name_problem` says which and why.
    """
    if not names:
        return True
    if not _ODD_NAMES.isdisjoint(names):
        return False
    # NUL is itself forbidden, so as the separator it must appear exactly between names
    joined = "\0".join(names)
    if joined.count("\0") != len(names) - 1 or "/" in joined or "\\" in joined:
        return False
    try:
        encoded = joined.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if max(map(len, names)) <= _SHORT_NAME:
        return True
    return max(map(len, encoded.split(b"\0"))) <= NAME_MAX
