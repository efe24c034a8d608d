"""Tracing: which OTel settings export what, and how mirrors and pass loops join the
trace of the changes that made a pass due (spans recorded in memory)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ciliary import telemetry, tracing
from ciliary.kv import SYNCED, KVEntry
from ciliary.watch import Mirror, PassClock, PassLoop


@pytest.mark.parametrize(("env", "protocol"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None),  # no endpoint: no export
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "grpc"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_export_protocol_follows_the_standard_environment(env: dict[str, str], protocol: str | None) -> None:
    assert telemetry.export_protocol(env) == protocol


def test_an_unsupported_protocol_names_the_variable() -> None:
    with pytest.raises(telemetry.TracingSettingError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json'"):
        telemetry.export_protocol({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})


def test_each_process_names_itself_and_otel_service_name_groups_them() -> None:
    attrs = telemetry.resource_attributes("node", cluster="c1", node="node-1", instance="node-node-1",
                                          env={"OTEL_SERVICE_NAME": "shop"})
    assert attrs["service.name"] == "ciliary-node"
    assert attrs["service.namespace"] == "shop"
    assert (attrs["ciliary.cluster"], attrs["ciliary.node"], attrs["service.instance.id"]) == \
        ("c1", "node-1", "node-node-1")
    assert "service.namespace" not in telemetry.resource_attributes("cli", env={})


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Spans of ``ciliary.tracing`` recorded in memory (the process's provider untouched)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def sender(name: str = "apply") -> tuple[trace.Span, dict[str, str]]:
    """A recording span of another process, and the headers its writes carry."""
    span = TracerProvider().get_tracer("sender").start_span(name)
    with trace.use_span(span, end_on_exit=True):
        return span, telemetry.inject_headers({"KV-Operation": "PUT"})


def entry(key: str, headers: dict[str, str] | None = None) -> KVEntry:
    return KVEntry("resources", key, 1, b"v", headers or {})


async def run_until(run: Callable[[], Awaitable[object]], done: Callable[[], object], what: str,
                    step: float = 0.001) -> None:
    """``run()`` as a task until ``done()`` holds (checked 200 times, ``step`` s apart), then
    cancelled; fails naming ``what`` when it never does."""
    task = asyncio.create_task(run())
    try:
        for _ in range(200):
            if done():
                return
            await asyncio.sleep(step)
        raise AssertionError(f"no {what}")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def one_pass(loop: PassLoop) -> None:
    before = loop.passes
    await run_until(loop.run, lambda: loop.passes > before, "pass ran")


def synced_mirror(bucket: str) -> Mirror:
    """A mirror past its initial state (changes from now on)."""
    mirror: Mirror = Mirror(bucket)
    mirror.apply(SYNCED)
    return mirror


async def test_a_pass_continues_the_trace_of_the_change_that_made_it_due(spans: InMemorySpanExporter) -> None:
    seen: list[dict[str, str]] = []

    async def run_pass() -> None:
        seen.append(telemetry.inject_headers())  # what a write in the pass carries

    loop = PassLoop("identity", run_pass)
    mirror = synced_mirror("resources").notify(loop)
    apply_span, headers = sender()
    mirror.apply(entry("Pod.default.a", headers))
    mirror.apply(entry("Pod.default.b", headers))  # the same apply: one cause
    await one_pass(loop)

    (span,) = spans.get_finished_spans()
    assert span.name == "identity pass"
    assert span.parent is not None
    assert span.parent.span_id == apply_span.get_span_context().span_id
    assert span.context.trace_id == apply_span.get_span_context().trace_id
    assert span.attributes[tracing.ATTR_CAUSES] == 1
    assert span.attributes[tracing.ATTR_MARKS] == 2
    assert span.attributes[tracing.ATTR_LOOP] == "identity"
    assert not span.links
    assert f"{span.context.span_id:016x}" in seen[0]["traceparent"]


async def test_a_pass_of_several_changes_is_the_first_ones_child_and_links_the_rest(
        spans: InMemorySpanExporter) -> None:
    async def run_pass() -> None:
        pass

    loop = PassLoop("policy", run_pass)
    mirror = synced_mirror("identities").notify(loop)
    first, first_headers = sender("first")
    second, second_headers = sender("second")
    mirror.apply(entry("id.1", first_headers))
    mirror.apply(entry("id.2", second_headers))
    mirror.apply(entry("id.3"))  # untraced: counted as a mark only
    await one_pass(loop)

    (span,) = spans.get_finished_spans()
    assert span.parent.span_id == first.get_span_context().span_id
    assert [link.context.span_id for link in span.links] == [second.get_span_context().span_id]
    assert span.attributes[tracing.ATTR_MARKS] == 3
    assert span.attributes[tracing.ATTR_CAUSES] == 2


async def test_causes_are_bounded_and_counted(spans: InMemorySpanExporter) -> None:
    async def run_pass() -> None:
        pass

    loop = PassLoop("servicelb", run_pass)
    mirror = synced_mirror("resources").notify(loop)
    for n in range(tracing.MAX_CAUSES + 5):
        mirror.apply(entry(f"Service.default.s{n}", sender()[1]))
    await one_pass(loop)
    (span,) = spans.get_finished_spans()
    assert span.attributes[tracing.ATTR_CAUSES] == tracing.MAX_CAUSES
    assert span.attributes[tracing.ATTR_CAUSES_DROPPED] == 5
    assert len(span.links) == tracing.MAX_CAUSES - 1


async def test_untraced_changes_give_a_root_span_only_where_spans_are_exported(
        spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run_pass() -> None:
        clock = PassClock()
        clock.lap("allocate")
        clock.report({}, deque())

    loop = PassLoop("identity", run_pass)
    mirror = Mirror("resources").notify(loop)
    mirror.apply(entry("Pod.default.a"))
    await one_pass(loop)
    assert not spans.get_finished_spans()  # this process exports nothing: no span at all

    monkeypatch.setattr(telemetry, "exporting", lambda: True)
    mirror.apply(entry("Pod.default.a"))
    mirror.apply(SYNCED)
    await one_pass(loop)
    (span,) = spans.get_finished_spans()
    assert span.parent is None and span.attributes[tracing.ATTR_CAUSES] == 0
    assert "ciliary.pass.ms.allocate" in span.attributes  # the pass's parts, as in the health

    loop.dirty.set()  # woken without a mark (a timer)
    await one_pass(loop)
    assert len(spans.get_finished_spans()) == 1


async def test_a_failed_pass_records_the_error_and_the_loop_goes_on(spans: InMemorySpanExporter) -> None:
    async def run_pass() -> None:
        raise ValueError("odd input")

    loop = PassLoop("policy", run_pass)
    synced_mirror("resources").notify(loop).apply(entry("x", sender()[1]))
    await run_until(loop.run, lambda: loop.failures, "failed pass")
    (span,) = spans.get_finished_spans()
    assert not span.status.is_ok
    assert span.events[0].name == "exception"


def test_without_a_recording_span_nothing_is_injected() -> None:
    assert "traceparent" not in telemetry.inject_headers()
    assert tracing.current_trace_id() == ""


async def test_a_kicked_map_write_continues_the_change_behind_the_kick(spans: InMemorySpanExporter) -> None:
    from services.node import maps as M
    from services.node.reconciler import ReconcileLoop, Reconciler

    reconciler = Reconciler()
    loop = ReconcileLoop(reconciler, M.FakeMapOps(), resync_interval=3600.0)
    policy_pass, headers = sender("policy pass")

    def on_change(_event: object) -> None:  # the node agent's producer: set desired, kick
        reconciler.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1001)])
        loop.kick()

    synced_mirror("ipcache").listen(on_change).apply(entry("10.0.0.1/32", headers))
    await run_until(loop.run, spans.get_finished_spans, "map write span", step=0.005)
    (span,) = spans.get_finished_spans()
    assert span.name == tracing.SPAN_MAP_WRITE
    assert span.parent.span_id == policy_pass.get_span_context().span_id
    assert span.attributes[tracing.ATTR_MAP_UPSERTED] == 1


def test_the_supervisor_hands_the_otel_environment_to_every_child(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from ciliary.supervisor import Supervisor

    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=lab", "CILIARY_FLOWS_OTEL_LOGS": "1"}
    for key, value in otel.items():
        monkeypatch.setenv(key, value)
    supervisor = Supervisor(data_dir=tmp_path, nodes=2)
    supervisor._plan_children()
    services = [c for c in supervisor.children if c.name != "nats-server"]
    assert {c.name for c in services} >= {"identity", "policy", "servicelb", "flows", "node/node-1", "node/node-2"}
    for child in services:
        assert {k: child.env.get(k) for k in otel} == otel, child.name


async def test_the_initial_state_and_bad_headers_continue_no_trace(spans: InMemorySpanExporter,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "exporting", lambda: True)

    async def run_pass() -> None:
        pass

    loop = PassLoop("identity", run_pass)
    mirror = Mirror("resources").notify(loop)
    mirror.apply(entry("Pod.default.a", sender()[1]))  # written long ago, read at start
    mirror.apply(SYNCED)
    await one_pass(loop)
    mirror.apply(entry("Pod.default.b", {"traceparent": "00-not-a-trace-01"}))  # malformed
    await one_pass(loop)
    first, second = spans.get_finished_spans()
    assert first.parent is None and second.parent is None
    assert first.attributes[tracing.ATTR_CAUSES] == 0 and second.attributes[tracing.ATTR_CAUSES] == 0
