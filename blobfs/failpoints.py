"""Named crash points for the durability tests.

A crash at an exact step (after the tar is written, after the upload, ...) is a fault no
real part produces on demand, so the crash tests set ``BLOBFS_FAILPOINT=<name>`` for the
daemon and it dies there with ``os._exit`` (no cleanup, like ``kill -9``). Unset, this is
one dictionary lookup per step.
"""

from __future__ import annotations

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
