"""servicelb as a real process on a real nats-server: Services + Pods + pod status in,
``services`` rows, allocations and Service status out; restarts change nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ciliary import config, schema
from ciliary.bus import Bus, KVEntry
from ciliary.cli.service import add_commands
from ciliary.resources import loads
from ciliary.store import ResourceStore
from tests.integration.conftest import NatsServer, eventually, service_process

MANIFESTS = """
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  annotations: {service.cilium.io/lb-algorithm: maglev}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: app, image: busybox, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: app, image: busybox, ports: [{name: http, containerPort: 8080}]}]
"""

READY = [{"type": "Ready", "status": "True"}]
NOT_READY = [{"type": "Ready", "status": "False"}]




async def frontends(bus: Bus) -> dict[str, schema.LBFrontend]:
    entries = await bus.kv_list(schema.BUCKET_SERVICES, "fe.>")
    return {k: schema.decode(e.value, schema.LBFrontend) for k, e in entries.items() if e.value}


async def snapshot(bus: Bus, bucket: str, pattern: str = ">") -> dict[str, tuple[int, bytes | None]]:
    entries: dict[str, KVEntry] = await bus.kv_list(bucket, pattern)
    return {k: (e.revision, e.value) for k, e in entries.items()}


async def healthy(bus: Bus, instance: str = "servicelb") -> schema.HealthReport | None:
    try:
        report = await bus.request(schema.SUBJECT_HEALTH.format(instance=instance), b"",
                                   schema.HealthReport, timeout=0.5)
    except Exception:
        return None
    return report if report.healthy and report.detail.get("reconciles") else None


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


def web_state(rows: dict[str, schema.LBFrontend]) -> dict[str, str]:
    (web,) = [fe for fe in rows.values() if fe.name == "web"]
    in_slots = set(web.slots)
    return {b.pod: ("slot" if b.id in in_slots else b.state) for b in web.backends}


@pytest.mark.timeout(120)
async def test_servicelb_process_end_to_end(nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_path = tmp_path / "servicelb.log"
    started = time.monotonic()
    bus = await Bus.connect(nats_server.url, "test")
    proc = service_process("servicelb", nats_server.url, log_path=log_path)
    try:
        await bus.ensure_buckets()
        store = ResourceStore(bus)
        await store.apply(loads(MANIFESTS))
        await store.report_status("Node", "", "node-1", "node/node-1",
                                  {"addresses": [{"type": "InternalIP", "address": "192.168.77.1"}]})
        for name, ip in (("web-1", "10.0.1.11"), ("web-2", "10.0.1.12")):
            await store.report_status("Pod", "default", name, "node/node-1",
                                      {"podIP": ip, "phase": "Running", "conditions": READY})

        # rows appear: ClusterIP frontends on allocated cluster IPs, NodePort on the node IP
        async def both_ready() -> dict[str, schema.LBFrontend] | None:
            rows = await frontends(bus)
            types = sorted(fe.type for fe in rows.values())
            if types != ["ClusterIP", "ClusterIP", "NodePort"]:
                return None
            if any(len(fe.slots) != 2 for fe in rows.values()):
                return None
            return rows

        rows = await eventually(both_ready, what="three frontends with two backends each")
        print(f"first rows after {time.monotonic() - started:.2f}s")
        web = next(fe for fe in rows.values() if fe.name == "web")
        assert web.type == "ClusterIP" and web.address.startswith("10.96.") and web.port == 80
        assert [(b.ip, b.port) for b in web.backends] == [("10.0.1.11", 8080), ("10.0.1.12", 8080)]
        assert web.algorithm == "maglev" and len(web.maglev) == 16381
        assert set(web.maglev) == set(web.slots)
        nodeport = next(fe for fe in rows.values() if fe.type == "NodePort")
        assert nodeport.address == "192.168.77.1" and 30000 <= nodeport.port <= 32767
        assert nodeport.backends[0].id in {b.id for b in web.backends} or nodeport.backends[0].port == 8080

        # the cluster IP is reported in bucket status, and persisted in allocations
        status = await eventually(lambda: store.get("Service", "default", "web"), what="status")
        assert status.status is not None and status.status["clusterIP"] == web.address
        allocations = await snapshot(bus, schema.BUCKET_ALLOCATIONS)
        assert f"{schema.ALLOC_LB_CLUSTER_IP}.{schema.lb_key_token(web.address)}" in allocations
        assert f"{schema.ALLOC_LB_NODE_PORT}.{nodeport.port}" in allocations
        assert f"{schema.ALLOC_LB_SERVICE_ID}.{web.service_id}" in allocations
        await eventually(lambda: healthy(bus), what="healthy")

        # ---- restart: identical ids and rows, nothing rewritten
        before = await snapshot(bus, schema.BUCKET_SERVICES)
        before_alloc = await snapshot(bus, schema.BUCKET_ALLOCATIONS)
        before_status = await snapshot(bus, schema.BUCKET_STATUS, "Service.>")
        assert stop(proc) == 0
        proc = service_process("servicelb", nats_server.url, log_path=log_path)
        restarted = time.monotonic()
        await eventually(lambda: healthy(bus), what="healthy after restart")
        print(f"healthy after restart in {time.monotonic() - restarted:.2f}s")
        assert await snapshot(bus, schema.BUCKET_SERVICES) == before
        assert await snapshot(bus, schema.BUCKET_ALLOCATIONS) == before_alloc
        assert await snapshot(bus, schema.BUCKET_STATUS, "Service.>") == before_status

        # ---- a pod turning not-ready leaves the slots (stays a backend for its established connections)
        await store.report_status("Pod", "default", "web-2", "node/node-1",
                                  {"podIP": "10.0.1.12", "phase": "Running", "conditions": NOT_READY})

        async def web2_out() -> dict[str, str] | None:
            state = web_state(await frontends(bus))
            return state if state == {"default/web-1": "slot", "default/web-2": "not-ready"} else None

        await eventually(web2_out, what="web-2 out of the active backends")
        rows = await frontends(bus)
        web_after = next(fe for fe in rows.values() if fe.name == "web")
        assert web_after.service_id == web.service_id and set(web_after.maglev) == set(web_after.slots)

        # ... and a terminating (still serving) pod stays as "terminating" next to a ready one
        await store.report_status("Pod", "default", "web-2", "node/node-1",
                                  {"podIP": "10.0.1.12", "phase": "Running", "conditions": READY,
                                   "terminating": True})

        async def web2_terminating() -> dict[str, str] | None:
            state = web_state(await frontends(bus))
            return state if state == {"default/web-1": "slot", "default/web-2": "terminating"} else None

        await eventually(web2_terminating, what="web-2 terminating")

        # ---- the CLI reads what servicelb wrote
        data_dir = tmp_path / "inst"
        config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=os.getpid()))
        out = await asyncio.to_thread(run_service_cli, data_dir, "list")
        assert out.splitlines()[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
        assert f"{web.address}:80/TCP" in out and "10.0.1.11:8080/TCP (active)" in out
        assert "10.0.1.12:8080/TCP (terminating)" in out
        listed = json.loads(await asyncio.to_thread(run_service_cli, data_dir, "list", "-o", "json"))
        assert {fe["name"] for fe in listed} == {"web", "web-np"}
        got = json.loads(await asyncio.to_thread(run_service_cli, data_dir, "get", "web", "-o", "json"))
        assert [fe["address"] for fe in got["frontends"]] == [web.address]
        assert got["endpointSlices"][0]["metadata"]["labels"]["kubernetes.io/service-name"] == "web"

        # ---- deleting a Service removes its rows and releases its node port
        await store.delete("Service", "default", "web-np")

        async def np_gone() -> bool:
            rows = await frontends(bus)
            allocs = await snapshot(bus, schema.BUCKET_ALLOCATIONS)
            return (all(fe.name != "web-np" for fe in rows.values())
                    and f"{schema.ALLOC_LB_NODE_PORT}.{nodeport.port}" not in allocs)

        await eventually(np_gone, what="web-np removed and its node port released")
        # that pass recomputed the deleted Service only (the first pass after a start
        # recomputes all of them)
        report = await eventually(lambda: healthy(bus), what="healthy")
        assert report.detail["services_recomputed"] == 1 and report.detail["services"] == 1
    finally:
        code = stop(proc)
        await bus.close()
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def run_service_cli(data_dir: Path, *argv: str) -> str:
    """Run ``ciliary service ...`` through add_commands, as the lead wires it into build_parser."""
    import contextlib
    import io

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="ciliary", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub, common)
    args = parser.parse_args(["service", *argv])
    args.data_dir_path = data_dir
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert args.func(args) == 0
    return buf.getvalue()


SELECTORLESS = """
apiVersion: v1
kind: Service
metadata: {name: legacy}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-1
  labels: {kubernetes.io/service-name: legacy}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [172.16.0.10]
- addresses: [172.16.0.11]
  conditions: {ready: false}
"""


@pytest.mark.timeout(120)
async def test_servicelb_allocation_race_manual_slices_and_garbage(nats_server: NatsServer, tmp_path: Path) -> None:
    log_path = tmp_path / "servicelb.log"
    bus = await Bus.connect(nats_server.url, "test")
    proc = service_process("servicelb", nats_server.url, log_path=log_path)
    try:
        await bus.ensure_buckets()
        store = ResourceStore(bus)
        # garbage in the input bucket is logged and skipped
        await bus.kv_put(schema.BUCKET_RESOURCES, "Service.default.garbage", b"\xc1not msgpack")
        await store.apply(loads(SELECTORLESS))

        async def legacy() -> schema.LBFrontend | None:
            rows = await frontends(bus)
            return next((fe for fe in rows.values() if fe.name == "legacy"), None)

        fe = await eventually(legacy, what="legacy frontend")
        assert [(b.ip, b.port, b.state) for b in fe.backends] == [("172.16.0.10", 8080, "active"),
                                                                  ("172.16.0.11", 8080, "not-ready")]
        assert fe.slots == [fe.backends[0].id]
        assert fe.address == "10.96.1.1"
        await eventually(lambda: healthy(bus), what="healthy")

        # another writer takes the next free cluster IP behind servicelb's back: the
        # compare-and-set create loses, servicelb re-reads the pool and takes the next one
        await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_CLUSTER_IP}.10-96-1-2",
                         schema.LBAllocation(owner="default/second"), last_revision=0)
        await store.apply(loads(SELECTORLESS.replace("legacy", "second")))

        async def second_status() -> str | None:
            obj = await store.get("Service", "default", "second")
            return obj.status.get("clusterIP") if obj and obj.status else None

        # the stranger's record names default/second: servicelb adopts it (same owner)
        assert await eventually(second_status, what="second clusterIP") == "10.96.1.2"

        await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_CLUSTER_IP}.10-96-1-3",
                         schema.LBAllocation(owner="default/someone-else"), last_revision=0)
        await store.apply(loads(SELECTORLESS.replace("legacy", "third")))

        async def third_status() -> str | None:
            obj = await store.get("Service", "default", "third")
            return obj.status.get("clusterIP") if obj and obj.status else None

        assert await eventually(third_status, what="third clusterIP") == "10.96.1.4"
        ips = [fe.address for fe in (await frontends(bus)).values()]
        assert sorted(ips) == ["10.96.1.1", "10.96.1.2", "10.96.1.4"]
        assert await healthy(bus) is not None
    finally:
        code = stop(proc)
        await bus.close()
    text = log_path.read_text()
    assert code == 0, text
    assert "Traceback" not in text
    assert "resources/Service.default.garbage" in text and "undecodable" in text
