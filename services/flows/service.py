"""Flows service shell: raw datapath events in, Hubble-style flows out.

Subscribes to ``flows.raw.>`` (every node executor's ``RawEventBatch``), decodes and
enriches each event into ``Flow`` records (``decode.py``) from mirrored ``ipcache``,
``identities``, ``services`` (frontends) and ``policy`` (rule references, for
``*_allowed_by``/``*_denied_by``) buckets plus Pods and their status, keeps the
most recent flows per node (``store.py``), publishes the flows of each raw batch on
``flows.enriched.<cluster>.<node>``, answers ``FlowQuery`` on ``ciliary.flows.query`` and
metrics requests on ``ciliary.flows.metrics``, and serves Prometheus metrics over HTTP
on ``CILIARY_FLOWS_METRICS_PORT`` (unset or 0: not served) and the service map page
(``/``, ``/api/servicemap``) on ``CILIARY_FLOWS_UI_PORT`` (unset: on the metrics server;
0: not served), both bound to ``CILIARY_FLOWS_HTTP_HOST`` (default 127.0.0.1). Flows are also kept in the
JetStream stream ``FLOWS`` (``CILIARY_FLOWS_STREAM_MAX_MB``, default 64, 0 = off;
``CILIARY_FLOWS_STREAM_MAX_AGE`` seconds, default 3600) and, with
``CILIARY_FLOWS_EXPORT_FILE``, appended as JSON lines (``export.py``). DNS names local
endpoints resolved are kept in a ``NameCache`` (``names.py``; ``CILIARY_FLOWS_NAMES_MAX``
entries, default 100000; ``CILIARY_FLOWS_NAMES_MIN_TTL`` seconds, default 3600) for
``source_names``/``destination_names``; its counters are in the health detail.

Invariants:
- A payload that is not a ``RawEventBatch`` (or an event that fails to decode) is counted
  in ``hubble_lost_events_total{source="decode"}``, never crashes the service; events the
  node's ring buffer lost are counted under ``source="perf_event_ring_buffer"``.
- Nothing here blocks the event loop: the HTTP endpoints use asyncio streams.
- The service map is rebuilt from the stored flows on each request (``servicemap.py``).
- Health: connected and every watch has delivered its initial state.
- Flows leave as one ``FlowBatch`` message per raw batch (``wire.flow_batches``; more
  only when one would exceed the bus's maximum message size), and query answers as
  ``FlowQueryReply`` chunks on the request's reply subject (``wire.reply_chunks``), so
  neither is limited by the maximum message size.
- A query the rings cannot answer (``history.needs_stream``) also reads the ``FLOWS``
  stream, in a task of its own (at most ``HISTORY_READERS`` at once, the others wait),
  bounded by ``CILIARY_FLOWS_HISTORY_MAX_SCAN`` flows and sending an empty progress chunk
  at least once a second while it reads; ring-only queries are answered at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from ciliary import config, flowfilter, schema
from ciliary.bus import BusError, KVEntry, Message
from ciliary.runtime import Context, mirror_kinds
from ciliary.watch import entries_only

from .decode import decode_batch
from .enrich import EnrichmentState
from .export import ExportConfig, write_lines
from .history import (
    PROGRESS_EVERY_S,
    Entry,
    HistoryLimits,
    StreamScan,
    answer_entries,
    decode_entries,
    needs_stream,
    read_history,
    start_time_ns,
)
from .http import DEFAULT_HOST, Handler, Response, start_http_server
from .metrics import LOST_BUS, LOST_DECODE, LOST_PUBLISH, LOST_RING_BUFFER, FlowMetrics
from .names import DEFAULT_MAX_ENTRIES, DEFAULT_MIN_TTL_S, ENV_MAX_ENTRIES, ENV_MIN_TTL, NameCache
from .servicemap import build_service_map
from .store import FlowStore
from .ui import PAGE
from .wire import flow_batches, reply_chunks

log = logging.getLogger(__name__)

WATCHED_KINDS = ("Pod", "Namespace", "Service")
ENV_METRICS_PORT = "CILIARY_FLOWS_METRICS_PORT"
ENV_UI_PORT = "CILIARY_FLOWS_UI_PORT"  # unset: same server as metrics; 0: no UI
ENV_HTTP_HOST = "CILIARY_FLOWS_HTTP_HOST"  # default 127.0.0.1
ENV_RING_CAPACITY = "CILIARY_FLOWS_RING_CAPACITY"
ENV_STREAM_MAX_MB = "CILIARY_FLOWS_STREAM_MAX_MB"  # 0 = no JetStream stream FLOWS
ENV_STREAM_MAX_AGE = "CILIARY_FLOWS_STREAM_MAX_AGE"  # seconds
DEFAULT_STREAM_MAX_MB = 64.0
DEFAULT_STREAM_MAX_AGE = 3600.0
QUEUE_GROUP = "flows"
GC_THRESHOLDS = (10_000, 10, 10)  # Python's default is (700, 10, 10)
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's default, when the server did not say
HISTORY_READERS = 2  # stream-reading queries at once
ANSWER_DECODE_FLOWS = 8 * 512  # stream flows decoded at once while an answer is sent


class QueryPlan(msgspec.Struct):
    """A decoded query, the rings' part of its answer and whether the stream is needed."""

    query: schema.FlowQuery
    ring: list[tuple[int, schema.Flow]]  # (time ns, flow), oldest first
    horizon_ns: int
    stream: bool


class FlowsCore:
    """Everything the service does between the bus and the stores (no I/O)."""

    def __init__(self, cluster: str, capacity: int = schema.FLOWS_RING_CAPACITY,
                 names: NameCache | None = None) -> None:
        self.names = names if names is not None else NameCache()
        self.enrichment = EnrichmentState(cluster, self.names)
        self.store = FlowStore(capacity)
        self.metrics = FlowMetrics()
        self.lost = 0
        self.last_seq: dict[str, int] = {}  # "<cluster>/<node>" -> last batch seq seen
        self.missed_batches = 0

    def ingest(self, data: bytes) -> list[schema.Flow]:
        """Decode, enrich, store and count one ``RawEventBatch`` payload."""
        try:
            batch = schema.decode(data, schema.RawEventBatch)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.metrics.lost(LOST_DECODE, 1)
            self.lost += 1
            return []
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
        return result.flows

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
                                 seen=self.store.seen, lost=self.lost)

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
        import time

        now = time.time_ns()
        since = query.get("since", "")
        try:
            since_ns = flowfilter.parse_time_arg(since, now) if since else 0
        except flowfilter.FilterError as err:
            raise ValueError(str(err)) from err
        body = msgspec.json.encode(self.service_map(since_ns, now))
        return Response(body, "application/json")


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    # Flow records are not tracked by the cyclic GC, but each flow still allocates a few
    # tracked containers; collecting every 700 allocations costs ~20% of the throughput.
    gc.set_threshold(*GC_THRESHOLDS)
    capacity = int(config.env_number(ENV_RING_CAPACITY, schema.FLOWS_RING_CAPACITY, integer=True, minimum=1))
    core = FlowsCore(ctx.settings.cluster, capacity, _name_cache())
    ctx.detail["flows"] = {"seen": 0, "stored": 0, "lost": 0}
    ctx.detail["names"] = core.names.stats()

    def on_pod(entry: KVEntry) -> None:
        ref = _ref(entry.key)
        if entry.deleted:
            core.enrichment.apply_pod(ref, None)
            return
        record = _decode(entry, schema.ResourceRecord)
        core.enrichment.apply_pod(ref, record.manifest if record else None)

    mirror_kinds(ctx, tg, WATCHED_KINDS)["Pod"].listen(entries_only(on_pod))
    for bucket, pattern, apply in (
        (schema.BUCKET_STATUS, "Pod.>", lambda e: core.enrichment.apply_pod_status(
            _ref(e.key), (r.status if (r := _decode(e, schema.StatusRecord)) else None))),
        (schema.BUCKET_IPCACHE, ">", lambda e: core.enrichment.apply_ipcache(
            e.key, _decode(e, schema.IPCacheRecord))),
        (schema.BUCKET_IDENTITIES, f"{schema.IDENTITY_ID_PREFIX}>", lambda e: core.enrichment.apply_identity(
            e.key, _decode(e, schema.IdentityRecord))),
        (schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>", lambda e: core.enrichment.apply_frontend(
            e.key, _decode(e, schema.LBFrontend))),
        (schema.BUCKET_POLICY, f"{schema.POLICY_ID_PREFIX}>", lambda e: core.enrichment.apply_policy(
            e.key, _decode(e, schema.PolicyMapRecord), e.revision)),
    ):
        ctx.mirror(tg, bucket, pattern, name=f"{bucket}/{pattern}", keep=False).listen(entries_only(apply))

    stream_on = await _ensure_flows_stream(ctx)
    if stream_on:
        try:  # flows stored before this start are in the stream only
            core.store.history_before = await ctx.bus.stream_last_seq(schema.STREAM_FLOWS) > 0
        except BusError as err:
            log.warning("flows: cannot read stream %s: %s", schema.STREAM_FLOWS, err)
    try:
        export = ExportConfig.from_env()
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as err:
        log.error("flows: export disabled, bad export settings: %s", err)
        export = None
    export_queue: asyncio.Queue[list[str]] = asyncio.Queue(maxsize=1024)
    if export is not None:
        tg.create_task(_export_writer(export, export_queue), name="flows-export")

    async def on_raw(msg: Message) -> None:
        flows = core.ingest(msg.data)
        ctx.detail["flows"] = {"seen": core.store.seen, "stored": len(core.store), "lost": core.lost}
        ctx.detail["names"] = core.names.stats()
        if flows:
            cluster, _, node = flows[0].node_name.partition("/")
            subject = schema.SUBJECT_FLOWS.format(cluster=cluster, node=node)
            for data in core.publish_payloads(flows, ctx.bus.max_payload):
                await ctx.bus.publish(subject, data)
        if export is not None and flows:
            try:
                export_queue.put_nowait(export.lines(flows))
            except asyncio.QueueFull:
                core.metrics.lost("export_queue", len(flows))
                core.lost += len(flows)

    history = _history_limits(stream_on)
    readers = asyncio.Semaphore(HISTORY_READERS)

    async def on_query(msg: Message) -> None:
        if not msg.reply:
            return
        plan = core.plan_query(msg.data, history=history.enabled)
        if isinstance(plan, schema.FlowQueryReply):
            await msg.respond(plan)
        elif not plan.stream:
            for data in core.answer_chunks(plan, ctx.bus.max_payload):
                await msg.respond(data)
        else:
            tg.create_task(_answer_from_history(ctx, core, plan, msg.reply, history, readers),
                           name="flows-history-query")

    async def on_metrics(msg: Message) -> None:
        await msg.respond(schema.FlowMetricsReply(text=core.metrics.render()))

    subs = [
        await ctx.bus.subscribe_raw(schema.SUBJECT_FLOWS_RAW_ALL, on_raw),
        await ctx.bus.subscribe_raw(schema.SUBJECT_FLOWS_QUERY, on_query, queue=QUEUE_GROUP),
        await ctx.bus.subscribe_raw(schema.SUBJECT_FLOWS_METRICS, on_metrics, queue=QUEUE_GROUP),
    ]
    await _start_http(ctx, tg, core)
    try:
        await asyncio.Event().wait()
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _ensure_flows_stream(ctx: Context) -> bool:
    """JetStream stream FLOWS over ``flows.enriched.>`` (bounded, oldest discarded);
    whether it exists."""
    max_mb = config.env_number(ENV_STREAM_MAX_MB, DEFAULT_STREAM_MAX_MB, minimum=0)
    if max_mb <= 0:
        return False
    max_age = config.env_number(ENV_STREAM_MAX_AGE, DEFAULT_STREAM_MAX_AGE, minimum=0)
    try:
        await ctx.bus.ensure_stream(schema.STREAM_FLOWS, [schema.SUBJECT_FLOWS_ALL],
                                    max_bytes=int(max_mb * 1024 * 1024), max_age_s=max_age)
    except Exception as err:  # the live subject and the ring work without the stream
        log.warning("flows: cannot create stream %s: %s", schema.STREAM_FLOWS, err)
        return False
    return True


def _name_cache(env: dict[str, str] | os._Environ[str] = os.environ) -> NameCache:
    """The DNS name cache from the environment; defaults (logged) for bad settings."""
    try:
        size_text = env.get(ENV_MAX_ENTRIES, "") or str(DEFAULT_MAX_ENTRIES)
        ttl_text = env.get(ENV_MIN_TTL, "") or str(DEFAULT_MIN_TTL_S)
        if not size_text.isdigit():
            raise ValueError(f"{ENV_MAX_ENTRIES}: expected a whole number of entries, got {size_text!r}")
        try:
            min_ttl = float(ttl_text)
        except ValueError:
            raise ValueError(f"{ENV_MIN_TTL}: expected seconds, got {ttl_text!r}") from None
        return NameCache(int(size_text), min_ttl)
    except ValueError as err:
        log.error("flows: DNS name cache uses its defaults, bad setting: %s", err)
        return NameCache()


def _history_limits(stream_on: bool) -> HistoryLimits:
    """History query limits from the environment; reading the stream is off without it."""
    if not stream_on:
        return HistoryLimits(max_scan=0)
    try:
        return HistoryLimits.from_env()
    except ValueError as err:
        log.error("flows: history queries read the rings only, bad setting: %s", err)
        return HistoryLimits(max_scan=0)


async def _answer_from_history(ctx: Context, core: FlowsCore, plan: QueryPlan, reply: str,
                               limits: HistoryLimits, readers: asyncio.Semaphore) -> None:
    """Answer a query that needs the ``FLOWS`` stream: progress chunks while reading, then
    the merged answer. A stream that cannot be read gives the rings' answer with a notice."""
    bus = ctx.bus
    sent = 0

    async def progress(scanned: int) -> None:
        nonlocal sent
        await bus.publish(reply, schema.FlowQueryReply(chunk=sent, more=True, scanned=scanned))
        sent += 1

    try:
        scan = StreamScan(plan.query, plan.horizon_ns, limits)
        notice = ""
        while True:  # wait for a reader, telling the client it is not forgotten
            try:
                await asyncio.wait_for(readers.acquire(), PROGRESS_EVERY_S)
                break
            except TimeoutError:
                await progress(0)
        try:
            await read_history(
                ctx.bus.read_stream(schema.STREAM_FLOWS, schema.SUBJECT_FLOWS_ALL,
                                    start_time_ns=start_time_ns(plan.query.since_ns, limits.margin_ns)),
                scan, progress)
        except BusError as err:
            log.warning("flows: history query: %s", err)
            notice = f"flows older than the rings could not be read: {err}"
        finally:
            readers.release()
        if scan.undecodable:
            log.warning("flows: %d messages in %s are not flow batches", scan.undecodable, schema.STREAM_FLOWS)
        for i, data in enumerate(core.answer_chunks(plan, bus.max_payload, scan, first_chunk=sent,
                                                    notice=notice)):
            await bus.publish(reply, data)
            sent += 1
            if i % 8 == 7:
                await asyncio.sleep(0)  # let ingest run between parts of a large answer
    except Exception as err:  # a failed answer must not take the service down
        log.exception("flows: history query failed")
        try:
            await bus.publish(reply, schema.FlowQueryReply(ok=False, chunk=sent,
                                                           error=f"history query failed: {err}"))
        except Exception:  # connection gone
            pass


async def _export_writer(cfg: ExportConfig, queue: asyncio.Queue[list[str]]) -> None:
    while True:
        lines = await queue.get()
        while not queue.empty() and len(lines) < 4096:
            lines += queue.get_nowait()
        try:
            await asyncio.to_thread(write_lines, cfg, lines)
        except OSError as err:
            log.warning("flows: export to %s failed: %s", cfg.path, err)


def _ref(key: str) -> str:
    """``Pod.<ns>.<name>`` -> ``ns/name``."""
    _, _, rest = key.partition(".")
    namespace, _, name = rest.partition(".")
    return f"{namespace}/{name}"


def _decode(entry: KVEntry, type_: type[Any]) -> Any:
    if entry.value is None:
        return None
    try:
        return schema.decode(entry.value, type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        log.warning("flows: bad %s entry %s: %s", entry.bucket, entry.key, err)
        return None


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def http_plan(env: dict[str, str] | os._Environ[str] = os.environ) -> dict[int, tuple[bool, bool]]:
    """{port: (serves metrics, serves UI)} from ``CILIARY_FLOWS_METRICS_PORT`` and
    ``CILIARY_FLOWS_UI_PORT`` (unset UI port: the UI shares the metrics server)."""
    metrics_port = int(env.get(ENV_METRICS_PORT, "0") or 0)
    ui_text = env.get(ENV_UI_PORT, "")
    ui_port = metrics_port if ui_text == "" else int(ui_text)
    plan: dict[int, tuple[bool, bool]] = {}
    if metrics_port:
        plan[metrics_port] = (True, ui_port == metrics_port)
    if ui_port and ui_port != metrics_port:
        plan[ui_port] = (False, True)
    return plan


async def _start_http(ctx: Context, tg: asyncio.TaskGroup, core: FlowsCore) -> None:
    host = os.environ.get(ENV_HTTP_HOST, "") or DEFAULT_HOST
    try:
        plan = http_plan()
    except ValueError as err:
        log.error("flows: HTTP disabled, bad port setting: %s", err)
        return
    urls: dict[str, str] = {}
    for port, (metrics, ui) in plan.items():
        routes = core.http_routes(metrics=metrics, ui=ui)
        fallback = routes["/metrics"] if metrics and not ui else None
        server = await start_http_server(port, routes, host, fallback=fallback)
        url = f"http://{host}:{port}"
        if metrics:
            urls["metrics"] = url + "/metrics"
        if ui:
            urls["ui"] = url + "/"
        log.info("flows: serving %s on %s", "+".join(k for k, on in (("metrics", metrics), ("ui", ui)) if on), url)
        tg.create_task(_serve(server), name=f"flows-http-{port}")
    if urls:
        ctx.detail["http"] = urls


async def _serve(server: asyncio.Server) -> None:
    async with server:
        await server.serve_forever()


async def start_metrics_server(
    port: int, render: Callable[[], str], host: str = DEFAULT_HOST
) -> asyncio.Server:
    """HTTP server answering ``GET``/``HEAD`` on any path with the metrics text."""

    def metrics(_query: dict[str, str]) -> Response:
        return Response(render().encode(), METRICS_CONTENT_TYPE)

    return await start_http_server(port, {"/metrics": metrics}, host, fallback=metrics)


async def serve_metrics(port: int, render: Callable[[], str], host: str = DEFAULT_HOST) -> None:
    server = await start_metrics_server(port, render, host)
    log.info("flows: serving metrics on %s:%d", host, port)
    await _serve(server)
