"""The whole embedded stack with real packets: ``up -d --nodes 2``, the shop, ``down``.

Every pod is a real namespace behind a node namespace; nothing is routed through the
machine's root namespace. The test drives only the public CLI, as a user would.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary import config

from .conftest import require_privileges
from .instance import ciliary, embedded_instance, pods_ready
from .instance import pod_connect as connect
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"

CLIENT_LOOP = """
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"ping\\n")
            if s.recv(100):
                ok += 1
            else:
                failed += 1
    except OSError:
        failed += 1
    time.sleep(0.02)
print(ok, failed)
"""


cli = ciliary


@pytest.fixture
def stack(tmp_path: Path, cluster_names: list[str]) -> Iterator[tuple[Path, str]]:
    require_privileges()
    cluster = "s" + secrets.token_hex(2)
    cluster_names.append(cluster)
    with embedded_instance(tmp_path / "instance", cluster, nodes=2, cluster_id=7) as data_dir:
        yield data_dir, cluster


def policy_in_force(data_dir: Path) -> bool:
    rows = json.loads(cli("endpoint", "list", "-o", "json", data_dir=data_dir).stdout)
    payments = [r for node in rows for r in node["rows"] if r["pod"] == "default/payments"]
    return bool(payments) and payments[0]["ingress_enforcement"]


def cluster_ip(data_dir: Path, name: str) -> str:
    svc = json.loads(cli("get", "svc", name, "-o", "json", data_dir=data_dir).stdout)
    return svc.get("status", {}).get("clusterIP") or svc["spec"]["clusterIP"]


def cluster_ip_in(data_dir: Path, namespace: str, name: str) -> str:
    svc = json.loads(cli("get", "svc", name, "-n", namespace, "-o", "json", data_dir=data_dir).stdout)
    return svc.get("status", {}).get("clusterIP") or svc["spec"].get("clusterIP", "")


def maps_snapshot(data_dir: Path) -> dict[str, list]:
    out = {}
    for view in ("ipcache", "lb"):
        out[view] = json.loads(cli("bpf", view, "list", "-o", "json", data_dir=data_dir).stdout)
    out["endpoints"] = json.loads(cli("endpoint", "list", "-o", "json", data_dir=data_dir).stdout)
    out["policy"] = json.loads(cli("bpf", "policy", "list", "-o", "json", data_dir=data_dir).stdout)
    return out


def test_shop_with_real_packets(stack: tuple[Path, str]) -> None:
    data_dir, cluster = stack
    cli("apply", "-f", str(SHOP), data_dir=data_dir)
    pods = wait_for(lambda: pods_ready(data_dir, 4), 60, "four ready pods (one in the outside world)")
    vip = wait_for(lambda: cluster_ip(data_dir, "payments"), 20, "a cluster IP")
    wait_for(lambda: policy_in_force(data_dir), 30, "payments ingress policy in the datapath")

    # every endpoint in the datapath carries the identity the identity service allocated
    identities = json.loads(cli("identity", "list", "-o", "json", data_dir=data_dir).stdout)
    endpoints = {r["pod"]: r for node in json.loads(cli("endpoint", "list", "-o", "json", data_dir=data_dir).stdout)
                 for r in node["rows"]}
    for pod in ("frontend", "checkout", "payments"):
        allocated = [i["id"] for i in identities if f"k8s:app={pod}" in i["labels"]]
        assert allocated == [endpoints[f"default/{pod}"]["identity"]], (pod, allocated, endpoints)
        assert allocated[0] >> 16 == 7  # cluster id 7 in bits 16-23

    # checkout -> payments by VIP (cross-node: checkout on node-1, payments on node-2)
    ok = connect(data_dir, "checkout", vip, 8080)
    assert ok.returncode == 0 and ok.stdout.split()[0] == "payments", ok.stdout + ok.stderr
    assert ok.stdout.split()[1] == pods["checkout"]["podIP"]  # no SNAT: payments sees checkout
    # frontend -> payments is dropped by policy, by VIP and by pod IP
    assert connect(data_dir, "frontend", vip, 8080, timeout=1.5).returncode != 0
    assert connect(data_dir, "frontend", pods["payments"]["podIP"], 8080, timeout=1.5).returncode != 0
    # same node, no policy on checkout: frontend -> checkout works
    same = connect(data_dir, "frontend", pods["checkout"]["podIP"], 8080)
    assert same.returncode == 0 and same.stdout.startswith("checkout")

    # payments may egress only to the payment gateway's CIDR on 443 (the world namespace)
    gateway = "203.0.113.10"
    answered = connect(data_dir, "payments", gateway, 443)
    assert answered.returncode == 0 and answered.stdout.startswith("payment-gateway"), answered.stderr
    assert connect(data_dir, "payments", gateway, 8443, timeout=1.5).returncode != 0
    assert connect(data_dir, "frontend", gateway, 8443).returncode == 0  # frontend has no egress policy
    # DNS through the kube-dns service, allowed by payments' egress policy, visible as L7
    dns_vip = wait_for(lambda: cluster_ip_in(data_dir, "kube-system", "kube-dns"), 20, "the kube-dns cluster IP")
    resolved = wait_for(lambda: (r := cli("exec", "payments", "--", sys.executable, "-m", "ciliary.workload",
                                           "resolve", dns_vip, "payment-gateway.example", data_dir=data_dir,
                                           check=False)).returncode == 0 and r, 20, "a DNS answer")
    assert resolved.stdout.split() == ["NOERROR", gateway], resolved.stdout

    def dns_flow() -> list:
        out = cli("observe", "--protocol", "dns", "--pod", "default/payments", "-o", "json",
                  "--last", "10", data_dir=data_dir, check=False).stdout
        return [f for line in out.splitlines() if line.strip()
                for f in [json.loads(line)["flow"]] if "dns" in f.get("l7", {})
                and f["l7"].get("type") == "RESPONSE" and f["l7"]["dns"].get("rcode", 0) == 0]

    answer = wait_for(dns_flow, 10, "an l7 DNS response flow")[-1]
    assert answer["l7"]["dns"]["query"].rstrip(".") == "payment-gateway.example"
    assert gateway in answer["l7"]["dns"].get("ips", [])

    # policy trace agrees with what the kernel did, without sending anything
    for source, target, port, verdict in (("default/payments", gateway, 443, "ALLOW"),
                                          ("default/payments", gateway, 8443, "DENY"),
                                          ("default/checkout", "default/payments", 8080, "ALLOW"),
                                          ("default/frontend", "default/payments", 8080, "DENY")):
        traced = cli("policy", "trace", "--from", source, "--to", target, "--port", f"{port}/TCP",
                     data_dir=data_dir).stdout
        assert f"Final verdict: {verdict}" in traced, traced

    # a policy update during continuous allowed traffic drops nothing (add before delete)
    client = subprocess.Popen(
        ["ip", "netns", "exec", pods["checkout"]["ciliary"]["netns"], sys.executable, "-c", CLIENT_LOOP,
         vip, "8080", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.5)
    policies = (SHOP / "30-policies.yaml").read_text()
    widened = policies.replace(
        "            app: checkout\n      toPorts:",
        "            app: checkout\n        - matchLabels:\n            tier: web\n      toPorts:", 1)
    assert widened != policies
    cli("apply", "-f", "-", data_dir=data_dir, stdin=widened)
    time.sleep(2.0)
    cli("apply", "-f", "-", data_dir=data_dir, stdin=policies)
    out, err = client.communicate(timeout=30)
    ok, failed = map(int, out.split())
    assert failed == 0 and ok > 20, (ok, failed, err)

    # the drop is visible as a Hubble-style flow
    def dropped() -> list:
        out = cli("observe", "--verdict", "DROPPED", "--to-pod", "default/payments", "-o", "json",
                  "--last", "5", data_dir=data_dir, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    flows = wait_for(dropped, 10, "a DROPPED flow to payments")
    flow = flows[-1]["flow"]
    assert flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["source"]["pod_name"] == "frontend" and flow["destination"]["pod_name"] == "payments"

    # deleting the policy opens the path (level-triggered, add-before-delete)
    cli("delete", "cnp", "payments-ingress", data_dir=data_dir)
    wait_for(lambda: connect(data_dir, "frontend", vip, 8080, timeout=1).returncode == 0, 30,
             "frontend -> payments after the policy was deleted")


def test_node_executor_sigkill_drops_nothing(stack: tuple[Path, str]) -> None:
    data_dir, cluster = stack
    cli("apply", "-f", str(SHOP / "10-workloads.yaml"), "-f", str(SHOP / "20-services.yaml"), data_dir=data_dir)
    pods = wait_for(lambda: pods_ready(data_dir, 3), 60, "three ready pods")
    vip = wait_for(lambda: cluster_ip(data_dir, "payments"), 20, "a cluster IP")
    wait_for(lambda: connect(data_dir, "checkout", vip, 8080).returncode == 0, 20, "checkout -> payments")
    before = maps_snapshot(data_dir)

    netns_name = pods["checkout"]["ciliary"]["netns"]
    client = subprocess.Popen(
        ["ip", "netns", "exec", netns_name, sys.executable, "-c", CLIENT_LOOP, vip, "8080", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)
    state = config.read_instance(data_dir)
    assert state is not None
    victim = next(p.pid for p in state.processes if p.name == "node/node-1")
    os.kill(victim, signal.SIGKILL)
    out, err = client.communicate(timeout=30)
    ok, failed = map(int, out.split())
    assert failed == 0 and ok > 50, (ok, failed, err)

    # the supervisor restarts the executor; it restores from the pinned maps and changes nothing
    def restarted() -> bool:
        status = json.loads(cli("status", "-o", "json", data_dir=data_dir, check=False).stdout or "{}")
        nodes = [s for s in status.get("services", []) if s["node"] == "node-1"]
        return bool(nodes) and nodes[0]["pid"] != victim and nodes[0]["healthy"]

    wait_for(restarted, 30, "node-1 executor restarted and healthy")
    time.sleep(1.0)
    assert maps_snapshot(data_dir) == before
    assert connect(data_dir, "checkout", vip, 8080).returncode == 0
