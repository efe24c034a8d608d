"""Sizes of a service's long-lived caches, reported in its health detail (``caches``).

Invariants:
- A ``CacheStats`` is a registry of named caches, each a size function, a cap (``None``: no
  number bounds it; it is pruned when the objects it describes go) and an eviction count
  function. ``stats()`` gives ``{name: {"size": n, "cap": c, "evicted": e}}`` (``cap``
  left out when ``None``), computed at that moment; ``publish(detail)`` puts it in a
  health detail under ``caches`` (services call it after each pass), so ``ciliary status
  -o json`` shows ``detail.caches`` as of the last pass.
- ``BoundedSet`` never holds more than ``cap`` items: adding a new item to a full set
  first forgets the oldest one and counts an eviction.
- ``env_cap`` reads an integer cap ≥ 1 from the environment (a bad value is logged and the
  default used, as every ciliary setting).
- Pure: no bus, no asyncio, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from ciliary import config


def env_cap(name: str, default: int, env: dict[str, str] | None = None) -> int:
    """The cap in environment variable ``name`` (an integer ≥ 1), else ``default``."""
    return int(config.env_number(name, default, integer=True, minimum=1, env=env))


@dataclass(frozen=True)
class _Cache:
    size: Callable[[], int]
    cap: int | None
    evicted: Callable[[], int]


class CacheStats:
    """Named caches of one service; ``stats()`` (or calling it) snapshots their sizes."""

    def __init__(self) -> None:
        self._caches: dict[str, _Cache] = {}

    def register(self, name: str, size: Callable[[], int], cap: int | None = None,
                 evicted: Callable[[], int] = lambda: 0) -> None:
        self._caches[name] = _Cache(size, cap, evicted)

    def stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, cache in sorted(self._caches.items()):
            row = {"size": int(cache.size()), "evicted": int(cache.evicted())}
            if cache.cap is not None:
                row["cap"] = cache.cap
            out[name] = row
        return out

    def publish(self, detail: dict[str, object]) -> None:
        detail["caches"] = self.stats()


class BoundedSet:
    """A set of at most ``cap`` items, the oldest forgotten first (``evicted`` counts them)."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("a BoundedSet's cap must be at least 1")
        self.cap = cap
        self.evicted = 0
        self._items: dict[Hashable, None] = {}  # insertion order = age

    def add(self, item: Hashable) -> bool:
        """Add ``item``; False when it was already there."""
        if item in self._items:
            return False
        if len(self._items) >= self.cap:
            del self._items[next(iter(self._items))]
            self.evicted += 1
        self._items[item] = None
        return True

    def discard(self, item: Hashable) -> None:
        self._items.pop(item, None)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._items))
