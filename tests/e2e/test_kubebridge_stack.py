"""The kube bridge feeding a running embedded stack from an API server (the double).

Objects exist only in the API-server double; ``ciliary up --kubeconfig`` runs the kube
bridge beside the services and brings them into the instance. The node executor takes its
pod CIDR from the Node object the API server has (``CILIARY_POD_CIDR_FROM_NODE=1``). Then,
with real packets: the pods run with addresses from that CIDR and reach each other through
the Service's clusterIP (the one the API server gave it), and the CiliumNetworkPolicy is
enforced and written back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8sdouble.apiserver import ApiServerDouble

from .instance import ciliary, embedded_instance, pod_connect, pods_ready
from .podnet import wait_for

VIP = "10.96.77.7"
NODE_POD_CIDR = "10.9.77.0/24"  # inside cluster 9's default 10.9.0.0/16, not what index 1 gets


def pod(name: str, app: str, serve: bool) -> dict[str, Any]:
    command = (["python3", "-m", "ciliary.workload", "serve", "--tcp", "8080", "--name", name]
               if serve else ["sleep", "3600"])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "main", "image": "ciliary/workload", "command": command,
                 "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]}}


OBJECTS: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
     "spec": {"podCIDR": NODE_POD_CIDR, "podCIDRs": [NODE_POD_CIDR]}},
    pod("web", "web", True), pod("client", "client", False), pod("intruder", "intruder", False),
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
     "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
              "selector": {"app": "web"},
              "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080}]}},
    {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
     "metadata": {"name": "web-from-client", "namespace": "default"},
     "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
              "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                           "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}},
]


class DoubleThread:
    """The API-server double on its own event loop in a thread (the test is synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.double = ApiServerDouble()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ApiServerDouble:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.double.start(), self.loop).result(10)
        return self.double

    def call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.double.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def double() -> Iterator[tuple[DoubleThread, ApiServerDouble]]:
    runner = DoubleThread()
    with runner as server:
        for obj in OBJECTS:
            runner.call(server.put_object, obj)
        yield runner, server


@pytest.fixture
def instance(tmp_path: Path, cluster_name: str, double: tuple[DoubleThread, ApiServerDouble]) -> Iterator[Path]:
    kubeconfig = double[1].kubeconfig(tmp_path / "kubeconfig")
    env = {"CILIARY_POD_CIDR_FROM_NODE": "1", "CILIARY_KUBE_RETRY_PERIOD": "0.2",
           "CILIARY_KUBE_RENEW_DEADLINE": "1.5", "CILIARY_KUBE_LEASE_DURATION": "2"}
    with embedded_instance(tmp_path / "instance", cluster_name, nodes=1, cluster_id=9, env=env,
                           args=("--kubeconfig", str(kubeconfig))) as data_dir:
        yield data_dir


def test_bridge_feeds_the_embedded_stack(instance: Path, double: tuple[DoubleThread, ApiServerDouble]) -> None:
    data_dir = instance
    runner, server = double
    pods = wait_for(lambda: pods_ready(data_dir, 3), 40, "three ready pods from the API server")
    network = ipaddress.ip_network(NODE_POD_CIDR)
    assert all(ipaddress.ip_address(p["podIP"]) in network for p in pods.values()), pods
    wait_for(lambda: any(r["pod"] == "default/web" and r["ingress_enforcement"]
                         for node in json.loads(ciliary("endpoint", "list", "-o", "json",
                                                        data_dir=data_dir).stdout)
                         for r in node["rows"]), 20, "the CNP in force on web")
    # the API server's clusterIP is a frontend in the datapath: packets to it arrive
    ok = wait_for(lambda: (r := pod_connect(data_dir, "client", VIP, 8080)).returncode == 0 and r, 20,
                  f"client reaches web through the clusterIP {VIP}")
    assert ok.stdout.split()[0] == "web"
    assert ok.stdout.split()[1] == pods["client"]["podIP"]
    assert pod_connect(data_dir, "intruder", VIP, 8080, timeout=1.0).returncode != 0
    status = ciliary("status", data_dir=data_dir, check=False).stdout
    assert f"resources: Kubernetes API server {server.url} (kube bridge leader kubebridge" in status, status
    # the policy is written back as enforced on node-1
    cnp = wait_for(lambda: (runner.call(server.get_object, "CiliumNetworkPolicy", "default",
                                        "web-from-client") or {}).get("status", {}).get("nodes"),
                   20, "CNP status with its enforcing node")
    assert cnp["node-1"]["enforcing"] is True
