"""The flows service's L7 side: spans from the OTLP receiver, joined, stored, counted (no I/O).

Invariants:
- ``accept`` takes the spans of one accepted OTLP request: each is joined with the flows
  of its connection held so far, stored, and counted in the HTTP metrics once.
- ``on_flows`` is called with every ingested flow batch: the flows are indexed for the
  join, and held spans they complete are replaced by their joined copies.
- ``drain_links`` hands out each new flow→trace link once (the caller marks the stored
  flows with it).
- The join holds at most ``CILIARY_FLOWS_JOIN_MAX_FLOWS`` flows (default 16384, least
  recently seen connections dropped first); ``stats()["join"]`` reports its size, cap and
  evicted connections.
- ``query`` answers an ``L7Query`` payload; a payload that does not decode is one
  ``ok=False`` reply. A trace's answer carries the flows joined to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from ciliary import schema
from ciliary.cachestats import env_cap

from .join import DEFAULT_MAX_FLOWS, JoinIndex
from .l7store import DEFAULT_CAPACITY, L7Metrics, L7Store

ENV_JOIN_MAX_FLOWS = "CILIARY_FLOWS_JOIN_MAX_FLOWS"


class L7Core:
    def __init__(self, resolve: Callable[[str], str] = lambda _ip: "",
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.store = L7Store(capacity)
        self.metrics = L7Metrics()
        self.join = JoinIndex(max_flows=env_cap(ENV_JOIN_MAX_FLOWS, DEFAULT_MAX_FLOWS))
        self.resolve = resolve
        self.accepted = 0
        self.rejected = 0

    def accept(self, spans: list[schema.L7Span]) -> None:
        joined = [self.join.join_span(span) for span in spans]
        self.store.add(joined)
        self.metrics.count(joined, self.resolve)
        self.accepted += len(joined)

    def on_flows(self, flows: list[schema.Flow], times: Sequence[int] | None = None) -> None:
        """``times``: each flow's time (unix ns) when the caller has it, else read from the flow."""
        for old, new in self.join.add_flows(flows, times):
            self.store.replace(old, new)

    def drain_links(self) -> dict[tuple[str, str], set[str]]:
        """Flows linked to a trace since the last call: {(node, trace id): flow uuids}."""
        out: dict[tuple[str, str], set[str]] = {}
        for flow, trace_id in self.join.new_links:
            out.setdefault((flow.node_name, trace_id), set()).add(flow.uuid)
        self.join.new_links.clear()
        return out

    def trace_of_flow(self, uuid: str) -> str:
        return self.join.trace_of_flow.get(uuid, "")

    def query(self, data: bytes) -> schema.L7QueryReply:
        try:
            q = schema.decode(data, schema.L7Query)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            return schema.L7QueryReply(ok=False, error=str(err))
        spans = self.store.query(q)
        flows = [schema.encode(f) for f in self.join.flows_of_trace.get(q.trace_id.lower(), [])] \
            if q.trace_id else []
        return schema.L7QueryReply(spans=spans, flows=flows)

    def stats(self) -> dict[str, int]:
        return {"accepted": self.accepted, "stored": len(self.store), "overwritten": self.store.overwritten,
                "joined": sum(1 for s in self.store.recent() if s.joined),
                "join": self.join_stats()}

    def join_stats(self) -> dict[str, int]:
        """Flows the join holds, its cap, connections it dropped to stay within it."""
        return {"size": self.join.held, "cap": self.join.max_flows, "evicted": self.join.evicted_keys}
