"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium's ``pkg/maglev``.

Invariants:
- `maglev_table` is a pure function of the *set* of backends and the table size ``M``:
  input order does not matter (backends are sorted by their hash key first), and the
  hash is keyed BLAKE2b over the backend address, so every node computes the same table.
- ``M`` is one of `TABLE_SIZES` (primes, as Cilium allows); each backend's permutation is
  ``(offset + j * skip) mod M`` with ``offset = h1 mod M`` and ``skip = h2 mod (M-1) + 1``,
  which visits every slot exactly once because ``M`` is prime.
- Population is round-robin: each backend in turn takes its next preferred free slot, so
  slot counts of any two backends differ by at most one, and removing one of ``N``
  backends moves about ``1/N`` of the table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import lru_cache

TABLE_SIZES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_TABLE_SIZE = 16381
# The hash is keyed so that tables are stable across releases unless this changes.
HASH_KEY = b"ciliary-maglev-v1"


def check_table_size(m: int) -> int:
    """``m`` if it is an allowed table size; raises ``ValueError`` otherwise."""
    if m not in TABLE_SIZES:
        raise ValueError(f"maglev table size {m} is not one of {', '.join(map(str, TABLE_SIZES))}")
    return m


def table_size_warning(m: int, backends: int) -> str:
    """A warning when ``m`` is below 100 × backends (Maglev's balance degrades), else ``""``."""
    if backends and m < 100 * backends:
        return (
            f"maglev table size {m} is below 100 x {backends} backends; "
            "distribution will be uneven (choose a larger prime)"
        )
    return ""


def backend_hashes(key: str) -> tuple[int, int]:
    """Two independent 64-bit hashes of a backend key (``ip:port``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16, key=HASH_KEY).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def offset_skip(key: str, m: int) -> tuple[int, int]:
    h1, h2 = backend_hashes(key)
    return h1 % m, h2 % (m - 1) + 1


def permutation(key: str, m: int) -> list[int]:
    """The full preference list of a backend: a permutation of ``range(m)``."""
    offset, skip = offset_skip(key, m)
    return [(offset + j * skip) % m for j in range(m)]


def maglev_table(backends: Iterable[tuple[str, int]], m: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """The lookup table: ``m`` entries, each the value (backend id) of one backend.

    ``backends`` are ``(hash key, value)`` pairs; keys must be unique. An empty input gives
    an empty table.
    """
    return list(_table(tuple(sorted(set(backends))), check_table_size(m)))


@lru_cache(maxsize=512)
def _table(backends: Sequence[tuple[str, int]], m: int) -> tuple[int, ...]:
    n = len(backends)
    if n == 0:
        return ()
    params = [offset_skip(key, m) for key, _ in backends]
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            offset, skip = params[i]
            c = (offset + nxt[i] * skip) % m
            while entry[c] >= 0:
                nxt[i] += 1
                c = (offset + nxt[i] * skip) % m
            entry[c] = i
            nxt[i] += 1
            filled += 1
            if filled == m:
                return tuple(backends[i][1] for i in entry)
