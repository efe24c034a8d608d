"""The kube bridge feeding a running embedded stack from an API server (the double).

Objects exist only in the API-server double; ``python -m services.kubebridge`` (started as
a Deployment would run it, with a kubeconfig) brings them into the instance. Then, with
real packets: the pods run and reach each other through the Service's clusterIP (the one
the API server gave it), and the CiliumNetworkPolicy is enforced.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciliary import config
from tests.k8sdouble.apiserver import ApiServerDouble

from .conftest import require_privileges
from .instance import ciliary, embedded_instance, pods_ready
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
VIP = "10.96.77.7"


def pod(name: str, app: str, serve: bool) -> dict[str, Any]:
    command = (["python3", "-m", "ciliary.workload", "serve", "--tcp", "8080", "--name", name]
               if serve else ["sleep", "3600"])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "node-1", "containers": [
                {"name": "main", "image": "ciliary/workload", "command": command,
                 "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}]}}


OBJECTS: list[dict[str, Any]] = [
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
def instance(tmp_path: Path, cluster_names: list[str]) -> Iterator[tuple[Path, str]]:
    require_privileges()
    cluster = "k" + secrets.token_hex(2)
    cluster_names.append(cluster)
    with embedded_instance(tmp_path / "instance", cluster, nodes=1, cluster_id=9) as data_dir:
        yield data_dir, cluster


def connect(data_dir: Path, pod_name: str, host: str, timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    return ciliary("exec", pod_name, "--", sys.executable, "-m", "ciliary.workload", "connect",
                   host, "8080", "--timeout", str(timeout), data_dir=data_dir, check=False)


def test_bridge_feeds_the_embedded_stack(instance: tuple[Path, str], tmp_path: Path) -> None:
    data_dir, cluster = instance
    state = config.read_instance(data_dir)
    assert state is not None
    runner = DoubleThread()
    with runner as double:
        for obj in OBJECTS:
            runner.call(double.put_object, obj)
        kubeconfig = double.kubeconfig(tmp_path / "kubeconfig")
        env = dict(os.environ, CILIARY_NATS_URL=state.nats_url, CILIARY_CLUSTER=cluster,
                   CILIARY_CLUSTER_ID="9", CILIARY_INSTANCE="kubebridge-e2e",
                   CILIARY_KUBECONFIG=str(kubeconfig), CILIARY_KUBE_RETRY_PERIOD="0.2",
                   CILIARY_KUBE_RENEW_DEADLINE="1.5", CILIARY_KUBE_LEASE_DURATION="2")
        creds = data_dir / "nats-creds" / "kubebridge.json"
        if creds.exists():  # an instance with NATS authentication: the bridge's own user
            env["CILIARY_NATS_CREDS"] = str(creds)
        with open(tmp_path / "kubebridge.log", "ab") as log:
            bridge = subprocess.Popen([sys.executable, "-m", "services.kubebridge"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            pods = wait_for(lambda: pods_ready(data_dir, 3), 40, "three ready pods from the API server")
            wait_for(lambda: any(r["pod"] == "default/web" and r["ingress_enforcement"]
                                 for node in json.loads(ciliary("endpoint", "list", "-o", "json",
                                                                data_dir=data_dir).stdout)
                                 for r in node["rows"]), 20, "the CNP in force on web")
            # the API server's clusterIP is a frontend in the datapath: packets to it arrive
            ok = wait_for(lambda: (r := connect(data_dir, "client", VIP)).returncode == 0 and r, 20,
                          f"client reaches web through the clusterIP {VIP}")
            assert ok.stdout.split()[0] == "web"
            assert ok.stdout.split()[1] == pods["client"]["podIP"]
            assert connect(data_dir, "intruder", VIP, timeout=1.0).returncode != 0
            status = ciliary("status", data_dir=data_dir, check=False).stdout
            assert f"Kubernetes API server {double.url}" in status, status
            # the policy is written back as enforced on node-1
            cnp = wait_for(lambda: (runner.call(double.get_object, "CiliumNetworkPolicy", "default",
                                                "web-from-client") or {}).get("status", {}).get("nodes"),
                           20, "CNP status with its enforcing node")
            assert cnp["node-1"]["enforcing"] is True
        finally:
            bridge.send_signal(signal.SIGTERM)
            try:
                assert bridge.wait(timeout=10) == 0, (tmp_path / "kubebridge.log").read_text()
            finally:
                if bridge.poll() is None:
                    bridge.kill()
