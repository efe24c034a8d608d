"""Churn and memory sampling of the soak: what ``bench/soak.py`` runs for minutes and
``tests/e2e/test_soak.py`` for two.

Invariants:
- ``Churn`` changes an instance only through the CLI callable it is given (``ciliary
  <args>``, stdin optional): one round creates one pod with a label of its own (a new
  identity), deletes the oldest churn pod once more than ``live_pods`` exist, creates a
  one-pod Service for the new pod and deletes the one of two rounds before, and rewrites
  the churn policy (its extra port and peer change every round). The Service ``churn-web``
  selects every churn pod, so its backends scale with each round.
- Every pod, Service and policy it makes is named ``churn-*`` / ``soak-*`` in namespace
  ``default``; the traffic client runs inside the client pod's namespace, addresses the
  ``churn-web`` cluster IP only, and is stopped (SIGTERM) by ``stop_traffic``.
- ``Sampler`` only reads ``/proc/<pid>/status`` of the processes ``instance.json`` lists
  (and the supervisor); a restarted process keeps its name and its samples continue.
- ``growth``/``slope``/``verdict`` are pure functions of the samples.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ciliary import config, natscreds, schema  # noqa: E402
from ciliary.bus import Bus  # noqa: E402
from tests.e2e import chaos  # noqa: E402

Cli = Callable[..., str]  # cli(*args, stdin=None) -> stdout; raises when ciliary exits non-zero
PORT = 8080


def _docs(*docs: dict[str, Any]) -> str:
    return "\n---\n".join(json.dumps(d) for d in docs)


def pod(name: str, node: str, labels: dict[str, str], serve: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": node, "containers": [{
                "name": "main", "image": "ciliary/workload",
                "command": ["python3", "-m", "ciliary.workload", "serve", "--tcp", serve, "--name", name],
                "ports": [{"name": "http", "containerPort": int(serve)}]}]}}


def service(name: str, selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": PORT, "targetPort": PORT,
                                                      "protocol": "TCP"}]}}


def policy(round_no: int) -> dict[str, Any]:
    """Churn pods accept the client on 8080 always; one extra rule changes every round."""
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "soak-churn", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "churn"}},
                     "ingress": [
                         {"fromEndpoints": [{"matchLabels": {"app": "soak-client"}}],
                          "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}]}]},
                         {"fromEndpoints": [{"matchLabels": {"gen": str(round_no)}}],
                          "toPorts": [{"ports": [{"port": str(9000 + round_no % 7), "protocol": "TCP"}]}]},
                     ]}}


@dataclass
class Churn:
    cli: Cli
    nodes: Sequence[str]
    live_pods: int = 3
    round_no: int = 0
    live: list[str] = field(default_factory=list)  # churn pods, oldest first
    deleted: dict[str, str] = field(default_factory=dict)  # deleted churn pod -> its IP
    deleted_gens: set[str] = field(default_factory=set)  # their "gen" labels
    traffic: subprocess.Popen[str] | None = None
    errors: list[str] = field(default_factory=list)

    def setup(self) -> None:
        """The client pod, ``churn-web`` and the policy."""
        self.cli("apply", "-f", "-", stdin=_docs(
            pod("soak-client", self.nodes[0], {"app": "soak-client"}, "7070"),
            service("churn-web", {"app": "churn"}), policy(0)))

    def pod_ips(self) -> dict[str, str]:
        items = json.loads(self.cli("get", "pods", "-o", "json"))["items"]
        return {p["metadata"]["name"]: p.get("status", {}).get("podIP", "") for p in items}

    def expected_pods(self) -> int:
        return 1 + len(self.live)

    def step(self) -> None:
        """One round (see the module docstring). A failing command is recorded, not raised:
        the next round goes on."""
        self.round_no += 1
        r = self.round_no
        name = f"churn-{r}"
        node = self.nodes[r % len(self.nodes)]
        try:
            self.cli("apply", "-f", "-", stdin=_docs(
                pod(name, node, {"app": "churn", "gen": str(r)}, str(PORT)),
                service(f"churn-one-{r}", {"gen": str(r)}), policy(r)))
            self.live.append(name)
            if r > 2:
                self.cli("delete", "svc", f"churn-one-{r - 2}")
            if len(self.live) > self.live_pods:
                gone = self.live.pop(0)
                ip = self.pod_ips().get(gone, "")
                self.cli("delete", "pod", gone)
                self.deleted[gone] = ip
                self.deleted_gens.add(gone.removeprefix("churn-"))
        except Exception as err:  # noqa: BLE001 - one failed round is reported, the soak goes on
            self.errors.append(f"round {r}: {err}")

    def start_traffic(self, client_netns: str, vip: str) -> None:
        """The chaos test's client (``tests/e2e/chaos.py``), one attempt every 0.2 s."""
        self.traffic = chaos.client(client_netns, vip, PORT, timeout=2.0, pause=0.2)

    def stop_traffic(self) -> tuple[int, int]:
        """(connections answered, connections failed) since ``start_traffic``."""
        if self.traffic is None:
            return 0, 0
        ok, failed = chaos.counts(self.traffic)
        self.traffic = None
        return ok, failed


# ---- memory samples --------------------------------------------------------------------------


def _memory(pid: int) -> tuple[float, float] | None:
    """(VmRSS, RssAnon) in MiB, None when the process is gone."""
    values: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    values[key] = int(value.split()[0]) / 1024
    except OSError:
        return None
    if len(values) < 2:
        return None
    return values["VmRSS"], values["RssAnon"]


def instance_pids(data_dir: Path) -> dict[str, int]:
    state = config.read_instance(data_dir)
    if state is None:
        return {}
    return {"supervisor": state.supervisor_pid, **{p.name: p.pid for p in state.processes}}


class Sampler:
    """Samples (seconds since start, RSS MiB, anon MiB) of every instance process every
    ``interval`` seconds in a thread; ``pids_seen`` holds every pid a name had."""

    def __init__(self, data_dir: Path, interval: float = 5.0) -> None:
        self.data_dir = data_dir
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, float]]] = {}
        self.pids_seen: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> Sampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        for name, pid in instance_pids(self.data_dir).items():
            memory = _memory(pid)
            if memory is None:
                continue
            seen = self.pids_seen.setdefault(name, [])
            if not seen or seen[-1] != pid:
                seen.append(pid)
            self.samples.setdefault(name, []).append((round(now, 1), round(memory[0], 1), round(memory[1], 1)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute (0 for < 2 points)."""
    if len(points) < 2:
        return 0.0
    mx, my = _mean([p[0] for p in points]), _mean([p[1] for p in points])
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in points) / var


def growth(values: Sequence[float]) -> float:
    """Mean of the last third minus mean of the middle third (MiB): the first third is
    warm-up; a leak shows as a last third above the middle one."""
    n = len(values)
    if n < 3:
        return 0.0
    third = n // 3
    return _mean(values[n - third:]) - _mean(values[third:n - third])


def growth_allowance(values: Sequence[float], floor_mib: float = 16.0, share: float = 0.15) -> float:
    """How much ``growth`` may be before it counts as a leak: ``floor_mib`` or ``share`` of
    the middle third's mean, whichever is larger (allocator and GC noise on a busy machine)."""
    n = len(values)
    third = max(1, n // 3)
    return max(floor_mib, share * _mean(values[third:n - third] or values))


def verdict(values: Sequence[float], times: Sequence[float], slope_limit: float = 0.5) -> str:
    """``growing`` when the last third is above the middle third by more than the allowance
    and the last half still climbs faster than ``slope_limit`` MiB/min; else ``bounded``."""
    half = len(values) // 2
    climbing = slope(list(zip(times[half:], values[half:], strict=True))) > slope_limit
    return "growing" if climbing and growth(values) > growth_allowance(values) else "bounded"


def summary(samples: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    """Start / peak / end / last-half slope / third-to-third growth / verdict of one
    process's RSS and anon samples."""
    times = [s[0] for s in samples]
    out: dict[str, Any] = {"samples": len(samples)}
    for label, index in (("rss", 1), ("anon", 2)):
        values = [s[index] for s in samples]
        half = len(values) // 2
        out[label] = {
            "start_mib": values[0], "peak_mib": max(values), "end_mib": values[-1],
            "slope_last_half_mib_per_min": round(slope(list(zip(times[half:], values[half:], strict=True))), 3),
            "growth_mib": round(growth(values), 1),
            "allowance_mib": round(growth_allowance(values), 1),
            "verdict": verdict(values, times),
        }
    return out


def cache_counts(status: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """``ciliary status -o json`` → service (``node/<name>`` for node executors) → cache →
    {size, cap, evicted} as the services report them under ``detail.caches`` (and the
    flows service's L7 join under ``detail.l7.join``)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for report in status.get("services", []):
        detail = report.get("detail", {})
        caches = dict(detail.get("caches") or {})
        join = (detail.get("l7") or {}).get("join") if isinstance(detail.get("l7"), dict) else None
        if join:
            caches["l7_join_flows"] = join
        if caches:
            name = report["name"] + (f"/{report['node']}" if report.get("node") else "")
            out[name] = caches
    return out


def ready_pods(cli: Cli) -> dict[str, dict[str, Any]]:
    """Status of every Running and Ready pod with an IP, by name."""
    items = json.loads(cli("get", "pods", "-o", "json"))["items"]
    return {p["metadata"]["name"]: p["status"] for p in items
            if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}


async def _bucket_keys(data_dir: Path, buckets: Sequence[str]) -> dict[str, list[str]]:
    state = config.read_instance(data_dir)
    if state is None:
        raise RuntimeError(f"no instance in {data_dir}")
    bus = await Bus.connect(state.nats_url, "soak-buckets",
                            credential=natscreds.instance_credential(data_dir, "cli"))
    try:
        return {bucket: sorted(await bus.kv_list(bucket)) for bucket in buckets}
    finally:
        await bus.close()


def bucket_keys(data_dir: Path, buckets: Sequence[str]) -> dict[str, list[str]]:
    """The live keys of ``buckets``, read as the instance's CLI user."""
    return asyncio.run(_bucket_keys(data_dir, buckets))


def leftovers(cli: Cli, churn: Churn, data_dir: Path | None = None) -> dict[str, list[str]]:
    """What deleted churn pods left (empty lists: converged): identities still labelled
    with a deleted pod's ``gen``, kernel ipcache rows (any node) for a deleted pod's IP
    that no live pod holds now, and (with ``data_dir``) entries of bucket ``status``
    for a deleted pod."""
    identities = json.loads(cli("identity", "list", "-o", "json"))
    stale_ids = [f"{i['id']} {','.join(i['labels'])}" for i in identities
                 if any(label.split(":", 1)[-1].startswith("gen=")
                        and label.split("=", 1)[1] in churn.deleted_gens for label in i["labels"])]
    live_ips = {status.get("podIP") for status in
                (p.get("status", {}) for p in json.loads(cli("get", "pods", "-o", "json"))["items"])}
    gone = {f"{ip}/32": name for name, ip in churn.deleted.items() if ip and ip not in live_ips}
    rows = [(node["node"], row) for node in json.loads(cli("bpf", "ipcache", "list", "-o", "json"))
            for row in node.get("rows", [])]
    stale_ipcache = [f"{node}: {row['prefix']} ({gone[row['prefix']]})" for node, row in rows if row["prefix"] in gone]
    out = {"identities": stale_ids, "ipcache": stale_ipcache}
    if data_dir is not None:
        statuses = bucket_keys(data_dir, [schema.BUCKET_STATUS])[schema.BUCKET_STATUS]
        out["status"] = [key for key in statuses if key.startswith("Pod.default.churn-")
                         and key.removeprefix("Pod.default.") in churn.deleted]
    return out
