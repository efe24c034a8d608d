"""ClusterMesh end to end: two embedded clusters (east, west; one node each) connected by
``ciliary clustermesh connect``, real packets between their pods over the linked underlays.

One walk through the story, in order:
1. a global ``payments`` service with affinity local: 300 connections from checkout in
   east all land in east; every east backend unready -> new connections go to west
   (continuous client, the gap is printed); east ready again -> traffic returns;
2. ``shared: "false"`` in west exports nothing; the MCS API (ServiceExport in west,
   ServiceImport in east) gives east the west backend, as the annotation would;
3. policy in east admits checkout only from cluster east: the identical checkout of west is
   dropped (the flow names cluster west), and allowed once the rule names west (the flow
   names the policy);
4. ``ciliary down`` of west: after the TTL east holds no west backend and sends nothing
   there.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ciliary import hubble, schema

from .conftest import require_privileges
from .instance import REPO, ciliary, embedded_instance, pods_ready
from .podnet import wait_for

TTL = 3.0
PORT, TARGET = 80, 8080
EAST_ID, WEST_ID = 61, 62


def apply(data_dir: Path, *docs: dict) -> None:
    ciliary("apply", "-f", "-", data_dir=data_dir, stdin="\n---\n".join(json.dumps(d) for d in docs))


def server_pod(name: str, labels: dict[str, str], gate: Path | None = None) -> dict:
    containers: list[dict] = [{
        "name": "session", "image": "ciliary/workload",
        "command": ["python3", "-m", "ciliary.workload", "session", "--tcp", str(TARGET), "--name", name],
        "ports": [{"name": "tcp", "containerPort": TARGET}],
        "readinessProbe": {"tcpSocket": {"port": TARGET}, "periodSeconds": 1},
    }]
    if gate is not None:
        gate.touch()
        containers.append({"name": "gate", "image": "ciliary/workload", "command": ["sleep", "3600"],
                           "readinessProbe": {"exec": {"command": ["test", "-f", str(gate)]}, "periodSeconds": 1}})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": "node-1", "containers": containers}}


def checkout_pod() -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "checkout", "namespace": "default", "labels": {"app": "checkout"}},
            "spec": {"nodeName": "node-1", "containers": [{
                "name": "idle", "image": "ciliary/workload",
                "command": ["python3", "-m", "ciliary.workload", "serve", "--tcp", "7000", "--name", "checkout"]}]}}


def service(name: str, selector: dict[str, str], notes: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "annotations": notes or {}},
            "spec": {"selector": selector, "ports": [{"name": "tcp", "port": PORT, "targetPort": TARGET}]}}


def mcs(kind: str, name: str) -> dict:
    doc: dict[str, Any] = {"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": kind,
                           "metadata": {"name": name, "namespace": "default"}}
    if kind == "ServiceImport":
        doc["spec"] = {"type": "ClusterSetIP", "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}]}
    return doc


def policy(cluster: str) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "payments-from-checkout", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "payments"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {
                         "app": "checkout", "io.cilium.k8s.policy.cluster": cluster}}],
                         "toPorts": [{"ports": [{"port": str(TARGET), "protocol": "TCP"}]}]}]}}


def frontend(data_dir: Path, name: str) -> dict | None:
    done = ciliary("service", "get", name, "-o", "json", data_dir=data_dir, check=False)
    if done.returncode != 0:
        return None
    found = [fe for fe in json.loads(done.stdout)["frontends"] if fe["type"] == "ClusterIP"]
    return found[0] if found else None


def slot_clusters(data_dir: Path, name: str) -> list[str] | None:
    """The cluster of every backend new connections go to ("" = this cluster)."""
    fe = frontend(data_dir, name)
    if fe is None:
        return None
    by_id = {b["id"]: b.get("cluster", "") for b in fe.get("backends", [])}
    return sorted(by_id[i] for i in fe.get("slots", []))


def loop_argv(data_dir: Path, pod: str, host: str, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "ciliary.cli", "--data-dir", str(data_dir), "exec", pod, "--",
            sys.executable, "-m", "ciliary.workload", "loop", host, str(port), *args]


def loop(data_dir: Path, pod: str, host: str, port: int, *args: str) -> dict:
    done = subprocess.run(loop_argv(data_dir, pod, host, port, *args), capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def pod_ip(data_dir: Path, name: str) -> str:
    ready = pods_ready_named(data_dir, {name})
    assert ready
    return ready[name]["podIP"]


def pods_ready_named(data_dir: Path, names: set[str]) -> dict[str, dict] | None:
    items = json.loads(ciliary("get", "pods", "-o", "json", data_dir=data_dir).stdout)["items"]
    ready = {p["metadata"]["name"]: p["status"] for p in items
             if p["metadata"]["name"] in names and p.get("status", {}).get("podIP")
             and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
    return ready if set(ready) == names else None


def observe(data_dir: Path, *args: str) -> list[dict]:
    out = ciliary("observe", *args, "--last", "50", "-o", "json", data_dir=data_dir, check=False).stdout
    return [json.loads(line)["flow"] for line in out.splitlines() if line.strip().startswith("{")]


@contextmanager
def both_up(*instances: AbstractContextManager[Path]) -> Iterator[None]:
    """Enter the instances' contexts at once (``ciliary up`` side by side), exit every one
    that came up, also when another failed."""
    with ExitStack() as stack, ThreadPoolExecutor(len(instances)) as pool:
        started = [pool.submit(cm.__enter__) for cm in instances]
        errors = []
        for cm, future in zip(instances, started, strict=True):
            if future.exception() is None:
                stack.push(cm.__exit__)
            else:
                errors.append(future.exception())
        if errors:
            raise errors[0]  # type: ignore[misc]
        yield


def answered_since(data_dir: Path, pod: str, since: float) -> bool:
    """A flow from checkout to ``pod`` seen after ``since`` (unix seconds)."""
    flows = observe(data_dir, "--from-pod", "default/checkout", "--to-pod", f"default/{pod}")
    return any(hubble.flow_time_ns(schema.Flow(time=f["time"])) / 1e9 >= since for f in flows)


def test_two_clusters_east_west(tmp_path: Path, cluster_names: list[str]) -> None:
    require_privileges()
    east, west = "t" + secrets.token_hex(2), "t" + secrets.token_hex(2)
    cluster_names.extend([east, west])
    east_dir, west_dir = tmp_path / "east", tmp_path / "west"
    gates = tmp_path / "gates"
    gates.mkdir()
    ttl = ("--mesh-ttl", str(TTL))
    with both_up(embedded_instance(east_dir, east, nodes=1, cluster_id=EAST_ID, args=ttl),
                 embedded_instance(west_dir, west, nodes=1, cluster_id=WEST_ID, args=ttl)):
        connected = ciliary("clustermesh", "connect", "--to", str(west_dir), data_dir=east_dir)
        assert f"cluster {east} <-> {west}: connected" in connected.stdout

        local = {"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}
        apply(east_dir, service("payments", {"app": "payments"}, local),
              server_pod("payments-east", {"app": "payments"}, gates / "east"), checkout_pod(),
              service("ledger", {"tier": "shared"}, {"service.cilium.io/global": "true"}),
              service("orders", {"tier": "shared"}), mcs("ServiceImport", "orders"))
        apply(west_dir, service("payments", {"app": "payments"}, local),
              server_pod("payments-west", {"app": "payments"}, gates / "west"), checkout_pod(),
              server_pod("shared-west", {"tier": "shared"}),
              service("ledger", {"tier": "shared"}, {"service.cilium.io/global": "true",
                                                     "service.cilium.io/shared": "false"}),
              service("orders", {"tier": "shared"}), mcs("ServiceExport", "orders"))
        wait_for(lambda: pods_ready(east_dir, 2), what="east's pods ready", timeout=60)
        wait_for(lambda: pods_ready(west_dir, 3), what="west's pods ready", timeout=60)

        # 1. affinity local: east while east is ready, west while it is not, back again
        assert wait_for(lambda: (frontend(east_dir, "payments") or {}).get("backends", [None, None])[1:] and
                        slot_clusters(east_dir, "payments") == [""], what="west's backend merged into east's payments")
        listed = ciliary("service", "list", data_dir=east_dir).stdout
        assert f"[cluster {west}]" in listed and f"[cluster {east}] (preferred)" in listed, listed
        vip = frontend(east_dir, "payments")["address"]  # type: ignore[index]
        first = loop(east_dir, "checkout", vip, PORT, "--count", "300", "--interval", "0")
        assert first["by_backend"] == {"payments-east": 300}, first

        stop = tmp_path / "stop"
        started = time.time()
        client = subprocess.Popen(loop_argv(east_dir, "checkout", vip, PORT, "--interval", "0.01",
                                            "--timeout", "0.5", "--stop-file", str(stop), "--max-seconds", "60"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            wait_for(lambda: answered_since(east_dir, "payments-east", started), what="the continuous client answered by east")
            (gates / "east").unlink()  # every east backend unready
            wait_for(lambda: slot_clusters(east_dir, "payments") == [west], what="east's payments failing over to west")
            time.sleep(1.0)
            (gates / "east").touch()
            wait_for(lambda: slot_clusters(east_dir, "payments") == [""], what="east's payments back in east")
            time.sleep(1.0)
        finally:
            stop.touch()
            out, err = client.communicate(timeout=30)
        run = json.loads(out)
        backends = [r[2] for r in run["records"]]
        assert "payments-west" in backends and backends[0] == "payments-east" and backends[-1] == "payments-east"
        first_west = backends.index("payments-west")
        assert all(b != "payments-west" for b in backends[:first_west])
        last_east = max(i for i, b in enumerate(backends[:first_west]) if b == "payments-east")
        gap = run["records"][first_west][0] - run["records"][last_east][1]
        print(f"failover east -> west: {run['failed']} failed attempts, gap {gap * 1000:.0f} ms "
              f"from the last answer of east to the first of west")

        # 2. shared: "false" exports nothing; MCS export/import gives the west backend
        assert wait_for(lambda: (frontend(east_dir, "orders") or {}).get("backends"), what="orders imported through MCS")
        orders = frontend(east_dir, "orders")
        assert [b.get("cluster") for b in orders["backends"]] == [west]  # type: ignore[index]
        assert loop(east_dir, "checkout", orders["address"], PORT, "--count", "3")["by_backend"] == {  # type: ignore[index]
            "shared-west": 3}
        assert (frontend(east_dir, "ledger") or {}).get("backends", []) == []

        # 3. policy: checkout only from cluster east
        target = pod_ip(east_dir, "payments-east")
        apply(east_dir, policy(east))
        wait_for(lambda: loop(west_dir, "checkout", target, TARGET, "--count", "1", "--timeout", "1")["failed"] == 1,
                 what="west's checkout dropped by east's policy")
        assert loop(east_dir, "checkout", target, TARGET, "--count", "3")["ok"] == 3
        drops = wait_for(lambda: [f for f in observe(east_dir, "--verdict", "DROPPED", "--from-cluster", west)
                                  if f.get("source", {}).get("pod_name") == "checkout"], what="the drop's flow")
        assert drops[-1]["source"]["cluster_name"] == west and drops[-1]["destination"]["cluster_name"] == east
        apply(east_dir, policy(west))
        wait_for(lambda: loop(west_dir, "checkout", target, TARGET, "--count", "1", "--timeout", "1")["ok"] == 1,
                 what="west's checkout allowed once the rule names west")
        allowed = wait_for(lambda: [f for f in observe(east_dir, "--verdict", "FORWARDED", "--from-cluster", west,
                                                       "--to-pod", "default/payments-east")
                                    if f.get("ingress_allowed_by")], what="the allowed flow naming the policy")
        assert allowed[-1]["ingress_allowed_by"][0]["name"] == "payments-from-checkout"

        # 4. west goes down: after the TTL nothing of it is left in east
        (gates / "east").unlink()
        wait_for(lambda: slot_clusters(east_dir, "payments") == [west], what="failover to west again")
        ciliary("down", data_dir=west_dir, timeout=120)
        wait_for(lambda: all(b.get("cluster") != west for b in (frontend(east_dir, "payments") or {}).get(
            "backends", [{"cluster": west}])), what=f"west withdrawn after the {TTL:g}s TTL", timeout=TTL * 4 + 10)
        assert slot_clusters(east_dir, "payments") == []
        after = loop(east_dir, "checkout", vip, PORT, "--count", "5", "--timeout", "0.5")
        assert after["ok"] == 0 and after["by_backend"] == {}
        status = json.loads(ciliary("clustermesh", "status", "-o", "json", data_dir=east_dir).stdout)
        (remote,) = status["remotes"]
        assert remote["name"] == west and not remote["connected"] and remote["errors"]
