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
from collections.abc import Callable
from typing import Any, TypeVar

from blobfs.errors import TimedOut

DEFAULT_TIMEOUT_S = 30.0

_local = threading.local()
T = TypeVar("T")


class within:  # noqa: N801 - used as ``with deadline.within(s):``, like a function
    """Run the body under a deadline ``seconds`` from now (None or <= 0: no deadline).

    A class rather than a generator-based context manager: every FUSE operation enters
    one, and a generator's set-up and tear-down are a visible part of what a small
    file's copy costs in Python.
    """

    __slots__ = ("_mine", "_outer")

    def __init__(self, seconds: float | None) -> None:
        self._mine: float | None = None if seconds is None or seconds <= 0 else seconds
        self._outer: tuple[float, float] | None = None

    def __enter__(self) -> None:
        seconds = self._mine
        if seconds is None:
            return
        outer: tuple[float, float] | None = getattr(_local, "deadline", None)
        self._outer = outer
        _local.deadline = _nested(seconds, outer)

    def __exit__(self, *exc: object) -> None:
        if self._mine is not None:
            _local.deadline = self._outer


def call_within(seconds: float | None, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` under a deadline ``seconds`` from now: :class:`within` without a
    context-manager object, for the one call each FUSE operation makes (a small file's
    copy makes six)."""
    if seconds is None or seconds <= 0:
        return func(*args)
    local = _local
    outer: tuple[float, float] | None = getattr(local, "deadline", None)
    local.deadline = _nested(seconds, outer)
    try:
        return func(*args)
    finally:
        local.deadline = outer


def _nested(seconds: float, outer: tuple[float, float] | None) -> tuple[float, float]:
    """A deadline ``seconds`` from now, inside ``outer``: a nested one never extends it."""
    mine = (time.monotonic() + seconds, seconds)
    return mine if outer is None or mine[0] < outer[0] else outer


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
