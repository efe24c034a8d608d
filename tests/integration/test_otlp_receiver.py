"""The flows service's OTLP/HTTP receiver with real senders: the OpenTelemetry Python SDK's
exporter, hand-written OTLP/JSON, and real Envoy sidecars (the sidecar's own bootstrap and
iptables redirection, in two throw-away network namespaces joined by a veth pair) exporting
over the Unix socket. Malformed requests get a 400 and store nothing."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from ciliary import schema
from ciliary.supervisor import free_port
from services.flows import otlpserver
from services.flows.l7core import L7Core
from services.node import sidecar
from tests.integration.conftest import require_root, stop_processes


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[tuple[L7Core, str, str]]:
    core = L7Core()
    port = free_port()
    sock = str(tmp_path / "otlp.sock")
    runner = await otlpserver.start(core.accept, sock, port)
    try:
        yield core, f"http://127.0.0.1:{port}/v1/traces", sock
    finally:
        await runner.cleanup()


async def test_sdk_exporter_payloads_are_stored_with_their_attributes(receiver) -> None:
    core, url, _sock = receiver
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=url)))
    tracer = provider.get_tracer("test")

    def emit() -> str:
        with tracer.start_as_current_span("GET /pay", kind=SpanKind.CLIENT, attributes={
            "http.request.method": "GET", "http.response.status_code": 503,
            "response_flags": "URX", "upstream_cluster": "outbound|8080||payments",
            "istio.canonical_service": "checkout"}) as span:
            return format(span.get_span_context().trace_id, "032x")

    trace_id = await asyncio.to_thread(emit)
    await asyncio.to_thread(provider.shutdown)
    [span] = core.store.trace(trace_id)
    assert (span.service, span.name, span.kind, span.method) == ("checkout", "GET /pay", "CLIENT", "GET")
    assert (span.status_code, span.response_flags, span.upstream_cluster) == (503, "URX", "outbound|8080||payments")
    assert span.canonical_service == "checkout"
    assert 'hubble_http_requests_total{' in core.metrics.render()
    assert 'status="503"' in core.metrics.render()


def _json_request(trace_id: str, span_id: str) -> dict:
    return {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "payments"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace_id, "spanId": span_id, "name": "ingress", "kind": 2,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000000200000000",
            "attributes": [{"key": "http.status_code", "value": {"stringValue": "200"}},
                           {"key": "istio.direction", "value": {"stringValue": "inbound"}}]}]}]}]}


async def test_json_accepted_and_malformed_requests_get_400_and_store_nothing(receiver) -> None:
    core, url, _sock = receiver
    trace_id = secrets.token_hex(16)
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=json.dumps(_json_request(trace_id, secrets.token_hex(8))),
                             headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "application/json"
        [span] = core.store.trace(trace_id)
        assert (span.kind, span.status_code, span.direction, span.end_ns - span.start_ns) == (
            "SERVER", 200, "inbound", 200_000_000)
        before = len(core.store)
        bad_requests = [
            (b"\xff\x00garbage", "application/x-protobuf"),
            (b"{not json", "application/json"),
            (json.dumps(_json_request("abcd", secrets.token_hex(8))).encode(), "application/json"),
            (json.dumps(_json_request("zz" * 16, secrets.token_hex(8))).encode(), "application/json"),
            # one good span and one with a short span id: the whole request is refused
            (json.dumps({"resourceSpans": [*_json_request(secrets.token_hex(16), secrets.token_hex(8))["resourceSpans"],
                                           *_json_request(secrets.token_hex(16), "00")["resourceSpans"]]}).encode(),
             "application/json"),
            (b"{}", "text/plain"),
        ]
        for body, kind in bad_requests:
            async with http.post(url, data=body, headers={"Content-Type": kind}) as resp:
                assert resp.status == 400, (body[:40], await resp.text())
                assert "malformed OTLP" in await resp.text()
        assert len(core.store) == before


# ------------------------------------------------------------------ real Envoy sidecars

APP = textwrap.dedent("""
    import socket, sys
    status = sys.argv[1]
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080)); srv.listen(16)
    while True:
        conn, _ = srv.accept()
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(f"HTTP/1.1 {status} X\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok".encode())
        conn.close()
""")

CLIENT = textwrap.dedent("""
    import http.client, sys
    c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5)
    c.request("GET", "/pay")
    print(c.getresponse().status)
""")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str]]:
    require_root("network namespaces")
    tag = secrets.token_hex(3)
    a, b = f"ciliary-t{tag}-a", f"ciliary-t{tag}-b"
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, ip in ((a, "10.254.0.1/30"), (b, "10.254.0.2/30")):
            _sh("ip", "-n", ns, "addr", "add", ip, "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _pod(name: str) -> schema.ResourceRecord:
    return schema.ResourceRecord(
        kind="Pod", api_version="v1", namespace="shop", name=name, uid=name, generation=1,
        created="2026-01-01T00:00:00Z", manifest={
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": name.split("-")[0]},
                         "annotations": {sidecar.INJECT_ANNOTATION: "true"}},
            "spec": {"containers": [{"name": "app", "image": "x", "command": ["app"],
                                     "ports": [{"containerPort": 8080}]}]}})


async def test_envoy_sidecars_export_joinable_spans_unchanged(receiver, two_namespaces, tmp_path: Path) -> None:
    core, _url, sock = receiver
    client_ns, server_ns = two_namespaces
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns, pod in ((client_ns, "checkout-1"), (server_ns, "payments-1")):
            plan = sidecar.plan(_pod(pod), sock)
            assert plan is not None
            subprocess.run(["ip", "netns", "exec", ns, "iptables-restore", "--noflush"],
                           input=plan.iptables.encode(), check=True, capture_output=True)
            config = sidecar.write_bootstrap(tmp_path / pod, plan)
            with open(tmp_path / f"{pod}-envoy.log", "wb") as log:
                procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *sidecar.container_argv(config)],
                                              stdout=log, stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", APP, "503"]))

        async def request() -> str:
            result = await asyncio.to_thread(subprocess.run, [
                "ip", "netns", "exec", client_ns, sys.executable, "-c", CLIENT, "10.254.0.2"],
                capture_output=True, text=True, timeout=10)
            return result.stdout.strip()

        for _ in range(100):  # until both Envoys listen
            if await request() == "503":
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("no answer through the sidecars: " + (tmp_path / "checkout-1-envoy.log").read_text()[-2000:])
        for _ in range(100):
            traces = {s.trace_id for s in core.store.recent()}
            full = [t for t in traces if {s.direction for s in core.store.trace(t)} == {"inbound", "outbound"}]
            if full:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"no trace with both sidecars' spans: {core.store.recent()}")
        spans = {s.direction: s for s in core.store.trace(full[0])}
        client, server = spans["outbound"], spans["inbound"]
        assert (client.kind, server.kind) == ("CLIENT", "SERVER")  # listener traffic directions
        assert server.parent_span_id == client.span_id  # W3C traceparent carried by Envoy
        assert (client.status_code, server.status_code) == (503, 503)
        assert client.upstream_address == "10.254.0.2:8080"
        assert client.upstream_cluster == sidecar.PASSTHROUGH_CLUSTER
        assert server.upstream_cluster == sidecar.inbound_cluster(8080)
        # the connection between the sidecars, named the same from both ends
        assert client.upstream_local_address == server.downstream_remote_address
        assert client.upstream_local_address.startswith("10.254.0.1:")
        assert (client.canonical_service, server.canonical_service) == ("checkout", "payments")
        assert client.attributes[sidecar.TAG_ATTEMPTS] == "1"  # no retry
        log_text = (tmp_path / "checkout-1-envoy.log").read_text()
        assert " 503 " in log_text and "upstream=10.254.0.2:8080" in log_text
    finally:
        stop_processes(procs)
