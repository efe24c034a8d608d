"""Cost of the public event API on the flow path: flows published as JSON on
``ciliary.events.flows.<cluster>.<node>`` (on: a subscriber holds a lease) against the
same path with nobody listening (off), in one run, rounds alternating off/on.

1. ``pipeline``: in-process on one core, the flows service's per-batch work
   (``FlowsCore.ingest`` + the ``FlowBatch`` messages it publishes + the event API's
   ``active`` check) with and without ``payloads.flow_messages``, and without the check (the JSON lines of
   ``ciliary observe -o json``), on the synthetic batches of bench/flows.py (512 events,
   256 pods). Reports flows/s and microseconds per flow, median of the rounds.
2. ``service``: a real nats-server (127.0.0.1) and a real ``python -m services.flows``
   pinned to one CPU, fed raw batches at a fixed offered rate; in the on rounds a plain
   nats-py subscriber in this process holds a lease and reads every event message. Reports
   the flows service's CPU per 1,000 flows, flows processed, and (on) the flow lines the
   subscriber received.

Nothing leaves the machine: NATS listens on 127.0.0.1 only; no namespace is created.

Usage: .venv/bin/python bench/events.py [--quick]
Writes bench/results/events.json (with the git commit, bench/sandbox.py) and prints a ratio table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
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

from ciliary import schema  # noqa: E402
from ciliary.events import payloads, subjects  # noqa: E402
from ciliary.events.publisher import EventPublisher  # noqa: E402
from services.flows.core import FlowsCore  # noqa: E402
from services.flows.service import GC_THRESHOLDS  # noqa: E402

RESULTS = REPO / "bench" / "results" / "events.json"
CLUSTER = F.CLUSTER
MAX_PAYLOAD = 1024 * 1024
LEASE_TTL_S = 2.0


# ---- 1. in-process ----------------------------------------------------------------------------


def pipeline(seconds: float, rounds: int) -> dict[str, Any]:
    cpu = S.pin_one_cpu()
    gc_default = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    batches = F.batches(64)
    core = FlowsCore(CLUSTER)
    F.enrichment(core)
    for p in batches[:8]:
        core.ingest(p)
    publisher = EventPublisher(None, CLUSTER, (subjects.FLOWS,), subjects.EventsSetting())  # type: ignore[arg-type]

    def without(p: bytes) -> int:
        flows = core.ingest(p)
        core.publish_payloads(flows, MAX_PAYLOAD)
        return len(flows)

    def off(p: bytes) -> int:
        flows = core.ingest(p)
        core.publish_payloads(flows, MAX_PAYLOAD)
        if publisher.active(subjects.FLOWS):
            raise AssertionError("nobody holds a lease")
        return len(flows)

    def on(p: bytes) -> int:
        flows = core.ingest(p)
        core.publish_payloads(flows, MAX_PAYLOAD)
        payloads.flow_messages(flows, MAX_PAYLOAD)
        return len(flows)

    def run(step: Any) -> float:
        gc.collect()
        n = 0
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            for p in batches:
                n += step(p)
        return n / (time.process_time() - cpu0)

    samples: dict[str, list[float]] = {"without": [], "off": [], "on": []}
    for _ in range(rounds):
        samples["without"].append(run(without))
        samples["off"].append(run(off))
        samples["on"].append(run(on))
    gc.set_threshold(*gc_default)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    out: dict[str, Any] = {"cpu": cpu, "seconds_per_round": seconds, "rounds": rounds, "modes": {}}
    for mode, values in samples.items():
        per_s = statistics.median(values)
        out["modes"][mode] = {"flows_per_cpu_s": round(per_s), "us_per_flow": round(1e6 / per_s, 2),
                              "rounds_flows_per_cpu_s": [round(v) for v in values]}
    flows = core.ingest(batches[0])
    msg = payloads.flow_messages(flows, MAX_PAYLOAD).messages
    out["json_bytes_per_flow"] = round(sum(map(len, msg)) / len(flows), 1)
    out["msgpack_bytes_per_flow"] = round(sum(map(len, core.publish_payloads(flows, MAX_PAYLOAD))) / len(flows), 1)
    return out


# ---- 2. nats-server + flows service ------------------------------------------------------------


class Listener:
    """A plain nats-py subscriber of the flow events; holds a lease while ``leasing``."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.lines = 0
        self.leasing = False
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def on_msg(msg: Any) -> None:
            self.lines += msg.data.count(b"\n")

        await self.nc.subscribe("ciliary.events.flows.>", cb=on_msg)

    async def lease(self) -> None:
        self.leasing = True

        async def renew() -> None:
            while self.leasing:
                await self.nc.publish(subjects.SUBJECT_INTEREST,
                                      json.dumps({"topics": ["flows"], "ttl_s": LEASE_TTL_S}).encode())
                await asyncio.sleep(LEASE_TTL_S / 4)

        self.task = asyncio.create_task(renew())

    async def release(self) -> None:
        self.leasing = False
        if self.task is not None:
            await self.task
        await asyncio.sleep(LEASE_TTL_S + 0.5)  # the lease runs out


async def _round(nc: Any, pid: int, rate: int, seconds: float, seq: list[int]) -> dict[str, Any]:
    events = F.synthetic_events(F.BATCH)
    fpe = F.flows_per_event()
    subject = schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1")
    seen0, _ = await F._seen(nc)
    cpu0 = S.process_cpu_s(pid)
    sent = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        if sent >= int(rate / fpe * elapsed):
            await asyncio.sleep(0.001)
            continue
        seq[0] += 1
        await nc.publish(subject, schema.encode(schema.RawEventBatch(
            cluster=CLUSTER, node="node-1", events=events, boot_time_ns=1_790_000_000 * 10**9, seq=seq[0])))
        sent += F.BATCH
    await nc.flush()
    expected = round(sent * fpe)
    deadline = time.monotonic() + 30
    while True:
        seen, _ = await F._seen(nc)
        if seen - seen0 >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    cpu_s = S.process_cpu_s(pid) - cpu0
    done = seen - seen0
    return {"flows": done, "service_cpu_s": round(cpu_s, 3),
            "service_cpu_ms_per_1k_flows": round(cpu_s / done * 1e6, 2) if done else None,
            "wall_s": round(time.perf_counter() - t0, 2)}


async def _service_rounds(url: str, pid: int, rate: int, seconds: float, rounds: int) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await F._seen(nc, patience=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        listener = Listener(nc)
        await listener.start()
        seq = [0]
        await _round(nc, pid, rate, 1.0, seq)  # warm-up
        rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for _ in range(rounds):
            lines0 = listener.lines
            rows["off"].append({**await _round(nc, pid, rate, seconds, seq), "event_lines": listener.lines - lines0})
            await listener.lease()
            await asyncio.sleep(0.5)  # the lease reaches the service
            lines0 = listener.lines
            row = await _round(nc, pid, rate, seconds, seq)
            await asyncio.sleep(0.3)
            rows["on"].append({**row, "event_lines": listener.lines - lines0})
            await listener.release()
            print(f"  off {rows['off'][-1]['service_cpu_ms_per_1k_flows']} ms/1k flows, "
                  f"on {rows['on'][-1]['service_cpu_ms_per_1k_flows']} ms/1k flows "
                  f"({rows['on'][-1]['event_lines']} event lines)", flush=True)
        return rows
    finally:
        await nc.close()


def service(rate: int, seconds: float, rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-events-"))
    server: S.NatsServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = S.NatsServer(tmp / "nats", log=tmp / "nats.log")
        svc, cpu = F.start_flows_service(tmp, server.url, unset=(subjects.ENV_EVENTS,))
        procs.append(svc)
        rows = asyncio.run(_service_rounds(server.url, svc.pid, rate, seconds, rounds))
        out: dict[str, Any] = {"service_cpu": cpu, "offered_flows_per_s": rate, "seconds_per_round": seconds,
                               "rounds": rows, "median": {}}
        for mode, rs in rows.items():
            out["median"][mode] = {
                "service_cpu_ms_per_1k_flows": statistics.median(r["service_cpu_ms_per_1k_flows"] for r in rs),
                "flows": statistics.median(r["flows"] for r in rs),
                "event_lines": statistics.median(r["event_lines"] for r in rs)}
        return out
    finally:
        S.stop_processes(procs)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- report --------------------------------------------------------------------------------------


def render(res: dict[str, Any]) -> str:
    p = res["pipeline"]
    none, off, on = p["modes"]["without"], p["modes"]["off"], p["modes"]["on"]
    out = [f"1. flows service per-batch work, in-process on CPU {p['cpu']} (median of {p['rounds']} rounds; "
           f"JSON {p['json_bytes_per_flow']} B/flow vs msgpack {p['msgpack_bytes_per_flow']} B/flow)",
           F.table(["event API", "flows/cpu-s", "us/flow", "x"],
                   [["without the event API's check", f"{none['flows_per_cpu_s']:,}", none["us_per_flow"],
                     f"{none['us_per_flow'] / off['us_per_flow']:.2f}"],
                    ["off (nobody listens)", f"{off['flows_per_cpu_s']:,}", off["us_per_flow"], "1.00"],
                    ["on (flows published as JSON)", f"{on['flows_per_cpu_s']:,}", on["us_per_flow"],
                     f"{on['us_per_flow'] / off['us_per_flow']:.2f}"]])]
    s = res["service"]
    m_off, m_on = s["median"]["off"], s["median"]["on"]
    out.append(f"\n2. nats-server + flows service (pinned to CPU {s['service_cpu']}), offered "
               f"{s['offered_flows_per_s']:,} flows/s, median of {len(s['rounds']['off'])} rounds")
    out.append(F.table(["event API", "flows", "service cpu ms/1k flows", "x", "event lines received"],
                       [["off (no lease)", m_off["flows"], m_off["service_cpu_ms_per_1k_flows"], "1.00",
                         m_off["event_lines"]],
                        ["on (a subscriber's lease)", m_on["flows"], m_on["service_cpu_ms_per_1k_flows"],
                         f"{m_on['service_cpu_ms_per_1k_flows'] / m_off['service_cpu_ms_per_1k_flows']:.2f}",
                         m_on["event_lines"]]]))
    out.append(f"\nload average (1, 5, 15 min) at start {res['load_average_start']}, at end {res['load_average_end']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter rounds")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {**S.results_header("bench/events.py" + (" --quick" if args.quick else "")),
                           "load_average_start": S.load_averages()}
    print("1. pipeline", flush=True)
    res["pipeline"] = pipeline(1.0 if args.quick else 2.0, 3 if args.quick else 5)
    print("2. nats-server + flows service", flush=True)
    res["service"] = service(25_000, 2.0 if args.quick else 4.0, 2 if args.quick else 3)
    res["load_average_end"] = S.load_averages()
    S.write_results(RESULTS, res, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
