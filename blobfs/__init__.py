"""blobfs: mount Supervisely blob image projects as ordinary directory trees over FUSE.

The public surface is small: the CLI (``blobfs``), and for programs that embed it the
offsets reader/writer, the pack writer and the exception tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blobfs.errors import BlobfsError, CorruptData, NotFound, OffsetsError, RemoteError, to_errno

if TYPE_CHECKING:
    from blobfs.format.offsets import (
        OffsetsIndex,
        parse_offsets,
        read_offsets_file,
        write_offsets,
    )
    from blobfs.model import BlobMember

__version__ = "0.1.0"

#: Loaded on first use: every ``blobfs`` command imports this package, and the short
#: ones (``flush``, ``status``) never need the offsets parser's imports.
_LAZY = {
    "OffsetsIndex": "blobfs.format.offsets",
    "parse_offsets": "blobfs.format.offsets",
    "read_offsets_file": "blobfs.format.offsets",
    "write_offsets": "blobfs.format.offsets",
    "BlobMember": "blobfs.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blobfs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BlobMember",
    "BlobfsError",
    "CorruptData",
    "NotFound",
    "OffsetsError",
    "OffsetsIndex",
    "RemoteError",
    "__version__",
    "parse_offsets",
    "read_offsets_file",
    "to_errno",
    "write_offsets",
]
