"""Cost of tracing on the apply path and the flow path: on against off in one run, rounds
alternating off/on.

1. ``apply``: a real nats-server (127.0.0.1) and real ``identity``, ``policy`` and
   ``servicelb`` processes, then the real ``ciliary apply -f`` of APPS apps (PODS_PER_APP
   pods, a Service and a CiliumNetworkPolicy each). Off: no OTel environment. On:
   ``OTEL_EXPORTER_OTLP_ENDPOINT`` names a sink process on 127.0.0.1 (it decodes every
   request and counts spans; its CPU is not counted). Each round starts from a fresh
   server and fresh services. Reported: the CLI's wall and CPU time, convergence (apply
   start until every Service has its frontend row, every app identity its policy record
   and every policy its status), the services' CPU from the apply until converged plus a
   quiet second, and the spans the sink received.
2. ``flows``: a real ``python -m services.flows`` pinned to one CPU, fed raw batches (the
   synthetic ones of bench/flows.py) at a fixed offered rate: off, tracing on (spans
   exported; nothing on the flow path makes one), and tracing on + flows as OTel log
   records (``CILIARY_FLOWS_OTEL_LOGS=1``). Reported: the service's CPU per 1,000 flows
   and the log records the sink received.
3. ``in_process``: the per-event and per-pass work tracing adds, on one core: a mirror
   applying an untraced vs a traced entry and marking a loop, and a pass span with the
   API's no-op tracer (off) vs the SDK with a batch processor whose exporter discards.

Nothing leaves the machine: NATS and the sink listen on 127.0.0.1; no namespace is created.

Usage: .venv/bin/python bench/tracing.py [--quick]
Writes bench/results/tracing.json (with the git commit and whether the tree was dirty,
bench/sandbox.py) and prints ratio tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import flows as F  # noqa: E402
import sandbox as S  # noqa: E402

from ciliary import config, schema  # noqa: E402
from ciliary.supervisor import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "tracing.json"
APPS = 50
PODS_PER_APP = 10
SERVICES = ("identity", "policy", "servicelb")
OTEL_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "CILIARY_FLOWS_OTEL_LOGS",
                  # flows settings a developer's shell may carry
                  "CILIARY_FLOWS_METRICS_PORT", "CILIARY_FLOWS_UI_PORT", "CILIARY_FLOWS_EXPORT_FILE")


# ---- the sink: a separate process that decodes OTLP/HTTP and counts ------------------------------


def run_sink(port: int) -> None:
    from aiohttp import web
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    counts = {"spans": 0, "logs": 0, "requests": 0}

    async def traces(request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        counts["requests"] += 1
        counts["spans"] += sum(len(s.spans) for r in req.resource_spans for s in r.scope_spans)
        return web.Response(content_type="application/x-protobuf")

    async def logs(request: web.Request) -> web.Response:
        req = ExportLogsServiceRequest()
        req.ParseFromString(await request.read())
        counts["requests"] += 1
        counts["logs"] += sum(len(s.log_records) for r in req.resource_logs for s in r.scope_logs)
        return web.Response(content_type="application/x-protobuf")

    async def get_counts(_request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/logs", logs)
    app.router.add_get("/counts", get_counts)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class Sink:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--sink", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.counts()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the OTLP sink did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/counts", timeout=2) as answer:  # loopback only
            return json.loads(answer.read())

    def stop(self) -> None:
        S.stop_processes([self.proc])


# ---- processes -----------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARIABLES}
    env.update(extra)
    return env


def nats_server(tmp: Path) -> S.NatsServer:
    """A fresh nats-server with its store and log in a new directory under ``tmp``."""
    where = Path(tempfile.mkdtemp(prefix="nats-", dir=tmp))
    return S.NatsServer(where / "js", log=where / "nats.log")


def start_service(name: str, url: str, tmp: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = clean_env(**{config.ENV_NATS_URL: url, config.ENV_CLUSTER: "benchtrace",
                        config.ENV_DATA_DIR: str(tmp), config.ENV_INSTANCE: f"{name}-bench",
                        "PYTHONUNBUFFERED": "1", **env})
    with open(tmp / f"{name}.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


# ---- 1. apply path -------------------------------------------------------------------------------


def manifests(first: int) -> str:
    """APPS apps numbered from ``first``: PODS_PER_APP pods, a Service and a policy each."""
    docs = []
    for a in range(first, first + APPS):
        for p in range(PODS_PER_APP):
            docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: app{a}-{p}, labels: {{app: app{a}}}}}
spec:
  nodeName: node-1
  containers: [{{name: c, image: busybox}}]
""")
        docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: app{a}}}
spec:
  selector: {{app: app{a}}}
  ports: [{{port: 80, targetPort: 8080}}]
""")
        docs.append(f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: app{a}-in}}
spec:
  endpointSelector: {{matchLabels: {{app: app{a}}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: app{first + (a + 1 - first) % APPS}}}}}]}}]
""")
    return "---\n".join(docs)


async def converged(url: str) -> tuple[int, int, int]:
    """(frontend rows, policy records, policy statuses) stored now."""
    from ciliary.bus import Bus

    bus = await Bus.connect(url, "bench-tracing")
    try:
        fe = await bus.kv_list(schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>")
        policy = await bus.kv_list(schema.BUCKET_POLICY)
        status = await bus.kv_list(schema.BUCKET_STATUS, "CiliumNetworkPolicy.>")
        return len(fe), len(policy), len(status)
    finally:
        await bus.close()


async def healthy(url: str, services: tuple[str, ...]) -> bool:
    from ciliary.bus import Bus
    from ciliary.status import gather_health

    try:
        bus = await Bus.connect(url, "bench-tracing")
    except Exception:
        return False
    try:
        reports = await gather_health(bus, timeout=0.5)
        return {r.service for r in reports if r.healthy} >= set(services)
    finally:
        await bus.close()


def wait_healthy(url: str, services: tuple[str, ...], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not asyncio.run(healthy(url, services)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"services {services} not healthy")
        time.sleep(0.2)


APPLIES = ("first", "second")  # the first apply after start, then one more of as many objects


def apply_round(tmp: Path, files: dict[str, Path], mode: str, sink: Sink) -> dict[str, Any]:
    """Fresh server and services; the first apply, then the second, each timed until
    converged and a quiet second after (the exporters send every 200 ms); the services'
    CPU of each window."""
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint} if mode == "on" else {}
    server = nats_server(tmp)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [start_service(name, server.url, tmp, {**otel, "OTEL_BSP_SCHEDULE_DELAY": "200"})
                 for name in SERVICES]
        wait_healthy(server.url, SERVICES)
        data_dir = tmp / f"data-{server.port}"
        config.write_instance(data_dir, config.InstanceState(nats_url=server.url, supervisor_pid=1))
        out: dict[str, Any] = {"mode": mode}
        for which in APPLIES:
            before = asyncio.run(converged(server.url))
            spans0 = sink.counts()["spans"]
            cpu0 = [S.process_cpu_s(p.pid) for p in procs]
            usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            cli = subprocess.run([sys.executable, "-m", "ciliary.cli", "apply", "-f", str(files[which])],
                                 env=clean_env(CILIARY_DATA_DIR=str(data_dir), **otel), cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
            cli_wall = time.perf_counter() - t0
            usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if cli.returncode != 0:
                raise RuntimeError(f"apply failed: {cli.stderr}")
            want = tuple(b + APPS for b in before)
            while True:
                got = asyncio.run(converged(server.url))
                if all(g >= w for g, w in zip(got, want, strict=True)):
                    break
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"no convergence: {got} of {want}")
                time.sleep(0.02)
            convergence = time.perf_counter() - t0
            time.sleep(1.0)  # the echo passes and the exporters' batches
            cpu1 = [S.process_cpu_s(p.pid) for p in procs]
            services_cpu = {name: round(b - a, 3) for name, a, b in zip(SERVICES, cpu0, cpu1, strict=True)}
            out[which] = {"cli_wall_s": round(cli_wall, 3),
                          "cli_cpu_s": round(usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime, 3),
                          "convergence_s": round(convergence, 3), "services_cpu_s": services_cpu,
                          "services_cpu_total_s": round(sum(services_cpu.values()), 3),
                          "spans": sink.counts()["spans"] - spans0,
                          "trace_printed": "trace " in cli.stderr}
        return out
    finally:
        S.stop_processes(procs, timeout=15)
        server.stop()


APPLY_KEYS = ("cli_wall_s", "cli_cpu_s", "convergence_s", "services_cpu_total_s", "spans")


def apply_path(rounds: int, sink: Sink) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-tracing-"))
    try:
        files = {"first": tmp / "first.yaml", "second": tmp / "second.yaml"}
        files["first"].write_text(manifests(0))
        files["second"].write_text(manifests(APPS))
        rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        apply_round(tmp, files, "off", sink)  # warm-up: byte code, page cache
        for _ in range(rounds):
            for mode in ("off", "on"):
                row = apply_round(tmp, files, mode, sink)
                rows[mode].append(row)
                print(f"  {mode}: " + "; ".join(
                    f"{w}: cli {row[w]['cli_wall_s']} s, converged {row[w]['convergence_s']} s, services "
                    f"{row[w]['services_cpu_total_s']} cpu-s, {row[w]['spans']} spans" for w in APPLIES), flush=True)
        median = {mode: {w: {key: round(statistics.median(r[w][key] for r in rs), 3) for key in APPLY_KEYS}
                         for w in APPLIES}
                  for mode, rs in rows.items()}
        return {"objects_per_apply": APPS * (PODS_PER_APP + 2), "apps_per_apply": APPS, "rounds": rows,
                "median": median}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- 2. flow path --------------------------------------------------------------------------------

FLOW_MODES = ("off", "tracing on", "tracing on + flow logs")


async def _flow_round(url: str, pid: int, rate: int, seconds: float) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1)
    try:
        await F._seen(nc)
        events = F.synthetic_events(F.BATCH)
        fpe = F.flows_per_event()
        subject = schema.SUBJECT_FLOWS_RAW.format(cluster=F.CLUSTER, node="node-1")
        seq = 0

        async def offer(duration: float) -> int:
            nonlocal seq
            sent = 0
            t0 = time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < duration:
                if sent >= int(rate / fpe * elapsed):
                    await asyncio.sleep(0.001)
                    continue
                seq += 1
                await nc.publish(subject, schema.encode(schema.RawEventBatch(
                    cluster=F.CLUSTER, node="node-1", events=events, boot_time_ns=1_790_000_000 * 10**9, seq=seq)))
                sent += F.BATCH
            await nc.flush()
            return round(sent * fpe)

        async def drained(seen0: int, expected: int) -> int:
            deadline = time.monotonic() + 30
            while True:
                seen, _ = await F._seen(nc)
                if seen - seen0 >= expected or time.monotonic() > deadline:
                    return seen - seen0
                await asyncio.sleep(0.05)

        seen0, _ = await F._seen(nc)
        await drained(seen0, await offer(1.0))  # warm-up
        seen0, _ = await F._seen(nc)
        cpu0 = S.process_cpu_s(pid)
        expected = await offer(seconds)
        done = await drained(seen0, expected)
        await asyncio.sleep(0.5)  # the batch processor's last export
        cpu_s = S.process_cpu_s(pid) - cpu0
        return {"flows": done, "service_cpu_s": round(cpu_s, 3),
                "service_cpu_ms_per_1k_flows": round(cpu_s / done * 1e6, 2) if done else None}
    finally:
        await nc.close()


def flow_path(rate: int, seconds: float, rounds: int, sink: Sink) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-tracing-flows-"))
    cpus = sorted(os.sched_getaffinity(0))
    envs = {"off": {}, "tracing on": {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint},
            "tracing on + flow logs": {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "CILIARY_FLOWS_OTEL_LOGS": "1"}}
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in FLOW_MODES}
    server = nats_server(tmp)
    try:
        for _ in range(rounds):
            for mode in FLOW_MODES:
                env = {config.ENV_CLUSTER: F.CLUSTER, config.ENV_CLUSTER_ID: "9", **envs[mode]}
                svc = start_service("flows", server.url, tmp, env)
                try:
                    os.sched_setaffinity(svc.pid, {cpus[-1]})
                    logs0 = sink.counts()["logs"]
                    row = asyncio.run(_flow_round(server.url, svc.pid, rate, seconds))
                finally:
                    S.stop_processes([svc], timeout=15)
                row["log_records"] = sink.counts()["logs"] - logs0
                rows[mode].append(row)
                print(f"  {mode}: {row['service_cpu_ms_per_1k_flows']} ms/1k flows, {row['flows']} flows, "
                      f"{row['log_records']} log records", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    median = {mode: {"service_cpu_ms_per_1k_flows": round(statistics.median(r["service_cpu_ms_per_1k_flows"]
                                                                            for r in rs), 2),
                     "flows": round(statistics.median(r["flows"] for r in rs)),
                     "log_records": round(statistics.median(r["log_records"] for r in rs))}
              for mode, rs in rows.items()}
    return {"service_cpu": cpus[-1], "offered_flows_per_s": rate, "seconds_per_round": seconds,
            "rounds": rows, "median": median}


# ---- 3. in process -------------------------------------------------------------------------------


def in_process(n: int) -> dict[str, Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from ciliary import telemetry, tracing
    from ciliary.kv import SYNCED, KVEntry
    from ciliary.watch import Mirror, PassLoop

    cpu = S.pin_one_cpu()

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    sdk_tracer = provider.get_tracer("bench")
    with sdk_tracer.start_as_current_span("apply"):
        traced_headers = telemetry.inject_headers({"KV-Operation": "PUT"})

    async def noop() -> None:
        return None

    def per_event(headers: dict[str, str]) -> float:
        loop = PassLoop("bench", noop)
        mirror = Mirror("resources").notify(loop)
        mirror.apply(SYNCED)  # changes from now on
        entries = [KVEntry("resources", f"Pod.default.p{i}", i, b"v", headers) for i in range(n)]
        t0 = time.perf_counter()
        for e in entries:
            mirror.apply(e)
        elapsed = time.perf_counter() - t0
        loop.causes.take()
        return elapsed / n * 1e6

    def per_pass(tracer: Any) -> float:
        saved = tracing._tracer
        tracing._tracer = tracer
        try:
            causes = [trace_context(traced_headers)]
            t0 = time.perf_counter()
            for _ in range(n // 10):
                with tracing.pass_span("bench", causes, 0, 1):
                    pass
            return (time.perf_counter() - t0) / (n // 10) * 1e6
        finally:
            tracing._tracer = saved

    def trace_context(headers: dict[str, str]) -> Any:
        return tracing.span_context_of(headers)

    def per_inject(current: bool) -> float:
        t0 = time.perf_counter()
        if current:
            with sdk_tracer.start_as_current_span("publish"):
                for _ in range(n):
                    telemetry.inject_headers()
        else:
            for _ in range(n):
                telemetry.inject_headers()
        return (time.perf_counter() - t0) / n * 1e6

    from opentelemetry import trace as api

    rows = {
        "mirror event, untraced entry (us)": [per_event({"KV-Operation": "PUT"}) for _ in range(5)],
        "mirror event, traced entry (us)": [per_event(traced_headers) for _ in range(5)],
        "pass span, no-op tracer: traced cause, no exporter (us)": [per_pass(api.NoOpTracer()) for _ in range(5)],
        "pass span, SDK + batch export (us)": [per_pass(sdk_tracer) for _ in range(5)],
        "bus headers, no span current (us)": [per_inject(False) for _ in range(5)],
        "bus headers, a span current (us)": [per_inject(True) for _ in range(5)],
    }
    provider.shutdown()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return {"cpu": cpu, "n": n, "median_us": {k: round(statistics.median(v), 3) for k, v in rows.items()},
            "samples_us": {k: [round(x, 3) for x in v] for k, v in rows.items()}}


# ---- report --------------------------------------------------------------------------------------


def _x(on: float, off: float) -> str:
    return f"{on / off:.2f}" if off else "-"


def render(res: dict[str, Any]) -> str:
    out = []
    a = res["apply"]
    out.append(f"1. apply path: `ciliary apply` of {a['objects_per_apply']:,} objects ({a['apps_per_apply']} apps) "
               f"into identity, policy and servicelb processes, then {a['objects_per_apply']:,} more; "
               f"median of {len(a['rounds']['off'])} rounds")
    table_rows = []
    for w in APPLIES:
        off = a["median"]["off"][w]
        for mode, label in (("off", "off"), ("on", "on (OTLP/HTTP)")):
            m = a["median"][mode][w]
            table_rows.append([f"{w} apply", label, m["cli_wall_s"], m["cli_cpu_s"], m["convergence_s"],
                               m["services_cpu_total_s"], _x(m["services_cpu_total_s"], off["services_cpu_total_s"]),
                               round(m["spans"])])
    out.append(F.table(["apply", "tracing", "cli wall s", "cli cpu s", "converged s", "services cpu s", "x",
                        "spans"], table_rows))
    f = res["flows"]
    base = f["median"]["off"]["service_cpu_ms_per_1k_flows"]
    out.append(f"\n2. flow path: flows service pinned to CPU {f['service_cpu']}, offered "
               f"{f['offered_flows_per_s']:,} flows/s, median of {len(f['rounds']['off'])} rounds")
    out.append(F.table(["mode", "flows", "service cpu ms/1k flows", "x", "log records"],
                       [[m, f["median"][m]["flows"], f["median"][m]["service_cpu_ms_per_1k_flows"],
                         _x(f["median"][m]["service_cpu_ms_per_1k_flows"], base), f["median"][m]["log_records"]]
                        for m in FLOW_MODES]))
    p = res["in_process"]
    out.append(f"\n3. in process on CPU {p['cpu']} (median of 5 runs of {p['n']:,} events, {p['n'] // 10:,} passes)")
    out.append(F.table(["work", "us"], [[k, v] for k, v in p["median_us"].items()]))
    out.append(f"\nload average (1, 5, 15 min) at start {res['load_average_start']}, at end {res['load_average_end']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    ap.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sink:
        run_sink(args.sink)
        return 0
    res: dict[str, Any] = {**S.results_header("bench/tracing.py" + (" --quick" if args.quick else "")),
                           "load_average_start": S.load_averages()}
    sink = Sink()
    try:
        print("1. apply path", flush=True)
        res["apply"] = apply_path(2 if args.quick else 4, sink)
        print("2. flow path", flush=True)
        res["flows"] = flow_path(25_000, 2.0 if args.quick else 4.0, 2 if args.quick else 3, sink)
    finally:
        sink.stop()
    print("3. in process", flush=True)
    res["in_process"] = in_process(20_000 if args.quick else 100_000)
    res["load_average_end"] = S.load_averages()
    S.write_results(RESULTS, res, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
