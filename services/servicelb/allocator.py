"""Persistent allocators for cluster IPs, node ports, service ids and backend ids (pure).

Invariants:
- A `Pool` maps values to owners one-to-one: a value is never held by two owners and an
  owner holds at most one value. The persistent copy lives in bucket ``allocations`` under
  ``<pool name>.<value key>``, one key per *value*, created with compare-and-set
  (must-not-exist), so two writers can never hand out the same value; the shell persists
  `Pool.pending` before any output uses them and re-reads the pool when a create loses.
- Allocation is deterministic given the persisted state: the lowest free value at or
  after the pool's dynamic start (wrapping to the static band below it), as Kubernetes
  does for cluster IPs (KEP-3070) and node ports (KEP-3668), so explicitly requested
  values (usually from the static band) rarely collide with dynamic ones. Id pools
  (`id_pool`) instead continue after the highest id held or last handed out, so a
  released service/backend id is not reused at once.
- `Pool.begin` starts a pass; every value looked up or allocated in the pass is "used".
  `Pool.unused` after a pass lists what may be released once the output without it is
  written. `Pool.misses` counts failed claims and allocations, so a caller can tell who
  waits for a value to become free.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Pool:
    """Values ``lo..hi`` (ints) handed to owners; ``dynamic_start`` splits the static band."""

    name: str
    lo: int
    hi: int
    dynamic_start: int = 0
    render: Callable[[int], str] = str  # value -> key-safe token
    owners: dict[int, str] = field(default_factory=dict)  # value -> owner
    by_owner: dict[str, int] = field(default_factory=dict)
    revisions: dict[int, int] = field(default_factory=dict)  # value -> KV revision
    pending: dict[int, str] = field(default_factory=dict)  # created this pass, not persisted
    used: set[int] = field(default_factory=set)
    rotate: bool = False  # ids: continue after the last value handed out (no quick reuse)
    misses: int = 0  # claims and allocations that failed (a value taken, the pool exhausted)
    _next: int = 0

    def __post_init__(self) -> None:
        if not self.dynamic_start:
            self.dynamic_start = self.lo

    # ---------------------------------------------------------------- persistence view

    def key(self, value: int) -> str:
        return f"{self.name}.{self.render(value)}"

    def load(self, entries: dict[int, tuple[str, int]]) -> None:
        """Replace the state with persisted ``value -> (owner, revision)`` entries."""
        self.owners.clear()
        self.by_owner.clear()
        self.revisions.clear()
        self.pending.clear()
        for value, (owner, revision) in sorted(entries.items()):
            if owner in self.by_owner:  # corrupt: keep the lowest, the other gets released
                self.owners[value] = f"{owner}\x00dup{value}"
            else:
                self.owners[value] = owner
                self.by_owner[owner] = value
            self.revisions[value] = revision
        self._next = max(self.owners, default=0) + 1

    def persisted(self, value: int, revision: int) -> None:
        self.pending.pop(value, None)
        self.revisions[value] = revision

    def released(self, value: int) -> None:
        owner = self.owners.pop(value, None)
        if owner is not None and self.by_owner.get(owner) == value:
            del self.by_owner[owner]
        self.revisions.pop(value, None)
        self.pending.pop(value, None)

    # ---------------------------------------------------------------- a pass

    def begin(self) -> None:
        self.used = set()

    def unused(self) -> list[int]:
        return sorted(v for v in self.owners if v not in self.used and v not in self.pending)

    def lookup(self, owner: str) -> int | None:
        value = self.by_owner.get(owner)
        if value is not None:
            self.used.add(value)
        return value

    def claim(self, owner: str, value: int) -> bool:
        """Hold a specific ``value`` for ``owner``; False when another owner has it."""
        holder = self.owners.get(value)
        if holder is not None and holder != owner:
            self.misses += 1
            return False
        old = self.by_owner.get(owner)
        if old is not None and old != value:
            self.used.discard(old)  # the owner moves; the old value is released after the pass
            del self.by_owner[owner]
            self.owners[old] = f"{owner}\x00moved"
        if holder is None:
            self.owners[value] = owner
            self.pending[value] = owner
        self.by_owner[owner] = value
        self.used.add(value)
        return True

    def allocate(self, owner: str) -> int | None:
        """The owner's value, allocating the lowest free one when it has none."""
        value = self.lookup(owner)
        if value is not None:
            return value
        for candidate in self._candidates():
            if candidate not in self.owners:
                self.owners[candidate] = owner
                self.by_owner[owner] = candidate
                self.pending[candidate] = owner
                self.used.add(candidate)
                self._next = candidate + 1
                return candidate
        self.misses += 1
        return None

    def _candidates(self) -> Iterator[int]:
        start = self.dynamic_start
        if self.rotate and self.lo <= self._next <= self.hi:
            start = self._next
        return itertools.chain(range(start, self.hi + 1), range(self.lo, start))


def ip_pool(name: str, cidr: str) -> Pool:
    """Cluster IPs of ``cidr`` (IPv4), network and broadcast excluded; static band first."""
    net = ipaddress.IPv4Network(cidr, strict=True)
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    size = last - first + 1
    band = min(max(16, size // 16), 256)
    return Pool(name, first, last, dynamic_start=min(first + band, last),
                render=lambda v: str(ipaddress.IPv4Address(v)).replace(".", "-"))


@functools.lru_cache(maxsize=1 << 18)
def ip_token(address: str) -> int:
    """The integer of a dotted IPv4 address (ValueError when it is not one). Cached: every
    reconcile parses the same few thousand addresses again."""
    return int(ipaddress.IPv4Address(address))


def ip_text(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def ip_in_pool(pool: Pool, address: str) -> bool:
    try:
        value = ip_token(address)
    except ValueError:
        return False
    return pool.lo <= value <= pool.hi


def node_port_pool(name: str, lo: int = 30000, hi: int = 32767) -> Pool:
    size = hi - lo + 1
    band = min(max(16, size // 32), 128)
    return Pool(name, lo, hi, dynamic_start=min(lo + band, hi))


def id_pool(name: str, hi: int) -> Pool:
    """Ids ``1..hi``; a released id is reused only after the others were handed out once,
    so a conntrack entry still naming it rarely meets a different backend."""
    return Pool(name, 1, hi, rotate=True)


def parse_value(pool: Pool, token: str) -> int | None:
    """The value a persisted key token names (inverse of ``pool.render``), or None."""
    try:
        if pool.render is str:
            return int(token)
        return ip_token(token.replace("-", "."))
    except ValueError:
        return None
