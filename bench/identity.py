"""Identity service benchmark against a real nats-server on a free loopback port.

Measures, with 1 and 2 identity service replicas:
- allocations/s: pods with new (distinct) label sets written at full speed, until every
  label set has a committed identity in bucket ``identities``;
- pod churn/s: pods over 50 label sets created with IPs (status as the node executor
  writes it) and then deleted, until ``ipcache`` follows each phase;
and the service's RSS once it holds 10,000 identities (1 replica).

Usage: .venv/bin/python bench/identity.py [--pods 2000] [--churn 1000] [--rss-identities 10000] [--repeat 3]
Writes bench/results/identity.json and prints an aligned table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402

from ciliary import output, schema  # noqa: E402
from ciliary.bus import SYNCED, Bus, KVEntry  # noqa: E402
from ciliary.store import kv_key, now_rfc3339  # noqa: E402

RESULTS = REPO / "bench" / "results" / "identity.json"
BATCH = 250


class Counter:
    """Follows a bucket and counts live keys matching a predicate."""

    def __init__(self, bus: Bus, bucket: str, match: Callable[[str, bytes], bool]) -> None:
        self.bus, self.bucket, self.match = bus, bucket, match
        self.keys: set[str] = set()
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for event in self.bus.watch(self.bucket):
            if event is SYNCED:
                continue
            assert isinstance(event, KVEntry)
            if event.deleted or not self.match(event.key, event.value or b""):
                self.keys.discard(event.key)
            else:
                self.keys.add(event.key)
            self.changed.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def wait_for(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while len(self.keys) != count:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.bucket}: {len(self.keys)} of {count}")
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def pod_record(name: str, labels: dict[str, str]) -> schema.ResourceRecord:
    manifest = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "bench", "labels": labels},
                "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}}
    return schema.ResourceRecord(kind="Pod", api_version="v1", namespace="bench", name=name,
                                 uid=str(uuid.uuid4()), generation=1, created=now_rfc3339(), manifest=manifest)


async def write_pods(bus: Bus, pods: list[tuple[str, dict[str, str]]], ips: dict[str, str] | None = None) -> None:
    for i in range(0, len(pods), BATCH):
        chunk = pods[i : i + BATCH]
        await asyncio.gather(*(bus.kv_put(schema.BUCKET_RESOURCES, kv_key("Pod", "bench", n), pod_record(n, lab))
                               for n, lab in chunk))
        if ips:
            await asyncio.gather(*(bus.kv_put(schema.BUCKET_STATUS, kv_key("Pod", "bench", n), schema.StatusRecord(
                reporter="node/node-1", status={"phase": "Running", "podIP": ips[n]})) for n, _ in chunk))


async def delete_pods(bus: Bus, names: list[str]) -> None:
    for i in range(0, len(names), BATCH):
        chunk = names[i : i + BATCH]
        await asyncio.gather(*(bus.kv_delete(schema.BUCKET_RESOURCES, kv_key("Pod", "bench", n)) for n in chunk))
        await asyncio.gather(*(bus.kv_delete(schema.BUCKET_STATUS, kv_key("Pod", "bench", n)) for n in chunk))


class Nats(S.NatsServer):
    """A nats-server (``S.NatsServer``) with its store in a temporary directory that ``stop`` removes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ciliary-bench-"))
        super().__init__(self.dir / "js")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_replicas(url: str, count: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        env = dict(os.environ, CILIARY_NATS_URL=url, CILIARY_INSTANCE=f"identity-bench-{i}",
                   CILIARY_LOG_LEVEL="WARNING")
        with open(log_dir / f"identity-{i}.log", "ab") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "services.identity"], env=env, cwd=REPO,
                                          stdout=out, stderr=subprocess.STDOUT))
    return procs


def stop_replicas(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_healthy(bus: Bus, count: int) -> None:
    from ciliary.status import gather_health

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reports = [r for r in await gather_health(bus, timeout=0.3) if r.service == "identity" and r.healthy]
        if len(reports) >= count:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("identity replicas not healthy")


async def run_scenario(replicas: int, pods: int, churn: int, log_dir: Path) -> dict[str, Any]:
    nats = Nats()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bus = await Bus.connect(nats.url, "bench")
        await bus.ensure_buckets()
        procs = start_replicas(nats.url, replicas, log_dir)
        await wait_healthy(bus, replicas)
        sets = Counter(bus, schema.BUCKET_IDENTITIES, lambda k, v: k.startswith(schema.IDENTITY_LABELS_PREFIX))
        pod_ips = Counter(bus, schema.BUCKET_IPCACHE,
                          lambda k, v: schema.decode(v, schema.IPCacheRecord).source == "pod")
        sets.start()
        pod_ips.start()

        # allocations: every pod a new label set
        new = [(f"alloc-{i}", {"app": f"svc-{i}", "tier": "bench"}) for i in range(pods)]
        t0 = time.monotonic()
        await write_pods(bus, new)
        written = time.monotonic() - t0
        await sets.wait_for(pods)
        alloc_s = time.monotonic() - t0

        # churn: pods over 50 label sets, with IPs, created then deleted
        churners = [(f"churn-{i}", {"app": f"svc-{i % 50}", "tier": "bench", "pod-template-hash": f"{i:08x}"})
                    for i in range(churn)]
        ips = {n: f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}" for i, (n, _) in enumerate(churners)}
        t1 = time.monotonic()
        await write_pods(bus, churners, ips)
        await pod_ips.wait_for(churn)
        up_s = time.monotonic() - t1
        t2 = time.monotonic()
        await delete_pods(bus, [n for n, _ in churners])
        await pod_ips.wait_for(0)
        down_s = time.monotonic() - t2
        await sets.stop()
        await pod_ips.stop()
        await bus.close()
        return {
            "replicas": replicas,
            "new_label_sets": pods,
            "write_seconds": round(written, 3),
            "allocation_seconds": round(alloc_s, 3),
            "allocations_per_second": round(pods / alloc_s, 1),
            "churn_pods": churn,
            "churn_create_seconds": round(up_s, 3),
            "churn_delete_seconds": round(down_s, 3),
            "pod_churn_per_second": round(2 * churn / (up_s + down_s), 1),
        }
    finally:
        stop_replicas(procs)
        nats.stop()


async def run_rss(identities: int, log_dir: Path) -> dict[str, Any]:
    nats = Nats()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        bus = await Bus.connect(nats.url, "bench")
        await bus.ensure_buckets()
        procs = start_replicas(nats.url, 1, log_dir)
        await wait_healthy(bus, 1)
        idle = rss_mib(procs[0].pid)
        sets = Counter(bus, schema.BUCKET_IDENTITIES, lambda k, v: k.startswith(schema.IDENTITY_LABELS_PREFIX))
        sets.start()
        t0 = time.monotonic()
        await write_pods(bus, [(f"rss-{i}", {"app": f"svc-{i}"}) for i in range(identities)])
        await sets.wait_for(identities)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.0)
        rss = rss_mib(procs[0].pid)
        await sets.stop()
        await bus.close()
        return {"identities": identities, "seconds": round(elapsed, 2), "rss_idle_mib": round(idle, 1),
                "rss_mib": round(rss, 1)}
    finally:
        stop_replicas(procs)
        nats.stop()


def median_run(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median allocation rate, plus every sample's two rates."""
    ordered = sorted(samples, key=lambda r: r["allocations_per_second"])
    run = dict(ordered[len(ordered) // 2])
    run["pod_churn_per_second"] = statistics.median(r["pod_churn_per_second"] for r in samples)
    run["samples"] = [{"allocations_per_second": r["allocations_per_second"],
                       "pod_churn_per_second": r["pod_churn_per_second"]} for r in samples]
    return run


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=2000, help="new label sets per allocation run")
    parser.add_argument("--churn", type=int, default=1000, help="pods created then deleted per churn run")
    parser.add_argument("--rss-identities", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per replica count; the median is reported")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.getLogger("ciliary.status").setLevel(logging.ERROR)  # no-responder replies while starting
    log_dir = Path(tempfile.mkdtemp(prefix="ciliary-bench-logs-"))
    samples: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for _ in range(max(1, args.repeat)):
        for n in (1, 2):
            samples[n].append(await run_scenario(n, args.pods, args.churn, log_dir))
    runs = [median_run(samples[n]) for n in (1, 2)]
    rss = await run_rss(args.rss_identities, log_dir)
    result = {
        "command": " ".join([".venv/bin/python bench/identity.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**S.machine(), "platform": platform.platform()},
        "date": now_rfc3339(),
        "note": "median of --repeat runs per replica count; churn/s is the median of its own samples",
        "runs": runs,
        "rss": rss,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(output.table(
        ["REPLICAS", "NEW-SETS", "ALLOC/S", "ALLOC/S (ALL RUNS)", "CHURN-PODS", "CHURN/S", "CHURN/S (ALL RUNS)"],
        [[r["replicas"], r["new_label_sets"], r["allocations_per_second"],
          " ".join(str(x["allocations_per_second"]) for x in r["samples"]), r["churn_pods"],
          r["pod_churn_per_second"], " ".join(str(x["pod_churn_per_second"]) for x in r["samples"])]
         for r in runs]))
    print(f"\nRSS with {rss['identities']} identities: {rss['rss_mib']} MiB "
          f"(idle {rss['rss_idle_mib']} MiB; allocated in {rss['seconds']}s)")
    print(f"results: {args.output}")
    shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
