"""``ciliary policy trace`` against a real nats-server, identity and policy services.

An IP/CIDR on either side is traced as the identity the ipcache maps it to (a pod, a
policy CIDR or world), and a pod traced to itself is reported as not subject to policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliary import config
from tests.integration.conftest import run_cli, service_process, stop_processes

MANIFESTS = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, image: x}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    - fromCIDR: [203.0.113.0/24]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""
IPS = {"web": "10.0.1.10", "client": "10.0.1.11"}


@pytest.fixture
def stack(nats_server, tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "data"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=1))
    procs = [service_process(name, nats_server.url, log_path=tmp_path / f"{name}.log")
             for name in ("identity", "policy")]
    try:
        yield data_dir
    finally:
        stop_processes(procs)


def set_pod_ips(data_dir: Path) -> None:
    """What the node executor reports once the pods run: their IPs, in Pod status."""
    import asyncio

    from ciliary import schema
    from ciliary.bus import Bus
    from ciliary.store import kv_key, now_rfc3339

    async def put() -> None:
        state = config.read_instance(data_dir)
        assert state is not None
        bus = await Bus.connect(state.nats_url, "test")
        try:
            for name, ip in IPS.items():
                await bus.kv_put(schema.BUCKET_STATUS, kv_key("Pod", "default", name),
                                 schema.StatusRecord(reporter="node/node-1", updated=now_rfc3339(),
                                                     status={"phase": "Running", "podIP": ip}))
        finally:
            await bus.close()

    asyncio.run(put())


def trace(data_dir: Path, src: str, dst: str, port: str) -> dict[str, Any]:
    result = run_cli("policy", "trace", "--from", src, "--to", dst, "--port", port, "-o", "json",
                     data_dir=data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def eventually_trace(data_dir: Path, src: str, dst: str, port: str, verdict: str,
                     timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = run_cli("policy", "trace", "--from", src, "--to", dst, "--port", port,
                         "-o", "json", data_dir=data_dir)
        if result.returncode == 0:
            reply = json.loads(result.stdout)
            if reply["verdict"] == verdict and reply["ingress"]["reason"] == "rule":
                return reply
        assert time.monotonic() < deadline, f"no {verdict}: {result.stdout}{result.stderr}"
        time.sleep(0.5)


def test_trace_from_cidr_and_to_itself(stack: Path, tmp_path: Path) -> None:
    manifests = tmp_path / "m.yaml"
    manifests.write_text(MANIFESTS)
    applied = run_cli("apply", "-f", str(manifests), data_dir=stack)
    assert applied.returncode == 0, applied.stderr
    set_pod_ips(stack)

    # a world address inside the policy CIDR: the CIDR identity the ipcache gives it
    reply = eventually_trace(stack, "203.0.113.7", "default/web", "443/TCP", "allow")
    assert reply["ingress"]["rules"] == [
        "CiliumNetworkPolicy/default/web spec[0].ingress[1]"]
    assert reply["egress"]["reason"] == "not-local"
    assert trace(stack, "203.0.113.0/28", "default/web", "443/TCP")["verdict"] == "allow"
    denied = trace(stack, "203.0.113.7", "default/web", "80/TCP")
    assert denied["verdict"] == "deny" and denied["ingress"]["reason"] == "default-deny"
    # outside every policy CIDR: world, which the policy does not allow
    outside = trace(stack, "198.51.100.1", "default/web", "443/TCP")
    assert outside["verdict"] == "deny" and outside["ingress"]["reason"] == "default-deny"

    # a pod IP is that pod's identity
    by_ip = eventually_trace(stack, IPS["client"], "default/web", "80/TCP", "allow")
    assert by_ip["ingress"]["rules"] == ["CiliumNetworkPolicy/default/web spec[0].ingress[0]"]
    assert trace(stack, IPS["client"], IPS["web"], "80/TCP")["verdict"] == "allow"
    assert trace(stack, IPS["client"], IPS["web"], "81/TCP")["verdict"] == "deny"

    # an endpoint to itself is not subject to policy (port 9 is allowed to nobody)
    for src, dst in (("default/web", "default/web"), (IPS["web"], "default/web"),
                     ("web", IPS["web"])):
        self_reply = trace(stack, src, dst, "9/TCP")
        assert self_reply["verdict"] == "allow", (src, dst)
        assert self_reply["egress"]["reason"] == self_reply["ingress"]["reason"] == "self"
    text = run_cli("policy", "trace", "--from", "default/web", "--to", "default/web",
                   "--port", "9/TCP", data_dir=stack)
    assert "not subject to policy" in text.stdout and "Final verdict: ALLOW" in text.stdout
    # the same identity in another pod is not "itself"
    other = trace(stack, "app=web", "default/web", "9/TCP")
    assert other["verdict"] == "deny" and other["ingress"]["reason"] == "default-deny"
