"""Cache registry and the bounded set that caps per-problem and per-object memories."""

from __future__ import annotations

import pytest

from ciliary.cachestats import BoundedSet, CacheStats, env_cap


def test_bounded_set_forgets_the_oldest_and_counts_it() -> None:
    seen = BoundedSet(3)
    assert [seen.add(x) for x in ("a", "b", "c", "a")] == [True, True, True, False]
    assert seen.add("d")  # full: "a" (the oldest) goes
    assert list(seen) == ["b", "c", "d"] and len(seen) == 3 and seen.evicted == 1
    assert "a" not in seen and seen.add("a")  # forgotten, so new again
    assert len(seen) == 3 and seen.evicted == 2
    seen.discard("c")
    assert list(seen) == ["d", "a"]
    for i in range(100):
        seen.add(i)
    assert len(seen) == 3 and seen.evicted == 2 + 99


def test_bounded_set_refuses_a_cap_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BoundedSet(0)


def test_cache_stats_snapshot_at_call_time_and_published_in_detail() -> None:
    table: dict[str, int] = {}
    capped = BoundedSet(2)
    stats = CacheStats()
    stats.register("table", lambda: len(table))
    stats.register("capped", lambda: len(capped), capped.cap, lambda: capped.evicted)
    assert stats.stats() == {"capped": {"size": 0, "evicted": 0, "cap": 2}, "table": {"size": 0, "evicted": 0}}
    table.update(a=1, b=2)
    for x in "xyz":
        capped.add(x)
    detail: dict[str, object] = {}
    stats.publish(detail)
    assert detail["caches"] == {"capped": {"size": 2, "evicted": 1, "cap": 2}, "table": {"size": 2, "evicted": 0}}


def test_env_cap_takes_a_positive_integer_else_the_default(caplog: pytest.LogCaptureFixture) -> None:
    assert env_cap("CILIARY_X_MAX", 7, env={}) == 7
    assert env_cap("CILIARY_X_MAX", 7, env={"CILIARY_X_MAX": "12"}) == 12
    for bad in ("0", "-3", "many", "1.5"):
        assert env_cap("CILIARY_X_MAX", 7, env={"CILIARY_X_MAX": bad}) == 7
    assert "CILIARY_X_MAX" in caplog.text
