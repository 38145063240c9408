"""The compiler's caches: explicit, bounded, keyed by content.

Every memo of the pipeline is one :class:`LRUCache` declared at module level where its stage
lives, with a name and a size bound; none is stored on a user's object and none is keyed by
``id()``. Keys are content: a bound pattern's :attr:`~attndsl.bound.BoundPattern.key` (a digest
of its canonical IR and parameter values) plus the call's sizes, tile shape, dtype or device.
Calls with tensor inputs are not cached (their values are data, not content of the call).

:func:`all_caches` lists them (``attndsl.caches.clear()`` empties every one, for tests and
benchmarks that want cold starts); each reports hits, misses and its size (:meth:`LRUCache.stats`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

_REGISTRY: dict[str, LRUCache] = {}


class LRUCache:
    """A thread-safe mapping that keeps the ``maxsize`` most recently used entries."""

    def __init__(self, name: str, maxsize: int):
        if name in _REGISTRY:
            raise ValueError(f"a cache named {name!r} exists already")
        self.name = name
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        _REGISTRY[name] = self

    def get(self, key: Hashable, compute: Callable[[], object]):
        """The value under ``key``, computed by ``compute()`` and kept on a miss. ``compute``
        runs outside the lock (it may be slow or use other caches); when two threads miss at
        once, the first value stored wins and both return it."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        value = compute()
        with self._lock:
            if key in self._data:
                return self._data[key]
            self._data[key] = value
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def stats(self) -> dict:
        return {"name": self.name, "size": len(self._data), "maxsize": self.maxsize,
                "hits": self.hits, "misses": self.misses}

    def __repr__(self) -> str:
        return f"<LRUCache {self.name} {len(self._data)}/{self.maxsize}>"


def all_caches() -> list[LRUCache]:
    """Every cache of the pipeline (those of modules imported so far)."""
    return list(_REGISTRY.values())


def clear() -> None:
    """Empty every cache."""
    for c in _REGISTRY.values():
        c.clear()
