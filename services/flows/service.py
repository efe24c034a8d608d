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
endpoints resolved are kept in a ``EndpointNameCache`` (``names.py``; ``CILIARY_FLOWS_NAMES_MAX``
entries, default 100000; ``CILIARY_FLOWS_NAMES_MIN_TTL`` seconds, default 3600) for
``source_names``/``destination_names``; its counters are in the health detail.
While the ``flows`` topic of the public event API is active (``CILIARY_EVENTS`` or a
subscriber's lease, ``ciliary.events``), the flows of each raw batch are also published as
``ciliary observe -o json`` lines on ``ciliary.events.flows.<cluster>.<node>``. With
``CILIARY_FLOWS_OTEL_LOGS=1`` and an OTLP endpoint, every flow is also exported as an
OpenTelemetry log record (``ciliary.tracing_flows``). The metrics
(HTTP and ``ciliary.flows.metrics``) are the Hubble families followed by the node and
control-plane families of the services' health reports (``healthscrape.py``).

Invariants:
- A payload that is not a ``RawEventBatch`` (or an event that fails to decode) is counted
  in ``hubble_lost_events_total{source="decode"}``, never crashes the service; events the
  node's ring buffer lost are counted under ``source="perf_event_ring_buffer"``.
- Nothing here blocks the event loop: the HTTP endpoints use asyncio streams.
- L7: an OTLP/HTTP receiver (``otlpserver``) on the cluster's Unix socket (and
  ``CILIARY_OTLP_PORT``) hands Envoy's spans to ``l7core``, which joins them with the
  flows of their connection; spans are queried on ``ciliary.flows.l7``, and the HTTP
  metrics are part of the metrics text.
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
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ciliary import config, schema
from ciliary.bus import BusError, KVEntry, Message
from ciliary.events import subjects as events
from ciliary.events.publisher import EventPublisher
from ciliary.otlpsocket import otlp_socket_path
from ciliary.runtime import Context, mirror_kinds
from ciliary.tracing_flows import FlowLogs
from ciliary.watch import entries_only

from . import otlpserver
from .core import METRICS_CONTENT_TYPE, FlowsCore, QueryPlan
from .export import ExportConfig, write_lines
from .healthscrape import HealthScrape
from .history import PROGRESS_EVERY_S, HistoryLimits, StreamScan, read_history, start_time_ns
from .http import DEFAULT_HOST, Response, start_http_server
from .l7core import L7Core
from .settings import (
    DEFAULT_STREAM_MAX_AGE,
    DEFAULT_STREAM_MAX_MB,
    ENV_HTTP_HOST,
    ENV_RING_CAPACITY,
    ENV_STREAM_MAX_AGE,
    ENV_STREAM_MAX_MB,
    history_limits,
    http_plan,
    name_cache_from_env,
)

log = logging.getLogger(__name__)

WATCHED_KINDS = ("Pod", "Namespace", "Service")
QUEUE_GROUP = "flows"
ENV_OTLP_PORT = "CILIARY_OTLP_PORT"  # OTLP/HTTP on TCP too (the Unix socket is always served)
GC_THRESHOLDS = (10_000, 10, 10)  # Python's default is (700, 10, 10)
HISTORY_READERS = 2  # stream-reading queries at once


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    # Flow records are not tracked by the cyclic GC, but each flow still allocates a few
    # tracked containers; collecting every 700 allocations costs ~20% of the throughput.
    gc.set_threshold(*GC_THRESHOLDS)
    capacity = int(config.env_number(ENV_RING_CAPACITY, schema.FLOWS_RING_CAPACITY, integer=True, minimum=1))
    core = FlowsCore(ctx.settings.cluster, capacity, name_cache_from_env())
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
            e.key, _decode(e, schema.PolicyMapHead), e.revision)),
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
    publisher = EventPublisher(ctx.bus, ctx.settings.cluster, events.SERVICE_TOPICS["flows"])
    await publisher.start()
    ctx.detail["events"] = publisher.stats
    flow_logs = FlowLogs.from_env("flows", cluster=ctx.settings.cluster, instance=ctx.settings.instance)

    l7 = L7Core(resolve=lambda ip: _workload_of(core, ip))
    ctx.detail["l7"] = l7.stats()

    async def on_raw(msg: Message) -> None:
        batch = core.decode_raw(msg.data)
        if batch is None:
            _flows_detail(ctx, core)
            return
        subject = schema.SUBJECT_FLOWS.format(cluster=batch.cluster, node=batch.node)
        node_key = f"{batch.cluster}/{batch.node}"
        if stream_on and core.ledger.needs_restore(node_key) and msg.subject == schema.SUBJECT_FLOWS_RAW.format(
                cluster=batch.cluster, node=batch.node):
            core.ledger.restore(node_key, await _stored_position(ctx, subject))
        got = core.ingest_raw(batch)
        times, flows = got.times, got.flows
        if flows:
            l7.on_flows(flows, times)
            _mark_traces(core, l7)
            ctx.detail["l7"]["join"] = l7.join_stats()
        _flows_detail(ctx, core)
        ctx.detail["names"] = core.names.stats()
        if flows or got.position is not None:
            for data in core.publish_payloads(flows, ctx.bus.max_payload, got.position):
                await ctx.bus.publish(subject, data)
        if flows:
            cluster, _, node = flows[0].node_name.partition("/")
            if publisher.active(events.FLOWS):
                await publisher.publish_flows(flows, cluster, node)
            if flow_logs is not None:
                flow_logs.emit(flows)
        if export is not None and flows:
            try:
                export_queue.put_nowait(export.lines(flows))
            except asyncio.QueueFull:
                core.count_lost("export_queue", len(flows), node_key)

    history = history_limits(stream_on)
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

    health = HealthScrape(ctx.bus)

    async def metrics_text() -> str:
        return core.metrics.render() + l7.metrics.render() + await health.text()

    def on_spans(spans: list[schema.L7Span]) -> None:
        l7.accept(spans)
        _mark_traces(core, l7)
        ctx.detail["l7"] = l7.stats()

    async def on_l7_query(msg: Message) -> None:
        if msg.reply:
            await msg.respond(l7.query(msg.data))

    async def on_metrics(msg: Message) -> None:
        await msg.respond(schema.FlowMetricsReply(text=await metrics_text()))

    subs = [
        await ctx.bus.subscribe_raw(schema.SUBJECT_FLOWS_RAW_ALL, on_raw),
        await ctx.bus.subscribe_raw(schema.SUBJECT_FLOWS_QUERY, on_query, queue=QUEUE_GROUP),
        await ctx.bus.subscribe_raw(schema.SUBJECT_FLOWS_METRICS, on_metrics, queue=QUEUE_GROUP),
        await ctx.bus.subscribe_raw(schema.SUBJECT_L7_QUERY, on_l7_query, queue=QUEUE_GROUP),
    ]
    receiver = await _start_otlp(ctx, on_spans)
    if await _start_http(ctx, tg, core, metrics_text):
        tg.create_task(health.run(), name="flows-health-metrics")
    try:
        await asyncio.Event().wait()
    finally:
        for sub in subs:
            await sub.unsubscribe()
        if receiver is not None:
            await receiver.cleanup()


def _flows_detail(ctx: Context, core: FlowsCore) -> None:
    ctx.detail["flows"] = {"seen": core.store.seen, "stored": len(core.store), "lost": core.lost,
                           "lost_by_source": core.lost_by_source()}


async def _stored_position(ctx: Context, subject: str) -> schema.BatchPosition | None:
    """The raw-batch position of the last ``FlowBatch`` the ``FLOWS`` stream holds on
    ``subject`` (a node's flows): where this service stopped before it (re)started."""
    try:
        stored = await ctx.bus.stream_last_message(schema.STREAM_FLOWS, subject)
    except BusError as err:
        log.warning("flows: no stored position for %s, its losses before now are not counted: %s",
                    subject, err)
        return None
    if stored is None:
        return None
    try:
        return schema.decode(stored.data, _StoredPosition).position
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class _StoredPosition(msgspec.Struct):
    """The position of a stored ``FlowBatch``, its flows left undecoded."""

    position: schema.BatchPosition | None = None


def _mark_traces(core: FlowsCore, l7: L7Core) -> None:
    for (node, trace_id), uuids in l7.drain_links().items():
        core.store.set_trace(node, uuids, trace_id)


def _workload_of(core: FlowsCore, address: str) -> str:
    """``ip:port`` -> the pod at that IP, else the Service of that frontend, else ""."""
    ip, _, port = address.rpartition(":")
    if not ip:
        ip, port = address, ""
    info = core.enrichment.ip(ip)
    if info is not None and info.pod:
        return f"{info.namespace}/{info.pod}"
    service = core.enrichment.frontend(ip, int(port), "TCP") if port.isdigit() else None
    return f"{service[0]}/{service[1]}" if service else ""


async def _start_otlp(ctx: Context, accept: Callable[[list[schema.L7Span]], None]) -> Any:
    """The OTLP/HTTP receiver on the cluster's Unix socket (and ``CILIARY_OTLP_PORT``)."""
    path = otlp_socket_path(ctx.settings.cluster)
    try:
        port = int(os.environ.get(ENV_OTLP_PORT, "0") or 0)
    except ValueError:
        log.error("flows: %s is not a port number; OTLP on the Unix socket only", ENV_OTLP_PORT)
        port = 0
    try:
        runner = await otlpserver.start(accept, path, port, os.environ.get(ENV_HTTP_HOST) or DEFAULT_HOST)
    except OSError as err:
        log.error("flows: OTLP receiver not started: %s", err)
        ctx.detail["otlp"] = {"error": str(err)}
        return None
    ctx.detail["otlp"] = {"socket": path, **({"port": port} if port else {})}
    log.info("flows: OTLP/HTTP receiver on %s%s", path, f" and port {port}" if port else "")
    return runner


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


async def _start_http(ctx: Context, tg: asyncio.TaskGroup, core: FlowsCore,
                      metrics_text: Callable[[], Awaitable[str]]) -> bool:
    """Start the HTTP servers the settings ask for; whether one serves metrics."""
    host = os.environ.get(ENV_HTTP_HOST, "") or DEFAULT_HOST
    try:
        plan = http_plan()
    except ValueError as err:
        log.error("flows: HTTP disabled, bad port setting: %s", err)
        return False
    urls: dict[str, str] = {}

    async def serve_metrics_page(_query: dict[str, str]) -> Response:
        return Response((await metrics_text()).encode(), METRICS_CONTENT_TYPE)

    for port, (metrics, ui) in plan.items():
        routes = core.http_routes(metrics=metrics, ui=ui)
        if metrics:
            routes["/metrics"] = serve_metrics_page
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
    return "metrics" in urls


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
