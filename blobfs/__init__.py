"""blobfs: mount Supervisely blob image projects as ordinary directory trees over FUSE.

The public surface is small: the CLI (``blobfs``), and for programs that embed it the
offsets reader/writer, the pack writer and the exception tree.
"""

from blobfs.errors import BlobfsError, CorruptData, NotFound, OffsetsError, RemoteError, to_errno
from blobfs.format.offsets import OffsetsIndex, parse_offsets, read_offsets_file, write_offsets
from blobfs.model import BlobMember

__version__ = "0.1.0"

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
