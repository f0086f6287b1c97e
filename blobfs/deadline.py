"""Per-operation deadlines: every FUSE operation finishes (or fails) within ``--timeout``.

The FUSE adapter opens a deadline around each operation (:func:`within`); code far below
it (HTTP retries, waits on another thread's fetch, the view's listing lock) asks how much
time is left (:func:`remaining`) instead of taking a budget argument through every layer.
The deadline belongs to the calling thread: background work (readahead, listing refresh,
writeback imports) runs outside any deadline unless it opens its own.

When the time is up the code raises :class:`~blobfs.errors.TimedOut` (ETIMEDOUT); a
nested :func:`within` never extends an outer deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from blobfs.errors import TimedOut

DEFAULT_TIMEOUT_S = 30.0

_local = threading.local()


@contextmanager
def within(seconds: float | None) -> Iterator[None]:
    """Run the body under a deadline ``seconds`` from now (None or <= 0: no deadline)."""
    outer: tuple[float, float] | None = getattr(_local, "deadline", None)
    if seconds is None or seconds <= 0:
        yield
        return
    mine = (time.monotonic() + seconds, seconds)
    _local.deadline = mine if outer is None or mine[0] < outer[0] else outer
    try:
        yield
    finally:
        _local.deadline = outer


def remaining() -> float | None:
    """Seconds left before this thread's deadline (may be <= 0), or None without one."""
    current: tuple[float, float] | None = getattr(_local, "deadline", None)
    return None if current is None else current[0] - time.monotonic()


def budget() -> float | None:
    """The whole budget of this thread's deadline, for messages."""
    current: tuple[float, float] | None = getattr(_local, "deadline", None)
    return None if current is None else current[1]


def expired(what: str, why: str = "") -> TimedOut:
    """The error to raise when the deadline passed while doing ``what``."""
    total = budget()
    limit = f"the {total:g} s deadline" if total is not None else "its deadline"
    return TimedOut(f"{what}: no answer within {limit} (--timeout){f'; {why}' if why else ''}")


def check(what: str, why: str = "") -> None:
    """Raise :class:`TimedOut` when this thread's deadline has passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise expired(what, why)


def wait(event: threading.Event, what: str) -> None:
    """Wait for ``event`` until the deadline; raise :class:`TimedOut` if it passes first."""
    left = remaining()
    if left is None:
        event.wait()
    elif not event.wait(max(left, 0.0)):
        raise expired(what)


def acquire(lock: threading.Lock | threading.RLock, what: str) -> None:
    """Take ``lock`` before the deadline; raise :class:`TimedOut` if it passes first."""
    left = remaining()
    if left is None:
        lock.acquire()
    elif not lock.acquire(timeout=max(left, 0.0)):
        raise expired(what)
