"""Named crash points for the durability tests.

A crash at an exact step (after the tar is written, after the upload, ...) is a fault no
real part produces on demand, so the crash tests set ``BLOBFS_FAILPOINT=<name>`` for the
daemon and it dies there with ``os._exit`` (no cleanup, like ``kill -9``). Unset, this is
one dictionary lookup per step.

``BLOBFS_POWER_CUT_LOG=<file>`` makes the spool log what each of its syncs made durable
(see :func:`note_dir_synced`); never set outside the trials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

logger = logging.getLogger(__name__)

ENV = "BLOBFS_FAILPOINT"


def failpoint(name: str) -> None:
    """Die here when ``$BLOBFS_FAILPOINT`` names this point; with ``<name>:sleep=<s>``,
    wait there instead (a step caught in the middle, e.g. an import still running)."""
    value = os.environ.get(ENV)
    if value == name:
        logger.critical("failpoint %s: exiting abruptly", name)
        os._exit(137)
    if value and value.startswith(f"{name}:sleep="):
        time.sleep(float(value.split("=", 1)[1]))


#: Path of a log of what the spool made durable, for the power-cut trials (unset: off).
POWER_CUT_ENV = "BLOBFS_POWER_CUT_LOG"


def _note(event: dict[str, object]) -> None:
    """Append one event to the power-cut log: a single ``O_APPEND`` write, so a daemon
    killed in the middle leaves at most one torn last line, which the reader skips."""
    log = os.environ.get(POWER_CUT_ENV)
    if not log:
        return
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def _listing(folder: str) -> dict[str, int]:
    with os.scandir(folder) as entries:
        return {e.name: e.inode() for e in entries}


def note_dir_synced(folder: str | os.PathLike[str]) -> None:
    """``folder`` was fsync'd: its entries as they are now survive a power cut.

    A power cut is the one fault of the durability proof no real part produces on demand,
    so the trials play it from this log (``tests/support/power_cut.py``): what a sync did
    not cover is dropped. Unset, this is one dictionary lookup.
    """
    if os.environ.get(POWER_CUT_ENV):
        path = os.path.abspath(folder)
        _note({"dirs": {path: _listing(path)}})


def note_tree_synced(root: str | os.PathLike[str]) -> None:
    """Everything below ``root`` survives a power cut as it is now (``syncfs``, or the
    state a new mount finds)."""
    if os.environ.get(POWER_CUT_ENV):
        dirs = {}
        for folder, _, _ in os.walk(os.path.abspath(root)):
            with contextlib.suppress(OSError):  # a temp folder removed meanwhile
                dirs[folder] = _listing(folder)
        _note({"dirs": dirs})


def note_journal_synced(path: str | os.PathLike[str], durable: int, size: int) -> None:
    """The journal at ``path`` was flushed: its first ``durable`` bytes, and a file of
    ``size`` bytes, survive a power cut; bytes past ``durable`` written since may not."""
    if os.environ.get(POWER_CUT_ENV):
        _note({"journal": os.path.abspath(path), "durable": durable, "size": size})
