"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET`` per state change.

systemd's ``Type=notify`` waits for ``READY=1``; blobfs sends it only once the kernel has
mounted the file system, and ``STOPPING=1`` when it starts to unmount.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False when not under one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        logger.warning("sd_notify %s failed: %s", state, exc)
        return False
    return True
