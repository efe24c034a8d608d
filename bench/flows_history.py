"""Flow history benchmark: reading the ``FLOWS`` stream for queries beyond the rings.

Measures:
1. ``scan``: ``services.flows.history.StreamScan.feed`` on one core over ``FlowBatch``
   messages of 512 enriched flows (the synthetic mix of bench/flows.py, decoded and
   enriched by ``FlowsCore``): flows per CPU-second for ``--all`` (every flow kept), a
   selective filter (``--verdict DROPPED --to-port 8080``) and ``--last 100``, and the
   memory the kept flows of an ``--all`` scan take (tracemalloc, per flow).
2. ``stream``: the same messages stored in a JetStream stream ``FLOWS`` of a real
   ``nats-server`` (127.0.0.1, temporary store), read back through
   ``Bus.read_stream`` + ``history.read_history`` as the flows service does for
   ``ciliary observe --all``: flows per second of wall clock and the longest the event
   loop went without running another task (a 1 ms ticker), which bounds the delay ingest
   sees during a history read; then the time to decode and encode the answer's reply
   chunks as the service does (``FlowsCore.answer_chunks``).

Usage: .venv/bin/python bench/flows_history.py [--messages N]
Writes bench/results/flows_history.json and prints the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.flows import CLUSTER, batches, enrichment  # noqa: E402
from ciliary import schema  # noqa: E402
from ciliary.bus import Bus  # noqa: E402
from ciliary.supervisor import free_port  # noqa: E402
from services.flows.core import FlowsCore, QueryPlan  # noqa: E402
from services.flows.history import HistoryLimits, StreamScan, read_history  # noqa: E402
from services.flows.service import GC_THRESHOLDS  # noqa: E402
from services.flows.store import NO_HORIZON  # noqa: E402

LIMITS = HistoryLimits(max_scan=10**9)


def messages(count: int) -> list[bytes]:
    """``count`` FlowBatch payloads of enriched flows, one per raw batch."""
    core = FlowsCore(CLUSTER, capacity=512)
    enrichment(core)
    raw = batches(count)
    return [schema.encode(schema.FlowBatch(flows=core.ingest(data))) for data in raw]


def scan_rates(payloads: list[bytes]) -> dict[str, Any]:
    flows = sum(len(schema.decode(p, schema.FlowBatch).flows) for p in payloads)
    queries = {
        "all": schema.FlowQuery(),
        "verdict DROPPED, to-port 8080": schema.FlowQuery(whitelist=[schema.FlowFilter(
            verdict=["DROPPED"], destination_port=["8080"])]),
        "last 100": schema.FlowQuery(number=100),
    }
    out: dict[str, Any] = {"flows": flows, "messages": len(payloads)}
    for name, q in queries.items():
        scan = StreamScan(q, NO_HORIZON, LIMITS)
        cpu = time.process_time()
        for p in payloads:
            scan.feed(p, 0)
        spent = time.process_time() - cpu
        out[name] = {"flows_per_cpu_s": round(flows / spent), "kept": len(scan.entries())}
    tracemalloc.start()
    scan = StreamScan(schema.FlowQuery(), NO_HORIZON, LIMITS)
    for p in payloads:
        scan.feed(p, 0)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out["all_kept_bytes_per_flow"] = round(current / flows)
    return out


async def _stream_read(url: str, payloads: list[bytes]) -> dict[str, Any]:
    bus = await Bus.connect(url, "bench-history")
    try:
        await bus.ensure_stream(schema.STREAM_FLOWS, [schema.SUBJECT_FLOWS_ALL], max_bytes=1 << 30, max_age_s=3600)
        subject = schema.SUBJECT_FLOWS.format(cluster=CLUSTER, node="node-1")
        for p in payloads:
            await bus.js.publish(subject, p)
        stalls: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = loop.time()
                stalls.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        scan = StreamScan(schema.FlowQuery(), NO_HORIZON, LIMITS)
        start, cpu = time.perf_counter(), time.process_time()
        await read_history(bus.read_stream(schema.STREAM_FLOWS, schema.SUBJECT_FLOWS_ALL), scan)
        wall, spent = time.perf_counter() - start, time.process_time() - cpu
        stop.set()
        await tick
        stalls.sort()
        core = FlowsCore(CLUSTER)
        plan = QueryPlan(schema.FlowQuery(), [], NO_HORIZON, True)
        start = time.process_time()
        sizes = [len(c) for c in core.answer_chunks(plan, bus.max_payload, scan)]
        answer_cpu = time.process_time() - start
        return {"flows": scan.scanned, "kept": len(scan.entries()), "seconds": round(wall, 2),
                "flows_per_s": round(scan.scanned / wall), "flows_per_cpu_s": round(scan.scanned / spent),
                "loop_gap_p99_ms": round(stalls[int(len(stalls) * 0.99)] * 1000, 1),
                "loop_gap_max_ms": round(stalls[-1] * 1000, 1),
                "answer_chunks": len(sizes), "answer_mb": round(sum(sizes) / 2**20, 1),
                "answer_flows_per_cpu_s": round(scan.scanned / answer_cpu)}
    finally:
        await bus.close()


def stream_read(payloads: list[bytes]) -> dict[str, Any]:
    from ciliary.supervisor import nats_server_binary

    tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-history-"))
    port = free_port()
    proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js",
                             "-sd", str(tmp / "nats")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        return asyncio.run(_stream_read(f"nats://127.0.0.1:{port}", payloads))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=400, help="FlowBatch messages (512 events each)")
    args = ap.parse_args(argv)
    gc.set_threshold(*GC_THRESHOLDS)  # as the flows service runs
    payloads = messages(args.messages)
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_start": os.getloadavg()[0],
           "command": "sudo .venv/bin/python bench/flows_history.py " + " ".join(argv or sys.argv[1:]),
           "scan": scan_rates(payloads), "stream": stream_read(payloads),
           "load_average_end": os.getloadavg()[0]}
    out = REPO / "bench" / "results" / "flows_history.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
