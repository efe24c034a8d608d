"""Policy benchmark: resolver from scratch, incremental update, apply → enforced in kernel.

Measures:
- resolve from scratch: ``resolve_policy`` (services/policy/resolve.py, pure) over
  ``--identities`` synthetic cluster identities and ``--rules`` synthetic policies
  (raw CNP / NP manifests, so decoding and normalisation count), and the same with
  policies already normalised, as the service keeps them between passes;
- incremental update: one pod's labels change (its identity is replaced by a new one),
  applied the way the service does it: ``PolicyEngine.begin`` / ``finish`` (services/policy/
  incremental.py: selector cache delta, then only the affected entries) + ``Step.ops()``
  (the map operations), with ``begin`` (the new identity resolved) timed on its own, and
  the changed identities' records re-encoded as the service does (``records.update_desired``,
  time per record); the final state is checked against a resolve from scratch;
- apply → enforced in kernel, with real packets on the embedded stack (``ciliary up -d
  --nodes 2``) that also carries the big policy set (``--kernel-identities`` pods,
  ``--kernel-rules`` policies, default 1,000 × 500): the synthetic universe's namespaces,
  one Pod per identity bound to a node that does not exist (``VIRTUAL_NODE``: never
  started, no IP; the identity service allocates its identity from its labels and
  namespace exactly as for a running pod, a ``unit`` label makes every label set
  distinct) and the synthetic policies. A client pod on node-1 connects in a tight loop
  (a fresh TCP connection per attempt, from inside its namespace) to a server pod on
  node-2 while a change is written to the bus; the latency is from the write (the
  manifest already parsed and validated, as ``ciliary apply`` does before it writes) to
  the first attempt that sees the new behaviour. Five kinds, ``--iterations`` each:
  ``deny`` (create a NetworkPolicy that isolates the server), ``lift`` (delete it),
  ``update`` (replace the peer of an allow rule: the server's enforcement flags stay, only
  policy map entries change), ``relabel_deny`` / ``relabel_lift`` (the server Pod gets a
  label set never seen before, with or without ``locked=yes``, which the ``lock``
  NetworkPolicy isolates: a new identity, resolved into or out of that policy, and the
  endpoint moved to it on both nodes). For every change it also records the bus write's
  own duration and, from the services' health (``recent_passes``), the identity and
  policy passes that started between the write and the flip (count, summed and longest
  time, the policy passes' resolve / encode / write parts), and when, counted from the
  write, the first of them started and had written what the flip waits for
  (``*_started_at_ms``, ``*_written_at_ms``: the identity pass its ipcache entries, the
  policy pass the records of the identities it resolved in full). A flip the probe
  sees before the write (an attempt that failed, or got through, on its own) is not a
  measurement: it is listed under ``early_flips`` and left out; more than one per hundred
  changes of the run (at least one allowed) fails it.

Usage: .venv/bin/python bench/policy.py [--identities 1000] [--rules 500] [--repeat 5]
       [--iterations 20] [--kernel-identities 1000] [--kernel-rules 500] [--no-kernel]
       [--output bench/results/policy.json]
Writes bench/results/policy.json (with the git commit and whether the tree was dirty) and
prints aligned tables. The kernel part needs root and creates only
``ciliary-<cluster>-*`` namespaces, removed by ``ciliary down``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ciliary import output  # noqa: E402
from services.policy.incremental import PolicyEngine  # noqa: E402
from services.policy.records import update_desired  # noqa: E402
from services.policy.resolve import ResolveOptions, normalize_all, resolve_policy  # noqa: E402

RESULTS = REPO / "bench" / "results" / "policy.json"
CLUSTER_ID = 1
NAMESPACES = 20
APPS = 100


# ---- synthetic universe -----------------------------------------------------------------------


def identity_labels(n: int, app: int, tier: int, ns: int) -> frozenset[str]:
    return frozenset({
        f"k8s:app=app-{app}", f"k8s:tier=tier-{tier}", f"k8s:version=v{n % 3}",
        f"k8s:io.kubernetes.pod.namespace=ns-{ns}",
        f"k8s:io.cilium.k8s.namespace.labels.team=team-{ns % 4}",
        f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=ns-{ns}",
        f"k8s:io.cilium.k8s.policy.serviceaccount=sa-{app}",
        "k8s:io.cilium.k8s.policy.cluster=default",
    })


def make_identities(count: int) -> dict[int, frozenset[str]]:
    ids: dict[int, frozenset[str]] = {
        1: frozenset({"reserved:host"}), 2: frozenset({"reserved:world"}),
        3: frozenset({"reserved:unmanaged"}), 4: frozenset({"reserved:health"}),
        5: frozenset({"reserved:init"}), 6: frozenset({"reserved:remote-node"}),
    }
    for i in range(count):
        ids[(CLUSTER_ID << 16) | (256 + i)] = identity_labels(i, i % APPS, i % 5, i % NAMESPACES)
    return ids


def make_named_ports(identities: dict[int, frozenset[str]]) -> dict[int, dict[str, tuple[int, int]]]:
    return {i: {"http": (8080, 6), "metrics": (9090, 6)} for i in identities if i >= 256}


def make_policies(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """A mix of CNP and NP shapes: pod/namespace selectors, expressions, ports, ranges,
    named ports, deny sections and egress."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for k in range(count):
        ns = f"ns-{k % NAMESPACES}"
        app = f"app-{rng.randrange(APPS)}"
        peer_app = f"app-{rng.randrange(APPS)}"
        shape = k % 5
        meta = {"name": f"p{k}", "namespace": ns}
        if shape == 0:
            out.append({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": meta, "spec": {
                "endpointSelector": {"matchLabels": {"app": app}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer_app}}],
                             "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}],
            }})
        elif shape == 1:
            out.append({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": meta, "spec": {
                "endpointSelector": {"matchLabels": {"tier": f"tier-{k % 5}"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {
                    "io.cilium.k8s.namespace.labels.team": f"team-{k % 4}"}}]}],
                "egressDeny": [{"toEndpoints": [{"matchLabels": {"app": peer_app}}],
                                "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}],
            }})
        elif shape == 2:
            out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": {
                "podSelector": {"matchLabels": {"app": app}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": f"team-{k % 4}"}},
                                       "podSelector": {"matchExpressions": [
                                           {"key": "version", "operator": "In", "values": ["v0", "v1"]}]}}],
                             "ports": [{"port": "http"}, {"port": 9000, "endPort": 9003, "protocol": "TCP"}]}],
            }})
        elif shape == 3:
            out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": {
                "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [app, peer_app]}]},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": f"tier-{k % 5}"}}}],
                            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 8080}]}],
            }})
        else:
            out.append({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": meta, "spec": {
                "endpointSelector": {"matchLabels": {"app": app}},
                "ingress": [{"fromEntities": ["cluster"],
                             "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}]}]}],
                "egress": [{"toEndpoints": [{}]}],
            }})
    return out


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return {"p50": round(statistics.median(s) * 1000, 3), "p99": round(p99 * 1000, 3),
            "min": round(s[0] * 1000, 3), "max": round(s[-1] * 1000, 3), "n": len(s)}


# ---- pure resolver ---------------------------------------------------------------------------------


def bench_resolver(n_identities: int, n_rules: int, repeat: int) -> dict[str, Any]:
    opts = ResolveOptions(cluster_name="default", cluster_id=CLUSTER_ID)
    identities = make_identities(n_identities)
    named = make_named_ports(identities)
    manifests = make_policies(n_rules)

    scratch, scratch_norm, res = [], [], None
    for _ in range(repeat):
        t = time.perf_counter()
        res = resolve_policy(manifests, identities, named, opts)
        scratch.append(time.perf_counter() - t)
    norm = normalize_all(manifests, opts)
    for _ in range(repeat):
        t = time.perf_counter()
        resolve_policy(norm, identities, named, opts)
        scratch_norm.append(time.perf_counter() - t)
    assert res is not None
    errors = [k for k, st in res.statuses.items() if st.state != "ok"]
    assert not errors, f"synthetic policies with errors: {errors[:3]}"

    # incremental: the service's long-lived engine, one pod's identity replaced at a time
    engine = PolicyEngine(opts)
    engine.apply(norm, identities, (), named)
    desired: dict[str, bytes] = {}  # bucket policy as the service encodes it
    update_desired(desired, engine.resolution(), set(engine.resolution().identities), "default", CLUSTER_ID, {}, {})
    current = dict(identities)
    rng = random.Random(2)
    incremental, begins, changed_ops, changed_ids, reencode = [], [], [], [], []
    next_id = (CLUSTER_ID << 16) | (256 + n_identities)
    for _ in range(max(20, repeat * 4)):
        victim = rng.choice([i for i in current if i >= 256])
        n = next_id - ((CLUSTER_ID << 16) | 256)
        labels = identity_labels(n, rng.randrange(APPS), rng.randrange(5), rng.randrange(NAMESPACES))
        named_now = dict(named)
        named_now[next_id] = named_now.pop(victim)
        t = time.perf_counter()
        step = engine.begin(None, {next_id: labels}, [victim], named_now)
        t_begin = time.perf_counter()
        step = engine.finish(step)
        ops = step.ops()
        incremental.append(time.perf_counter() - t)
        begins.append(t_begin - t)
        changed_ops.append(len(ops))
        changed_ids.append(len(step.changed))
        t = time.perf_counter()
        update_desired(desired, step.resolution, step.changed, "default", CLUSTER_ID, {}, {})
        reencode.append((time.perf_counter() - t) / max(1, len(step.changed)))
        del current[victim]
        current[next_id] = labels
        named, next_id = named_now, next_id + 1
    scratch_now = resolve_policy(norm, current, named, opts)
    assert engine.resolution().identities == scratch_now.identities, "incremental != from scratch"
    return {
        "identities": n_identities, "rules": n_rules, "repeat": repeat,
        "local_identities_with_policy": res.counters["identities"], "entries": res.counters["entries"],
        "from_scratch_ms": summary(scratch), "from_scratch_normalised_ms": summary(scratch_norm),
        "incremental_ms": summary(incremental),
        "incremental_begin_ms": summary(begins),
        "reencode_per_record_ms": summary(reencode),
        "incremental_ops_median": statistics.median(changed_ops),
        "incremental_identities_changed_median": statistics.median(changed_ids),
    }


# ---- apply → enforced in the kernel -------------------------------------------------------------

# Runs in the client pod's namespace. Per command line "<expect> <ip> <port>" it probes with
# fresh TCP connections until one sees <expect> and prints the CLOCK_MONOTONIC start time of
# that attempt. "closed": attempts back to back (1 ms apart; a success takes well under a
# millisecond), one that gets no connection in 150 ms is closed. "open": a new non-blocking
# attempt every millisecond, each given 150 ms (a dropped SYN is not retried sooner), so
# attempts overlap and the one that first connects and is answered marks the flip to within
# about a millisecond, not the length of a failing attempt.
FLIP_PROBER = r"""
import select, socket, sys, time
print("ready", flush=True)

def answered(sock):
    try:
        sock.setblocking(True)
        sock.settimeout(0.5)
        sock.sendall(b"ping\n")
        return bool(sock.recv(100))
    except OSError:
        return False

for line in sys.stdin:
    expect, ip, port = line.split()
    addr = (ip, int(port))
    attempts = 0
    if expect == "closed":
        while True:
            start = time.monotonic()
            attempts += 1
            try:
                with socket.create_connection(addr, timeout=0.15) as s:
                    is_open = answered(s)
            except OSError:
                is_open = False
            if not is_open:
                break
            time.sleep(0.001)
        print(f"{start:.6f} {attempts}", flush=True)
        continue
    pending, found = {}, None
    while found is None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        pending[s] = time.monotonic()
        attempts += 1
        s.connect_ex(addr)
        _, ready, _ = select.select([], list(pending), [], 0.001)
        for sock in sorted(ready, key=pending.get):
            started = pending.pop(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and answered(sock):
                found = started if found is None else min(found, started)
            sock.close()
        now = time.monotonic()
        for sock in [k for k, t in pending.items() if now - t > 0.15]:
            del pending[sock]
            sock.close()
    for sock in pending:
        sock.close()
    print(f"{found:.6f} {attempts}", flush=True)
"""

WORKLOADS = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  nodeName: node-1
  containers:
    - name: c
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--tcp", "80", "--name", "client"]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: default, labels: {app: server}}
spec:
  nodeName: node-2
  containers:
    - name: s
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--tcp", "80", "--name", "server"]
"""


def np_manifest(name: str, from_app: str | None) -> str:
    ingress = "[]" if from_app is None else f"[{{from: [{{podSelector: {{matchLabels: {{app: {from_app}}}}}}}]}}]"
    return (f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            f"metadata: {{name: {name}, namespace: default}}\n"
            f"spec: {{podSelector: {{matchLabels: {{app: server}}}}, policyTypes: [Ingress], ingress: {ingress}}}\n")


def ctl(data_dir: Path, *args: str, timeout: float = 120) -> str:
    res = subprocess.run([sys.executable, "-m", "ciliary.cli", *args], capture_output=True, text=True,
                         env=dict(os.environ, CILIARY_DATA_DIR=str(data_dir)), cwd=REPO, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"ciliary {' '.join(args)}: {res.stdout}{res.stderr}")
    return res.stdout


class Writer:
    """Writes to the bus exactly as ``ciliary apply`` / ``delete`` do, without the CLI's
    interpreter start-up inside the measured interval."""

    def __init__(self, data_dir: Path) -> None:
        from bench.sandbox import connect_as_cli
        from ciliary import config

        self.loop = asyncio.new_event_loop()
        state = config.read_instance(data_dir)
        assert state is not None
        self.bus = self.loop.run_until_complete(connect_as_cli(state.nats_url, data_dir, "bench-policy"))
        self.loop.run_until_complete(self.bus.ensure_buckets())

    def parse(self, text: str) -> list[Any]:
        """Validated resources, as ``ciliary apply`` reads them before it writes."""
        from ciliary.resources import loads

        return loads(text)

    def store(self, resources: list[Any]) -> None:
        """Write already parsed resources (``ciliary apply``'s bus part)."""
        from ciliary.store import ResourceStore

        self.loop.run_until_complete(ResourceStore(self.bus).apply(resources))

    def apply(self, text: str) -> None:
        self.store(self.parse(text))

    def delete(self, kind: str, name: str) -> None:
        from ciliary.store import ResourceStore

        self.loop.run_until_complete(ResourceStore(self.bus).delete(kind, "default", name))

    def health(self) -> list[Any]:
        from ciliary.status import gather_health

        return self.loop.run_until_complete(gather_health(self.bus, timeout=0.3))

    def wait_settled(self, n_identities: int, timeout: float) -> dict[str, Any]:
        """Until the identity service holds at least `n_identities` identities and neither
        it nor the policy service has run a pass for a second."""
        deadline = time.monotonic() + timeout
        last: tuple[Any, ...] | None = None
        while True:
            reports = self.health()
            ident = service_detail(reports, "identity")
            policy = service_detail(reports, "policy")
            counters = policy.get("policy") or {}
            now = (ident.get("passes"), counters.get("passes"), counters.get("writes"))
            if (ident.get("identities") or 0) >= n_identities and now == last and None not in now:
                return {"identities": ident.get("identities"),
                        "identities_with_policy": policy.get("identities_with_policy"),
                        "entries": policy.get("entries")}
            assert time.monotonic() < deadline, f"not settled after {timeout}s: {ident} {policy}"
            last = now
            time.sleep(1.0)

    def close(self) -> None:
        self.loop.run_until_complete(self.bus.close())
        self.loop.close()


VIRTUAL_NODE = "bench-unscheduled"  # no executor runs it: its pods never start


def scale_manifests(n_identities: int, n_rules: int) -> list[dict[str, Any]]:
    """The big policy set for the embedded stack: the synthetic universe's namespaces,
    ``n_identities`` pods bound to a node that does not exist (never started, no IP: the
    identity service allocates one identity per distinct label set, and the ``unit``
    label makes every pod's set distinct) and ``n_rules`` policies."""
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": f"ns-{ns}", "labels": {"team": f"team-{ns % 4}"}}}
        for ns in range(NAMESPACES)
    ]
    for i in range(n_identities):
        app = i % APPS
        out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"u{i}", "namespace": f"ns-{i % NAMESPACES}",
            "labels": {"app": f"app-{app}", "tier": f"tier-{i % 5}", "version": f"v{i % 3}",
                       "unit": f"u{i}"}},
            "spec": {"nodeName": VIRTUAL_NODE, "serviceAccountName": f"sa-{app}", "containers": [
                {"name": "c", "image": "ciliary/workload", "command": ["sleep", "infinity"],
                 "ports": [{"name": "http", "containerPort": 8080},
                           {"name": "metrics", "containerPort": 9090}]}]}})
    return out + make_policies(n_rules)


def server_manifest(labels: dict[str, str]) -> str:
    doc = yaml_load(WORKLOADS)[1]
    doc["metadata"]["labels"] = labels
    return json.dumps(doc)


def yaml_load(text: str) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(text) if d]


def lock_manifest() -> str:
    """Isolates (empty ingress) every pod of namespace default labelled ``locked=yes``."""
    return ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            "metadata: {name: lock, namespace: default}\n"
            "spec: {podSelector: {matchLabels: {locked: 'yes'}}, policyTypes: [Ingress], ingress: []}\n")


def passes_in(reports: list[Any], window: tuple[float, float]) -> dict[str, float]:
    """Per service (identity, policy): the passes that started between the write and the
    first attempt with the new verdict (``recent_passes`` in the service health): how
    many, their summed time and the longest, and the summed parts of each service's passes."""
    out: dict[str, float] = {}
    for service in ("identity", "policy"):
        recent = service_detail(reports, service).get("recent_passes") or []
        ran = [p for p in recent if window[0] <= p.get("start", 0) <= window[1]]
        out[f"{service}_passes"] = len(ran)
        out[f"{service}_pass_sum_ms"] = round(sum(p.get("ms", 0) for p in ran), 2)
        out[f"{service}_pass_max_ms"] = max((p.get("ms", 0) for p in ran), default=0.0)
        parts = ("resolve", "encode", "write") if service == "policy" else (
            "inputs", "allocate", "ipcache", "housekeeping")
        for part in parts:
            out[f"{service}_{part}_sum_ms"] = round(sum(p.get(part, 0) for p in ran), 2)
        if ran:  # when, from the change's write, the first pass had written what matters
            first = ran[0]
            done = (first.get("first_write_at", 0) if service == "policy" else
                    sum(first.get(part, 0) for part in ("inputs", "allocate", "ipcache")))
            out[f"{service}_written_at_ms"] = round((first["start"] - window[0]) * 1000 + done, 2)
            out[f"{service}_started_at_ms"] = round((first["start"] - window[0]) * 1000, 2)
    return out


def service_detail(reports: list[Any], service: str) -> dict[str, Any]:
    return next((dict(r.detail) for r in reports if r.service == service), {})


def bench_kernel(iterations: int, n_identities: int, n_rules: int) -> dict[str, Any]:
    cluster = "b" + secrets.token_hex(2)
    data_dir = Path(tempfile.mkdtemp(prefix="ciliary-bench-policy-")) / "instance"
    ctl(data_dir, "up", "-d", "--nodes", "2", "--cluster", cluster, "--cluster-id", "13")
    prober = writer = None
    try:
        writer = Writer(data_dir)
        loaded: dict[str, Any] = {"identities_requested": n_identities, "rules": n_rules}
        if n_identities or n_rules:
            t = time.monotonic()
            docs = scale_manifests(n_identities, n_rules)
            writer.apply("\n---\n".join(json.dumps(d) for d in docs))
            loaded["write_s"] = round(time.monotonic() - t, 2)
            loaded.update(writer.wait_settled(n_identities, timeout=600))
            loaded["settle_s"] = round(time.monotonic() - t, 2)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(WORKLOADS)
            f.flush()
            ctl(data_dir, "apply", "-f", f.name)
        deadline = time.monotonic() + 90
        while True:
            items = json.loads(ctl(data_dir, "get", "pods", "-n", "default", "-o", "json"))["items"]
            st = {p["metadata"]["name"]: p.get("status", {}) for p in items}
            if all(st.get(n, {}).get("phase") == "Running" and st[n].get("podIP") for n in ("client", "server")):
                break
            assert time.monotonic() < deadline, f"pods not running: {st}"
            time.sleep(0.5)
        writer.wait_settled(n_identities, timeout=120)
        server_ip = st["server"]["podIP"]
        prober = subprocess.Popen(
            ["ip", "netns", "exec", st["client"]["ciliary"]["netns"], sys.executable, "-u", "-c", FLIP_PROBER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert prober.stdin is not None and prober.stdout is not None
        assert prober.stdout.readline().strip() == "ready"

        samples: dict[str, list[float]] = {kind: [] for kind, _ in KERNEL_KINDS}
        writes: dict[str, list[float]] = {kind: [] for kind, _ in KERNEL_KINDS}
        passes: dict[str, dict[str, list[float]]] = {}
        early: list[dict[str, Any]] = []  # flips seen before the write: not a measurement

        def settle(expect: str) -> None:  # the state is stable before the next change
            prober.stdin.write(f"{expect} {server_ip} 80\n")  # type: ignore[union-attr]
            prober.stdin.flush()  # type: ignore[union-attr]
            prober.stdout.readline()  # type: ignore[union-attr]
            time.sleep(0.3)

        def measure(kind: str, expect: str, change: Callable[[], None]) -> None:
            """One change: write -> first attempt with the new verdict; then, once stable,
            the passes the services ran from the write to that attempt."""
            prober.stdin.write(f"{expect} {server_ip} 80\n")  # type: ignore[union-attr]
            prober.stdin.flush()  # type: ignore[union-attr]
            time.sleep(0.05)
            wall0, t0 = time.time(), time.monotonic()
            change()
            writes[kind].append(time.monotonic() - t0)
            t_flip = float(prober.stdout.readline().split()[0])  # type: ignore[union-attr]
            settle(expect)
            if t_flip < t0:  # an attempt failed (or passed) before the change was written
                early.append({"kind": kind, "expect": expect, "ms_before_write": round((t0 - t_flip) * 1000, 3)})
                return
            samples[kind].append(t_flip - t0)
            window = (wall0, wall0 + (t_flip - t0))
            for name, value in passes_in(writer.health(), window).items():
                passes.setdefault(kind, {}).setdefault(name, []).append(value)

        settle("open")
        isolate = writer.parse(np_manifest("isolate", None))
        for _ in range(iterations):
            measure("deny", "closed", lambda: writer.store(isolate))
            measure("lift", "open", lambda: writer.delete("NetworkPolicy", "isolate"))
        writer.apply(np_manifest("allow-peer", "client"))
        settle("open")
        peers = {p: writer.parse(np_manifest("allow-peer", p)) for p in ("nobody", "client")}
        for i in range(iterations):
            expect, peer = ("closed", "nobody") if i % 2 == 0 else ("open", "client")
            measure("update", expect, lambda peer=peer: writer.store(peers[peer]))
        # relabel: every change gives the server a label set never seen before, so the
        # identity service allocates a new identity, the policy service resolves it (into
        # or out of the `lock` policy) and both executors move the endpoint to it
        writer.delete("NetworkPolicy", "allow-peer")
        writer.apply(lock_manifest())
        settle("open")
        for i in range(iterations):
            locked = writer.parse(server_manifest({"app": "server", "gen": f"g{2 * i}", "locked": "yes"}))
            measure("relabel_deny", "closed", lambda res=locked: writer.store(res))
            free = writer.parse(server_manifest({"app": "server", "gen": f"g{2 * i + 1}"}))
            measure("relabel_lift", "open", lambda res=free: writer.store(res))
        changes = len(KERNEL_KINDS) * iterations
        assert len(early) <= max(1, changes // 100), f"flips before the write: {early}"
        reports = writer.health()
        loaded["identities"] = service_detail(reports, "identity").get("identities")
        policy = service_detail(reports, "policy")
        loaded["identities_with_policy"] = policy.get("identities_with_policy")
        loaded["entries"] = policy.get("entries")
        return {"iterations": iterations, "cluster_nodes": 2, "path": "client node-1 -> server node-2, TCP 80",
                "loaded": loaded,
                **{f"{k}_ms": summary(v) for k, v in samples.items()},
                "write_ms": {k: summary(v) for k, v in writes.items()},
                "samples_ms": {k: [round(x * 1000, 3) for x in v] for k, v in samples.items()},
                "early_flips": early,
                "passes_per_change_ms": {
                    kind: {name: [round(x, 3) for x in values] for name, values in by.items() if name.endswith("_at_ms")}
                    for kind, by in passes.items()},
                "passes_until_flip_ms": {
                    kind: {name: summary([v / 1000 for v in values]) for name, values in by.items()}
                    for kind, by in passes.items()}}
    finally:
        if writer is not None:
            writer.close()
        if prober is not None:
            prober.kill()
            prober.wait()
        ctl(data_dir, "down")
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"ciliary-{cluster}-" not in listed, "namespaces left behind"
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def git_state() -> dict[str, Any]:
    """The commit measured and the uncommitted changes to code that runs in the bench."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    code = [p for p in changed if p.startswith(("ciliary/", "services/", "bpf/", "bench/policy.py"))]
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed), "dirty_code": code}


KERNEL_KINDS = (
    ("deny", "create isolating NP"), ("lift", "delete it"), ("update", "change allow peer"),
    ("relabel_deny", "server relabelled into isolating NP"),
    ("relabel_lift", "server relabelled out of it"),
)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so the instance's ``finally: ciliary down`` still runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser()
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--rules", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--kernel-identities", type=int, default=1000,
                        help="pods (one identity each) loaded into the embedded stack")
    parser.add_argument("--kernel-rules", type=int, default=500,
                        help="policies loaded into the embedded stack")
    parser.add_argument("--no-kernel", action="store_true", help="skip the embedded-stack part")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    args = parser.parse_args()
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews the resolver times
    measured = git_state()  # what runs: taken before the run, not after

    resolver = bench_resolver(args.identities, args.rules, args.repeat)
    kernel = None if args.no_kernel else bench_kernel(args.iterations, args.kernel_identities,
                                                     args.kernel_rules)
    base = resolver["from_scratch_ms"]["p50"]
    rows = [
        ["resolve from scratch (manifests)", f"{args.identities} ids x {args.rules} rules",
         resolver["from_scratch_ms"]["p50"], resolver["from_scratch_ms"]["p99"], "1.00"],
        ["resolve from scratch (normalised)", f"{args.identities} ids x {args.rules} rules",
         resolver["from_scratch_normalised_ms"]["p50"], resolver["from_scratch_normalised_ms"]["p99"],
         f"{resolver['from_scratch_normalised_ms']['p50'] / base:.2f}"],
        ["incremental: one pod relabelled", "engine apply + map ops",
         resolver["incremental_ms"]["p50"], resolver["incremental_ms"]["p99"],
         f"{resolver['incremental_ms']['p50'] / base:.2f}"],
        ["  of which: begin (new identity resolved)", "PolicyEngine.begin",
         resolver["incremental_begin_ms"]["p50"], resolver["incremental_begin_ms"]["p99"],
         f"{resolver['incremental_begin_ms']['p50'] / base:.3f}"],
        ["re-encode one changed record", "records.update_desired",
         resolver["reencode_per_record_ms"]["p50"], resolver["reencode_per_record_ms"]["p99"],
         f"{resolver['reencode_per_record_ms']['p50'] / base:.4f}"],
    ]
    if kernel:
        for kind, what in KERNEL_KINDS:
            s = kernel[f"{kind}_ms"]
            rows.append([f"apply -> enforced in kernel: {kind}", what, s["p50"], s["p99"], f"{s['p50'] / base:.2f}"])
        for kind, _ in KERNEL_KINDS:
            kernel[f"{kind}_vs_resolve_from_scratch_p50"] = round(kernel[f"{kind}_ms"]["p50"] / base, 2)
    result = {
        "command": " ".join([".venv/bin/python bench/policy.py", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m_at_start": load_at_start},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": ("times in ms; ratio = p50 / p50 of resolve from scratch (manifests). Kernel latency: "
                 "bus write -> first TCP attempt from the client pod that sees the new verdict"),
        "git": measured, "resolver": resolver, "kernel": kernel,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(output.table(["MEASURE", "WHAT", "P50 MS", "P99 MS", "X RESOLVE"], rows))
    if kernel:
        print(f"loaded: {kernel['loaded']}")
        prow = [[kind, name, s["p50"], s["p99"]] for kind, by in kernel["passes_until_flip_ms"].items()
                for name, s in by.items()]
        prow += [[kind, "bus write (ResourceStore)", s["p50"], s["p99"]] for kind, s in kernel["write_ms"].items()]
        print(output.table(["CHANGE", "WRITE -> FLIP: PASSES (SERVICE HEALTH)", "P50", "P99"], prow))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
