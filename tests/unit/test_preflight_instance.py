"""``ciliary preflight`` against a running instance, on ``ciliary.testing.FakeBus``: its pods,
services, live map fill and operations checks, and the verdicts they lead to."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from ciliary import config, schema
from ciliary.bus import Message
from ciliary.cli import app, common
from ciliary.resources import loads
from ciliary.store import ResourceStore
from ciliary.testing import FakeBus
from services.flows.service import start_metrics_server

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80}, {name: https, port: 443}]}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: node-{1 + i % 2}, containers: [{{name: c, image: nginx}}]}}
""" for i in range(4))


def health(service: str, node: str = "", detail: dict[str, Any] | None = None) -> schema.HealthReport:
    return schema.HealthReport(service=service, instance=f"{service}-{node}" if node else service, pid=1,
                               version="0", started=0.0, healthy=True, node=node, detail=detail or {})


def node_maps(policy_entries: int) -> dict[str, Any]:
    return {"maps": {"ciliary_policy": {"entries": policy_entries, "max": 1024, "fill": policy_entries / 1024},
                     "ciliary_lxc": {"entries": 2, "max": 1024, "fill": 2 / 1024}}}


async def serve(bus: FakeBus, *, trace: bool, policy_entries: int) -> None:
    reports = [health(s) for s in schema.SERVICE_NAMES if s != "node"]
    reports += [health("node", "node-1", node_maps(policy_entries)), health("node", "node-2", node_maps(3))]

    async def on_health(msg: Message) -> None:
        for report in reports:
            await msg.respond(report)

    async def on_flows(msg: Message) -> None:
        await msg.respond(schema.FlowQueryReply(flows=[], seen=42))

    async def on_explain(msg: Message) -> None:
        await msg.respond(schema.IdentityExplainReply(identity_labels=["k8s:app=preflight"]))

    async def on_trace(msg: Message) -> None:
        await msg.respond(schema.PolicyTraceReply(verdict="allow"))

    async def on_debug(msg: Message) -> None:
        await msg.respond(schema.NodeDebugReply(ok=True, node=msg.subject.split(".")[3]))

    await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, on_health)
    await bus.subscribe_raw(schema.SUBJECT_FLOWS_QUERY, on_flows)
    await bus.subscribe_raw(schema.SUBJECT_IDENTITY_EXPLAIN, on_explain)
    if trace:
        await bus.subscribe_raw(schema.SUBJECT_POLICY_TRACE, on_trace)
    for node in ("node-1", "node-2"):
        await bus.subscribe_raw(schema.SUBJECT_NODE_DEBUG.format(cluster="shop", node=node), on_debug)
    await ResourceStore(bus).apply(loads(OBJECTS))


def run_preflight(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str, trace: bool = True,
                  policy_entries: int = 5) -> dict[str, Any]:
    data_dir = tmp_path / "instance"
    with socket.socket() as probe_port:  # a free port for the metrics endpoint
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]
    config.write_instance(data_dir, config.InstanceState(
        nats_url="nats://fake", supervisor_pid=os.getpid(), cluster="shop", cluster_id=3,
        nodes=["node-1", "node-2"], metrics_url=f"http://127.0.0.1:{port}/metrics"))

    async def with_instance(work: Any) -> Any:
        bus = FakeBus()
        await serve(bus, trace=trace, policy_entries=policy_entries)
        server = await start_metrics_server(port, lambda: "# TYPE hubble_flows_processed_total counter\n"
                                                          "hubble_flows_processed_total 42\n")
        try:
            return await work(bus)
        finally:
            server.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "run_with_bus", lambda _args, work: asyncio.run(with_instance(work)))
        with pytest.raises(SystemExit) as done:
            app.main(["preflight", "--data-dir", str(data_dir), "--no-kernel", "-o", "json", *args])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    return json.loads(out)


def test_an_instance_supplies_pods_services_live_fill_and_operations(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    report = run_preflight(tmp_path, capsys, "--backends", "2")
    assert report["labels"]["source"].startswith("instance shop")
    assert report["labels"]["endpoints"] == 4 and report["labels"]["identities"] == 1
    assert report["labels"]["ceiling"]["cluster_id"] == 3
    scale = report["sizing"]["scale"]
    assert (scale["services"], scale["ports"], scale["nodes"], scale["endpoints_per_node"]) == (1, 2, 2, 2)
    maps = {m["name"]: m for m in report["sizing"]["maps"]}
    assert maps["ciliary_lb4_services"]["expected"] == 2 * 3
    assert maps["ciliary_policy"]["max_entries"] == 1024  # the node's real size, not the default
    assert {(m["node"], m["map"]) for m in report["live"]["maps"]} == {
        ("node-1", "ciliary_policy"), ("node-1", "ciliary_lxc"), ("node-2", "ciliary_policy"), ("node-2", "ciliary_lxc")}
    ops = {c["name"]: c for c in report["operations"]}
    assert {n: c["status"] for n, c in ops.items()} == {
        "services healthy": "pass", "flows visible (observe)": "pass", "metrics endpoint": "pass",
        "identity explain": "pass", "policy trace": "pass", "map views (ciliary bpf)": "pass",
        "connectivity test": "not run"}
    # the fixture's endpoint serves no ciliary_bpf_map_pressure series: the detail says so
    assert "no ciliary_bpf_map_pressure series yet" in ops["metrics endpoint"]["detail"]
    assert report["decision"]["verdict"] == "pilot"
    assert report["decision"]["questions"]["operations"]["answer"] == "yes"


def test_a_failing_operations_check_means_train_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_preflight(tmp_path, capsys, trace=False)
    ops = {c["name"]: c for c in report["operations"]}
    assert ops["policy trace"]["status"] == "fail" and ops["policy trace"]["detail"].startswith("no answer")
    assert report["decision"]["verdict"] == "train-first"


def test_a_full_live_map_is_a_cost_with_its_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_preflight(tmp_path, capsys, policy_entries=1000)
    bands = {(m["node"], m["map"]): m["band"] for m in report["live"]["maps"]}
    assert bands[("node-1", "ciliary_policy")] == "critical"
    cost = report["decision"]["questions"]["upgrade_cost"]["reasons"]
    assert any("critical: node-1 ciliary_policy 1,000/1,024" in r and "raise CILIARY_MAP_POLICY" in r for r in cost)
    assert report["decision"]["verdict"] == "pilot"
