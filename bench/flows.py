"""Flow visibility benchmark: pipeline throughput, kernel → observe latency, datapath cost.

Measures, in one run:
1. ``pipeline``: flows decoded + enriched + stored (+ counted in metrics) per second on
   one core at steady state, driving ``services.flows.core.FlowsCore.ingest`` with
   synthetic ``RawEventBatch`` payloads (512 events per batch, as the node executor
   sends at most; a mix of TCP trace events, policy drops, DNS requests/responses with
   payload and ICMP, over 256 pods known to the enrichment state), with the garbage
   collector thresholds the service sets. Also the msgpack encoding of the ``FlowBatch``
   messages the service publishes per raw batch, and the pieces separately.
2. ``service``: the same payloads through a real ``nats-server`` (127.0.0.1, JetStream on,
   temporary store) into a real ``python -m services.flows`` process pinned to one CPU,
   offered at fixed rates (10k … 100k flows/s for a few seconds each) and flat out. Each
   step reports how many flows the service saw (its ``FlowQueryReply.seen``), how many it
   counted as lost, how many were missing without being counted, and how long it needed
   after the last publish to catch up.
3. ``latency``: on the embedded stack (``ciliary up -d --nodes 2``, the shop workloads and
   services, no policy) checkout opens connections to payments (cross node) at 20/s; the
   bench subscribes to ``flows.enriched.>`` exactly as ``ciliary observe --follow`` does,
   and a real ``ciliary observe --follow -o json`` runs at the same time. Latency = arrival
   time − the flow's kernel timestamp (``bpf_ktime_get_ns`` + boot time), p50/p99.
4. ``visibility cost``: on the same stack, sequential TCP connections (connect, 32 B
   request/response, close) checkout → payments for a few seconds, with flow visibility
   on (events read by the executors, published, decoded by the flows service) and with
   events not read (both node executors SIGSTOPped: the programs still emit every event,
   the ring buffer fills and further reservations fail fast, as the datapath counts them
   lost). Reports conn/s and the CPU seconds the whole instance (nats-server, services,
   executors) and the machine spent per 1,000 connections, with ratios against not-read.

Nothing leaves the machine: NATS and HTTP listen on 127.0.0.1; pod traffic stays in the
instance's namespaces (cluster ``b<4 hex>``), which ``ciliary down`` removes at the end,
also on error or Ctrl-C.

Usage: .venv/bin/python bench/flows.py [--quick] [--skip-stack]
Writes bench/results/flows.json and prints aligned tables. Parts 3-4 need root and bcc.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402

from ciliary import config, hubble, schema  # noqa: E402
from services.flows.core import FlowsCore  # noqa: E402
from services.flows.dns import build_query, build_response  # noqa: E402
from services.flows.service import GC_THRESHOLDS  # noqa: E402

RESULTS = REPO / "bench" / "results" / "flows.json"
CLUSTER = "bench"
BATCH = 512  # services/node/agent.EVENT_BATCH_MAX
TARGET = 100_000  # flows/s per node
SHOP = REPO / "examples" / "shop"
PUBLISH_STEP = "ingest + encode the FlowBatch messages to publish"


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


# ---- synthetic events --------------------------------------------------------------------


def pod_ip(i: int) -> str:
    return f"10.200.{1 + i // 200}.{10 + i % 200}"


def enrichment(core: FlowsCore, pods: int = 256) -> None:
    e = core.enrichment
    for i in range(pods):
        ident = 10000 + i % 64
        ns = f"ns{i % 8}"
        name = f"app{i % 64}-5c6d7f9b8-{i:05d}"
        e.apply_ipcache(f"x.{i}", schema.IPCacheRecord(prefix=f"{pod_ip(i)}/32", identity=ident,
                                                       namespace=ns, pod=name, node="node-1",
                                                       cluster=CLUSTER, cluster_id=9, source="pod"))
        e.apply_pod(f"{ns}/{name}", {"metadata": {"name": name, "namespace": ns,
                                                  "labels": {"app": f"app{i % 64}", "pod-template-hash": "5c6d7f9b8"},
                                                  "ownerReferences": [{"kind": "ReplicaSet",
                                                                       "name": f"app{i % 64}-5c6d7f9b8"}]},
                                     "spec": {"nodeName": "node-1"}})
    for ident in range(10000, 10064):
        e.apply_identity(f"{schema.IDENTITY_ID_PREFIX}{ident}", schema.IdentityRecord(
            id=ident, labels=[f"k8s:app=app{ident - 10000}", f"k8s:io.kubernetes.pod.namespace=ns{(ident - 10000) % 8}"],
            scope="cluster", cluster=CLUSTER, cluster_id=9))
    for j in range(32):
        e.apply_frontend(f"fe.{j}", schema.LBFrontend(address=f"10.96.0.{10 + j}", port=80, proto="TCP",
                                                      namespace="ns0", name=f"svc{j}", type="ClusterIP",
                                                      service_id=j + 1, rev_nat_id=j + 1))


def synthetic_events(n: int) -> list[schema.RawFlowEvent]:
    """A mix per 20 events: 14 TCP traces, 2 policy drops, 2 DNS (request + response), 1 ICMP, 1 via a VIP."""
    q = build_query("svc3.ns0.svc.cluster.local", 1, 0x4242)
    r = build_response("svc3.ns0.svc.cluster.local", 1, [(1, 30, socket.inet_aton("10.96.0.13"))], ident=0x4242)
    out = []
    for i in range(n):
        a, b = pod_ip(i % 256), pod_ip((i * 7 + 3) % 256)
        k = i % 20
        ts = 1_000_000_000 + i * 1000
        if k < 14:
            flags = (0x02, 0x12, 0x11, 0x10)[k % 4]
            out.append(schema.RawFlowEvent(ts_ns=ts, saddr=a, daddr=b, sport=40000 + i % 20000, dport=8080,
                                           src_identity=10000 + i % 64, dst_identity=10000 + (i * 7) % 64,
                                           ep_id=1 + i % 100, ifindex=5, proto=6, tcp_flags=flags,
                                           direction=2 if k % 2 else 1, is_reply=flags == 0x12,
                                           ct_state=2 if flags == 0x12 else 0, pkt_len=60))
        elif k < 16:
            out.append(schema.RawFlowEvent(ts_ns=ts, saddr=a, daddr=b, sport=41000, dport=8080, proto=6,
                                           tcp_flags=0x02, type=2, verdict=2, drop_reason=133, direction=1,
                                           src_identity=10000 + i % 64, ep_id=7, pkt_len=60))
        elif k == 16:
            out.append(schema.RawFlowEvent(ts_ns=ts, saddr=a, daddr=b, sport=53000, dport=53, proto=17,
                                           direction=2, ep_id=3, orig_daddr="10.96.0.10", orig_dport=53,
                                           payload=q, pkt_len=len(q) + 28))
        elif k == 17:
            out.append(schema.RawFlowEvent(ts_ns=ts, saddr=b, daddr=a, sport=53, dport=53000, proto=17,
                                           direction=1, ep_id=3, is_reply=True, ct_state=2,
                                           orig_daddr="10.96.0.10", orig_dport=53, payload=r,
                                           pkt_len=len(r) + 28))
        elif k == 18:
            out.append(schema.RawFlowEvent(ts_ns=ts, saddr=a, daddr="93.184.216.34", sport=7, dport=0,
                                           proto=1, direction=2, ep_id=4))
        else:
            out.append(schema.RawFlowEvent(ts_ns=ts, saddr=a, daddr=b, sport=42000, dport=8080, proto=6,
                                           tcp_flags=0x02, direction=2, ep_id=5,
                                           orig_daddr=f"10.96.0.{10 + i % 32}", orig_dport=80))
    return out


def batches(count: int, node: str = "node-1") -> list[bytes]:
    events = synthetic_events(BATCH)
    return [schema.encode(schema.RawEventBatch(cluster=CLUSTER, node=node, events=events, boot_time_ns=1_790_000_000
                                               * 10**9, seq=s + 1)) for s in range(count)]


def flows_per_event() -> float:
    core = FlowsCore(CLUSTER)
    enrichment(core)
    return len(core.ingest(batches(1)[0])) / BATCH


# ---- 1. pure pipeline ------------------------------------------------------------------------


def pipeline(seconds: float) -> dict[str, Any]:
    cpu = S.pin_one_cpu()
    gc_default = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)  # as services/flows/service.py main() does
    payloads = batches(64)
    core = FlowsCore(CLUSTER)
    enrichment(core)
    for p in payloads[:8]:  # warm-up, fills caches
        core.ingest(p)

    def run(step) -> tuple[int, float]:
        gc.collect()
        n = 0
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            for p in payloads:
                n += step(p)
        return n, time.process_time() - cpu0

    from services.flows.decode import decode_batch

    rows = {}
    n, cpu_s = run(lambda p: len(schema.decode(p, schema.RawEventBatch).events))
    rows["msgpack decode only"] = ("events", n, cpu_s)
    n, cpu_s = run(lambda p: len(decode_batch(schema.decode(p, schema.RawEventBatch), core.enrichment).flows))
    rows["decode + enrich"] = ("flows", n, cpu_s)
    n, cpu_s = run(lambda p: len(core.ingest(p)))
    rows["decode + enrich + store + metrics (ingest)"] = ("flows", n, cpu_s)

    def service_path(p: bytes) -> int:
        flows = core.ingest(p)
        core.publish_payloads(flows, 1024 * 1024)
        return len(flows)

    n, cpu_s = run(service_path)
    rows[PUBLISH_STEP] = ("flows", n, cpu_s)
    fpe = flows_per_event()
    out = {"cpu": cpu, "seconds_per_step": seconds, "batch_events": BATCH, "flows_per_event": round(fpe, 3),
           "gc_thresholds": list(GC_THRESHOLDS),
           "steps": {k: {"unit": u, "count": c, "cpu_s": round(s, 3), "per_s": round(c / s)}
                     for k, (u, c, s) in rows.items()}}
    gc.set_threshold(*gc_default)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


# ---- 2. real nats-server + flows service -------------------------------------------------------


async def _seen(nc: Any, patience: float = 30.0) -> tuple[int, int]:
    """(flows seen, events lost) as the flows service reports them; waits while it
    reconnects (after the server cut it off as a slow consumer). ``nc``: a nats-py client
    or a ``ciliary.bus.Bus``."""
    from ciliary.bus import Bus

    q = schema.FlowQuery(number=1, whitelist=[schema.FlowFilter(uuid=["none"])], rings_only=True)
    deadline = time.monotonic() + patience
    while True:
        try:
            if isinstance(nc, Bus):
                reply = await nc.request(schema.SUBJECT_FLOWS_QUERY, q, schema.FlowQueryReply, timeout=5)
            else:
                msg = await nc.request(schema.SUBJECT_FLOWS_QUERY, schema.encode(q), timeout=5)
                reply = schema.decode(msg.data, schema.FlowQueryReply)
            return reply.seen, reply.lost
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _service_bench(url: str, pid: int, rates: list[int], step_s: float) -> list[dict[str, Any]]:
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await _seen(nc)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        fpe = flows_per_event()
        events = synthetic_events(BATCH)
        seq = 0

        def payload() -> bytes:
            nonlocal seq
            seq += 1
            return schema.encode(schema.RawEventBatch(cluster=CLUSTER, node="node-1", events=events,
                                                      boot_time_ns=1_790_000_000 * 10**9, seq=seq))
        subject = schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1")
        rows = []
        for rate in rates:  # offered flows/s; 0 = flat out
            seen0, lost0 = await _seen(nc)
            cpu0 = S.process_cpu_s(pid)
            sent_events = 0
            t0 = time.perf_counter()
            i = 0
            while (elapsed := time.perf_counter() - t0) < step_s:
                if rate:
                    due = int(rate / fpe * elapsed)
                    if sent_events >= due:
                        await asyncio.sleep(0.001)
                        continue
                await nc.publish(subject, payload())
                i += 1
                sent_events += BATCH
                if i % 32 == 0:
                    await nc.flush()
            await nc.flush()
            send_s = time.perf_counter() - t0
            expected = round(sent_events * fpe)
            # wait until the service caught up (or stopped making progress)
            last, still = -1, time.perf_counter()
            while True:
                seen, lost = await _seen(nc)
                done = seen - seen0
                if done >= expected:
                    break
                if done != last:
                    last, still = done, time.perf_counter()
                elif time.perf_counter() - still > 3:
                    break
                await asyncio.sleep(0.05)
            total_s = time.perf_counter() - t0
            cpu_s = S.process_cpu_s(pid) - cpu0
            if done < expected:
                # one more batch reveals a gap in the sequence (batches the bus dropped)
                await nc.publish(subject, payload())
                await nc.flush()
                expected += round(BATCH * fpe)
                await asyncio.sleep(1.0)
                seen, lost = await _seen(nc)
                done = seen - seen0
            rows.append({
                "offered_flows_per_s": rate or "max", "sent_flows": expected,
                "publish_flows_per_s": round(expected / send_s), "processed_flows": done,
                "processed_per_s": round(done / total_s), "catch_up_s": round(total_s - send_s, 2),
                "lost_counted": lost - lost0,
                # a bus loss is counted once per missing batch; each bench batch is 512 events
                "missing_flows": expected - done,
                "missing_uncounted": max(0, expected - done - round((lost - lost0) * BATCH * fpe)),
                "service_cpu_s": round(cpu_s, 2),
                "flows_per_service_cpu_s": round(done / cpu_s) if cpu_s else None,
                "kept_up": done >= expected and total_s - send_s < 1.0,
            })
            print(f"  offered {rows[-1]['offered_flows_per_s']!s:>7}  processed {rows[-1]['processed_per_s']:>7}/s"
                  f"  catch-up {rows[-1]['catch_up_s']:>5}s  missing {rows[-1]['missing_uncounted']}", flush=True)
        return rows
    finally:
        await nc.close()


def start_flows_service(tmp: Path, url: str, unset: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m services.flows`` on ``url`` (cluster CLUSTER, data directory and flows.log
    in ``tmp``) without the flows settings a developer's shell may carry nor the variables
    ``unset``, pinned to the last allowed CPU; returns the process and that CPU."""
    env = dict(os.environ, **{config.ENV_NATS_URL: url, config.ENV_CLUSTER: CLUSTER,
                              config.ENV_CLUSTER_ID: "9", config.ENV_DATA_DIR: str(tmp),
                              config.ENV_INSTANCE: "flows-bench", "PYTHONUNBUFFERED": "1"})
    for k in ("CILIARY_FLOWS_METRICS_PORT", "CILIARY_FLOWS_UI_PORT", "CILIARY_FLOWS_EXPORT_FILE", *unset):
        env.pop(k, None)
    with open(tmp / "flows.log", "wb") as log:
        svc = subprocess.Popen([sys.executable, "-m", "services.flows"], env=env, cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT)
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(svc.pid, {cpu})
    return svc, cpu


def service(rates: list[int], step_s: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-flows-"))
    server: S.NatsServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = S.NatsServer(tmp / "nats", log=tmp / "nats.log")
        url = server.url
        svc, cpu = start_flows_service(tmp, url)
        procs.append(svc)
        try:
            rows = asyncio.run(_service_bench(url, svc.pid, rates, step_s))
        except Exception:
            keep = Path(tempfile.gettempdir()) / "ciliary-bench-flows-failed"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(tmp, keep, ignore=shutil.ignore_patterns("nats"))
            print(f"service bench failed; logs in {keep}", file=sys.stderr)
            raise
        return {"service_cpu": cpu, "step_seconds": step_s, "rows": rows,
                "stream": "JetStream stream FLOWS on (default 64 MB)"}
    finally:
        S.stop_processes(procs)
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- 3 + 4. the embedded stack ----------------------------------------------------------------


class Stack:
    def __init__(self) -> None:
        self.cluster = "b" + secrets.token_hex(2)
        self.tmp = Path(tempfile.mkdtemp(prefix="ciliary-bench-flows-stack-"))
        self.data_dir = self.tmp / "instance"
        self.env = dict(os.environ, CILIARY_DATA_DIR=str(self.data_dir))
        for k in ("CILIARY_FLOWS_METRICS_PORT", "CILIARY_FLOWS_UI_PORT"):
            self.env.pop(k, None)
        self.stopped: list[int] = []
        self.up = False

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "ciliary.cli", *args], capture_output=True, text=True,
                           env=self.env, cwd=REPO, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"ciliary {' '.join(args)}: {r.stdout}{r.stderr}")
        return r

    def start(self) -> dict[str, dict]:
        self.up = True
        self.cli("up", "-d", "--nodes", "2", "--cluster", self.cluster, "--cluster-id", "11")
        self.cli("apply", "-f", str(SHOP / "10-workloads.yaml"), "-f", str(SHOP / "20-services.yaml"))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            items = json.loads(self.cli("get", "pods", "-o", "json").stdout)["items"]
            ready = {p["metadata"]["name"]: p["status"] for p in items
                     if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
                     and any(c["type"] == "Ready" and c["status"] == "True"
                             for c in p["status"].get("conditions", []))}
            if len(ready) == 3:
                return ready
            time.sleep(0.3)
        raise RuntimeError("pods not ready")

    def state(self) -> config.InstanceState:
        state = config.read_instance(self.data_dir)
        assert state is not None
        return state

    def stop_executors(self) -> None:
        for p in self.state().processes:
            if p.name.startswith("node/"):
                os.kill(p.pid, signal.SIGSTOP)
                self.stopped.append(p.pid)

    def continue_executors(self) -> None:
        while self.stopped:
            pid = self.stopped.pop()
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def close(self) -> list[str]:
        problems = []
        self.continue_executors()
        if self.up:
            r = self.cli("down", check=False)
            if r.returncode != 0:
                problems.append(f"down: {r.stdout}{r.stderr}")
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        if f"ciliary-{self.cluster}-" in listed:
            problems.append("namespaces left behind")
        if Path("/sys/fs/bpf/ciliary", self.cluster).exists():
            problems.append("pins left behind")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def _connect_once(ip: str, port: int) -> None:
    with socket.create_connection((ip, port), timeout=2) as s:
        s.sendall(b"ping\n")
        s.recv(100)


def latency(stack: Stack, pods: dict[str, dict], count: int) -> dict[str, Any]:
    from services.node import netns as N

    payments_ip = pods["payments"]["podIP"]
    client_ip = pods["checkout"]["podIP"]
    got: list[float] = []
    cli_got: list[float] = []

    async def subscribe_and_drive() -> None:
        bus = await S.connect_as_cli(stack.state().nats_url, stack.data_dir, "bench-flows-latency")

        async def on_flow(msg: Any) -> None:
            now = time.time_ns()
            for f in schema.decode(msg.data, schema.FlowBatch).flows:
                if (f.ip and f.ip.source == client_ip and f.ip.destination == payments_ip and f.l4 and f.l4.TCP
                        and f.l4.TCP.flags and f.l4.TCP.flags.SYN and not f.l4.TCP.flags.ACK
                        and f.trace_observation_point == "FROM_ENDPOINT"):
                    got.append((now - hubble.flow_time_ns(f)) / 1e6)

        sub = await bus.subscribe_raw(schema.SUBJECT_FLOWS_ALL, on_flow)
        follow = subprocess.Popen([sys.executable, "-m", "ciliary.cli", "observe", "--follow", "--from-pod",
                                   "default/checkout", "--to-pod", "default/payments", "--tcp-flags", "SYN",
                                   "--type", "trace:from-endpoint", "-o", "json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=stack.env,
                                  cwd=REPO)
        lines: queue.Queue[tuple[int, str]] = queue.Queue()

        def reader() -> None:
            for line in follow.stdout:  # type: ignore[union-attr]
                lines.put((time.time_ns(), line))

        threading.Thread(target=reader, daemon=True).start()
        await asyncio.sleep(2.0)  # the CLI connects and subscribes
        loop = asyncio.get_running_loop()
        netns = pods["checkout"]["ciliary"]["netns"]
        for _ in range(count):
            await loop.run_in_executor(None, lambda: N.run_in_netns(netns, lambda: _connect_once(payments_ip, 8080)))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        follow.terminate()
        follow.wait(timeout=10)
        while not lines.empty():
            t, line = lines.get()
            try:
                flow = json.loads(line)
            except ValueError:
                continue
            if flow["flow"].get("l4", {}).get("TCP", {}).get("flags", {}).get("ACK"):
                continue
            cli_got.append((t - hubble.flow_time_ns(schema.Flow(time=flow["time"]))) / 1e6)
        await sub.unsubscribe()
        await bus.close()

    asyncio.run(subscribe_and_drive())

    def summary(xs: list[float]) -> dict[str, Any]:
        return {"samples": len(xs), "p50_ms": round(pct(xs, 0.5), 2), "p99_ms": round(pct(xs, 0.99), 2),
                "max_ms": round(max(xs), 2) if xs else None}

    return {"connections": count, "subscription": summary(got), "observe_follow_cli": summary(cli_got)}


def instance_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds per instance process (nats-server, services, node executors)."""
    out: dict[str, float] = {}
    for p in stack.state().processes:
        try:
            out[p.name] = S.process_cpu_s(p.pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def instance_cpu_s(stack: Stack) -> float:
    return sum(instance_cpu(stack).values())


def machine_cpu_s() -> float:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    busy = sum(int(x) for i, x in enumerate(parts[:8]) if i not in (3, 4))  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def conn_rate(netns: str, ip: str, port: int, seconds: float) -> dict[str, Any]:
    from services.node import netns as N

    def run() -> dict[str, Any]:
        done = failed = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            try:
                with socket.create_connection((ip, port), timeout=2) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.sendall(b"x" * 32)
                    s.recv(100)
                done += 1
            except OSError:
                failed += 1
        return {"connections": done, "failed": failed, "seconds": time.perf_counter() - t0}

    return N.run_in_netns(netns, run)


def stack_seen(stack: Stack) -> int:
    async def run() -> int:
        bus = await S.connect_as_cli(stack.state().nats_url, stack.data_dir, "bench-flows-seen")
        try:
            return (await _seen(bus))[0]
        finally:
            await bus.close()

    return asyncio.run(run())


def visibility_cost(stack: Stack, pods: dict[str, dict], seconds: float, rounds: int) -> dict[str, Any]:
    netns = pods["checkout"]["ciliary"]["netns"]
    ip = pods["payments"]["podIP"]
    # Thousands of connections a round leave the client's ports in TIME_WAIT, and connect()
    # then searches longer and longer for a free one: let the client (in the bench's own pod
    # namespace) reuse them, so every round measures the datapath, not the port search.
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"], check=True)
    conn_rate(netns, ip, 8080, 1.0)  # warm-up
    rows: list[dict[str, Any]] = []
    for r in range(rounds):
        for mode in ("visibility", "not-read"):
            if mode == "not-read":
                stack.stop_executors()
            try:
                time.sleep(0.3)
                seen0 = stack_seen(stack) if mode == "visibility" else 0
                per0, mach0 = instance_cpu(stack), machine_cpu_s()
                res = conn_rate(netns, ip, 8080, seconds)
                time.sleep(0.5 if mode == "visibility" else 0.0)  # let the pipeline finish this step's events
                per1, mach = instance_cpu(stack), machine_cpu_s() - mach0
                flows = stack_seen(stack) - seen0 if mode == "visibility" else 0
                per = {k: round(per1[k] - per0.get(k, 0.0), 3) for k in per1}
                inst = sum(per.values())
            finally:
                stack.continue_executors()
            if mode == "not-read":
                time.sleep(2.0)  # executors drain the ring and report the losses before the next step
            conns = res["connections"]
            rows.append({"mode": mode, "round": r + 1, "connections": conns, "failed": res["failed"],
                         "conn_per_s": round(conns / res["seconds"], 1),
                         "instance_cpu_s_per_1k_conn": round(inst / conns * 1000, 3) if conns else None,
                         "machine_cpu_s_per_1k_conn": round(mach / conns * 1000, 3) if conns else None,
                         "instance_cpu_s_by_process": {k: v for k, v in per.items() if v},
                         "flows_per_conn": round(flows / conns, 2) if conns and flows else None,
                         "instance_cpu_us_per_flow": round(inst / flows * 1e6, 1) if flows else None})
            print(f"  {mode:10} round {r + 1}: {rows[-1]['conn_per_s']:>8} conn/s  instance "
                  f"{rows[-1]['instance_cpu_s_per_1k_conn']} cpu-s/1k conn  machine "
                  f"{rows[-1]['machine_cpu_s_per_1k_conn']} cpu-s/1k conn  {rows[-1]['instance_cpu_s_by_process']}",
                  flush=True)
    summary = {}
    for mode in ("visibility", "not-read"):
        mine = [x for x in rows if x["mode"] == mode]
        summary[mode] = {k: round(statistics.median(x[k] for x in mine), 3)
                         for k in ("conn_per_s", "instance_cpu_s_per_1k_conn", "machine_cpu_s_per_1k_conn")}
    vis = [x for x in rows if x["mode"] == "visibility" and x["flows_per_conn"]]
    if vis:
        summary["visibility"]["flows_per_conn"] = statistics.median(x["flows_per_conn"] for x in vis)
        summary["visibility"]["instance_cpu_us_per_flow"] = statistics.median(
            x["instance_cpu_us_per_flow"] for x in vis)
    return {"seconds": seconds, "rounds": rounds, "rows": rows, "median": summary}


# ---- output ------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(res: dict[str, Any]) -> str:
    out = []
    p = res["pipeline"]
    out.append(f"1. pipeline on one core (CPU {p['cpu']}, {p['batch_events']} events/batch, "
               f"{p['flows_per_event']} flows/event)")
    out.append(table(["step", "unit", "per second", "vs 100k flows/s"],
                     [[k, v["unit"], f"{v['per_s']:,}", f"{v['per_s'] / TARGET:.2f}x"] for k, v in p["steps"].items()]))
    if "service" in res:
        out.append("\n2. nats-server + flows service process (pinned to one CPU)")
        out.append(table(["offered flows/s", "published/s", "processed/s", "flows/cpu-s", "catch-up s", "missing flows",
                          "lost counted", "missing uncounted", "kept up"],
                         [[r["offered_flows_per_s"], f"{r['publish_flows_per_s']:,}", f"{r['processed_per_s']:,}",
                           f"{r['flows_per_service_cpu_s']:,}", r["catch_up_s"], r["missing_flows"], r["lost_counted"], r["missing_uncounted"],
                           r["kept_up"]]
                          for r in res["service"]["rows"]]))
    if "latency" in res:
        lat = res["latency"]
        out.append(f"\n3. kernel -> observe latency ({lat['connections']} connections, SYN from-endpoint flows)")
        out.append(table(["path", "samples", "p50 ms", "p99 ms", "max ms"],
                         [[k, v["samples"], v["p50_ms"], v["p99_ms"], v["max_ms"]]
                          for k, v in (("subscription (flows.enriched.>)", lat["subscription"]),
                                       ("ciliary observe --follow -o json", lat["observe_follow_cli"]))]))
    if "visibility_cost" in res:
        med = res["visibility_cost"]["median"]
        base = med["not-read"]
        out.append("\n4. flow visibility cost on checkout -> payments TCP connections (median of rounds)")
        out.append(table(["mode", "conn/s", "x", "instance cpu-s/1k conn", "x", "machine cpu-s/1k conn", "x"],
                         [[m, v["conn_per_s"], f"{v['conn_per_s'] / base['conn_per_s']:.2f}",
                           v["instance_cpu_s_per_1k_conn"],
                           f"{v['instance_cpu_s_per_1k_conn'] / base['instance_cpu_s_per_1k_conn']:.2f}"
                           if base["instance_cpu_s_per_1k_conn"] else "-",
                           v["machine_cpu_s_per_1k_conn"],
                           f"{v['machine_cpu_s_per_1k_conn'] / base['machine_cpu_s_per_1k_conn']:.2f}"
                           if base["machine_cpu_s_per_1k_conn"] else "-"]
                          for m, v in med.items()]))
        vis = med["visibility"]
        if vis.get("flows_per_conn"):
            out.append(f"with visibility: {vis['flows_per_conn']} flows per connection, "
                       f"{vis['instance_cpu_us_per_flow']} us of instance CPU per flow "
                       "(executors + nats-server + flows service)")
    out.append(f"\nload average (1, 5, 15 min) at start {res.get('load_average_start')}, "
               f"at end {res.get('load_average_end')}")
    out.append(f"\nverdict: {res['verdict']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter steps")
    ap.add_argument("--skip-stack", action="store_true", help="only parts 1 and 2 (no root needed)")
    ap.add_argument("--only-stack", action="store_true", help="only parts 3 and 4; keeps the other results")
    args = ap.parse_args(argv)
    step = 1.0 if args.quick else 3.0
    res: dict[str, Any] = {**S.results_header("bench/flows.py" + (" --quick" if args.quick else "")),
                           "target_flows_per_s": TARGET,
                           # the machine may be shared: record how busy it was
                           "load_average_start": S.load_averages()}
    if args.only_stack and RESULTS.exists():
        old_res = json.loads(RESULTS.read_text())
        res["pipeline"], res["service"] = old_res["pipeline"], old_res["service"]
    else:
        print("1. pipeline", flush=True)
        res["pipeline"] = pipeline(step)
        print("2. nats-server + flows service", flush=True)
        res["service"] = service([10_000, 25_000, 50_000, 100_000, 0], 2.0 if args.quick else 4.0)
    if not args.skip_stack:
        stack = Stack()
        interrupted = False

        def on_term(signum, _frame):  # noqa: ANN001
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            print(f"3./4. embedded stack, cluster {stack.cluster}", flush=True)
            pods = stack.start()
            res["latency"] = latency(stack, pods, 60 if args.quick else 200)
            res["visibility_cost"] = visibility_cost(stack, pods, 2.0 if args.quick else 5.0, 2 if args.quick else 3)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            problems = stack.close()
            signal.signal(signal.SIGTERM, old)
            if problems:
                print("cleanup problems:", problems, file=sys.stderr)
                res["cleanup_problems"] = problems
        if interrupted:
            return 130
    ingest = res["pipeline"]["steps"][PUBLISH_STEP]["per_s"]
    best = max((r["processed_per_s"] for r in res["service"]["rows"]), default=0)
    kept = [r["offered_flows_per_s"] for r in res["service"]["rows"] if r["kept_up"]]
    per_cpu = [r["flows_per_service_cpu_s"] for r in res["service"]["rows"]
               if r["offered_flows_per_s"] == 100_000 and r["flows_per_service_cpu_s"]]
    core_share = f"{TARGET / per_cpu[0]:.2f}" if per_cpu else "?"
    res["verdict"] = (
        f"the pipeline does {ingest:,} flows/s on one core in-process and the service process "
        f"{best:,} flows/s end to end; at 100,000 flows/s it needs {core_share} of a CPU; "
        f"it kept up at offered {kept} flows/s. "
        + ("It keeps up with 100,000 flows/s per node." if 100_000 in kept
           else "It does NOT keep up with 100,000 flows/s per node.")
    )
    res["load_average_end"] = S.load_averages()
    S.write_results(RESULTS, res, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
