"""``blobfs pack``: the images of a folder into blobs of a local project.

The packing itself is :class:`blobfs.format.pack.ProjectPacker`, shared with writeback's
local importer; this is what the command adds on top: which files of the folder count.
"""

from __future__ import annotations

from pathlib import Path


def images_in(folder: Path) -> list[Path]:
    """The files ``blobfs pack`` takes from ``folder``, sorted by name.

    Hidden files (names starting with a dot, such as ``.DS_Store``) and symlinks are
    skipped, as a shell's ``*`` skips hidden files; so is anything but a regular file.
    """
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
    )
