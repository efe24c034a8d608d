"""ciliary.heap: collector pauses counted per generation; the freezer's schedule."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from ciliary import heap


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()  # what earlier tests froze would count as this test's heap
    yield
    gc.unfreeze()


def test_pauses_are_counted_per_generation_with_the_longest() -> None:
    now = [0.0]
    pauses = heap.GcPauses(clock=lambda: now[0])
    for generation, seconds in ((0, 0.001), (2, 0.040), (0, 0.003), (2, 0.010)):
        pauses.callback("start", {"generation": generation})
        now[0] += seconds
        pauses.callback("stop", {"generation": generation})
    snap = pauses.snapshot()
    assert snap["collections"] == [2, 0, 2]
    assert snap["pause_ms_total"] == [4.0, 0.0, 50.0]
    assert snap["pause_ms_max"] == [3.0, 0.0, 40.0]


def test_pause_counter_sees_a_real_collection() -> None:
    pauses = heap.GcPauses()
    gc.callbacks.append(pauses.callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(pauses.callback)
    assert pauses.collections[2] == 1 and pauses.max_pause_s[2] > 0


def test_settled_freezes_what_is_alive_and_a_due_collection_unfreezes_it() -> None:
    now = [1000.0]
    freezer = heap.HeapFreezer(clock=lambda: now[0])
    table = [[i] for i in range(50_000)]  # long-lived, tracked objects
    freezer.settled()
    assert gc.get_freeze_count() >= len(table)
    assert not freezer.due()  # grown, but not for MIN_INTERVAL_S yet
    now[0] += heap.MIN_INTERVAL_S
    assert freezer.collect_if_due() and freezer.full_collections == 1
    assert gc.get_freeze_count() >= len(table)  # frozen again after the collection
    now[0] += heap.MIN_INTERVAL_S
    assert not freezer.due()  # nothing grew since: not due before MAX_INTERVAL_S
    more = [[i] for i in range(gc.get_freeze_count() // 3 + 10_000)]  # grown by more than GROWTH
    freezer.settled()
    now[0] += 1.0
    assert not freezer.due()  # grown, but the growth was looked at less than MIN_INTERVAL_S ago
    now[0] += heap.MIN_INTERVAL_S
    assert freezer.due() and more
    now[0] += heap.MAX_INTERVAL_S
    assert freezer.collect_if_due()


def test_a_cycle_frozen_with_the_heap_is_reclaimed_by_the_due_collection() -> None:
    now = [0.0]
    freezer = heap.HeapFreezer(clock=lambda: now[0])

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # type: ignore[attr-defined]
    ref = weakref.ref(cycle)
    freezer.settled()
    del cycle
    gc.collect()
    assert ref() is not None  # frozen: ordinary collections skip it
    now[0] += heap.MAX_INTERVAL_S
    assert freezer.collect_if_due()
    assert ref() is None


def test_no_freezer_outside_a_service_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_installed", None)
    assert heap.freezer() is None
