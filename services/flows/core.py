"""The flows service's core: everything between the bus and the stores, without I/O.

Invariants:
- ``FlowsCore.ingest`` never raises on a payload: what does not decode is counted in
  ``hubble_lost_events_total{source="decode"}``, the events of batches missing from a
  node's run (``losses.LossLedger``) under ``source="bus"`` (while the service ran) or
  ``source="observer_events_queue"`` (published while it was not running), the node
  ring buffer's own losses under ``source="perf_event_ring_buffer"``. Every count also
  becomes a ``LostEvent`` record (the newest ``LOST_EVENTS_KEPT`` are kept) that query
  answers carry when it falls within their time span.
- Every sequenced batch leaves at least one ``FlowBatch`` message with its position
  (``publish_payloads``), empty when none of its flows can be sent, so the ``FLOWS``
  stream's last message of a node is always the last position this service stored.
- Replies are built as chunks of at most the bus's maximum message size
  (``wire.reply_chunks``); a query that fails validation is one ``ok=False`` reply.
- Stream flows merged into an answer are decoded ``ANSWER_DECODE_FLOWS`` at a time, as the
  chunks are taken, so a large history answer never holds every decoded flow at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from ciliary import flowfilter, schema

from .decode import decode_batch
from .enrich import EnrichmentState
from .history import Entry, StreamScan, answer_entries, decode_entries, needs_stream
from .http import Handler, Response
from .losses import LossLedger
from .metrics import LOST_DECODE, LOST_PUBLISH, LOST_RING_BUFFER, FlowMetrics
from .names import EndpointNameCache
from .servicemap import build_service_map
from .store import FlowStore
from .ui import PAGE
from .wire import flow_batches, reply_chunks

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's default, when the server did not say
ANSWER_DECODE_FLOWS = 8 * 512  # stream flows decoded at once while an answer is sent
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOST_EVENTS_KEPT = 1024  # newest LostEvent records kept for query answers


class QueryPlan(msgspec.Struct):
    """A decoded query, the rings' part of its answer and whether the stream is needed."""

    query: schema.FlowQuery
    ring: list[tuple[int, schema.Flow]]  # (time ns, flow), oldest first
    horizon_ns: int
    stream: bool


@dataclass
class Ingested:
    """One raw batch after ingest: its node (``<cluster>/<node>``), the flows made of it
    with their times (unix ns, same order), and its position in its executor run."""

    node: str
    times: list[int]
    flows: list[schema.Flow]
    position: schema.BatchPosition | None  # None: the batch is not sequenced


def answer_span(query: schema.FlowQuery, entries: list[Entry]) -> tuple[int, int]:
    """The time span (unix ns, 0 = unbounded) an answer covers: the query's, narrowed to
    the flows returned when ``number`` cut it (from the oldest of the last ``number``, up
    to the newest of the first ``number``)."""
    since, until = query.since_ns, query.until_ns
    if query.number > 0 and len(entries) >= query.number:
        if query.first:
            until = entries[-1][0]
        else:
            since = entries[0][0]
    return since, until


class FlowsCore:
    """Everything the service does between the bus and the stores (no I/O)."""

    def __init__(self, cluster: str, capacity: int = schema.FLOWS_RING_CAPACITY,
                 names: EndpointNameCache | None = None) -> None:
        self.cluster = cluster
        self.names = names if names is not None else EndpointNameCache()
        self.enrichment = EnrichmentState(cluster, self.names)
        self.store = FlowStore(capacity)
        self.metrics = FlowMetrics()
        self.lost = 0
        self.ledger = LossLedger()
        self.missed_batches = 0
        self.lost_events: deque[schema.LostEvent] = deque(maxlen=LOST_EVENTS_KEPT)

    def ingest(self, data: bytes) -> list[schema.Flow]:
        """Decode, enrich, store and count one ``RawEventBatch`` payload."""
        return self.ingest_timed(data)[1]

    def ingest_timed(self, data: bytes) -> tuple[list[int], list[schema.Flow]]:
        """``ingest``, with each flow's time (unix ns, same order) as the store holds it."""
        batch = self.decode_raw(data)
        if batch is None:
            return [], []
        got = self.ingest_raw(batch)
        return got.times, got.flows

    def decode_raw(self, data: bytes) -> schema.RawEventBatch | None:
        """The ``RawEventBatch`` of a payload; ``None`` (counted as lost) if it is not one."""
        try:
            return schema.decode(data, schema.RawEventBatch)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.count_lost(LOST_DECODE, 1)
            return None

    def ingest_raw(self, batch: schema.RawEventBatch) -> Ingested:
        """Account, decode, enrich, store and count one raw batch."""
        node = f"{batch.cluster}/{batch.node}"
        gap = self.ledger.account(node, batch)
        if gap.events or gap.ring_lost:
            self.missed_batches += gap.batches
            self.count_lost(gap.source, gap.events, node)
            self.count_lost(LOST_RING_BUFFER, gap.ring_lost, node)
        result = decode_batch(batch, self.enrichment, self.names)
        self.count_lost(LOST_RING_BUFFER, batch.lost, node)
        self.count_lost(LOST_DECODE, result.undecodable, node)
        if result.flows:
            self.store.add_batch(node, result.times, result.flows)
            self.metrics.process_many(result.flows)
        position = self.ledger.positions.get(node) if batch.seq > 0 and batch.run > 0 else None
        return Ingested(node, result.times, result.flows, position)

    def count_lost(self, source: str, events: int, node: str = "") -> None:
        """Count ``events`` lost under ``source`` and keep a ``LostEvent`` record of them."""
        if events <= 0:
            return
        self.metrics.lost(source, events)
        self.lost += events
        self.lost_events.append(schema.LostEvent(source=source.upper(), num_events_lost=events,
                                                 node_name=node, time_ns=time.time_ns()))

    def lost_by_source(self) -> dict[str, int]:
        """``hubble_lost_events_total`` by source (for the health detail)."""
        return {dict(labels)["source"]: int(value) for labels, value in
                self.metrics.counters["hubble_lost_events_total"].items()}

    def publish_payloads(self, flows: list[schema.Flow], limit: int,
                         position: schema.BatchPosition | None = None) -> list[bytes]:
        """``FlowBatch`` messages for one ingested batch (all flows of one node), each with
        the batch's ``position``; a flow too large for any message is counted in
        ``hubble_lost_events_total{source="publish"}``. With a position there is always at
        least one message (empty when no flow can be sent)."""
        out = flow_batches(flows, limit or DEFAULT_MAX_PAYLOAD, position)
        self.count_lost(LOST_PUBLISH, out.too_large, flows[0].node_name if flows else "")
        if position is not None and not out.messages:
            return [schema.encode(schema.FlowBatch(position=position))]
        return out.messages

    def lost_events_between(self, since_ns: int, until_ns: int) -> list[schema.LostEvent]:
        """The kept ``LostEvent`` records noticed in ``[since_ns, until_ns]`` (0: unbounded)."""
        return [e for e in self.lost_events
                if (not since_ns or e.time_ns >= since_ns) and (not until_ns or e.time_ns <= until_ns)]

    def query(self, data: bytes) -> schema.FlowQueryReply:
        """The whole answer to a ``FlowQuery`` payload as one record (see ``query_chunks``)."""
        try:
            q = schema.decode(data, schema.FlowQuery)
            flowfilter.validate([*q.whitelist, *q.blacklist])
            flows = self.store.query(q)
        except (msgspec.DecodeError, msgspec.ValidationError, flowfilter.FilterError) as err:
            return schema.FlowQueryReply(ok=False, error=str(err))
        return schema.FlowQueryReply(
            flows=flows, seen=self.store.seen, capacity=self.store.capacity, lost=self.lost,
            lost_events=self.lost_events_between(q.since_ns, q.until_ns),
        )

    def plan_query(self, data: bytes, *, history: bool = True) -> QueryPlan | schema.FlowQueryReply:
        """The rings' part of a ``FlowQuery`` payload's answer and whether the ``FLOWS``
        stream must be read too (never without ``history``); an ``ok=False`` reply for a
        bad query."""
        try:
            q = schema.decode(data, schema.FlowQuery)
            flowfilter.validate([*q.whitelist, *q.blacklist])
            ring = self.store.query_timed(q)
        except (msgspec.DecodeError, msgspec.ValidationError, flowfilter.FilterError) as err:
            return schema.FlowQueryReply(ok=False, error=str(err))
        horizon = self.store.horizon_ns()
        return QueryPlan(q, ring, horizon, history and needs_stream(q, ring, horizon))

    def answer_chunks(self, plan: QueryPlan, limit: int, stream: StreamScan | None = None, *,
                      first_chunk: int = 0, notice: str = "") -> Iterator[bytes]:
        """``FlowQueryReply`` chunks of a planned query's answer, the stream part merged in;
        stream flows are decoded ``ANSWER_DECODE_FLOWS`` at a time, as the chunks are taken."""
        if stream is None:
            entries: list[Entry] = [(t, f.uuid, f) for t, f in plan.ring]
            scanned, truncated = 0, False
        else:
            entries = answer_entries(stream.entries(), plan.ring, plan.query)
            scanned, truncated = stream.scanned, stream.truncated
        lost_events = self.lost_events_between(*answer_span(plan.query, entries))
        step = ANSWER_DECODE_FLOWS
        parts = [entries[i:i + step] for i in range(0, len(entries), step)] or [[]]
        chunk = first_chunk
        for i, part in enumerate(parts):
            chunks = reply_chunks(decode_entries(part), limit or DEFAULT_MAX_PAYLOAD, seen=self.store.seen,
                                  capacity=self.store.capacity, lost=self.lost, first_chunk=chunk,
                                  scanned=scanned, truncated=truncated, notice=notice,
                                  final=i == len(parts) - 1, lost_events=lost_events)
            chunk += len(chunks)
            yield from chunks

    def query_chunks(self, data: bytes, limit: int) -> list[bytes]:
        """The answer to a ``FlowQuery`` payload as ``FlowQueryReply`` chunks of at most
        ``limit`` bytes each (``wire.reply_chunks``); an error is one ``ok=False`` chunk."""
        reply = self.query(data)
        if not reply.ok:
            return [schema.encode(reply)]
        return reply_chunks(reply.flows, limit or DEFAULT_MAX_PAYLOAD, seen=reply.seen,
                            capacity=reply.capacity, lost=reply.lost, lost_events=reply.lost_events)

    def service_map(self, since_ns: int = 0, now_ns: int = 0) -> dict[str, Any]:
        flows = self.store.query(schema.FlowQuery(since_ns=since_ns, number=0))
        return build_service_map(flows, since_ns=since_ns, now_ns=now_ns,
                                 seen=self.store.seen, lost=self.lost, local_cluster=self.cluster)

    def http_routes(self, *, metrics: bool = True, ui: bool = True) -> dict[str, Handler]:
        """The HTTP routes of the metrics and/or service map server."""
        routes: dict[str, Handler] = {}
        if metrics:
            routes["/metrics"] = lambda _q: Response(self.metrics.render().encode(), METRICS_CONTENT_TYPE)
        if ui:
            page = PAGE.encode()
            routes["/"] = routes["/index.html"] = lambda _q: Response(page, "text/html; charset=utf-8")
            routes["/api/servicemap"] = self._servicemap_handler
            routes["/healthz"] = lambda _q: Response(b"ok\n")
        return routes

    def _servicemap_handler(self, query: dict[str, str]) -> Response:
        now = time.time_ns()
        since = query.get("since", "")
        try:
            since_ns = flowfilter.parse_time_arg(since, now) if since else 0
        except flowfilter.FilterError as err:
            raise ValueError(str(err)) from err
        body = msgspec.json.encode(self.service_map(since_ns, now))
        return Response(body, "application/json")
