"""The flows service's core: everything between the bus and the stores, without I/O.

Invariants:
- ``FlowsCore.ingest`` never raises on a payload: what does not decode is counted in
  ``hubble_lost_events_total{source="decode"}``, batches missing from a node's sequence
  under ``source="bus"``, the node ring buffer's own losses under
  ``source="perf_event_ring_buffer"``.
- Replies are built as chunks of at most the bus's maximum message size
  (``wire.reply_chunks``); a query that fails validation is one ``ok=False`` reply.
- Stream flows merged into an answer are decoded ``ANSWER_DECODE_FLOWS`` at a time, as the
  chunks are taken, so a large history answer never holds every decoded flow at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec

from ciliary import flowfilter, schema

from .decode import decode_batch
from .enrich import EnrichmentState
from .history import Entry, StreamScan, answer_entries, decode_entries, needs_stream
from .http import Handler, Response
from .metrics import LOST_BUS, LOST_DECODE, LOST_PUBLISH, LOST_RING_BUFFER, FlowMetrics
from .names import EndpointNameCache
from .servicemap import build_service_map
from .store import FlowStore
from .ui import PAGE
from .wire import flow_batches, reply_chunks

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's default, when the server did not say
ANSWER_DECODE_FLOWS = 8 * 512  # stream flows decoded at once while an answer is sent
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class QueryPlan(msgspec.Struct):
    """A decoded query, the rings' part of its answer and whether the stream is needed."""

    query: schema.FlowQuery
    ring: list[tuple[int, schema.Flow]]  # (time ns, flow), oldest first
    horizon_ns: int
    stream: bool


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
        self.last_seq: dict[str, int] = {}  # "<cluster>/<node>" -> last batch seq seen
        self.missed_batches = 0

    def ingest(self, data: bytes) -> list[schema.Flow]:
        """Decode, enrich, store and count one ``RawEventBatch`` payload."""
        return self.ingest_timed(data)[1]

    def ingest_timed(self, data: bytes) -> tuple[list[int], list[schema.Flow]]:
        """``ingest``, with each flow's time (unix ns, same order) as the store holds it."""
        try:
            batch = schema.decode(data, schema.RawEventBatch)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.metrics.lost(LOST_DECODE, 1)
            self.lost += 1
            return [], []
        missed = self._missed(batch)
        if missed:
            # a batch never carries zero events: each missing one lost at least one
            self.missed_batches += missed
            self.metrics.lost(LOST_BUS, missed)
            self.lost += missed
        result = decode_batch(batch, self.enrichment, self.names)
        self.metrics.lost(LOST_RING_BUFFER, batch.lost)
        self.metrics.lost(LOST_DECODE, result.undecodable)
        self.lost += batch.lost + result.undecodable
        if result.flows:
            self.store.add_batch(f"{batch.cluster}/{batch.node}", result.times, result.flows)
            self.metrics.process_many(result.flows)
        return result.times, result.flows

    def publish_payloads(self, flows: list[schema.Flow], limit: int) -> list[bytes]:
        """``FlowBatch`` messages for one ingested batch (all flows of one node); a flow
        too large for any message is counted in ``hubble_lost_events_total{source="publish"}``."""
        out = flow_batches(flows, limit or DEFAULT_MAX_PAYLOAD)
        self.metrics.lost(LOST_PUBLISH, out.too_large)
        self.lost += out.too_large
        return out.messages

    def _missed(self, batch: schema.RawEventBatch) -> int:
        """Batches of this node that never arrived (a gap in ``seq``). ``seq`` 0 is not
        tracked; a ``seq`` that does not grow means the executor restarted."""
        if batch.seq <= 0:
            return 0
        key = f"{batch.cluster}/{batch.node}"
        last = self.last_seq.get(key)
        self.last_seq[key] = batch.seq
        if last is None or batch.seq <= last:
            return 0
        return batch.seq - last - 1

    def query(self, data: bytes) -> schema.FlowQueryReply:
        """The whole answer to a ``FlowQuery`` payload as one record (see ``query_chunks``)."""
        try:
            q = schema.decode(data, schema.FlowQuery)
            flowfilter.validate([*q.whitelist, *q.blacklist])
            flows = self.store.query(q)
        except (msgspec.DecodeError, msgspec.ValidationError, flowfilter.FilterError) as err:
            return schema.FlowQueryReply(ok=False, error=str(err))
        return schema.FlowQueryReply(
            flows=flows, seen=self.store.seen, capacity=self.store.capacity, lost=self.lost
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
        step = ANSWER_DECODE_FLOWS
        parts = [entries[i:i + step] for i in range(0, len(entries), step)] or [[]]
        chunk = first_chunk
        for i, part in enumerate(parts):
            chunks = reply_chunks(decode_entries(part), limit or DEFAULT_MAX_PAYLOAD, seen=self.store.seen,
                                  capacity=self.store.capacity, lost=self.lost, first_chunk=chunk,
                                  scanned=scanned, truncated=truncated, notice=notice,
                                  final=i == len(parts) - 1)
            chunk += len(chunks)
            yield from chunks

    def query_chunks(self, data: bytes, limit: int) -> list[bytes]:
        """The answer to a ``FlowQuery`` payload as ``FlowQueryReply`` chunks of at most
        ``limit`` bytes each (``wire.reply_chunks``); an error is one ``ok=False`` chunk."""
        reply = self.query(data)
        if not reply.ok:
            return [schema.encode(reply)]
        return reply_chunks(reply.flows, limit or DEFAULT_MAX_PAYLOAD, seen=reply.seen,
                            capacity=reply.capacity, lost=reply.lost)

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
