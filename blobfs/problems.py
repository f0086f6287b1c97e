"""Problems found in untrusted input, aggregated: one line per (file, cause).

A hostile or broken project can hold millions of bad entries (a 6 MB offsets file can
reference one bad entry three million times). Logging or keeping each one would cost
gigabytes of log and memory, and the first few names say as much as all of them. So every
source reports through a :class:`Problems` collector: a problem is a ``(where, cause)``
pair plus the name it concerns; the collector keeps a count and the first few names per
pair, and a bounded number of pairs, so its memory does not grow with the input.

Logging is aggregated the same way. Inside :meth:`Problems.listing` (one folder or one
dataset being listed) nothing is logged until the block ends, then one line per pair that
grew. Outside it (failures found while serving reads) a pair is logged when first seen and
again each time its count has grown tenfold, so a program reading a million bad entries
writes a handful of lines, not a million.

A listing is read again whenever it may have changed (a remote source's TTL refresh, a
local dataset re-listed after a writeback import). What a listing finds replaces what the
previous listing of the same scope found, so meeting the same bad entries again counts
and logs nothing, and an entry fixed since is no longer counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Names kept per (where, cause), and their length in characters.
NAMES_KEPT = 3
NAME_CHARS = 80
#: Longest name replayed from a snapshot: a shown name (quoted, escaped) or a reason why
#: a file was refused is longer than :data:`NAME_CHARS`, and must come back unchanged.
SNAPSHOT_NAME_CHARS = 1000
#: Distinct (where, cause) pairs kept; further ones are only counted.
MAX_GROUPS = 10_000
OVERFLOW = ("(further files)", "more problems than are kept")


def show(value: object) -> str:
    """A short printable form of any untrusted value; never raises, never long.

    ``repr`` of a str is cut to :data:`NAME_CHARS`; an int of thousands of digits (which
    ``str`` refuses to print) or any other object is shown by its size or type only, so a
    hostile name can neither crash a message nor flood it.
    """
    try:
        if isinstance(value, str):
            cut = value[:NAME_CHARS]
            return repr(cut) + ("..." if len(value) > NAME_CHARS else "")
        if value is None or isinstance(value, bool):
            return repr(value)
        if isinstance(value, int):
            if value.bit_length() > 64:
                return f"<int of {value.bit_length()} bits>"
            return str(value)
        if isinstance(value, float):
            return repr(value)
        return f"<{type(value).__name__}>"
    except Exception:  # a str subclass with a hostile __repr__ cannot occur, but never fail
        return "<?>"


@dataclass
class _Group:
    count: int = 0
    names: list[str] = field(default_factory=list)
    logged: int = 0


class Problems:
    """A bounded, thread-safe tally of problems by ``(where, cause)``."""

    def __init__(
        self,
        log: logging.Logger | None = None,
        names_kept: int = NAMES_KEPT,
        max_groups: int = MAX_GROUPS,
    ) -> None:
        self._log = log
        self._names_kept = names_kept
        self._max_groups = max_groups
        self._groups: dict[tuple[str, str], _Group] = {}
        # scope -> what its last listing counted, by the pair it was counted under here
        self._scopes: dict[Hashable, dict[tuple[str, str], int]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def add(self, where: str, cause: str, name: str | None = None, count: int = 1) -> None:
        """Count ``count`` problems of ``cause`` in ``where``; ``name`` is kept if few yet.

        ``name`` must already be short and printable (see :func:`show`).
        """
        self._bump((where, cause), count, [] if name is None else [name])

    def merge(self, other: Problems) -> None:
        """Add everything ``other`` collected (a parse's own collector) into this one."""
        with other._lock:
            items = [(k, g.count, list(g.names)) for k, g in other._groups.items()]
        for key, count, names in items:
            self._bump(key, count, names)

    def _bump(self, key: tuple[str, str], count: int, names: list[str]) -> None:
        sink: Problems | None = getattr(self._local, "sink", None)
        if sink is not None:  # inside a listing: counted when it ends
            sink._bump(key, count, names)
            return
        with self._lock:
            key = self._count(key, count, names)
        self._report([key], tenfold=True)

    def _count(self, key: tuple[str, str], count: int, names: list[str]) -> tuple[str, str]:
        """Add ``count`` to ``key`` (under the lock); returns the pair it was counted under."""
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self._max_groups:
                key = OVERFLOW
                group = self._groups.setdefault(key, _Group())
            else:
                group = self._groups[key] = _Group()
        group.count += count
        for name in names:
            if len(group.names) < self._names_kept and name not in group.names:
                group.names.append(name)
        return key

    @contextmanager
    def listing(self, scope: Hashable) -> Iterator[None]:
        """Problems found in the block are ``scope``'s (a dataset, a folder): they replace
        what the previous listing of ``scope`` found, and once the block ends one line is
        logged per pair that grew beyond what was logged before.

        A listing inside another one in the same thread counts towards the outer one. A
        listing that fails part way keeps the previous one's finds (it is tried again).
        """
        if getattr(self._local, "sink", None) is not None:
            yield
            return
        found = Problems(names_kept=self._names_kept, max_groups=self._max_groups)
        self._local.sink = found
        try:
            yield
        finally:
            self._local.sink = None
        self._replace(scope, found)

    def _replace(self, scope: Hashable, found: Problems) -> None:
        items = [(k, g.count, g.names) for k, g in found._groups.items()]
        with self._lock:
            before = self._scopes.pop(scope, {})
            now: dict[tuple[str, str], int] = {}
            grew: list[tuple[str, str]] = []
            for key, count, names in items:
                was = before.pop(key, 0)
                group = self._groups.get(key)
                if group is not None and group.count <= was:  # counted by this scope only
                    group.names = []  # the names it has now, not those it had
                key = self._count(key, count - was, names)
                now[key] = now.get(key, 0) + count
                if count > was:
                    grew.append(key)
            for key, was in before.items():  # not met again: fixed since
                group = self._groups.get(key)
                if group is not None:
                    group.count -= was
                    if group.count <= 0:
                        del self._groups[key]
            if now:
                self._scopes[scope] = now
        self._report(sorted(set(grew)), tenfold=False)

    def _report(self, keys: list[tuple[str, str]], tenfold: bool) -> None:
        if self._log is None:
            return
        for key in keys:
            with self._lock:
                group = self._groups.get(key)
                if group is None:
                    continue
                due = group.count > group.logged and (
                    not tenfold or group.logged == 0 or group.count >= 10 * group.logged
                )
                if due:
                    group.logged = group.count
                line = _line(key, group) if due else None
            if line is not None:
                self._log.warning("%s", line)

    def snapshot(self) -> list[list[Any]]:
        """Every group as ``[where, cause, count, names]`` (JSON-ready), to be replayed by
        :meth:`add_snapshot` (an index cache keeps the problems of the entries it holds)."""
        with self._lock:
            return [[w, c, g.count, list(g.names)] for (w, c), g in self._groups.items()]

    def add_snapshot(self, items: object) -> None:
        """Add what :meth:`snapshot` gave; malformed items (a damaged cache) are skipped."""
        if not isinstance(items, list):
            return
        for item in items:
            if (
                isinstance(item, list)
                and len(item) == 4
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and isinstance(item[2], int)
                and isinstance(item[3], list)
                and all(isinstance(n, str) for n in item[3])
            ):
                names = [n[:SNAPSHOT_NAME_CHARS] for n in item[3][: self._names_kept]]
                self._bump((item[0], item[1]), max(1, item[2]), names)

    def lines(self) -> list[str]:
        """One line per (where, cause): what ``blobfs check`` prints and the mount counts."""
        with self._lock:
            return [_line(k, g) for k, g in self._groups.items()]

    @property
    def total(self) -> int:
        """Problems counted (not pairs)."""
        with self._lock:
            return sum(g.count for g in self._groups.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)

    def __bool__(self) -> bool:
        return len(self) > 0


def _line(key: tuple[str, str], group: _Group) -> str:
    where, cause = key
    names = ", ".join(group.names)
    if group.count == 1:
        return f"{where}: {cause}" + (f": {names}" if names else "")
    more = "e.g. " if len(group.names) < group.count else ""
    return f"{where}: {cause}: {group.count} entries" + (f" ({more}{names})" if names else "")
