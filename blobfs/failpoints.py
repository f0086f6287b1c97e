"""Named crash points for the durability tests.

A crash at an exact step (after the tar is written, after the upload, ...) is a fault no
real part produces on demand, so the crash tests set ``BLOBFS_FAILPOINT=<name>`` for the
daemon and it dies there with ``os._exit`` (no cleanup, like ``kill -9``). Unset, this is
one dictionary lookup per step.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV = "BLOBFS_FAILPOINT"


def failpoint(name: str) -> None:
    """Die here when ``$BLOBFS_FAILPOINT`` names this point."""
    if os.environ.get(ENV) == name:
        logger.critical("failpoint %s: exiting abruptly", name)
        os._exit(137)
