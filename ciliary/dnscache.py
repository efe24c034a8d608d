"""The cache behind every DNS name cache: learned answers that expire, bounded (pure).

The identity service (toFQDNs: name -> addresses) and the flows service (per endpoint:
address -> names) each keep DNS answers in a ``DNSCache``; they differ only in the path
under which an answer is stored and in which names of a response they learn.

Invariants:
- Entries sit at one fixed depth of nested dicts: a path ``(k1, ..., kn)`` is the entry
  ``root[k1]...[kn] = expiry``; ``size`` counts entries. A dict emptied by a removal is
  removed from its parent, except the dicts of the first ``pinned_levels`` levels below
  the root, which stay once created (callers may hold on to them).
- ``put(path, ttl, now)`` holds the entry until ``now + max(ttl, min_ttl)`` (Cilium's
  ``tofqdns-min-ttl``); a later answer only ever extends an entry, never shortens it.
- ``expire(now)`` removes exactly the entries whose expiry is ``<= now``;
  ``drop_expired`` removes those of one leaf dict; both count them in ``expired``. ``next_expiry`` is the
  earliest expiry held (None when empty).
- ``evict()`` removes the entries that expire first until at most ``max_entries`` are
  held, counting them in ``evicted``.
- A min-heap of ``(expiry, *path)`` finds the earliest entries. It may hold stale items
  (refreshed, expired or discarded entries), which are skipped; it is rebuilt from the
  live entries once it holds more than ``2 * size + 64`` items.
- Times and TTLs are in one unit of the caller's choice (seconds, nanoseconds).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

Chain = Sequence[tuple[dict[Any, Any], Hashable]]  # (dict, key) steps down the tree


class DNSCache:
    """Path -> expiry in nested dicts, bounded; see the module invariants."""

    def __init__(self, *, depth: int, max_entries: int, min_ttl: float, pinned_levels: int = 0) -> None:
        self.depth = depth
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.pinned_levels = pinned_levels
        self.root: dict[Any, Any] = {}
        self.size = 0
        self.evicted = 0
        self.expired = 0
        self._heap: list[tuple[Any, ...]] = []

    # ------------------------------------------------------------ entries

    def get(self, path: Sequence[Hashable]) -> Any:
        """The expiry of ``path``, or None when not held."""
        node: Any = self.root
        for key in path:
            node = node.get(key)
            if node is None:
                return None
        return node

    def put(self, path: Sequence[Hashable], ttl: float, now: float) -> bool:
        """Hold ``path`` for ``max(ttl, min_ttl)`` from ``now``; True when the entry is new
        or extended, False when it is already held at least that long."""
        expiry = now + max(ttl, self.min_ttl)
        parent = self.root
        for key in path[:-1]:
            child = parent.get(key)
            if child is None:
                child = parent[key] = {}
            parent = child
        leaf = path[-1]
        held = parent.get(leaf)
        if held is not None and held >= expiry:
            return False
        parent[leaf] = expiry
        if held is None:
            self.size += 1
        heapq.heappush(self._heap, (expiry, *path))
        if len(self._heap) > 2 * self.size + 64:
            self._heap = [(held_until, *key_path) for key_path, held_until in self._entries(self.root, ())]
            heapq.heapify(self._heap)
        return True

    def discard(self, path: Sequence[Hashable]) -> int:
        """Remove the entry or the whole subtree at ``path``; returns the entries removed."""
        chain = self._chain(path)
        if chain is None:
            return 0
        parent, key = chain[-1]
        gone = parent.pop(key)
        count = 1 if len(path) == self.depth else sum(1 for _ in self._entries(gone, ()))
        self.size -= count
        self._prune(chain[:-1], 0)
        return count

    # ------------------------------------------------------------ expiry and bound

    def expire(self, now: float) -> int:
        """Remove every entry with expiry <= ``now``; returns how many."""
        gone = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if self._remove_if_current(item):
                gone += 1
        self.expired += gone
        return gone

    def evict(self) -> int:
        """Remove the entries that expire first while more than ``max_entries`` are held."""
        gone = 0
        while self.size > self.max_entries and self._heap:
            if self._remove_if_current(heapq.heappop(self._heap)):
                gone += 1
        self.evicted += gone
        return gone

    @property
    def next_expiry(self) -> Any:
        heap = self._heap
        while heap:
            expiry, *path = heap[0]
            if self.get(path) == expiry:
                return expiry
            heapq.heappop(heap)
        return None

    def drop_expired(self, chain: Chain, now: float, level: int = 0) -> int:
        """Remove the expired entries of the leaf dict at the end of ``chain``; returns
        how many. ``chain`` steps from a dict ``level`` levels below the root (0: the root
        itself) down to the leaf dict's parent."""
        parent, key = chain[-1]
        leaves = parent[key]
        gone = [k for k, expiry in leaves.items() if expiry <= now]
        for k in gone:
            del leaves[k]
        self.size -= len(gone)
        self.expired += len(gone)
        self._prune(chain, level)
        return len(gone)

    def stats(self) -> dict[str, int]:
        """Counters for a service's health detail."""
        return {"entries": self.size, "max": self.max_entries, "evicted": self.evicted,
                "expired": self.expired}

    # ------------------------------------------------------------ internals

    def _chain(self, path: Sequence[Hashable]) -> list[tuple[dict[Any, Any], Hashable]] | None:
        chain: list[tuple[dict[Any, Any], Hashable]] = []
        node: Any = self.root
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            chain.append((node, key))
            node = node[key]
        return chain

    def _remove_if_current(self, item: tuple[Any, ...]) -> bool:
        """Remove the entry of a heap item unless the item is stale."""
        expiry, *path = item
        chain = self._chain(path)
        if chain is None:
            return False
        parent, key = chain[-1]
        if parent[key] != expiry:
            return False
        del parent[key]
        self.size -= 1
        self._prune(chain[:-1], 0)
        return True

    def _prune(self, chain: Chain, level: int) -> None:
        """Remove emptied dicts along ``chain`` (deepest first), keeping pinned levels."""
        for i in range(len(chain) - 1, -1, -1):
            parent, key = chain[i]
            if parent[key] or level + i + 1 <= self.pinned_levels:
                return
            del parent[key]

    def _entries(self, node: dict[Any, Any], prefix: tuple[Hashable, ...]) -> Iterator[tuple[tuple[Hashable, ...], Any]]:
        for key, child in node.items():
            if isinstance(child, dict):
                yield from self._entries(child, (*prefix, key))
            else:
                yield (*prefix, key), child
