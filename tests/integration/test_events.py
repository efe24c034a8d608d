"""The public event API and the served ``/metrics`` against a real nats-server and the real
flows, identity, policy and servicelb processes.

The subscriber is ``examples/events_subscriber.py``: plain nats-py, no ciliary import. It
gets nothing while no one holds a lease; with a lease it decodes flows as the lines of
``ciliary observe -o json`` and the identity, endpoint, policy and service change events
as docs/events.md documents them. ``/metrics`` carries the Hubble families and the node
and control-plane families, and ``promtool check metrics`` accepts it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from ciliary import config, hubble, schema
from ciliary.bus import Bus, Message
from ciliary.resources import loads
from ciliary.status import gather_health
from ciliary.store import ResourceStore, kv_key, now_rfc3339
from ciliary.supervisor import free_port
from tests.integration.conftest import (
    FLOWS_SETTINGS,
    REPO,
    ensure_buckets,
    eventually,
    running_service,
)

CLUSTER = "eventsit"
SUBSCRIBER = REPO / "examples" / "events_subscriber.py"
SERVICES = ("flows", "identity", "policy", "servicelb")
BOOT_NS = 1_790_000_000 * 10**9

FIRST = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""
SECOND = """
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: default, labels: {app: db}}
spec: {nodeName: node-2, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {selector: {app: db}, ports: [{port: 5432, protocol: TCP}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "9090", protocol: TCP}]}]
"""
IPS = {"web-1": ("10.0.1.10", "node-1"), "client": ("10.0.1.11", "node-1"), "db-1": ("10.0.2.20", "node-2")}


@pytest.fixture
def stack(nats_server, tmp_path: Path) -> Iterator[int]:
    """The four services of one cluster; yields the flows service's metrics port."""
    asyncio.run(ensure_buckets(nats_server.url))
    port = free_port()
    env = {config.ENV_CLUSTER: CLUSTER}
    unset = (*FLOWS_SETTINGS, "CILIARY_EVENTS", "CILIARY_FLOWS_RING_CAPACITY")
    served = {"CILIARY_FLOWS_METRICS_PORT": str(port), "CILIARY_FLOWS_UI_PORT": "0"}
    with ExitStack() as stack:
        for name in SERVICES:
            extra = served if name == "flows" else {}
            stack.enter_context(running_service(name, nats_server.url, log_path=tmp_path / f"{name}.log",
                                                env={**env, **extra},
                                                unset=tuple(k for k in unset if k not in extra)))
        yield port


class Subscriber:
    """``examples/events_subscriber.py`` as a process; its printed events, as they come."""

    def __init__(self, url: str, *args: str) -> None:
        self.args = [sys.executable, str(SUBSCRIBER), "--url", url, *args]
        self.events: list[dict[str, Any]] = []
        self.ready = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=subprocess.PIPE, cwd="/")
        self.reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self.ready.wait(), 30)
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            record = json.loads(line)
            if record.get("subscribed"):
                self.ready.set()
            else:
                self.events.append(record)

    async def __aexit__(self, *exc: object) -> None:
        self.proc.terminate()
        await self.proc.wait()
        self.reader.cancel()

    def on(self, topic: str) -> list[dict[str, Any]]:
        return [r["event"] for r in self.events if r["subject"].startswith(f"ciliary.events.{topic}.")]


def raw_batch(node: str, seq: int, events: int = 3) -> schema.RawEventBatch:
    return schema.RawEventBatch(cluster=CLUSTER, node=node, boot_time_ns=BOOT_NS, seq=seq, events=[
        schema.RawFlowEvent(ts_ns=10**9 + seq * 1000 + i, saddr="10.0.1.11", daddr="10.0.1.10", sport=40000 + i,
                            dport=8080, proto=6, tcp_flags=0x02, direction=2, ep_id=1, src_identity=0,
                            dst_identity=0, ifindex=4, pkt_len=60)
        for i in range(events)])


async def apply(bus: Bus, text: str, pods: tuple[str, ...]) -> None:
    await ResourceStore(bus).apply(loads(text, source="test"))
    for pod in pods:
        ip, node = IPS[pod]
        await bus.kv_put(schema.BUCKET_STATUS, kv_key("Pod", "default", pod), schema.StatusRecord(
            reporter=f"node/{node}", status={"phase": "Running", "podIP": ip}, updated=now_rfc3339()))


async def keys(bus: Bus, bucket: str, prefix: str) -> list[str]:
    return [k for k in await bus.kv_list(bucket) if k.startswith(prefix)]


async def flows_seen(bus: Bus) -> int:
    try:
        reply = await bus.request(schema.SUBJECT_FLOWS_QUERY, schema.FlowQuery(number=0, rings_only=True),
                                  schema.FlowQueryReply, timeout=1.0)
    except Exception:
        return 0
    return reply.seen


async def all_healthy(bus: Bus) -> bool:
    reports = await gather_health(bus, timeout=0.5)
    return {r.service for r in reports if r.healthy} >= set(SERVICES)


async def test_events_only_with_interest_then_as_documented(stack: int, nats_server) -> None:
    tree = ast.parse(SUBSCRIBER.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("ciliary", "services")}, imported
    bus = await Bus.connect(nats_server.url, "test-events")
    try:
        await eventually(lambda: all_healthy(bus), 60, "every service healthy")
        async with Subscriber(nats_server.url, "--no-lease") as idle:
            # no lease: flows, identities, endpoints, services and policy all change, nothing is published
            await apply(bus, FIRST, ("web-1", "client"))
            await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1"), raw_batch("node-1", 1))
            await eventually(lambda: flows_seen(bus), 30, "the flows service counting the batch")
            await eventually(lambda: keys(bus, schema.BUCKET_POLICY, "id."), 30, "policy written")
            await eventually(lambda: keys(bus, schema.BUCKET_SERVICES, "fe."), 30, "the service's frontend")
            await eventually(lambda: _has_endpoint(bus, "10.0.1.10"), 30, "web-1 in the ipcache")
            await asyncio.sleep(1.0)  # anything published by now would have reached the subscriber
            assert idle.events == []

            async with Subscriber(nats_server.url, "--ttl", "30") as sub:
                seq = 1

                async def flow_arrived() -> list[dict[str, Any]]:
                    nonlocal seq
                    seq += 1
                    await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1"),
                                      raw_batch("node-1", seq))
                    await asyncio.sleep(0.2)
                    return sub.on("flows")

                lines = await eventually(flow_arrived, 30, "flow events once leased")
                await apply(bus, SECOND, ("db-1",))
                await eventually(lambda: _settled(sub), 30, "identity, endpoint, service and policy events")
            assert idle.events, "a lease anyone holds publishes to every subscriber"
    finally:
        await bus.close()

    # flows: exactly what `ciliary observe -o json` prints for them
    for line in lines:
        assert line["node_name"] == f"{CLUSTER}/node-1"
        assert line["flow"]["verdict"] and line["flow"]["uuid"]
        flow = schema.msgspec.json.decode(json.dumps(line["flow"]), type=schema.Flow)
        assert json.loads(hubble.format_jsonpb(flow)) == line
    assert {e["subject"] for e in sub.events if e["subject"].startswith("ciliary.events.flows.")} == {
        f"ciliary.events.flows.{CLUSTER}.node-1"}

    identities = [e for e in sub.on("identities") if "k8s:app=db" in e["identity"]["labels"]]
    assert identities[0]["version"] == 1 and identities[0]["kind"] == "identity"
    assert identities[0]["change"] == "added" and identities[0]["cluster"] == CLUSTER
    db_id = identities[0]["identity"]["id"]

    endpoint = next(e for e in sub.on("endpoints") if e["endpoint"]["pod"] == "db-1")
    assert endpoint["change"] == "added"
    assert endpoint["endpoint"] == {"namespace": "default", "pod": "db-1", "node": "node-2", "ip": "10.0.2.20",
                                    "identity": db_id}
    assert any(e["subject"] == f"ciliary.events.endpoints.{CLUSTER}.node-2" for e in sub.events)

    service = next(e for e in sub.on("services") if e["service"]["name"] == "db")
    assert service["change"] == "added" and service["frontend"]["port"] == 5432
    assert service["frontend"]["protocol"] == "TCP" and service["kind"] == "service"

    policy = next(e for e in sub.on("policy") if e["change"] == "updated")
    assert policy["kind"] == "policy" and policy["removed"] == []
    assert [(a["direction"], a["port"], a["protocol"], a["verdict"]) for a in policy["added"]] == [
        ("ingress", 9090, 6, "allow")]
    assert policy["added"][0]["rule"].startswith("CiliumNetworkPolicy/default/web ")


async def _has_endpoint(bus: Bus, ip: str) -> bool:
    for entry in (await bus.kv_list(schema.BUCKET_IPCACHE)).values():
        if entry.value and schema.decode(entry.value, schema.IPCacheRecord).prefix == f"{ip}/32":
            return True
    return False


async def _settled(sub: Subscriber) -> bool:
    return (any("k8s:app=db" in e["identity"]["labels"] for e in sub.on("identities"))
            and any(e["endpoint"]["pod"] == "db-1" for e in sub.on("endpoints"))
            and any(e["service"]["name"] == "db" for e in sub.on("services"))
            and any(e["change"] == "updated" for e in sub.on("policy")))


NODE_REPORT = schema.HealthReport(
    service="node", instance="node-node-1", pid=1, version="0", started=0.0, healthy=True, cluster=CLUSTER,
    node="node-1", detail={"endpoints": 2, "maps": {"ciliary_policy": {"entries": 4096, "max": 16384, "fill": 0.25}}})


WANTED = (  # the node executor's gauges, Hubble's counters, every service's health and passes
    'ciliary_bpf_map_pressure{map_name="ciliary_policy",node="node-1"} 0.25\n',
    'ciliary_endpoint{node="node-1"} 2\n',
    'hubble_flows_processed_total{subtype="from-endpoint",type="Trace",verdict="FORWARDED"} 3\n',
    'ciliary_controlplane_pass_duration_seconds_count{service="policy"}',
    'ciliary_controlplane_last_pass_seconds{service="identity",instance="identity"}',
    'ciliary_service_healthy{service="servicelb",instance="servicelb",node=""} 1\n',
)


async def test_served_metrics_carry_node_gauges_and_pass_promtool(stack: int, nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test-metrics")
    try:
        async def node_health(msg: Message) -> None:  # a node executor's report, as it answers status
            await msg.respond(NODE_REPORT)

        await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, node_health)
        await eventually(lambda: all_healthy(bus), 60, "every service healthy")
        await apply(bus, FIRST, ("web-1", "client"))
        await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1"), raw_batch("node-1", 1))
        await eventually(lambda: flows_seen(bus), 30, "the flows service counting the batch")

        async def served() -> str:
            text = await asyncio.to_thread(_get, f"http://127.0.0.1:{stack}/metrics")
            return text if all(w in text for w in WANTED) else ""

        text = await eventually(served, 30, "control-plane passes on /metrics")
        cli = await bus.request(schema.SUBJECT_FLOWS_METRICS, schema.FlowMetricsRequest(), schema.FlowMetricsReply)
    finally:
        await bus.close()
    assert all(w in text for w in WANTED)
    # `ciliary metrics` prints the same families as the endpoint
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert families == {line.split()[2] for line in cli.text.splitlines() if line.startswith("# TYPE")}
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup.sh"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()
