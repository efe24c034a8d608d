"""The scenarios of ``ciliary connectivity test`` as data, and how a result is judged (pure).

A run deploys its own workloads into the namespace ``ciliary-test`` of a running instance
(a client and two echo servers on two nodes, a NodePort Service over the echo servers, a
policy-guarded server, a server in the sandbox's outside world) and runs each selected
scenario: one probe from the client pod (``python -m ciliary.workload connect`` or
``resolve``), judged from what the probe printed and the flows the datapath reported.

Invariants:
- Everything a run creates lives in ``NAMESPACE`` and carries ``PART_OF_LABEL``; its
  policies select only its own pods (``endpointSelector`` on the ``name`` label, in its
  own namespace), so a run never changes what happens to anything else.
- ``select`` keeps scenario order; ``manifests`` deploys only what the selected scenarios
  need (``Scenario.needs`` and the objects those pods imply), in dependency order.
- ``skip_reason`` decides from the instance alone (node count, cluster DNS) before any
  probe; a skipped scenario is neither a pass nor a failure.
- ``judge`` is a pure function of the scenario, the probe's outcome and the flows seen
  since the probe started: a scenario that expects an answer passes when the expected
  peer answered (and, when it names a policy, a FORWARDED policy verdict names that
  policy); a scenario that expects a drop passes only when nothing answered and a
  DROPPED flow names the expected policy in ``<direction>_denied_by``.
- No I/O here: no bus, no asyncio, no subprocesses (``ciliary/cli/connectivity.py`` runs it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ciliary import schema

NAMESPACE = "ciliary-test"
PART_OF_LABEL = "app.kubernetes.io/part-of"
PART_OF = "ciliary-connectivity-test"
WORLD_ANNOTATION = "sandbox.ciliary.io/outside-world"
ECHO_PORT = 8080
DENIED_PORT = 9090
WORLD_PORT = 18080
WORLD_ADDRESS = "203.0.113.80"  # any address of the sandbox world's 203.0.113.0/24
CLIENT = "client"
SERVICE = "echo"
ALLOW_POLICY = "allow-client-to-guarded"
DENY_POLICY = "deny-client-to-guarded-9090"
DNS_NAME = "kube-dns.kube-system.svc.cluster.local"

PASS, FAIL, SKIP = "pass", "fail", "skip"

# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A test pod: ``placement`` is ``first`` (the client's node), ``second`` (another
    node when there is one) or ``world`` (the sandbox's outside world)."""

    name: str
    placement: str
    tcp_ports: tuple[int, ...] = (ECHO_PORT,)
    labels: tuple[tuple[str, str], ...] = ()


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload(CLIENT, "first"),
    Workload("echo-same", "first", labels=(("app", SERVICE),)),
    Workload("echo-other", "second", labels=(("app", SERVICE),)),
    Workload("guarded", "second", tcp_ports=(ECHO_PORT, DENIED_PORT)),
    Workload("world-echo", "world", tcp_ports=(WORLD_PORT,)),
)}


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Probe:
    """What the client does. ``target``: ``pod:<name>`` (its IP), ``service`` (the echo
    Service's cluster IP), ``nodeport`` (the second node's InternalIP and the echo
    Service's node port), ``world`` (``WORLD_ADDRESS``), ``dns`` (the cluster DNS)."""

    target: str
    port: int = ECHO_PORT


@dataclass(frozen=True)
class Expect:
    """``answered_by``: the workloads one of which must answer (empty: any DNS answer);
    ``answered=False``: nothing may answer. ``policy``/``direction``: the policy a
    policy-verdict flow must name (allowed_by when answered, denied_by when dropped)."""

    answered: bool = True
    answered_by: tuple[str, ...] = ()
    policy: str = ""
    direction: str = "ingress"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    needs: tuple[str, ...]  # workloads
    probe: Probe
    expect: Expect
    service: bool = False  # needs the echo Service
    policies: tuple[str, ...] = ()
    two_nodes: bool = False
    cluster_dns: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("pod-to-pod/same-node", "client -> echo-same (same node) by pod IP",
             (CLIENT, "echo-same"), Probe("pod:echo-same"), Expect(answered_by=("echo-same",))),
    Scenario("pod-to-pod/cross-node", "client -> echo-other (other node) by pod IP",
             (CLIENT, "echo-other"), Probe("pod:echo-other"), Expect(answered_by=("echo-other",)),
             two_nodes=True),
    Scenario("pod-to-service/cluster-ip", "client -> Service echo by cluster IP",
             (CLIENT, "echo-same", "echo-other"), Probe("service"),
             Expect(answered_by=("echo-same", "echo-other")), service=True),
    Scenario("pod-to-service/node-port", "client -> Service echo by the other node's InternalIP and node port",
             (CLIENT, "echo-same", "echo-other"), Probe("nodeport"),
             Expect(answered_by=("echo-same", "echo-other")), service=True),
    Scenario("pod-to-world", f"client -> {WORLD_ADDRESS}:{WORLD_PORT} in the outside world",
             (CLIENT, "world-echo"), Probe("world", WORLD_PORT), Expect(answered_by=("world-echo",))),
    Scenario("dns/cluster-dns", f"client resolves {DNS_NAME} through the cluster DNS service",
             (CLIENT,), Probe("dns", 53), Expect(), cluster_dns=True),
    Scenario("policy/allow", f"client -> guarded:{ECHO_PORT}, allowed by {ALLOW_POLICY}",
             (CLIENT, "guarded"), Probe("pod:guarded"),
             Expect(answered_by=("guarded",), policy=ALLOW_POLICY), policies=(ALLOW_POLICY, DENY_POLICY)),
    Scenario("policy/deny", f"client -> guarded:{DENIED_PORT}, dropped by {DENY_POLICY}",
             (CLIENT, "guarded"), Probe("pod:guarded", DENIED_PORT),
             Expect(answered=False, policy=DENY_POLICY), policies=(ALLOW_POLICY, DENY_POLICY)),
)


def names() -> list[str]:
    return [s.name for s in SCENARIOS]


def select(patterns: Iterable[str] = ()) -> list[Scenario]:
    """The scenarios whose name matches any of the glob ``patterns`` (each may hold
    several, comma-separated; ``!glob`` excludes), in declaration order; every scenario
    when no including pattern is given. ValueError names a pattern that matches nothing."""
    include: list[str] = []
    exclude: list[str] = []
    for pattern in patterns:
        for part in filter(None, (p.strip() for p in pattern.split(","))):
            (exclude if part.startswith("!") else include).append(part.lstrip("!"))
    for glob in include + exclude:
        if not any(fnmatch.fnmatchcase(s.name, glob) for s in SCENARIOS):
            raise ValueError(f"--test {glob!r} matches no test; tests: {', '.join(names())}")
    return [s for s in SCENARIOS
            if (not include or any(fnmatch.fnmatchcase(s.name, g) for g in include))
            and not any(fnmatch.fnmatchcase(s.name, g) for g in exclude)]


# ---------------------------------------------------------------- the instance


@dataclass(frozen=True)
class Environment:
    """What a run learned about the instance before deploying: its Ready nodes (sorted)
    with their InternalIPs, and the cluster DNS service's address ("" when none)."""

    nodes: tuple[str, ...]
    node_ips: dict[str, str] = field(default_factory=dict)
    cluster_dns: str = ""

    def node_for(self, placement: str) -> str:
        """The node a workload placement lands on ("" for the outside world)."""
        if placement == "world" or not self.nodes:
            return ""
        if placement == "second" and len(self.nodes) > 1:
            return self.nodes[1]
        return self.nodes[0]


def skip_reason(scenario: Scenario, env: Environment) -> str:
    """Why ``scenario`` cannot run on this instance ("" when it can)."""
    if scenario.two_nodes and len(env.nodes) < 2:
        return f"needs 2 nodes, the instance has {len(env.nodes)}"
    if scenario.cluster_dns and not env.cluster_dns:
        return "no cluster DNS (no Service kube-system/kube-dns)"
    return ""


# ---------------------------------------------------------------- manifests


def _metadata(name: str, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": {PART_OF_LABEL: PART_OF, **(labels or {})}, **extra}


def namespace_manifest() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {PART_OF_LABEL: PART_OF}}}


def pod_manifest(workload: Workload, env: Environment) -> dict[str, Any]:
    command = ["python3", "-m", "ciliary.workload", "serve", "--name", workload.name]
    for port in workload.tcp_ports:
        command += ["--tcp", str(port)]
    extra: dict[str, Any] = {}
    spec: dict[str, Any] = {"containers": [{
        "name": "workload", "image": "ciliary/workload", "command": command,
        "ports": [{"containerPort": p, "protocol": "TCP"} for p in workload.tcp_ports],
        "readinessProbe": {"tcpSocket": {"port": workload.tcp_ports[0]}, "periodSeconds": 1},
    }]}
    if workload.placement == "world":
        extra["annotations"] = {WORLD_ANNOTATION: "true"}
    else:
        spec["nodeName"] = env.node_for(workload.placement)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": _metadata(workload.name, {"name": workload.name, **dict(workload.labels)}, **extra),
            "spec": spec}


def service_manifest() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(SERVICE),
            "spec": {"type": "NodePort", "selector": {"app": SERVICE},
                     "ports": [{"name": "tcp", "port": ECHO_PORT, "targetPort": ECHO_PORT, "protocol": "TCP"}]}}


def policy_manifest(name: str) -> dict[str, Any]:
    rule = [{"fromEndpoints": [{"matchLabels": {"name": CLIENT}}],
             "toPorts": [{"ports": [{"port": str(ECHO_PORT if name == ALLOW_POLICY else DENIED_PORT),
                                     "protocol": "TCP"}]}]}]
    section = "ingress" if name == ALLOW_POLICY else "ingressDeny"
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": _metadata(name),
            "spec": {"endpointSelector": {"matchLabels": {"name": "guarded"}}, section: rule}}


def needed_workloads(scenarios: Sequence[Scenario]) -> list[Workload]:
    wanted = {w for s in scenarios for w in s.needs}
    return [w for name, w in WORKLOADS.items() if name in wanted]


def manifests(scenarios: Sequence[Scenario], env: Environment) -> list[dict[str, Any]]:
    """The objects a run of ``scenarios`` deploys: namespace, policies, service, pods
    (policies before pods, so a guarded pod never runs unguarded)."""
    out = [namespace_manifest()]
    for policy in dict.fromkeys(p for s in scenarios for p in s.policies):
        out.append(policy_manifest(policy))
    if any(s.service for s in scenarios):
        out.append(service_manifest())
    out += [pod_manifest(w, env) for w in needed_workloads(scenarios)]
    return out


# ---------------------------------------------------------------- probes


@dataclass(frozen=True)
class Addresses:
    """Where the deployed workloads answer: pod IPs by name, the echo Service's cluster IP
    and node port, the InternalIP the node-port probe uses, the cluster DNS address."""

    pods: dict[str, str] = field(default_factory=dict)
    cluster_ip: str = ""
    node_port: int = 0
    node_ip: str = ""
    cluster_dns: str = ""


def probe_destination(probe: Probe, addresses: Addresses) -> tuple[str, int]:
    """(address, port) a probe sends to; ("", 0) while it is not known."""
    kind, _, pod = probe.target.partition(":")
    if kind == "pod":
        return addresses.pods.get(pod, ""), probe.port
    if kind == "service":
        return addresses.cluster_ip, probe.port
    if kind == "nodeport":
        return (addresses.node_ip, addresses.node_port) if addresses.node_port else ("", 0)
    if kind == "world":
        return WORLD_ADDRESS, probe.port
    if kind == "dns":
        return addresses.cluster_dns, probe.port
    raise ValueError(f"unknown probe target {probe.target!r}")


def probe_args(probe: Probe, addresses: Addresses, *, timeout: float) -> list[str]:
    """The ``python -m ciliary.workload`` arguments of a probe."""
    host, port = probe_destination(probe, addresses)
    if probe.target == "dns":
        return ["resolve", host, DNS_NAME, "--port", str(port), "--timeout", f"{timeout:g}"]
    return ["connect", host, str(port), "--timeout", f"{timeout:g}"]


# ---------------------------------------------------------------- judging


@dataclass(frozen=True)
class Outcome:
    """What a probe saw: ``answered`` and its output line (``<responder> <peer-ip>``, or
    ``NOERROR 10.0.0.1`` for DNS), else the error it printed."""

    answered: bool
    output: str = ""
    error: str = ""

    @property
    def responder(self) -> str:
        return self.output.split()[0] if self.output.split() else ""


def _named(policies: Sequence[schema.FlowPolicy], name: str) -> bool:
    return any(p.name == name and p.namespace == NAMESPACE for p in policies)


def naming_flows(expect: Expect, flows: Sequence[schema.Flow]) -> list[schema.Flow]:
    """The flows that name the expected policy with the expected verdict."""
    if not expect.policy:
        return []
    kind = "allowed_by" if expect.answered else "denied_by"
    verdict = "FORWARDED" if expect.answered else "DROPPED"
    attr = f"{expect.direction}_{kind}"
    return [f for f in flows if f.verdict == verdict and _named(getattr(f, attr), expect.policy)]


def judge(scenario: Scenario, outcome: Outcome, flows: Sequence[schema.Flow]) -> tuple[str, str]:
    """``(PASS|FAIL, reason)`` for one probe of ``scenario`` (see the module invariants)."""
    expect = scenario.expect
    if expect.answered:
        if not outcome.answered:
            return FAIL, f"no answer ({outcome.error or 'the probe failed'}){drops_seen(flows)}"
        if expect.answered_by and outcome.responder not in expect.answered_by:
            return FAIL, f"answered by {outcome.responder or '?'}, expected {' or '.join(expect.answered_by)}"
        if expect.policy and not naming_flows(expect, flows):
            return FAIL, f"answered, but no FORWARDED policy verdict names {NAMESPACE}/{expect.policy}"
        if expect.answered_by:
            peer = outcome.output.split()[1:2]
            who = f"{outcome.responder} answered" + (f" (it saw the client as {peer[0]})" if peer else "")
        else:
            who = f"DNS answer {outcome.output}"
        allowed = f", allowed by {NAMESPACE}/{expect.policy}" if expect.policy else ""
        return PASS, f"{who}{allowed}"
    if outcome.answered:
        return FAIL, f"answered ({outcome.output}); expected a drop by {NAMESPACE}/{expect.policy}"
    if expect.policy:
        if naming_flows(expect, flows):
            return PASS, f"dropped, denied by {NAMESPACE}/{expect.policy}"
        return FAIL, f"no answer, but no DROPPED flow names {NAMESPACE}/{expect.policy}{drops_seen(flows) or '; no drop seen'}"
    return PASS, "no answer"


def drops_seen(flows: Sequence[schema.Flow]) -> str:
    """``; dropped: POLICY_DENIED at EGRESS`` for the drops among ``flows`` ("" for none)."""
    drops = sorted({f"{f.drop_reason_desc or 'DROPPED'}" + (f" at {f.traffic_direction}" if f.traffic_direction else "")
                    for f in flows if f.verdict == "DROPPED"})
    return f"; dropped: {', '.join(drops)}" if drops else ""


PROOF_FLOWS = 4


def proof_flows(scenario: Scenario, flows: Sequence[schema.Flow], limit: int = PROOF_FLOWS) -> list[schema.Flow]:
    """At most ``limit`` flows (oldest first) that show what happened: those naming the
    expected policy first, then drops, then the rest in time order."""
    naming = naming_flows(scenario.expect, flows)
    rank = {id(f): 0 for f in naming}
    ordered = sorted(range(len(flows)), key=lambda i: (
        rank.get(id(flows[i]), 1 if flows[i].verdict == "DROPPED" else 2), i))
    chosen = sorted(ordered[:limit])
    return [flows[i] for i in chosen]


@dataclass
class Result:
    """One scenario's result: ``status`` PASS/FAIL/SKIP, why, how long it took (seconds),
    what the probe sent to, and the flows that prove it."""

    name: str
    status: str
    reason: str = ""
    duration: float = 0.0
    destination: str = ""
    flows: list[schema.Flow] = field(default_factory=list)


def exit_code(results: Sequence[Result]) -> int:
    """0 when nothing failed (skips do not fail a run), else 1."""
    return 1 if any(r.status == FAIL for r in results) else 0


def summary(results: Sequence[Result]) -> dict[str, int]:
    return {status: sum(1 for r in results if r.status == status) for status in (PASS, FAIL, SKIP)}
