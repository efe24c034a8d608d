"""Chaos under traffic, the long form of ``tests/e2e/test_chaos.py``, with a report.

For each bus (``single``: one nats-server; ``replicated``: ``--nats-replicas 3`` with two
identity replicas) a 2-node instance runs the shop's workloads, services and policies.
Then, for ``--rounds`` rounds, each victim is SIGKILLed in turn while two clients connect
without pause across the payments VIP: from checkout (allowed by policy) and from
frontend (denied). Right after each kill a Namespace is applied (the CLI retries a NATS
timeout); it must be stored once the fault is over. Per fault:

- connections attempted and failed on the allowed path, attempts and passed on the denied
  path (clients started before the kill, stopped once converged); and whether one
  established connection (frontend holding a connection to a session server in checkout,
  a line and its answer every 20 ms) lived through the fault, with its exchanges;
- seconds from the kill until converged: the victim restarted, every service healthy
  (replicated: every stream with all copies current), the kernel maps and the computed
  buckets equal to what they held before the fault; polled through the CLI, so the
  resolution is a CLI round trip (~0.5 s);
- items compared: map rows + bucket keys.

Last, once per bus, the supervisor is killed: its children go with it (the node executors
tear their pods down), ``ciliary up`` runs again and the pods are created again with new
addresses. The clients run until the children are gone (connections failed meanwhile are
counted, not asserted); converged is the kill until traffic flows again and the maps equal
what they held before, pod for pod (addresses replaced by pod names), identities and
policy bucket unchanged.

Nothing leaves the machine: nodes and pods are network namespaces of clusters named
``ch<hex>``; ``ciliary down`` removes them. Writes bench/results/chaos.json (with the git
commit and whether the tree was dirty) and prints a table.

    sudo .venv/bin/python bench/chaos.py [--rounds 1] [--bus single|replicated|both]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sandbox import EmbeddedInstance, install_sigterm, results_header, write_results  # noqa: E402
from ciliary import config, schema  # noqa: E402
from ciliary.bus import BusError  # noqa: E402
from ciliary.output import table  # noqa: E402
from tests.e2e import chaos as C  # noqa: E402
from tests.e2e.instance import pods_ready  # noqa: E402
from tests.e2e.test_stack import SHOP, cluster_ip, connect, maps_snapshot, policy_in_force  # noqa: E402

SINGLE_VICTIMS = ("identity", "servicelb", "policy", "flows", "mesh", "nats-server", "node/node-1")
REPLICATED_VICTIMS = ("nats-server-1", "nats-server-2", "nats-server-3", "identity", "identity-2",
                      "servicelb", "policy", "flows", "mesh", "node/node-1")
CONVERGE_TIMEOUT = 120.0


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``predicate()``'s first truthy value within ``timeout``. A read that fails meanwhile
    (a CLI command timing out while a replicated bus elects a leader) counts as "not yet";
    the last such failure is named if the time runs out."""
    deadline = time.monotonic() + timeout
    failure = ""
    while time.monotonic() < deadline:
        try:
            found = predicate()
        except (AssertionError, OSError, BusError) as err:
            found, failure = None, str(err).splitlines()[0][:200]
        if found:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last: {failure})" if failure else ""))


class ChaosInstance(EmbeddedInstance):
    """``EmbeddedInstance`` with 2 nodes and extra ``ciliary up`` flags."""

    def __init__(self, bus: str) -> None:
        super().__init__("ch", cluster_id=57 if bus == "single" else 58, nodes=2)
        self.bus = bus
        self.flags = ("--nats-replicas", "3", "--identity-replicas", "2") if bus == "replicated" else ()

    def up(self) -> None:
        self.cli("up", "-d", "--nodes", str(self.nodes), "--cluster", self.cluster, "--cluster-id",
                 str(self.cluster_id), "--timeout", str(self.timeout), *self.flags, timeout=self.timeout + 30)

    def __enter__(self) -> ChaosInstance:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self


def converged(inst: ChaosInstance, before: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Healthy, replicated, and maps and computed buckets as before."""
    data_dir = inst.data_dir
    if not C.all_healthy(data_dir):
        return False
    if inst.bus == "replicated" and not C.fully_replicated(data_dir):
        return False
    if maps_snapshot(data_dir) != before:
        return False
    return C.buckets_snapshot(data_dir) == stored


def items(maps: dict[str, list], stored: dict[str, dict[str, bytes]]) -> int:
    return sum(len(node["rows"]) for nodes in maps.values() for node in nodes) + sum(len(b) for b in stored.values())


def apply_namespace(inst: ChaosInstance, name: str) -> dict[str, Any]:
    """``ciliary apply`` of a new Namespace (as a user runs it: a fresh CLI process)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ciliary.cli", "apply", "-f", "-"], capture_output=True, text=True,
                          input=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n",
                          env=dict(os.environ, CILIARY_DATA_DIR=str(inst.data_dir)), cwd=REPO, timeout=90)
    return {"ok": done.returncode == 0, "seconds": round(time.monotonic() - started, 2),
            "retries": done.stderr.count("retrying")}


def fault(inst: ChaosInstance, victim: str, pods: dict[str, Any], vip: str, before: dict[str, Any],
          stored: dict[str, Any], namespace: str) -> dict[str, Any]:
    data_dir = inst.data_dir
    held = C.established(pods["frontend"]["ciliary"]["netns"], pods["checkout"]["podIP"])
    allowed = C.client(pods["checkout"]["ciliary"]["netns"], vip, 8080, timeout=2.0)
    denied = C.client(pods["frontend"]["ciliary"]["netns"], vip, 8080, timeout=0.25)
    time.sleep(1.0)
    pid = C.pid_of(data_dir, victim)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    applied = apply_namespace(inst, namespace)
    wait(lambda: C.pid_of(data_dir, victim) != pid, 60, f"{victim} restarted")
    restarted = time.monotonic() - killed
    wait(lambda: converged(inst, before, stored), CONVERGE_TIMEOUT, f"converged after {victim}")
    seconds = time.monotonic() - killed
    exchanges, broken = C.counts(held)
    ok, failed, reasons = C.counts_and_reasons(allowed)
    passed, refused = C.counts(denied)
    kept = inst.cli("get", "ns", namespace, check=False).returncode == 0
    return {"victim": victim, "allowed_attempted": ok + failed, "allowed_failed": failed,
            "allowed_failed_by_reason": reasons,
            "denied_attempted": passed + refused, "denied_passed": passed,
            "established_exchanges": exchanges, "established_broken": bool(broken),
            "restarted_s": round(restarted, 2), "converged_s": round(seconds, 2),
            "items_compared": items(before, stored), "apply_during_fault": {**applied, "stored_after": kept}}


def supervisor_fault(inst: ChaosInstance, pods: dict[str, Any], vip: str, before: dict[str, Any],
                     stored: dict[str, Any]) -> dict[str, Any]:
    data_dir = inst.data_dir
    state = config.read_instance(data_dir)
    assert state is not None
    allowed = C.client(pods["checkout"]["ciliary"]["netns"], vip, 8080, timeout=2.0)
    denied = C.client(pods["frontend"]["ciliary"]["netns"], vip, 8080, timeout=0.25)
    time.sleep(1.0)
    killed = time.monotonic()
    os.kill(state.supervisor_pid, signal.SIGKILL)
    wait(lambda: not any(config.pid_alive(p.pid) for p in state.processes), 60, "every child exited")
    children_gone = time.monotonic() - killed
    ok, failed = C.counts(allowed)
    passed, refused = C.counts(denied)
    inst.up()
    wait(lambda: pods_ready(data_dir, 3), 90, "the pods ready again")
    wait(lambda: connect(data_dir, "checkout", vip, 8080).returncode == 0, 60, "checkout -> payments again")
    resumed = time.monotonic() - killed
    expected = C.by_pod(before)
    wait(lambda: not C.maps_differ(expected, C.by_pod(maps_snapshot(data_dir))), CONVERGE_TIMEOUT,
         "maps as before, pod for pod")
    seconds = time.monotonic() - killed
    after = C.buckets_snapshot(data_dir)
    same = [b for b in (schema.BUCKET_IDENTITIES, schema.BUCKET_POLICY) if after[b] == stored[b]]
    if len(same) != 2:
        raise RuntimeError(f"buckets changed across the supervisor's death: {same}")
    return {"victim": "supervisor", "allowed_attempted": ok + failed, "allowed_failed": failed,
            "denied_attempted": passed + refused, "denied_passed": passed,
            "children_gone_s": round(children_gone, 2), "traffic_resumed_s": round(resumed, 2),
            "converged_s": round(seconds, 2),
            "items_compared": items(before, {b: stored[b] for b in same})}


def run_bus(bus: str, rounds: int) -> dict[str, Any]:
    victims = SINGLE_VICTIMS if bus == "single" else REPLICATED_VICTIMS
    with ChaosInstance(bus) as inst:
        data_dir = inst.data_dir
        inst.cli("apply", "-f", str(SHOP / "10-workloads.yaml"), "-f", str(SHOP / "20-services.yaml"),
                 "-f", str(SHOP / "30-policies.yaml"))
        pods = wait(lambda: pods_ready(data_dir, 3), 90, "three ready pods")
        vip = wait(lambda: cluster_ip(data_dir, "payments"), 30, "a cluster IP")
        wait(lambda: policy_in_force(data_dir), 60, "the payments policy in the datapath")
        wait(lambda: connect(data_dir, "checkout", vip, 8080).returncode == 0, 30, "checkout -> payments")
        if bus == "replicated":
            wait(lambda: C.fully_replicated(data_dir), 60, "every stream fully replicated")
        before = maps_snapshot(data_dir)
        stored = C.buckets_snapshot(data_dir)
        faults = []
        server = C.session_server(pods["checkout"]["ciliary"]["netns"])
        try:
            wait(lambda: connect(data_dir, "frontend", pods["checkout"]["podIP"], C.SESSION_PORT).returncode == 0,
                 30, "frontend -> checkout's session server")
            for round_ in range(rounds):
                for victim in victims:
                    entry = fault(inst, victim, pods, vip, before, stored, f"chaos-{round_}-{len(faults)}")
                    entry["round"] = round_ + 1
                    faults.append(entry)
                    print(f"{bus}: {victim}: {entry['allowed_failed']}/{entry['allowed_attempted']} failed, "
                          f"converged in {entry['converged_s']:.1f}s", file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
        entry = supervisor_fault(inst, pods, vip, before, stored)
        entry["round"] = rounds
        faults.append(entry)
    if inst.problems:
        raise RuntimeError(f"{bus}: left behind: {inst.problems}")
    return {"bus": bus, "faults": faults}


def _note(f: dict[str, Any]) -> str:
    if f["victim"] == "supervisor":
        return (f"children gone {f['children_gone_s']:.1f}s, traffic back {f['traffic_resumed_s']:.1f}s "
                f"(outage: {f['allowed_failed']:,} failed)")
    apply = f["apply_during_fault"]
    if not (apply["ok"] and apply["stored_after"]):
        return "apply FAILED"
    retries = apply["retries"]
    return f"apply ok {apply['seconds']:.1f}s" + (f" ({retries} {'retry' if retries == 1 else 'retries'})"
                                                  if retries else "")


def render(res: dict[str, Any]) -> str:
    rows = []
    for run in res["runs"]:
        for f in run["faults"]:
            outage = f["victim"] == "supervisor"  # pods torn down: every attempt fails at once
            held = "-" if outage else (f"BROKEN after {f['established_exchanges']}" if f["established_broken"]
                                       else f"kept ({f['established_exchanges']:,})")
            rows.append([
                run["bus"], str(f["round"]), f["victim"], "-" if outage else f"{f['allowed_attempted']:,}",
                "-" if outage else str(f["allowed_failed"]), f"{f['denied_passed']}/{f['denied_attempted']:,}",
                held, f"{f['converged_s']:.1f}s", str(f["items_compared"]), _note(f),
            ])
    return table(["BUS", "ROUND", "KILLED", "ALLOWED", "FAILED", "DENIED PASSED", "ESTABLISHED", "CONVERGED",
                  "ITEMS", "NOTE"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="times each victim is killed")
    parser.add_argument("--bus", choices=["single", "replicated", "both"], default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/chaos.py needs root (network namespaces, BPF)")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    install_sigterm()
    buses = ["single", "replicated"] if args.bus == "both" else [args.bus]
    res = results_header(f"bench/chaos.py --rounds {args.rounds} --bus {args.bus}")
    try:
        res["runs"] = [run_bus(bus, args.rounds) for bus in buses]
    finally:
        C.stop_leftovers()  # a run that failed half way leaves no client connecting
    write_results(REPO / "bench" / "results" / "chaos.json", res, render)
    bad = [f"{run['bus']}/{f['victim']}" for run in res["runs"] for f in run["faults"]
           if f["victim"] != "supervisor" and (f["allowed_failed"] or f["denied_passed"] or f["established_broken"])]
    if bad:
        raise SystemExit(f"traffic affected by: {', '.join(bad)}")


if __name__ == "__main__":
    main()
