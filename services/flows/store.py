"""Recent flows per node: fixed-size rings and Hubble-style queries over them (pure).

Invariants:
- Each node has its own ring of at most ``capacity`` flows (Hubble's default 4095); the
  oldest flow is overwritten first and counted in ``overwritten``.
- ``set_trace`` rewrites held flows only to add their trace context (the join); the ring's
  order, times and counts never change.
- ``query`` returns flows oldest first: those matching the whitelist/blacklist filters
  and ``since <= time <= until``, then the first or last ``number`` of them.
- ``horizon_ns`` is the time from which on the rings hold every flow the service has
  stored (assuming each node's flows arrive in time order; a flow overwritten with
  exactly the horizon's time is the one exception): 0 while no ring has overwritten
  anything and no history predates the store (``history_before``), else the oldest flow
  of the latest-starting incomplete ring (``NO_HORIZON`` when history predates the store
  and no ring has flows yet). Older flows are only in the ``FLOWS`` stream (``history.py``).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

import msgspec

from ciliary import flowfilter, schema
from ciliary.hubble import flow_time_ns

NO_HORIZON = 1 << 62  # the rings cover no time range at all


class FlowRing:
    """A bounded ring of (time ns, flow), in arrival order."""

    def __init__(self, capacity: int = schema.FLOWS_RING_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("ring capacity must be at least 1")
        self.capacity = capacity
        self._ring: deque[tuple[int, schema.Flow]] = deque(maxlen=capacity)
        self.written = 0

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def overwritten(self) -> int:
        return self.written - len(self._ring)

    def add(self, flow: schema.Flow, time_ns: int | None = None) -> None:
        self._ring.append((flow_time_ns(flow) if time_ns is None else time_ns, flow))
        self.written += 1

    def extend(self, times: Iterable[int], flows: Sequence[schema.Flow]) -> None:
        """Add flows in order with their times (unix ns)."""
        self._ring.extend(zip(times, flows, strict=True))
        self.written += len(flows)

    def __iter__(self) -> Iterator[tuple[int, schema.Flow]]:
        return iter(self._ring)

    @property
    def oldest_ns(self) -> int:
        """Time of the oldest flow held (0 when empty)."""
        return self._ring[0][0] if self._ring else 0


class FlowStore:
    """One ring per ``<cluster>/<node>``."""

    def __init__(self, capacity: int = schema.FLOWS_RING_CAPACITY) -> None:
        self.capacity = capacity
        self.rings: dict[str, FlowRing] = {}
        self.seen = 0
        self.history_before = False  # flows older than this store exist elsewhere (a restart)

    def add(self, flow: schema.Flow, time_ns: int | None = None) -> None:
        ring = self.rings.get(flow.node_name)
        if ring is None:
            ring = self.rings[flow.node_name] = FlowRing(self.capacity)
        ring.add(flow, time_ns)
        self.seen += 1

    def extend(self, flows: Iterable[schema.Flow]) -> None:
        for flow in flows:
            self.add(flow)

    def add_batch(self, node_name: str, times: Sequence[int], flows: Sequence[schema.Flow]) -> None:
        """Flows of one node (``node_name`` = their ``<cluster>/<node>``), oldest first."""
        ring = self.rings.get(node_name)
        if ring is None:
            ring = self.rings[node_name] = FlowRing(self.capacity)
        ring.extend(times, flows)
        self.seen += len(flows)

    def __len__(self) -> int:
        return sum(len(r) for r in self.rings.values())

    def set_trace(self, node_name: str, uuids: set[str], trace_id: str) -> int:
        """Give the held flows ``uuids`` of one node's ring Hubble's
        ``trace_context.parent.trace_id`` (the join with L7 spans); how many were found."""
        ring = self.rings.get(node_name)
        if ring is None or not uuids:
            return 0
        context = schema.FlowTraceContext(parent=schema.FlowTraceParent(trace_id=trace_id))
        found = 0
        entries = ring._ring
        for i in range(len(entries) - 1, -1, -1):
            t, flow = entries[i]
            if flow.uuid in uuids:
                entries[i] = (t, msgspec.structs.replace(flow, trace_context=context))
                found += 1
                if found == len(uuids):
                    break
        return found

    def horizon_ns(self) -> int:
        """From this time on the rings hold every flow (see the module invariants)."""
        incomplete = [r.oldest_ns for r in self.rings.values()
                      if len(r) and (r.overwritten or self.history_before)]
        if incomplete:
            return max(incomplete)
        return NO_HORIZON if self.history_before else 0

    def query(self, q: schema.FlowQuery) -> list[schema.Flow]:
        return [f for _, f in self.query_timed(q)]

    def query_timed(self, q: schema.FlowQuery) -> list[tuple[int, schema.Flow]]:
        """``query`` with each flow's time (unix ns)."""
        def matching(ring: FlowRing) -> Iterator[tuple[int, schema.Flow]]:
            for t, flow in ring:
                if q.since_ns and t < q.since_ns:
                    continue
                if q.until_ns and t > q.until_ns:
                    continue
                if flowfilter.matches(flow, q.whitelist, q.blacklist):
                    yield t, flow

        merged = heapq.merge(*(matching(r) for r in self.rings.values()), key=lambda item: item[0])
        if q.number <= 0:
            return list(merged)
        if q.first:
            out = []
            for item in merged:
                out.append(item)
                if len(out) >= q.number:
                    break
            return out
        return list(deque(merged, maxlen=q.number))
