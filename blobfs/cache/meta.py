"""Small caches of API answers (annotation JSON) so listings do not refetch them."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_MAX_ENTRIES = 200_000


class LockedLru(Generic[K, V]):
    """A thread-safe LRU of a bounded number of entries (cachetools is not thread-safe)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._lru: LRUCache[K, V] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._lru.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._lru[key] = value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._lru

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
