"""Traces out over OTLP: the services and the node executor as real processes on a real
nats-server, the real ``ciliary`` CLI, and an OTLP/HTTP receiver inside the test.

One ``ciliary apply`` is one trace: the CLI's root span, the identity, policy and
servicelb passes its writes made due, and the node executor's map write, every hop
joined through the trace context the KV entries carry. With no endpoint nothing is
exported and no trace context is written."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ciliary import config, schema, tracing, tracing_flows
from ciliary.bus import Bus
from ciliary.status import gather_health
from tests.integration.conftest import (
    FLOWS_SETTINGS,
    REPO,
    NatsServer,
    eventually,
    service_process,
    stop_processes,
)
from tests.integration.otlp import GrpcTraceReceiver, OTLPReceiver, ReceivedSpan

MANIFESTS = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec:
  nodeName: node-elsewhere
  containers: [{name: app, image: busybox}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
"""

OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                  "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME",
                  "OTEL_RESOURCE_ATTRIBUTES")


def apply(data_dir: Path, otel: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``ciliary apply -f -`` with MANIFESTS, under exactly the OTel environment ``otel``."""
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARIABLES}
    env.update(otel, CILIARY_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "ciliary.cli", "apply", "-f", "-"], input=MANIFESTS,
                          capture_output=True, text=True, env=env, timeout=60, cwd=REPO)


def cli_instance(nats_server: NatsServer, tmp_path: Path) -> Path:
    """A data dir that points the CLI at the test's NATS server."""
    data_dir = tmp_path / "data"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=1))
    return data_dir


async def all_healthy(bus: Bus, services: set[str]) -> bool:
    reports = await gather_health(bus, timeout=0.5)
    return {r.service for r in reports if r.healthy} >= services


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    out = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        out.append(span)
    return out


def caused_by(span: ReceivedSpan, cause: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> bool:
    """``cause`` is an ancestor of ``span`` or of one of the spans it links to."""
    chain = [span, *ancestors(span, by_id)]
    for _trace_id, span_id in span.links:
        if span_id in by_id:
            chain += [by_id[span_id], *ancestors(by_id[span_id], by_id)]
    return any(s.span_id == cause.span_id for s in chain)


@pytest.mark.timeout(180)
async def test_one_apply_is_one_trace_across_every_hop(nats_server: NatsServer, tmp_path: Path,
                                                       procs: list[subprocess.Popen[bytes]]) -> None:
    receiver = OTLPReceiver()
    await receiver.start()
    cluster = "t" + secrets.token_hex(2)
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "shop"}
    env = {**otel, config.ENV_CLUSTER: cluster, config.ENV_CLUSTER_ID: "23",
           config.ENV_DATA_DIR: str(tmp_path / "data"), "CILIARY_TEARDOWN_ON_EXIT": "1"}
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        for name in ("identity", "policy", "servicelb"):
            procs.append(service_process(name, nats_server.url, log_path=tmp_path / f"{name}.log", env=env))
        procs.append(service_process("node", nats_server.url, node="node-1", log_path=tmp_path / "node.log",
                                     env=env))
        await eventually(lambda: all_healthy(bus, {"identity", "policy", "servicelb", "node"}), 90,
                         "every service healthy")

        result = await asyncio.to_thread(apply, cli_instance(nats_server, tmp_path), otel)
        assert result.returncode == 0, result.stderr
        assert "service/web -n default created" in result.stdout
        trace_id = result.stderr.split("trace ", 1)[1].split()[0]  # printed for the user
        # the apply's writes carry its trace context
        entries = await bus.kv_list(schema.BUCKET_RESOURCES, "Service.default.web")
        assert trace_id in entries["Service.default.web"].headers[tracing.TRACEPARENT]

        def names() -> set[tuple[str, str]]:
            return {(s.service, s.name) for s in receiver.trace(trace_id)}

        wanted = {("ciliary-cli", "ciliary apply"), ("ciliary-identity", "identity pass"),
                  ("ciliary-policy", "policy pass"), ("ciliary-servicelb", "servicelb pass"),
                  ("ciliary-node", "node map write")}
        assert await receiver.wait_for(lambda: names() >= wanted, 30), names()
    finally:
        stop_processes(procs)  # a clean stop flushes what is still queued
        await bus.close()
        await receiver.stop()
    for proc in procs:
        assert proc.returncode == 0

    spans = receiver.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    # one tree: a single root (the CLI's), every other span's parent is in the trace
    roots = [s for s in spans if not s.parent_span_id]
    assert [(r.service, r.name) for r in roots] == [("ciliary-cli", "ciliary apply")]
    (root,) = roots
    assert all(s.parent_span_id in by_id for s in spans if s is not root)
    assert root.attributes[tracing.ATTR_OBJECTS] == 3
    assert root.attributes["ciliary.apply.created"] == 3
    # every process names itself; OTEL_SERVICE_NAME groups them
    for span in spans:
        assert span.resource["service.namespace"] == "shop"
    node_spans = [s for s in spans if s.service == "ciliary-node"]
    assert all(s.resource["ciliary.node"] == "node-1" and s.resource["ciliary.cluster"] == cluster
               for s in node_spans)

    # each hop continues the trace: resources -> identity, servicelb, policy;
    # identities -> policy; services bucket -> node map write
    def passes(name: str) -> list[ReceivedSpan]:
        return [s for s in spans if s.name == name]

    assert any(s.parent_span_id == root.span_id for s in passes("identity pass"))
    assert any(s.parent_span_id == root.span_id for s in passes("servicelb pass"))
    assert any(caused_by(p, i, by_id) for p in passes("policy pass") for i in passes("identity pass")), \
        "no policy pass continues an identity pass"
    written = [s for s in node_spans if s.name == "node map write"
               and s.attributes[tracing.ATTR_MAP_UPSERTED] > 0]
    assert any(caused_by(w, lb, by_id) for w in written for lb in passes("servicelb pass")), \
        "no node map write continues a servicelb pass"
    for span in passes("identity pass") + passes("policy pass") + passes("servicelb pass"):
        assert span.attributes[tracing.ATTR_CAUSES] >= 1
    assert receiver.rejected == 0


@pytest.mark.timeout(90)
async def test_no_endpoint_no_export_and_no_trace_context(nats_server: NatsServer, tmp_path: Path,
                                                          procs: list[subprocess.Popen[bytes]]) -> None:
    receiver = OTLPReceiver()
    await receiver.start()
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        # the exporter's other settings, but no endpoint
        quiet = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "shop"}
        procs.append(service_process("identity", nats_server.url, log_path=tmp_path / "identity.log",
                                     env=quiet, unset=OTEL_VARIABLES[:2]))
        await eventually(lambda: all_healthy(bus, {"identity"}), 30, "identity healthy")
        data_dir = cli_instance(nats_server, tmp_path)
        result = await asyncio.to_thread(apply, data_dir, quiet)
        assert result.returncode == 0, result.stderr
        assert "trace" not in result.stderr

        async def identity_written() -> dict:
            return {k: e for k, e in (await bus.kv_list(schema.BUCKET_IDENTITIES)).items()
                    if k.startswith(schema.IDENTITY_ID_PREFIX)}

        identities = await eventually(identity_written, 30, "an identity for web-1")
        resources = await bus.kv_list(schema.BUCKET_RESOURCES)
        assert resources and identities
        for entry in [*resources.values(), *identities.values()]:
            assert tracing.TRACEPARENT not in entry.headers, entry.key

        # an endpoint with export turned off: nothing reaches it either
        off = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_EXPORTER": "none"}
        result = await asyncio.to_thread(apply, data_dir, off)
        assert result.returncode == 0 and "trace" not in result.stderr, result.stderr
        # an unsupported protocol: one clear line, the apply still works, nothing exported
        bad = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        result = await asyncio.to_thread(apply, data_dir, bad)
        assert result.returncode == 0, result.stderr
        assert "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        stop_processes(procs)
        await bus.close()
        await receiver.stop()
    assert receiver.requests == 0


@pytest.mark.timeout(60)
async def test_flows_exported_as_log_records(nats_server: NatsServer, tmp_path: Path,
                                             procs: list[subprocess.Popen[bytes]]) -> None:
    receiver = OTLPReceiver()
    await receiver.start()
    bus = await Bus.connect(nats_server.url, "test")
    cluster = "flowlogs"
    try:
        await bus.ensure_buckets()
        procs.append(service_process(
            "flows", nats_server.url, log_path=tmp_path / "flows.log",
            env={config.ENV_CLUSTER: cluster, config.ENV_DATA_DIR: str(tmp_path / "data"),
                 "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BLRP_SCHEDULE_DELAY": "100",
                 tracing_flows.ENV_FLOW_LOGS: "1"},
            unset=FLOWS_SETTINGS))
        await eventually(lambda: all_healthy(bus, {"flows"}), 30, "flows healthy")
        events = [schema.RawFlowEvent(ts_ns=10**9 + i, saddr="10.200.1.10", daddr="10.200.2.20",
                                      sport=30000 + i, dport=8080, proto=6, tcp_flags=0x02, direction=2,
                                      ep_id=1, src_identity=10000, dst_identity=20000, ifindex=4, pkt_len=60)
                  for i in range(3)]
        await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=cluster, node="node-1"),
                          schema.RawEventBatch(cluster=cluster, node="node-1", boot_time_ns=1_790_000_000 * 10**9,
                                               seq=1, events=events))
        assert await receiver.wait_for(lambda: len(receiver.logs) >= 3, 20), receiver.logs
    finally:
        stop_processes(procs)
        await bus.close()
        await receiver.stop()
    records = sorted(receiver.logs, key=lambda r: r.attributes["source.port"])
    assert [r.attributes["source.port"] for r in records] == [30000, 30001, 30002]
    for record in records:
        assert record.service == "ciliary-flows"
        assert record.event_name == tracing_flows.EVENT_NAME
        attrs = record.attributes
        assert (attrs["source.address"], attrs["destination.address"], attrs["destination.port"]) == \
            ("10.200.1.10", "10.200.2.20", 8080)
        assert attrs["network.transport"] == "tcp"
        assert attrs[tracing_flows.A_NODE] == f"{cluster}/node-1"
        assert attrs[tracing_flows.A_VERDICT] == "FORWARDED"
        assert record.severity == "INFO"
        assert record.time_unix_nano > 1_790_000_000 * 10**9  # the kernel time, on the boot clock
        assert set(attrs) <= set(tracing_flows.ATTRIBUTES)
    assert receiver.rejected == 0 and not receiver.spans  # flows make no spans


@pytest.mark.timeout(60)
async def test_grpc_protocol(nats_server: NatsServer, tmp_path: Path) -> None:
    receiver = GrpcTraceReceiver()
    await receiver.start()
    try:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        result = await asyncio.to_thread(apply, cli_instance(nats_server, tmp_path), otel)
        assert result.returncode == 0, result.stderr
        trace_id = result.stderr.split("trace ", 1)[1].split()[0]
        # the CLI flushed before it exited
        assert ("ciliary-cli", tracing.SPAN_APPLY, trace_id) in receiver.spans
    finally:
        await receiver.stop()
