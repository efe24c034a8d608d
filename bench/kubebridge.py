"""Kube bridge at scale: the initial list of N pods (default 5,000), time and memory.

Per run: a fresh nats-server (loopback, throw-away store), the API-server double
(``tests/k8sdouble``, in this process) holding N pods made from the recorded pod fixture
(distinct names, 50 per namespace label ``app``), 20 Namespaces and N/10 Services; then
``python -m services.kubebridge`` is started exactly as a Deployment runs it (kubeconfig
pointing at the double, page size 500) and timed:

- ``first_request_s``: from process start until its first pod list request (interpreter,
  imports, NATS connection, buckets);
- ``listed_s``: until the last page of the pod list was served;
- ``synced_s``: until every object is in bucket ``resources`` (read back with one kv_list);
- ``rss_mb`` / ``peak_rss_mb``: the bridge's resident memory after the sync and its peak
  (VmRSS / VmHWM); ``start_rss_mb`` the same at its first pod list request (the interpreter
  with kubernetes-asyncio loaded, nothing listed yet);

The double serves the lists from this process (Python, aiohttp): its time to build and send
the pages is part of ``listed_s``, as a real API server's would be.
- ``change_ms``: p50 / p90 of ``--changes`` single-pod updates, from the API write until
  the new record is in the bucket (watch event → translate → compare-and-set write).

Nothing leaves the machine: every socket is on 127.0.0.1.

Usage: .venv/bin/python bench/kubebridge.py [--pods N] [--runs R] [--changes C] [--output F]
Writes bench/results/kubebridge.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sandbox import NatsServer, git_state, machine, process_memory  # noqa: E402
from ciliary import schema  # noqa: E402
from ciliary.bus import Bus  # noqa: E402
from tests.k8sdouble import fixtures  # noqa: E402
from tests.k8sdouble.apiserver import ApiServerDouble  # noqa: E402

RESULTS = REPO / "bench" / "results" / "kubebridge.json"
PAGE_SIZE = 500


def populate(double: ApiServerDouble, pods: int) -> int:
    base_pod = fixtures.load("pod")
    base_svc = fixtures.load("service")
    namespaces = 20
    for n in range(namespaces):
        ns = fixtures.variant(fixtures.load("namespace"), f"ns-{n}")
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"] = f"ns-{n}"
        double.put_object(ns)
    for i in range(pods):
        obj = fixtures.variant(base_pod, f"web-{i}", app=f"app-{i // 50}")
        obj["metadata"]["namespace"] = f"ns-{i % namespaces}"
        obj["status"]["podIP"] = f"10.{244 + i // 65536}.{i // 256 % 256}.{i % 256}"
        double.put_object(obj)
    services = pods // 10
    for i in range(services):
        svc = fixtures.variant(base_svc, f"svc-{i}")
        svc["metadata"]["namespace"] = f"ns-{i % namespaces}"
        svc["spec"]["clusterIP"] = f"10.96.{i // 250}.{i % 250 + 1}"
        svc["spec"]["clusterIPs"] = [svc["spec"]["clusterIP"]]
        svc["spec"]["selector"] = {"app": f"app-{i}"}
        double.put_object(svc)
    return namespaces + pods + services


async def one_run(pods: int, changes: int, workdir: Path) -> dict[str, Any]:
    nats = NatsServer(workdir / "nats")
    double = ApiServerDouble(bookmark_interval=5.0)
    await double.start()
    bridge: subprocess.Popen[bytes] | None = None
    bus: Bus | None = None
    try:
        total = populate(double, pods)
        url = nats.url
        bus = await Bus.connect(url, "bench-kubebridge")
        await bus.ensure_buckets()
        env = dict(os.environ, CILIARY_NATS_URL=url, CILIARY_INSTANCE="kubebridge-bench",
                   CILIARY_KUBECONFIG=str(double.kubeconfig(workdir / "kubeconfig")),
                   CILIARY_KUBE_PAGE_SIZE=str(PAGE_SIZE), CILIARY_KUBE_RETRY_PERIOD="0.2",
                   CILIARY_KUBE_RENEW_DEADLINE="5", CILIARY_KUBE_LEASE_DURATION="10",
                   CILIARY_LOG_LEVEL="WARNING")
        served_before = len(double.requests)
        t0 = time.monotonic()
        with open(workdir / "kubebridge.log", "ab") as log:
            bridge = subprocess.Popen([sys.executable, "-m", "services.kubebridge"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        start_rss = 0.0
        first = listed = 0.0
        pages_seen = 0
        while True:
            await asyncio.sleep(0.01)
            pod_pages = [r for r in double.requests[served_before:]
                         if r.path == "/api/v1/pods" and "watch" not in r.query]
            if not first and (pod_pages or any(r.path == "/api/v1/pods" for r in
                                               double.requests[served_before:])):
                first = time.monotonic() - t0
                start_rss = process_memory(bridge.pid).get("rss_mib", 0.0)
            if len(pod_pages) > pages_seen:
                pages_seen = len(pod_pages)
                if not listed and pages_seen >= -(-pods // PAGE_SIZE):
                    listed = time.monotonic() - t0
            if listed and len(double.requests) - served_before > pages_seen:  # watching now
                stored = await bus.kv_list(schema.BUCKET_RESOURCES, ">")
                if len(stored) >= total:
                    synced = time.monotonic() - t0
                    break
            if time.monotonic() - t0 > 300:
                raise RuntimeError("the bridge did not sync within 300 s")
        memory = process_memory(bridge.pid)
        rss, peak = memory.get("rss_mib", 0.0), memory.get("peak_rss_mib", 0.0)
        latencies = []
        base = fixtures.load("pod")
        for i in range(changes):
            obj = fixtures.variant(base, f"web-{i}", app=f"app-{i // 50}", changed=str(i))
            obj["metadata"]["namespace"] = f"ns-{i % 20}"
            key = f"Pod.ns-{i % 20}.web-{i}"
            start = time.monotonic()
            double.put_object(obj)
            while True:
                entry = await bus.kv_get(schema.BUCKET_RESOURCES, key)
                record = schema.decode(entry.value, schema.ResourceRecord) if entry else None
                if record and record.manifest["metadata"]["labels"].get("changed") == str(i):
                    break
                await asyncio.sleep(0.001)
            latencies.append((time.monotonic() - start) * 1000)
        latencies.sort()
        return {"objects": total, "first_request_s": round(first, 2),
                "listed_s": round(listed, 2), "synced_s": round(synced, 2),
                "start_rss_mb": start_rss, "rss_mb": rss, "peak_rss_mb": peak,
                "pages": pages_seen, "load_average": round(os.getloadavg()[0], 2),
                "change_ms": {"p50": round(statistics.median(latencies), 1),
                              "p90": round(latencies[int(len(latencies) * 0.9) - 1], 1)}
                if latencies else {}}
    finally:
        if bridge is not None:
            bridge.terminate()
            try:
                await asyncio.to_thread(bridge.wait, 10)
            except subprocess.TimeoutExpired:
                bridge.kill()
        if bus is not None:
            await bus.close()
        await double.stop()
        nats.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    res: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/kubebridge.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(), "git": git_state(),
        "params": {"pods": args.pods, "runs": args.runs, "changes": args.changes,
                   "page_size": PAGE_SIZE},
        "runs": [],
    }
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ciliary-kubebridge-bench-") as tmp:
            result = asyncio.run(one_run(args.pods, args.changes, Path(tmp)))
        res["runs"].append(result)
        print(f"run {run + 1}: {json.dumps(result)}", flush=True)
    runs = res["runs"]
    res["median"] = {key: statistics.median(r[key] for r in runs)
                     for key in ("first_request_s", "listed_s", "synced_s", "start_rss_mb",
                                 "rss_mb", "peak_rss_mb")}
    res["median"]["change_ms_p50"] = statistics.median(r["change_ms"]["p50"] for r in runs
                                                       if r["change_ms"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    m = res["median"]
    print(f"\n{args.pods:,} pods ({runs[0]['objects']:,} objects), page size {PAGE_SIZE}, "
          f"median of {len(runs)} runs")
    print(f"{'1st list':>10} {'listed':>10} {'synced':>10} {'rss start':>10} {'rss synced':>11} "
          f"{'peak rss':>10} {'change p50':>11}")
    print(f"{m['first_request_s']:>9.2f}s {m['listed_s']:>9.2f}s {m['synced_s']:>9.2f}s "
          f"{m['start_rss_mb']:>8.1f}MB "
          f"{m['rss_mb']:>9.1f}MB {m['peak_rss_mb']:>8.1f}MB {m['change_ms_p50']:>9.1f}ms")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
