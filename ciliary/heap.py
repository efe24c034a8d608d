"""The cyclic garbage collector in a long-running service: its pauses measured, and the
long-lived state kept out of its way.

A service that holds a large table (the node executor's desired map rows, the policy and
identity models) pays for it in every full (generation 2) collection: CPython walks every
tracked object: ~97 ms beside the node executor's table at 10,000 services
(bench/node_memory.py). Such a
collection starts whenever enough new objects have survived, so it lands at random on the
path of one change and makes that change's tail.

Invariants:
- Only a service's own process manages its heap (``manage_process_heap``, called by the
  service shell); elsewhere ``freezer()`` is None and nothing here touches the collector.
- ``GcPauses`` is the only ``gc.callbacks`` entry this module installs, once per process;
  it counts collections and their pause per generation (``snapshot()`` is what the health
  detail carries under ``gc``; ``healthmetrics`` turns it into
  ``ciliary_gc_collections_total`` / ``ciliary_gc_pause_seconds_total`` /
  ``ciliary_gc_pause_seconds_max``).
- ``HeapFreezer.settled()`` (called when a pass has written its result) moves every object
  alive at that moment to the permanent generation (``gc.freeze``, O(1)); later collections
  walk only what was allocated since. Reference counting still frees frozen objects; only
  a cycle among them waits for ``collect_if_due``.
- ``HeapFreezer.collect_if_due()`` unfreezes and runs one full collection when the frozen
  heap has grown by ``GROWTH`` since the last one and at least ``MIN_INTERVAL_S`` have
  passed (the growth is counted at most once per ``MIN_INTERVAL_S``: counting walks the
  frozen objects); callers run it when their inputs are quiet, so the one long pause falls outside
  the path of a change. Nothing is ever frozen for longer than ``MAX_INTERVAL_S``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

GROWTH = 0.25  # frozen objects grown by this share since the last full collection
MIN_INTERVAL_S = 60.0
MAX_INTERVAL_S = 600.0


class GcPauses:
    """Collections and their pause per generation, measured with ``gc.callbacks``."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        self.collections = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_pause_s = [0.0, 0.0, 0.0]

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        generation = int(info.get("generation", 2))
        pause = self._clock() - self._started
        self.collections[generation] += 1
        self.pause_s[generation] += pause
        if pause > self.max_pause_s[generation]:
            self.max_pause_s[generation] = pause

    def snapshot(self) -> dict[str, Any]:
        """The health detail's ``gc``: per generation, collections, total and longest pause (ms)."""
        return {
            "collections": list(self.collections),
            "pause_ms_total": [round(s * 1000, 3) for s in self.pause_s],
            "pause_ms_max": [round(s * 1000, 3) for s in self.max_pause_s],
        }


_installed: GcPauses | None = None


def manage_process_heap() -> GcPauses:
    """Called by the service shell (``ciliary.runtime``) in a service's own process: the
    process's ``GcPauses`` (installed on the first call), and from then on ``freezer()``
    gives loops a ``HeapFreezer``."""
    global _installed
    if _installed is None:
        _installed = GcPauses()
        gc.callbacks.append(_installed.callback)
    return _installed


def freezer() -> HeapFreezer | None:
    """A ``HeapFreezer`` in a service's own process; None elsewhere (a test process that
    builds a service must not freeze its heap)."""
    return HeapFreezer() if _installed is not None else None


class HeapFreezer:
    """Keeps a service's long-lived state in the permanent generation (see the module
    docstring). ``clock`` is injectable for tests."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._last_full = self._last_check = clock()
        self._frozen_after_full = gc.get_freeze_count()
        self.full_collections = 0

    def settled(self) -> None:
        """A pass has written its result: what is alive now is long-lived."""
        gc.freeze()

    def due(self) -> bool:
        """Whether a full collection is due. Counting the frozen objects walks them all
        (``gc.get_freeze_count`` is O(n)), so the growth is looked at once per
        ``MIN_INTERVAL_S`` at most; every other call is a clock read."""
        now = self._clock()
        if now - self._last_full >= MAX_INTERVAL_S:
            return True
        if now - self._last_check < MIN_INTERVAL_S:
            return False
        self._last_check = now
        grown = gc.get_freeze_count() - self._frozen_after_full
        return grown > GROWTH * max(self._frozen_after_full, 10_000)

    def collect_if_due(self) -> bool:
        """One full collection over everything when due (inputs quiet); True if it ran."""
        if not self.due():
            return False
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._last_full = self._last_check = self._clock()
        self._frozen_after_full = gc.get_freeze_count()
        self.full_collections += 1
        return True
