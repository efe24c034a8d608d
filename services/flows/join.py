"""The join of L7 spans with the L3/L4 flows of the same connection (pure).

Invariants:
- A connection is named by its client socket (client IP, client port) and protocol TCP:
  for a flow that is not a reply, its source; for a reply, its destination. This is the
  side the datapath's service translation never rewrites, so the key is the same before
  and after translation. A sidecar span names that socket itself: an inbound span's
  downstream remote address, an outbound span's upstream local address (Envoy's own
  socket towards the upstream).
- A span joins the flows of its key seen from ``WINDOW_BEFORE_NS`` before its start to
  ``WINDOW_AFTER_NS`` after its end (a kept-alive connection's flows precede its
  requests); flows arriving after the span are joined when they arrive.
- Memory is bounded: at most ``max_keys`` connections and ``max_flows`` flows held in all
  (least recently seen connections dropped first, counted in ``evicted_keys``),
  ``PER_KEY`` flows per connection, and ``max_traces`` flow→trace entries.
- Flows joined later add to what a span already has (flow uuids, policies; a drop stays
  the verdict; the node and identities are kept unless the new flows name them).
- A flow's trace id is Hubble's ``trace_context.parent.trace_id``; a span gains the flow's
  verdict, identities, workloads, the policies that decided and the node, from the
  flow that decided (a policy verdict or a drop first, else the newest); the node is the
  sidecar's: where the connection leaves the client (outbound) or reaches the server
  (inbound).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from ciliary import schema
from ciliary.hubble import flow_time_ns

WINDOW_BEFORE_NS = 120 * 10**9
WINDOW_AFTER_NS = 10 * 10**9
PER_KEY = 16
DEFAULT_MAX_KEYS = 65536
DEFAULT_MAX_TRACES = 65536
DEFAULT_MAX_FLOWS = 16384  # four flow rings' worth (Hubble's 4095 per node)

Key = tuple[str, int]


def split_address(address: str) -> Key | None:
    """``10.1.0.5:41234`` or ``[fd00::1]:80`` -> (ip, port); None when not ip:port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def flow_key(flow: schema.Flow) -> Key | None:
    if flow.ip is None or flow.l4 is None or flow.l4.TCP is None:
        return None
    reply = flow.is_reply if flow.is_reply is not None else flow.reply
    if reply:
        return flow.ip.destination, flow.l4.TCP.destination_port
    return flow.ip.source, flow.l4.TCP.source_port


def span_key(span: schema.L7Span) -> Key | None:
    if span.direction == "inbound" or (not span.direction and span.kind == "SERVER"):
        return split_address(span.downstream_remote_address)
    return split_address(span.upstream_local_address)


def _deciding(flows: list[schema.Flow]) -> schema.Flow:
    for flow in reversed(flows):
        if flow.verdict == "DROPPED" or flow.egress_denied_by or flow.ingress_denied_by:
            return flow
    for flow in reversed(flows):
        if flow.egress_allowed_by or flow.ingress_allowed_by:
            return flow
    return flows[-1]


def _workload(endpoint: schema.FlowEndpoint | None) -> str:
    if endpoint is None or not endpoint.pod_name:
        return ""
    return f"{endpoint.namespace}/{endpoint.pod_name}"


def joined_span(span: schema.L7Span, flows: list[schema.Flow]) -> schema.L7Span:
    """``span`` with the join's fields taken from ``flows`` (same connection)."""
    decider = _deciding(flows)
    policies = sorted({*span.policies, *(f"{p.namespace}/{p.name}" if p.namespace else p.name
                                         for f in flows for p in (*f.egress_allowed_by, *f.ingress_allowed_by,
                                                                  *f.egress_denied_by, *f.ingress_denied_by))})
    forward = [f for f in flows if not (f.is_reply if f.is_reply is not None else f.reply)] or flows
    src = next((f.source for f in forward if f.source is not None and f.source.identity), None)
    dst = next((f.destination for f in forward if f.destination is not None and f.destination.identity), None)
    uuids = list(dict.fromkeys([*span.flow_uuids, *(f.uuid for f in flows if f.uuid)]))
    # the node of the sidecar: where the flow leaves the client (outbound) or reaches the server
    point = "TO_ENDPOINT" if span.direction == "inbound" else "FROM_ENDPOINT"
    node = next((f.node_name for f in forward if f.trace_observation_point == point),
                span.node or decider.node_name)
    verdict = span.verdict if span.verdict == "DROPPED" else decider.verdict
    return schema.msgspec.structs.replace(
        span, joined=True, flow_uuids=uuids, verdict=verdict,
        source_identity=src.identity if src else span.source_identity,
        destination_identity=dst.identity if dst else span.destination_identity,
        source_workload=_workload(src) or span.source_workload,
        destination_workload=_workload(dst) or span.destination_workload,
        policies=policies, node=node,
    )


class JoinIndex:
    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS, max_traces: int = DEFAULT_MAX_TRACES,
                 max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        self.max_keys = max_keys
        self.max_traces = max_traces
        self.max_flows = max_flows
        self.held = 0  # flows in every connection's ring
        self.evicted_keys = 0
        self._flows: OrderedDict[Key, deque[tuple[int, schema.Flow]]] = OrderedDict()
        self._spans: OrderedDict[Key, list[schema.L7Span]] = OrderedDict()
        self.trace_of_flow: OrderedDict[str, str] = OrderedDict()  # flow uuid -> trace id
        self.flows_of_trace: dict[str, list[schema.Flow]] = {}
        self.new_links: list[tuple[schema.Flow, str]] = []  # (flow, trace id) since last drained

    def _remember_trace(self, flows: list[schema.Flow], trace_id: str) -> None:
        held = self.flows_of_trace.setdefault(trace_id, [])
        for flow in flows:
            if flow.uuid and flow.uuid not in self.trace_of_flow:
                self.trace_of_flow[flow.uuid] = trace_id
                held.append(flow)
                self.new_links.append((flow, trace_id))
        while len(self.trace_of_flow) > self.max_traces:
            uuid, old_trace = self.trace_of_flow.popitem(last=False)
            kept = [f for f in self.flows_of_trace.get(old_trace, []) if f.uuid != uuid]
            if kept:
                self.flows_of_trace[old_trace] = kept
            else:
                self.flows_of_trace.pop(old_trace, None)

    def add_flows(self, flows: list[schema.Flow], times: Sequence[int] | None = None,
                  ) -> list[tuple[schema.L7Span, schema.L7Span]]:
        """Index flows (``times``: their unix ns when known, else read from each flow);
        returns (old, joined) for every held span a new flow joins."""
        updates: list[tuple[schema.L7Span, schema.L7Span]] = []
        touched: dict[Key, list[tuple[int, schema.Flow]]] = {}
        for i, flow in enumerate(flows):
            key = flow_key(flow)
            if key is None:
                continue
            ring = self._flows.get(key)
            if ring is None:
                ring = self._flows[key] = deque(maxlen=PER_KEY)
            else:
                self._flows.move_to_end(key)
            timed = (flow_time_ns(flow) if times is None else times[i], flow)
            if len(ring) < PER_KEY:
                self.held += 1
            ring.append(timed)
            while len(self._flows) > self.max_keys or self.held > self.max_flows:
                _, dropped = self._flows.popitem(last=False)
                self.held -= len(dropped)
                self.evicted_keys += 1
            touched.setdefault(key, []).append(timed)
        for key, new in touched.items():
            spans = self._spans.get(key)
            if not spans:
                continue
            for i, span in enumerate(spans):
                hits = [f for t, f in new if span.start_ns - WINDOW_BEFORE_NS <= t
                        <= span.end_ns + WINDOW_AFTER_NS]
                if hits:
                    joined = joined_span(span, hits)
                    self._remember_trace(hits, span.trace_id)
                    spans[i] = joined
                    updates.append((span, joined))
        return updates

    def join_span(self, span: schema.L7Span) -> schema.L7Span:
        """The span joined with the flows already held for its connection (or unchanged),
        held for flows still to come."""
        key = span_key(span)
        if key is None:
            return span
        ring = self._flows.get(key, ())
        hits = [f for t, f in ring if span.start_ns - WINDOW_BEFORE_NS <= t <= span.end_ns + WINDOW_AFTER_NS]
        out = joined_span(span, hits) if hits else span
        if hits:
            self._remember_trace(hits, span.trace_id)
        held = self._spans.setdefault(key, [])
        held.append(out)
        del held[:-PER_KEY]
        self._spans.move_to_end(key)
        while len(self._spans) > self.max_keys:
            self._spans.popitem(last=False)
        return out
