"""Maglev: permutations, determinism, balance and disruption (measured, then asserted)."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.servicelb import maglev

M = maglev.DEFAULT_TABLE_SIZE


def backends(n: int, start: int = 0) -> list[tuple[str, int]]:
    return [(f"10.0.{i // 200}.{i % 200 + 1}:8080", i + 1) for i in range(start, start + n)]


def reference_table(items: list[tuple[str, int]], m: int) -> list[int]:
    """The paper's pseudo-code, verbatim (full permutation lists), over sorted backends."""
    items = sorted(items)
    perms = [maglev.permutation(key, m) for key, _ in items]
    nxt = [0] * len(items)
    entry = [-1] * m
    n = 0
    while True:
        for i in range(len(items)):
            c = perms[i][nxt[i]]
            while entry[c] >= 0:
                nxt[i] += 1
                c = perms[i][nxt[i]]
            entry[c] = i
            nxt[i] += 1
            n += 1
            if n == m:
                return [items[i][1] for i in entry]


@pytest.mark.parametrize("m", [251, 1021, 16381])
def test_permutation_visits_every_slot_once(m: int) -> None:
    for key, _ in backends(20):
        offset, skip = maglev.offset_skip(key, m)
        assert 0 <= offset < m and 1 <= skip < m
        perm = maglev.permutation(key, m)
        assert sorted(perm) == list(range(m))
        assert perm[:3] == [offset, (offset + skip) % m, (offset + 2 * skip) % m]


@pytest.mark.parametrize(("n", "m"), [(1, 251), (3, 251), (7, 1021), (10, 16381)])
def test_table_matches_the_papers_algorithm(n: int, m: int) -> None:
    items = backends(n)
    assert maglev.maglev_table(items, m) == reference_table(items, m)


def test_table_is_independent_of_input_order_and_process() -> None:
    items = backends(10)
    table = maglev.maglev_table(items, M)
    for seed in range(5):
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        assert maglev.maglev_table(shuffled, M) == table
    # keyed BLAKE2b, not Python's per-process hash(): this digest is the same everywhere
    assert hashlib.sha256(repr(table).encode()).hexdigest()[:16] == STABLE_DIGEST


STABLE_DIGEST = "94d2fa8573d805fa"  # table of backends(10) at M=16381; must never change


def test_stable_hash_is_pinned() -> None:
    # Changing the hash would change every node's table at upgrade time: pin it.
    assert maglev.backend_hashes("10.0.0.1:8080") == (
        int.from_bytes(hashlib.blake2b(b"10.0.0.1:8080", digest_size=16, key=maglev.HASH_KEY).digest()[:8], "little"),
        int.from_bytes(hashlib.blake2b(b"10.0.0.1:8080", digest_size=16, key=maglev.HASH_KEY).digest()[8:], "little"),
    )
    assert maglev.offset_skip("10.0.0.1:8080", 251) == maglev.offset_skip("10.0.0.1:8080", 251)


def test_even_spread_at_default_size() -> None:
    counts = Counter(maglev.maglev_table(backends(10), M))
    assert len(counts) == 10
    ratio = max(counts.values()) / min(counts.values())
    print(f"max/min slot share over 10 backends at M={M}: {ratio:.4f}")
    assert ratio <= 1.05


@pytest.mark.parametrize(("n", "bound"), [(3, 1.5), (10, 1.5), (20, 1.5), (30, 1.5), (50, 2.0), (100, 3.0)])
def test_removing_one_backend_moves_about_one_nth(n: int, bound: float) -> None:
    # Maglev trades disruption for balance as N/M grows: up to N=30 at most 1.5/N of the
    # table moves; beyond that the bound loosens (docs/servicelb.md has the measured table).
    items = backends(n)
    before = maglev.maglev_table(items, M)
    worst = 0.0
    for gone in (0, n // 2, n - 1):
        after = maglev.maglev_table(items[:gone] + items[gone + 1:], M)
        moved = sum(1 for a, b in zip(before, after, strict=True) if a != b) / M
        worst = max(worst, moved)
        # slots of surviving backends stay where they were, except the few refilled
        removed_id = items[gone][1]
        assert removed_id not in after
    print(f"N={n}: worst moved fraction {worst:.4f} (1/N = {1 / n:.4f}, x N = {worst * n:.2f})")
    assert worst <= bound / n


def test_adding_one_backend_moves_about_one_nth() -> None:
    n = 10
    before = maglev.maglev_table(backends(n), M)
    after = maglev.maglev_table(backends(n + 1), M)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b) / M
    print(f"adding the 11th backend moved {moved:.4f}")
    assert moved <= 1.5 / (n + 1)


def test_empty_and_single() -> None:
    assert maglev.maglev_table([], M) == []
    assert set(maglev.maglev_table(backends(1), 251)) == {1}


def test_table_size_must_be_an_allowed_prime() -> None:
    assert maglev.check_table_size(16381) == 16381
    with pytest.raises(ValueError, match="not one of"):
        maglev.maglev_table(backends(2), 1000)
    assert maglev.table_size_warning(16381, 10) == ""
    assert "below 100 x 200" in maglev.table_size_warning(16381, 200)


@settings(max_examples=40, deadline=None)
@given(
    st.sets(st.tuples(st.integers(0, 255), st.integers(1, 65535)), min_size=1, max_size=40),
    st.sampled_from([251, 509, 1021, 2039]),
)
def test_property_balanced_and_complete(addrs: set[tuple[int, int]], m: int) -> None:
    items = [(f"10.1.2.{a}:{p}", i + 1) for i, (a, p) in enumerate(sorted(addrs))]
    table = maglev.maglev_table(items, m)
    assert len(table) == m
    counts = Counter(table)
    assert set(counts) == {v for _, v in items} if len(items) <= m else True
    assert max(counts.values()) - min(counts.values()) <= 1
    assert maglev.maglev_table(list(reversed(items)), m) == table
