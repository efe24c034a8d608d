"""Recent flows per node: fixed-size rings and Hubble-style queries over them (pure).

Invariants:
- Each node has its own ring of at most ``capacity`` flows (Hubble's default 4095); the
  oldest flow is overwritten first and counted in ``overwritten``.
- ``query`` returns flows oldest first: those matching the whitelist/blacklist filters
  and ``since <= time <= until``, then the first or last ``number`` of them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from ciliary import flowfilter, schema
from ciliary.flowrender import flow_time_ns


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


class FlowStore:
    """One ring per ``<cluster>/<node>``."""

    def __init__(self, capacity: int = schema.FLOWS_RING_CAPACITY) -> None:
        self.capacity = capacity
        self.rings: dict[str, FlowRing] = {}
        self.seen = 0

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

    def query(self, q: schema.FlowQuery) -> list[schema.Flow]:
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
            return [f for _, f in merged]
        if q.first:
            out = []
            for _, f in merged:
                out.append(f)
                if len(out) >= q.number:
                    break
            return out
        last: deque[schema.Flow] = deque(maxlen=q.number)
        for _, f in merged:
            last.append(f)
        return list(last)
