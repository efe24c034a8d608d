"""The DNS answer cache both name caches are built on, against a plain dict model."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.dnscache import DNSCache


def flat(node: dict[Any, Any], prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], float]:
    out: dict[tuple[Any, ...], float] = {}
    for key, child in node.items():
        if isinstance(child, dict):
            out.update(flat(child, (*prefix, key)))
        else:
            out[(*prefix, key)] = child
    return out


def empty_dicts(node: dict[Any, Any], depth: int = 0) -> list[int]:
    """Depths (1 = a child of the root) of the empty dicts in the tree."""
    found = []
    for child in node.values():
        if isinstance(child, dict):
            found += [depth + 1] if not child else empty_dicts(child, depth + 1)
    return found


def test_min_ttl_extend_only_and_expiry() -> None:
    cache = DNSCache(depth=2, max_entries=10, min_ttl=60)
    assert cache.put(("a", "1"), 5, now=1000) is True  # floored to 60 s
    assert cache.put(("a", "1"), 30, now=990) is False  # 990 + 60 < 1060: kept
    assert cache.get(("a", "1")) == 1060
    assert cache.put(("a", "1"), 100, now=1010) is True
    assert cache.get(("a", "1")) == 1110 and cache.next_expiry == 1110
    assert cache.expire(1109) == 0 and cache.expire(1110) == 1
    assert cache.root == {} and cache.size == 0 and cache.next_expiry is None
    assert cache.stats() == {"entries": 0, "max": 10, "evicted": 0, "expired": 1}


def test_pinned_levels_stay_and_deeper_dicts_go() -> None:
    cache = DNSCache(depth=3, max_entries=10, min_ttl=0, pinned_levels=1)
    cache.put(("node", "ep", "x"), 10, now=0)
    cache.put(("node", "ep2", "y"), 20, now=0)
    held = cache.root["node"]
    assert cache.expire(15) == 1 and cache.root == {"node": {"ep2": {"y": 20}}}
    assert cache.discard(("node", "ep2")) == 1
    assert cache.root == {"node": {}} and cache.root["node"] is held and cache.size == 0
    assert cache.discard(("node", "gone")) == 0


def test_drop_expired_removes_only_the_expired_leaves_of_one_dict() -> None:
    cache = DNSCache(depth=3, max_entries=10, min_ttl=0, pinned_levels=1)
    cache.put(("node", "ep", "old"), 10, now=0)
    cache.put(("node", "ep", "new"), 30, now=0)
    cache.put(("node", "other", "old"), 10, now=0)
    endpoints = cache.root["node"]
    assert cache.drop_expired(((endpoints, "ep"),), 20, level=1) == 1
    assert cache.root["node"]["ep"] == {"new": 30}
    assert cache.size == 2 and cache.expired == 1
    assert cache.drop_expired(((endpoints, "ep"),), 40, level=1) == 1
    assert cache.root == {"node": {"other": {"old": 10}}}


def test_eviction_takes_what_expires_first() -> None:
    cache = DNSCache(depth=1, max_entries=2, min_ttl=0)
    for key, ttl in (("a", 30), ("b", 10), ("c", 20)):
        cache.put((key,), ttl, now=0)
    assert cache.evict() == 1 and cache.evicted == 1
    assert cache.root == {"a": 30, "c": 20}


def test_a_refreshed_entry_is_not_expired_by_its_stale_heap_item() -> None:
    cache = DNSCache(depth=2, max_entries=10, min_ttl=0)
    cache.put(("a", "1"), 100, now=0)
    cache.put(("a", "1"), 200, now=0)
    cache.put(("b", "2"), 50, now=0)
    assert cache.expire(150) == 1
    assert cache.root == {"a": {"1": 200}}


OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.tuples(st.sampled_from("ab"), st.sampled_from("xy"), st.sampled_from("pq")),
              st.integers(0, 50), st.integers(0, 100)),
    st.tuples(st.just("expire"), st.integers(0, 150)),
    st.tuples(st.just("evict")),
    st.tuples(st.just("discard"), st.tuples(st.sampled_from("ab"), st.sampled_from("xy"))),
    st.tuples(st.just("drop_expired"), st.sampled_from("ab"), st.sampled_from("xy"), st.integers(0, 150)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS, st.integers(1, 6))
def test_matches_a_dict_model(ops: list[tuple[Any, ...]], max_entries: int) -> None:
    cache = DNSCache(depth=3, max_entries=max_entries, min_ttl=5, pinned_levels=1)
    model: dict[tuple[Any, ...], int] = {}
    expired = evicted = 0
    for op in ops:
        if op[0] == "put":
            _, path, ttl, now = op
            expiry = now + max(ttl, 5)
            changed = model.get(path, -1) < expiry
            assert cache.put(path, ttl, now) is changed
            model[path] = max(model.get(path, -1), expiry)
        elif op[0] == "expire":
            gone = [p for p, e in model.items() if e <= op[1]]
            assert cache.expire(op[1]) == len(gone)
            expired += len(gone)
            for p in gone:
                del model[p]
        elif op[0] == "evict":
            over = max(0, len(model) - max_entries)
            order = sorted(model, key=lambda p: model[p])
            assert cache.evict() == over
            evicted += over
            removed = [p for p in model if cache.get(p) is None]
            assert len(removed) == over
            # ties aside, the entries that expire first went
            assert sorted(model[p] for p in removed) == sorted(model[p] for p in order[:over])
            for p in removed:
                del model[p]
        elif op[0] == "discard":
            gone = [p for p in model if p[:2] == op[1]]
            assert cache.discard(op[1]) == len(gone)
            for p in gone:
                del model[p]
        else:
            _, node, ep, now = op
            endpoints = cache.root.get(node)
            if endpoints is None or ep not in endpoints:
                assert not any(p[:2] == (node, ep) for p in model)
                continue
            gone = [p for p, e in model.items() if p[:2] == (node, ep) and e <= now]
            assert cache.drop_expired(((endpoints, ep),), now, level=1) == len(gone)
            expired += len(gone)
            for p in gone:
                del model[p]
        assert flat(cache.root) == model
        assert cache.size == len(model)
        assert all(depth <= 1 for depth in empty_dicts(cache.root))
        assert len(cache._heap) <= 2 * cache.size + 65
        assert cache.next_expiry == (min(model.values()) if model else None)
    assert (cache.expired, cache.evicted) == (expired, evicted)
