"""Import shim: mfusepy (maintained fork) first, fusepy as a fallback, in one place."""

from __future__ import annotations

try:
    from mfusepy import FUSE, FuseOSError, Operations
except ImportError:  # pragma: no cover - only on machines with the old fusepy
    from fuse import FUSE, FuseOSError, Operations  # type: ignore[no-redef,unused-ignore]

__all__ = ["FUSE", "FuseOSError", "Operations"]
