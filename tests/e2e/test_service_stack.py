"""Service load balancing through the whole embedded stack, with real packets.

``ciliary up`` → servicelb derives EndpointSlices from pod readiness → bucket
``services`` → each node executor's reconciler writes the lb4 maps → the tc datapath
picks a backend per new connection. The tests drive only the public CLI and the
``ciliary.workload`` helper inside pods:

- ``session`` backends answer every line with their pod name, so a client knows who
  answered (and one connection can exchange data for as long as it lives);
- ``loop`` clients connect continuously and report who answered each attempt;
- ``hold`` keeps one long-lived connection and exchanges a line per stdin line.

One stack (two nodes) serves the whole module; every test creates its own Service and
backend pods (exec readiness probes on files under the test's temporary directory) and
deletes them at the end. Nothing is routed through the machine's root namespace.
"""

from __future__ import annotations

import json
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import require_privileges
from .instance import ciliary, embedded_instance
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
PORT = 80
TARGET = 8080
DROP_NO_SERVICE = 158


@dataclass(frozen=True)
class Stack:
    data_dir: Path
    cluster: str
    ready_dir: Path  # readiness files: a pod is ready while <ready_dir>/<pod> exists


def cli(stack: Stack | Path, *args: str, check: bool = True, timeout: float = 60,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    data_dir = stack.data_dir if isinstance(stack, Stack) else stack
    return ciliary(*args, data_dir=data_dir, check=check, timeout=timeout, stdin=stdin)


def exec_argv(stack: Stack, pod: str, *workload: str) -> list[str]:
    return [sys.executable, "-m", "ciliary.cli", "--data-dir", str(stack.data_dir), "exec", pod, "--",
            sys.executable, "-m", "ciliary.workload", *workload]


def workload(stack: Stack, pod: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(exec_argv(stack, pod, *args), capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def apply(stack: Stack, *docs: dict) -> None:
    cli(stack, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))


# ---------------------------------------------------------------- manifests


def backend_pod(stack: Stack, name: str, app: str, node: str, *, ready: bool = True) -> dict:
    ready_file = stack.ready_dir / name
    if ready:
        ready_file.touch()
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "session", "image": "ciliary/workload",
                "command": ["python3", "-m", "ciliary.workload", "session", "--tcp", str(TARGET), "--name", name],
                "ports": [{"name": "tcp", "containerPort": TARGET}],
                "readinessProbe": {"tcpSocket": {"port": TARGET}, "periodSeconds": 1},
            }, {
                "name": "gate", "image": "ciliary/workload", "command": ["sleep", "3600"],
                "readinessProbe": {"exec": {"command": ["test", "-f", str(ready_file)]}, "periodSeconds": 1},
            }],
        },
    }


def client_pod(name: str, node: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"role": "client"}},
        "spec": {"nodeName": node, "containers": [{
            "name": "idle", "image": "ciliary/workload",
            "command": ["python3", "-m", "ciliary.workload", "serve", "--tcp", "7000", "--name", name],
        }]},
    }


def service(name: str, app: str, **spec: object) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": app}, "ports": [{"name": "tcp", "port": PORT, "targetPort": TARGET}],
                 **spec},
    }


# ---------------------------------------------------------------- state through the CLI


def ready_pods(stack: Stack, names: set[str]) -> dict[str, dict] | None:
    items = json.loads(cli(stack, "get", "pods", "-o", "json").stdout)["items"]
    ready = {
        p["metadata"]["name"]: p["status"] for p in items
        if p["metadata"]["name"] in names and p.get("status", {}).get("phase") == "Running"
        and p["status"].get("podIP")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    }
    return ready if set(ready) == names else None


def existing_pods(stack: Stack) -> set[str]:
    items = json.loads(cli(stack, "get", "pods", "-o", "json").stdout)["items"]
    return {p["metadata"]["name"] for p in items}


def frontend(stack: Stack, name: str, type_: str = "ClusterIP") -> dict | None:
    result = cli(stack, "service", "get", name, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    found = [fe for fe in json.loads(result.stdout)["frontends"] if fe["type"] == type_]
    return found[0] if found else None


def backend_states(fe: dict | None) -> dict[str, str]:
    """pod name -> "slot" (takes new connections) or the backend's state."""
    if fe is None:
        return {}
    slots = set(fe.get("slots") or [])
    return {b["pod"].split("/", 1)[1]: ("slot" if b["id"] in slots else b.get("state", "active"))
            for b in fe.get("backends") or []}


def wait_states(stack: Stack, name: str, want: dict[str, str], timeout: float = 30) -> dict:
    def check() -> dict | None:
        fe = frontend(stack, name)
        return fe if fe is not None and backend_states(fe) == want else None

    try:
        return wait_for(check, timeout, f"service {name} backends {want}")
    except AssertionError as err:
        raise AssertionError(f"{err}; last: {backend_states(frontend(stack, name))}") from None


def deploy(stack: Stack, name: str, pods: list[str], nodes: tuple[str, ...], *extra: dict,
           **spec: object) -> dict:
    """Service ``name`` (selector ``app: name``, ``spec`` added) with ready backend pods
    ``pods`` on ``nodes`` (and ``extra`` objects); returns its ClusterIP frontend once every
    pod is in the slots of every node's lb4 maps."""
    apply(stack, service(name, name, **spec), *extra,
          *(backend_pod(stack, p, name, n) for p, n in zip(pods, nodes, strict=True)))
    wait_for(lambda: ready_pods(stack, set(pods)), 60, f"{len(pods)} ready backends")
    fe = wait_states(stack, name, dict.fromkeys(pods, "slot"))
    wait_datapath(stack, fe)
    return fe


def wait_datapath(stack: Stack, fe: dict) -> None:
    """Every node's lb4 maps hold the frontend with exactly its slot backends."""
    vip = f"{fe['address']}:{fe['port']}/{fe['proto']}"
    by_id = {b["id"]: f"{b['ip']}:{b['port']}" for b in fe.get("backends") or []}
    want = sorted(by_id[i] for i in fe.get("slots") or [])

    def programmed() -> bool:
        nodes = json.loads(cli(stack, "bpf", "lb", "list", "-o", "json").stdout)
        for node in nodes:
            rows = [r for r in node["rows"] if r["frontend"].upper() == vip.upper()]
            if len(rows) != 1 or sorted(rows[0]["backends"]) != want:
                return False
        return bool(nodes)

    wait_for(programmed, 20, f"{vip} with slots {want} in every node's lb4 maps")


def loop(stack: Stack, pod: str, vip: str, *args: str, port: int = PORT) -> dict:
    done = workload(stack, pod, "loop", vip, str(port), *args, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), f"loop failed: {done.stdout}{done.stderr}"
    return json.loads(done.stdout)


def cleanup(stack: Stack, services: list[str], pods: list[str]) -> None:
    if services:
        cli(stack, "delete", "service", *services, check=False)
    if pods:
        cli(stack, "delete", "pod", *pods, check=False)
        wait_for(lambda: not (existing_pods(stack) & set(pods)), 30, f"pods {pods} gone")
    for pod in pods:
        (stack.ready_dir / pod).unlink(missing_ok=True)


# ---------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_privileges()
    cluster = "lb" + secrets.token_hex(2)
    base = tmp_path_factory.mktemp("service-stack")
    ready_dir = base / "ready"
    ready_dir.mkdir()
    with embedded_instance(base / "instance", cluster, nodes=2, cluster_id=9) as data_dir:
        s = Stack(data_dir, cluster, ready_dir)
        apply(s, client_pod("client-1", "node-1"), client_pod("client-2", "node-2"))
        wait_for(lambda: ready_pods(s, {"client-1", "client-2"}), 60, "two client pods")
        yield s


# ---------------------------------------------------------------- 1. spread


def test_every_ready_backend_takes_connections(stack: Stack) -> None:
    pods = ["spread-1", "spread-2", "spread-3"]
    try:
        fe = deploy(stack, "spread", pods, ("node-1", "node-2", "node-1"))
        for client in ("client-1", "client-2"):
            summary = loop(stack, client, fe["address"], "--count", "300", "--interval", "0")
            print(f"spread from {client}: {summary['by_backend']} failed {summary['failed']}")
            assert summary["failed"] == 0, summary["errors"]
            assert summary["attempts"] == 300
            assert set(summary["by_backend"]) == set(pods), summary["by_backend"]
    finally:
        cleanup(stack, ["spread"], pods)


# ---------------------------------------------------------------- 2. readiness


class Hold:
    """A long-lived connection from a pod to the VIP, one exchange per ``exchange()``."""

    def __init__(self, stack: Stack, pod: str, vip: str) -> None:
        self.proc = subprocess.Popen(exec_argv(stack, pod, "hold", vip, str(PORT), "--timeout", "5"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)

    def exchange(self, timeout: float = 10) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("ping\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no answer on the long-lived connection"
        line = self.proc.stdout.readline().strip()
        assert line and not line.startswith("error"), f"long-lived connection failed: {line!r}"
        return line.split()[0]

    def close(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def test_not_ready_backend_keeps_its_connections_and_gets_no_new_ones(stack: Stack) -> None:
    pods = ["ready-1", "ready-2", "ready-3"]
    hold = None
    try:
        fe = deploy(stack, "readiness", pods, ("node-1", "node-2", "node-2"))
        vip = fe["address"]

        hold = Hold(stack, "client-1", vip)
        chosen = hold.exchange()
        assert chosen in pods
        others = [p for p in pods if p != chosen]

        (stack.ready_dir / chosen).unlink()  # its readiness probe now fails
        fe = wait_states(stack, "readiness", {chosen: "not-ready", **dict.fromkeys(others, "slot")})
        wait_datapath(stack, fe)

        # the established connection still exchanges data both ways, with the same backend
        for _ in range(3):
            assert hold.exchange() == chosen
        summary = loop(stack, "client-1", vip, "--count", "100", "--interval", "0")
        print(f"while {chosen} is not ready: {summary['by_backend']} failed {summary['failed']}")
        assert summary["failed"] == 0, summary["errors"]
        assert set(summary["by_backend"]) == set(others), summary["by_backend"]
        summary = loop(stack, "client-2", vip, "--count", "50", "--interval", "0")
        assert summary["failed"] == 0 and set(summary["by_backend"]) == set(others), summary
        assert hold.exchange() == chosen

        (stack.ready_dir / chosen).touch()  # ready again: it takes new connections again
        fe = wait_states(stack, "readiness", dict.fromkeys(pods, "slot"))
        wait_datapath(stack, fe)
        summary = loop(stack, "client-1", vip, "--count", "100", "--interval", "0")
        print(f"after {chosen} is ready again: {summary['by_backend']}")
        assert summary["failed"] == 0, summary["errors"]
        assert set(summary["by_backend"]) == set(pods), summary["by_backend"]
        assert hold.exchange() == chosen
        assert hold.close() == 0
        hold = None
    finally:
        if hold is not None:
            hold.close()
        cleanup(stack, ["readiness"], pods)


# ---------------------------------------------------------------- 3. scaling


def test_scaling_during_traffic_fails_no_connection(stack: Stack) -> None:
    first = ["scale-1", "scale-2", "scale-3"]
    added = ["scale-4", "scale-5"]
    removed = first
    stop = stack.ready_dir / "stop-scale-loop"
    client = None
    try:
        fe = deploy(stack, "scale", first, ("node-1", "node-2", "node-1"))
        vip = fe["address"]

        client = subprocess.Popen(exec_argv(stack, "client-2", "loop", vip, str(PORT), "--interval", "0.02",
                                            "--stop-file", str(stop), "--max-seconds", "120"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        time.sleep(1.0)

        t_add = time.time()
        apply(stack, *(backend_pod(stack, p, "scale", n) for p, n in zip(added, ("node-2", "node-1"),
                                                                         strict=True)))
        wait_for(lambda: ready_pods(stack, set(first + added)), 60, "five ready backends")
        fe = wait_states(stack, "scale", dict.fromkeys(first + added, "slot"))
        wait_datapath(stack, fe)
        time.sleep(1.5)  # let the loop use the new backends

        t_delete = time.time()
        cli(stack, "delete", "pod", *removed)
        fe = wait_states(stack, "scale", dict.fromkeys(added, "slot") | dict.fromkeys(removed, "terminating"))
        wait_datapath(stack, fe)
        t_removed = time.time()  # no node selects a deleted pod for a new connection from here on
        time.sleep(1.5)
        stop.touch()
        out, err = client.communicate(timeout=30)
        client = None
        assert out.strip(), err
        summary = json.loads(out)
        print(f"scaling 3->5->2: {summary['attempts']} connections, {summary['failed']} failed, "
              f"{summary['by_backend']}")
        assert summary["failed"] == 0, summary["errors"]
        assert summary["attempts"] > 100
        records = summary["records"]
        # every answer came from a pod that was a backend at that time
        for start, end, backend in records:
            assert backend in first + added, (start, backend)
            if backend in added:
                assert end > t_add, (start, end, backend)
            if backend in removed:
                assert start < t_removed, (start, end, backend)
        # the added pods took connections before the old ones left, and only they after
        assert {b for s, _, b in records if t_add < s < t_delete} >= set(added)
        late = {b for s, _, b in records if s > t_removed}
        assert late == set(added), late
    finally:
        stop.touch()
        if client is not None:
            client.kill()
            client.wait()
        cleanup(stack, ["scale"], first + added)
        stop.unlink(missing_ok=True)


# ---------------------------------------------------------------- 4. affinity and NodePort


def test_client_ip_affinity_and_node_port(stack: Stack) -> None:
    pods = ["sticky-1", "sticky-2", "sticky-3"]
    try:
        fe = deploy(stack, "sticky", pods, ("node-1", "node-2", "node-1"),
                    service("sticky-np", "sticky", type="NodePort"), sessionAffinity="ClientIP")
        assert fe["affinity_timeout"] == 10800
        for client in ("client-1", "client-2"):
            summary = loop(stack, client, fe["address"], "--count", "20", "--interval", "0")
            print(f"affinity from {client}: {summary['by_backend']}")
            assert summary["failed"] == 0, summary["errors"]
            assert len(summary["by_backend"]) == 1, summary["by_backend"]

        # NodePort on node-1's InternalIP, from a pod on node-2
        nodes = json.loads(cli(stack, "get", "nodes", "-o", "json").stdout)["items"]
        node1 = next(n for n in nodes if n["metadata"]["name"] == "node-1")
        ip = next(a["address"] for a in node1["status"]["addresses"] if a["type"] == "InternalIP")

        def node_port() -> dict | None:
            result = cli(stack, "service", "get", "sticky-np", "-o", "json", check=False)
            if result.returncode != 0:
                return None
            return next((f for f in json.loads(result.stdout)["frontends"]
                         if f["type"] == "NodePort" and f["address"] == ip and len(f.get("slots") or []) == 3),
                        None)

        np = wait_for(node_port, 30, f"NodePort frontend on {ip}")
        summary = loop(stack, "client-2", ip, "--count", "30", "--interval", "0", port=np["port"])
        print(f"NodePort {ip}:{np['port']} from client-2: {summary['by_backend']}")
        assert summary["failed"] == 0, summary["errors"]
        assert set(summary["by_backend"]) <= set(pods) and summary["by_backend"], summary
    finally:
        cleanup(stack, ["sticky", "sticky-np"], pods)


# ---------------------------------------------------------------- 5. no ready backend


def no_service_drops(stack: Stack, node: str) -> int:
    nodes = json.loads(cli(stack, "bpf", "metrics", "list", "-o", "json").stdout)
    return sum(r["packets"] for n in nodes if n["node"] == node for r in n["rows"]
               if r["reason"] == DROP_NO_SERVICE)


def test_service_without_ready_backends_drops_with_158(stack: Stack) -> None:
    pods = ["idle-1"]
    try:
        apply(stack, service("idle", "idle"), backend_pod(stack, "idle-1", "idle", "node-1", ready=False))
        fe = wait_states(stack, "idle", {"idle-1": "not-ready"})
        assert not fe.get("slots")
        wait_datapath(stack, fe)
        before = no_service_drops(stack, "node-1")
        summary = loop(stack, "client-1", fe["address"], "--count", "3", "--interval", "0", "--timeout", "1")
        assert summary["failed"] == 3 and not summary["by_backend"], summary
        after = wait_for(lambda: (n := no_service_drops(stack, "node-1")) > before and n, 10,
                         "SERVICE_BACKEND_NOT_FOUND drops counted")
        print(f"no ready backend: {summary['errors']}; drops {before} -> {after}")
        assert after - before >= 3

        (stack.ready_dir / "idle-1").touch()  # the one backend becomes ready: connections work
        fe = wait_states(stack, "idle", {"idle-1": "slot"})
        wait_datapath(stack, fe)
        summary = loop(stack, "client-1", fe["address"], "--count", "5", "--interval", "0")
        assert summary["by_backend"] == {"idle-1": 5}, summary
    finally:
        cleanup(stack, ["idle"], pods)
