"""Costs of the Istio co-deployment: the span/flow join, OTLP intake, diagnose, and the
Envoy sidecar's latency over the bare datapath path, in one run.

1. ``join``: ``JoinIndex.add_flows`` for FLOWS flows over CONNECTIONS client sockets (in
   batches of 100, as raw batches arrive), then ``join_span`` for SPANS spans each
   matching 4 flows. Reported: µs per flow and per span (median of ROUNDS).
2. ``otlp``: Envoy-shaped OTLP/HTTP protobuf requests of 100 spans: decode + join + store +
   count in process (one core), and the same through the receiver over HTTP on a Unix
   socket (aiohttp client and server in one process, so both share the core).
   Reported: spans/s.
3. ``diagnose``: ``ciliary.diagnose.diagnose`` over 500 flows and 200 spans (the evidence
   the CLI gathers at most); ms per call. The CLI's bus round trips are not included
   (docs/istio.md shows the command's own timing).
4. ``sidecar``: two throw-away namespaces joined by a veth pair, an HTTP responder in one;
   requests from the other, each on a new connection, bare (no redirection) and through
   both sidecars (the sidecar's own iptables rules and Envoy bootstrap, spans exported to
   a receiver on a Unix socket), rounds alternating. Reported: p50/p99 per request and
   the ratio. Root only; skipped otherwise.

Nothing leaves the machine: the namespaces have no route out; the receiver is a Unix socket.

Usage: .venv/bin/python bench/istio.py [--quick]
Writes bench/results/istio.json and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue  # noqa: E402

from ciliary import schema  # noqa: E402
from ciliary.diagnose import Evidence, diagnose  # noqa: E402
from ciliary.hubble import rfc3339_nano  # noqa: E402
from services.flows import otlpserver  # noqa: E402
from services.flows.join import JoinIndex  # noqa: E402
from services.flows.l7core import L7Core  # noqa: E402
from services.flows.otlp import decode_traces  # noqa: E402
from services.node import sidecar  # noqa: E402

RESULTS = REPO / "bench" / "results" / "istio.json"
T0 = 1_700_000_000 * 10**9


def flow(i: int, t_ns: int, reply: bool = False) -> schema.Flow:
    sport = 20000 + i % 40000
    src, dst = f"10.1.{i // 40000 % 250}.5", "10.1.200.7"
    return schema.Flow(
        time=rfc3339_nano(t_ns), uuid=f"u{i}-{reply}", verdict="FORWARDED", is_reply=reply, node_name="b/node-1",
        trace_observation_point="FROM_ENDPOINT",
        ip=schema.FlowIP(source=dst if reply else src, destination=src if reply else dst),
        l4=schema.FlowLayer4(TCP=schema.FlowTCP(source_port=8080 if reply else sport,
                                                destination_port=sport if reply else 8080)),
        source=schema.FlowEndpoint(identity=1001, namespace="shop", pod_name="checkout"),
        destination=schema.FlowEndpoint(identity=1002, namespace="shop", pod_name="payments"))


def span(i: int) -> schema.L7Span:
    sport = 20000 + i % 40000
    return schema.L7Span(trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", direction="outbound",
                         start_ns=T0 + i * 1000, end_ns=T0 + i * 1000 + 10**6,
                         upstream_local_address=f"10.1.{i // 40000 % 250}.5:{sport}",
                         upstream_address="10.96.0.10:8080", status_code=200, method="GET")


def bench_join(connections: int, rounds: int) -> dict[str, Any]:
    flows = [flow(i, T0 + i * 1000, reply) for i in range(connections) for reply in (False, True)] * 2
    spans = [span(i) for i in range(connections)]
    per_flow, per_span, joined = [], [], 0
    for _ in range(rounds):
        index = JoinIndex()
        start = time.perf_counter()
        for k in range(0, len(flows), 100):
            index.add_flows(flows[k:k + 100])
        per_flow.append((time.perf_counter() - start) / len(flows) * 1e6)
        start = time.perf_counter()
        out = [index.join_span(s) for s in spans]
        per_span.append((time.perf_counter() - start) / len(spans) * 1e6)
        joined = sum(1 for s in out if s.joined)
    return {"flows": len(flows), "spans": len(spans), "joined": joined,
            "us_per_flow": round(statistics.median(per_flow), 2),
            "us_per_span": round(statistics.median(per_span), 2)}


def envoy_request(base: int, n: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="checkout.shop")))
    ss = rs.scope_spans.add()
    for i in range(base, base + n):
        sp = ss.spans.add()
        sp.trace_id, sp.span_id, sp.name, sp.kind = (i + 1).to_bytes(16, "big"), (i + 1).to_bytes(8, "big"), "egress", 3
        sp.start_time_unix_nano, sp.end_time_unix_nano = T0 + i, T0 + i + 2_000_000
        for key, value in (("http.status_code", "200"), ("response_flags", "-"), ("http.method", "GET"),
                           ("http.url", "http://10.96.0.10:8080/pay"), ("upstream_cluster", "PassthroughCluster"),
                           ("istio.direction", "outbound"), ("istio.canonical_service", "checkout"),
                           ("k8s.pod.name", "checkout"), ("k8s.namespace.name", "shop"),
                           ("upstream.local_address", f"10.1.0.5:{20000 + i % 40000}"),
                           ("upstream.remote_address", "10.96.0.10:8080"), ("node_id", "sidecar~shop~checkout"),
                           ("guid:x-request-id", secrets.token_hex(16)), ("user_agent", "python"),
                           ("downstream.remote_address", f"10.1.0.5:{30000 + i % 30000}")):
            sp.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return req.SerializeToString()


def bench_otlp(requests: int, per_request: int) -> dict[str, Any]:
    bodies = [envoy_request(r * per_request, per_request) for r in range(requests)]
    core = L7Core()
    start = time.process_time()
    for body in bodies:
        core.accept(decode_traces(body, "application/x-protobuf"))
    in_process = requests * per_request / (time.process_time() - start)

    async def over_http() -> float:
        import aiohttp

        http_core = L7Core()
        with tempfile.TemporaryDirectory(prefix="ciliary-bench-") as tmp:
            sock = str(Path(tmp) / "otlp.sock")
            runner = await otlpserver.start(http_core.accept, sock)
            try:
                async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http:
                    start = time.process_time()
                    for body in bodies:
                        async with http.post("http://otlp/v1/traces", data=body,
                                             headers={"Content-Type": "application/x-protobuf"}) as resp:
                            assert resp.status == 200
                    cpu = time.process_time() - start
            finally:
                await runner.cleanup()
        assert len(http_core.store) == min(requests * per_request, http_core.store.capacity)
        return requests * per_request / cpu

    return {"requests": requests, "spans_per_request": per_request,
            "bytes_per_request": len(bodies[0]),
            "spans_per_s_in_process": round(in_process), "spans_per_s_http": round(asyncio.run(over_http()))}


def bench_diagnose(calls: int) -> dict[str, Any]:
    flows = [flow(i, T0 + i * 1000, i % 2 == 1) for i in range(500)]
    spans = [schema.msgspec.structs.replace(span(i), status_code=503 if i == 199 else 200) for i in range(200)]
    ev = Evidence(source="shop/checkout", destination="shop/payments", port=8080, flows=flows, spans=spans,
                  sidecar=True)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        result = diagnose(ev)
        times.append((time.perf_counter() - start) * 1e3)
    assert result.layer == "l7"
    return {"flows": len(flows), "spans": len(spans), "ms_per_call": round(statistics.median(times), 3)}


APP = textwrap.dedent("""
    import socket
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080)); srv.listen(256)
    while True:
        conn, _ = srv.accept()
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
        conn.close()
""")

CLIENT = textwrap.dedent("""
    import http.client, json, sys, time
    out = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5)
        c.request("GET", "/pay")
        r = c.getresponse(); r.read(); c.close()
        assert r.status == 200, r.status
        out.append(time.perf_counter() - start)
    print(json.dumps(out))
""")


def _sh(*argv: str, stdin: bytes | None = None) -> None:
    subprocess.run(argv, check=True, capture_output=True, input=stdin, timeout=30)


def bench_sidecar(requests: int, rounds: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root"}
    tag = secrets.token_hex(3)
    a, b = f"ciliary-bench{tag}-a", f"ciliary-bench{tag}-b"
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-istio-"))
    core = L7Core()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def receive() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(otlpserver.start(core.accept, str(tmp / "otlp.sock")))
        started.set()
        loop.run_forever()

    threading.Thread(target=receive, daemon=True).start()
    started.wait(10)
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, ip in ((a, "10.254.9.1/30"), (b, "10.254.9.2/30")):
            _sh("ip", "-n", ns, "addr", "add", ip, "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        procs.append(subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", APP]))
        plans = {}
        for ns, pod in ((a, "checkout"), (b, "payments")):
            record = schema.ResourceRecord(kind="Pod", api_version="v1", namespace="bench", name=pod, uid=pod,
                                           generation=1, created="2026-01-01T00:00:00Z", manifest={
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": "bench", "labels": {"app": pod},
                             "annotations": {sidecar.INJECT_ANNOTATION: "true"}},
                "spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}]}]}})
            plans[ns] = plan = sidecar.plan(record, str(tmp / "otlp.sock"))
            config = sidecar.write_bootstrap(tmp / pod, plan)
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *sidecar.container_argv(config)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2.0)

        def run(n: int) -> list[float]:
            done = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", CLIENT, "10.254.9.2", str(n)],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        def redirect(on: bool) -> None:
            for ns, plan in plans.items():
                if on:
                    _sh("ip", "netns", "exec", ns, "iptables-restore", "--noflush", stdin=plan.iptables.encode())
                else:
                    _sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-F")
                    _sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-X")

        samples: dict[str, list[float]] = {"bare": [], "sidecars": []}
        for _ in range(rounds):
            for mode in ("bare", "sidecars"):
                redirect(mode == "sidecars")
                run(20)  # warm-up
                samples[mode] += run(requests)
        redirect(False)
        time.sleep(1.5)
        out: dict[str, Any] = {"requests_per_mode": len(samples["bare"]), "spans_received": core.accepted}
        for mode, values in samples.items():
            values.sort()
            out[mode] = {"p50_ms": round(S.pct(values, 0.50) * 1e3, 3), "p99_ms": round(S.pct(values, 0.99) * 1e3, 3)}
        out["ratio_p50"] = round(out["sidecars"]["p50_ms"] / out["bare"]["p50_ms"], 2)
        out["added_p50_ms"] = round(out["sidecars"]["p50_ms"] - out["bare"]["p50_ms"], 3)
        return out
    finally:
        S.stop_processes(procs, timeout=5)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        loop.call_soon_threadsafe(loop.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def render(res: dict[str, Any]) -> str:
    j, o, d, s = res["join"], res["otlp"], res["diagnose"], res["sidecar"]
    lines = [
        f"join        {j['us_per_flow']:>8} µs/flow   {j['us_per_span']:>8} µs/span   ({j['joined']}/{j['spans']} joined)",
        f"otlp        {o['spans_per_s_in_process']:>8} spans/s in process   {o['spans_per_s_http']:>8} spans/s over HTTP",
        f"diagnose    {d['ms_per_call']:>8} ms/call ({d['flows']} flows, {d['spans']} spans)",
    ]
    if "skipped" in s:
        lines.append(f"sidecar     skipped: {s['skipped']}")
    else:
        lines.append(f"sidecar     bare p50 {s['bare']['p50_ms']} ms p99 {s['bare']['p99_ms']} ms | "
                     f"sidecars p50 {s['sidecars']['p50_ms']} ms p99 {s['sidecars']['p99_ms']} ms | "
                     f"ratio p50 {s['ratio_p50']}x (+{s['added_p50_ms']} ms)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    S.install_sigterm()
    res = S.results_header("bench/istio.py" + (" --quick" if args.quick else ""), ("envoy",))
    print("1. join", flush=True)
    res["join"] = bench_join(5_000 if args.quick else 20_000, 3)
    print("2. otlp", flush=True)
    res["otlp"] = bench_otlp(50 if args.quick else 200, 100)
    print("3. diagnose", flush=True)
    res["diagnose"] = bench_diagnose(50 if args.quick else 200)
    print("4. sidecar latency", flush=True)
    res["sidecar"] = bench_sidecar(100 if args.quick else 300, 2 if args.quick else 3)
    S.write_results(RESULTS, res, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
