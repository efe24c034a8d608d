"""``ciliary preflight``: the seed's four migration questions answered for this node, a pod
list, a scale and (when one runs) an instance, with the verdict of its decision tree.

Invariants:
- The analysis is ``ciliary.preflight`` (pure cores); this module gathers the inputs: the
  kernel probe (``ciliary.preflight.probe``), the pod list (``--pods FILE|-``, else the
  running instance's Pods and Namespaces), the instance's health (live map fill, node
  names), its Services (the scale when ``--services`` is not given) and its operations
  checks, each asked over the bus like the commands that show them.
- Without a running instance preflight still answers from the kernel, the pod list and
  the flags; what it could not check is named, never guessed.
- The live fill of the instance's maps is reported with its band (``ciliary.mappressure``)
  and counts as a cost (a setting to raise), not as an operations failure.
- A malformed pod list prints every problem (item and field) as ``error:`` lines and
  exits 2; other failures are ``CliError``s (exit 1). A finished report exits 0 whatever
  the verdict (the verdict is in the output).
- The connectivity test (``ciliary connectivity test``) deploys workloads, so it runs only
  with ``--connectivity``, as its own process (command modules never import each other).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ciliary import config, mappressure, output, schema
from ciliary.bus import Bus, BusError, NoReply
from ciliary.cli import common
from ciliary.identitylabels import PatternError
from ciliary.preflight import decision as D
from ciliary.preflight import kernel as K
from ciliary.preflight import labels, pods, probe, render, sizing
from ciliary.resources import ManifestError
from ciliary.status import gather_health, missing_or_unhealthy
from ciliary.store import ResourceStore

OPS_TIMEOUT = 3.0  # seconds each operations check may take
CONNECTIVITY_TIMEOUT = 600.0


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``preflight`` to the ``ciliary`` parser."""
    p = subparsers.add_parser(
        "preflight", parents=[common_parent],
        help="can we migrate? kernel, label hygiene, map sizing, operations readiness and a verdict")
    p.add_argument("--pods", metavar="FILE|-",
                   help="pod list: kubectl get pods -A -o json (add namespaces: kubectl get pods,ns -A -o json)")
    p.add_argument("--services", type=int, metavar="N", help="services to size for (default: the instance's)")
    p.add_argument("--backends", type=int, metavar="N", help="backends per service")
    p.add_argument("--ports", type=int, default=None, metavar="N", help="ports per service (default 1, or the instance's)")
    p.add_argument("--maglev-services", type=int, default=0, metavar="N", help="services using Maglev")
    p.add_argument("--identities", type=int, metavar="N", help="identities (default: estimated from the pod list)")
    p.add_argument("--policy-entries", type=int, metavar="N", help="policy entries per local identity")
    p.add_argument("--nodes", type=int, metavar="N", help="nodes (default: from the pod list or the instance)")
    p.add_argument("--clusters", type=int, default=1, metavar="N", help="clusters in the mesh (default 1)")
    p.add_argument("--cluster-id", type=int, metavar="ID", help="this cluster's ID (default: the instance's, else 1)")
    p.add_argument("--label-filter", metavar="PATTERNS",
                   help="identity label patterns (Cilium syntax; default: $CILIARY_IDENTITY_LABELS)")
    p.add_argument("--no-kernel", action="store_true", help="do not probe this node's kernel")
    p.add_argument("--connectivity", action="store_true",
                   help="also run `ciliary connectivity test` (deploys test workloads into ciliary-test)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every kernel check, not only those not ok")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_preflight)


@dataclass
class InstanceFacts:
    """What a running instance contributes."""

    cluster: str
    cluster_id: int
    nodes: list[str]
    reports: list[schema.HealthReport]
    pod_list: pods.PodList | None = None
    services: int = 0
    ports: int = 0  # frontends (service ports) over all services
    operations: list[D.OpsCheck] = field(default_factory=list)


def cmd_preflight(args: argparse.Namespace) -> int:
    for name in ("services", "backends", "ports", "identities", "policy_entries", "nodes", "maglev_services"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise common.CliError(f"--{name.replace('_', '-')} must not be negative")
    if args.clusters < 1:
        raise common.CliError("--clusters must be at least 1")
    notes: list[str] = []

    pod_list, source = None, ""
    if args.pods:
        try:
            pod_list, source = read_pod_list(args.pods), ("<stdin>" if args.pods == "-" else args.pods)
        except ManifestError as err:
            for problem in err.problems:
                common.print_error(f"pod list: {problem}")
            return 2
        except OSError as err:
            raise common.CliError(f"cannot read {args.pods}: {err.strerror or err}") from err

    instance = None
    state = config.read_instance(args.data_dir_path)
    if state is not None and config.pid_alive(state.supervisor_pid):
        instance = common.run_with_bus(args, lambda bus: gather_instance(bus, state, want_pods=pod_list is None))
        if pod_list is None and instance.pod_list is not None:
            pod_list, source = instance.pod_list, f"instance {state.cluster} ({args.data_dir_path})"
        if args.connectivity:
            instance.operations.append(run_connectivity(args))
        else:
            instance.operations.append(D.OpsCheck("connectivity test", D.NOT_RUN,
                                                  "add --connectivity to deploy and run `ciliary connectivity test`"))

    cluster = instance.cluster if instance else schema.DEFAULT_CLUSTER_NAME
    cluster_id = args.cluster_id if args.cluster_id is not None else (
        instance.cluster_id if instance else schema.DEFAULT_CLUSTER_ID)
    patterns_text = args.label_filter if args.label_filter is not None else os.environ.get("CILIARY_IDENTITY_LABELS", "")
    hygiene = None
    if pod_list is not None:
        try:
            hygiene = labels.analyse(pod_list.pods, pod_list.namespace_labels, label_patterns=patterns_text.split(),
                                     cluster=cluster, cluster_id=cluster_id, clusters=args.clusters)
        except PatternError as err:
            raise common.CliError(f"label filter: {err}") from err
        except ValueError as err:  # a cluster ID outside the layout
            raise common.CliError(str(err)) from err
        if pod_list.skipped:
            notes.append("pod list: ignored " + ", ".join(f"{n} {k}" for k, n in sorted(pod_list.skipped.items())))

    sizes, errors = sizing.sizes_from_env(os.environ)
    notes += errors
    live = mappressure.map_fills(instance.reports) if instance else None
    live_max = {m.map: m.max_entries for m in live or []}
    scale = build_scale(args, pod_list, hygiene, instance)
    report = sizing.size_maps(scale, sizes, live_max=live_max, ncpus=os.cpu_count() or 1)

    checks = features = None
    if not args.no_kernel:
        checks = probe.probe_kernel()
        features = K.feature_verdicts(checks)
    decision = D.decide(features, list((checks or {}).values()), hygiene, report,
                        instance.operations if instance else None, live or [])
    uname = os.uname()
    findings = render.Findings(
        release=uname.release, machine=uname.machine, checks=checks, features=features,
        pods_source=source, hygiene=hygiene, scale=scale, sizing=report, live=live,
        operations=instance.operations if instance else None, decision=decision, notes=notes)
    if args.output == "json":
        print(output.to_json(render.to_json(findings)))
    else:
        print(render.text(findings, verbose=args.verbose))
    return 0


def read_pod_list(path: str) -> pods.PodList:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    return pods.parse_pod_list(text, "<stdin>" if path == "-" else path)


def build_scale(args: argparse.Namespace, pod_list: pods.PodList | None, hygiene: labels.LabelHygiene | None,
                instance: InstanceFacts | None) -> sizing.Scale:
    endpoints = per_node = None
    nodes = args.nodes
    if pod_list is not None:
        endpoints = len(pod_list.endpoints)
        counts = pod_list.per_node()
        if nodes is None:
            nodes = len(counts) or (len(instance.nodes) if instance else None)
        unscheduled = endpoints - sum(counts.values())
        busiest = max(counts.values(), default=0)
        per_node = busiest + (-(-unscheduled // nodes) if nodes else unscheduled)
    elif instance is not None and nodes is None:
        nodes = len(instance.nodes)
    services, ports = args.services, args.ports
    if services is None and instance is not None:
        services = instance.services
        if ports is None and instance.services:
            ports = max(1, round(instance.ports / instance.services))
    identities = args.identities if args.identities is not None else (hygiene.identities if hygiene else None)
    return sizing.Scale(services=services, backends=args.backends, ports=ports or 1,
                        maglev_services=args.maglev_services, endpoints=endpoints,
                        endpoints_per_node=per_node, nodes=nodes, identities=identities,
                        policy_entries=args.policy_entries, clusters=args.clusters)


# ---------------------------------------------------------------- the running instance


async def gather_instance(bus: Bus, state: config.InstanceState, *, want_pods: bool) -> InstanceFacts:
    reports = await gather_health(bus, timeout=1.0)
    facts = InstanceFacts(state.cluster, state.cluster_id, list(state.nodes), reports)
    store = ResourceStore(bus)
    if want_pods:
        objects = await store.list("Pod") + await store.list("Namespace")
        facts.pod_list = pods.from_manifests((o.record.kind, o.record.manifest) for o in objects)
    for svc in await store.list("Service"):
        facts.services += 1
        facts.ports += len(((svc.record.manifest.get("spec") or {}).get("ports")) or []) or 1
    facts.operations = await operations_checks(bus, state, reports)
    return facts


async def operations_checks(bus: Bus, state: config.InstanceState,
                            reports: list[schema.HealthReport]) -> list[D.OpsCheck]:
    """Can an operator see flows, metrics, identities, policy verdicts and maps here?"""
    missing = missing_or_unhealthy(reports, state.nodes)
    checks = [D.OpsCheck("services healthy", D.FAIL if missing else D.PASS,
                         f"missing or unhealthy: {', '.join(missing)}" if missing else
                         f"{len(reports)} service instances healthy")]
    checks.append(await _check("flows visible (observe)", _flows(bus)))
    checks.append(await asyncio.to_thread(_metrics_check, state.metrics_url))
    checks.append(await _check("identity explain", _explain(bus)))
    checks.append(await _check("policy trace", _trace(bus)))
    checks.append(await _check("map views (ciliary bpf)", _map_views(bus, state)))
    return checks


async def _check(name: str, work: Any) -> D.OpsCheck:
    try:
        ok, detail = await asyncio.wait_for(work, OPS_TIMEOUT)
    except (BusError, NoReply, TimeoutError) as err:
        return D.OpsCheck(name, D.FAIL, f"no answer: {err or type(err).__name__}")
    return D.OpsCheck(name, D.PASS if ok else D.FAIL, detail)


async def _flows(bus: Bus) -> tuple[bool, str]:
    query = schema.FlowQuery(number=20, rings_only=True)
    flows = 0
    async for data in bus.request_stream(schema.SUBJECT_FLOWS_QUERY, query, timeout=OPS_TIMEOUT):
        reply = schema.decode(data, schema.FlowQueryReply)
        if not reply.ok:
            return False, reply.error
        flows += len(reply.flows)
        if not reply.more:
            seen = reply.seen
            break
    else:
        return False, "the answer ended early"
    if not seen:
        return True, "the flows service answers; no flows recorded yet (no traffic)"
    return True, f"{seen:,} flows seen, {flows} recent returned"


def _metrics_check(url: str) -> D.OpsCheck:
    name = "metrics endpoint"
    if not url:
        return D.OpsCheck(name, D.FAIL, "the instance records no metrics URL")
    try:
        with urllib.request.urlopen(url, timeout=OPS_TIMEOUT) as resp:
            body = resp.read().decode(errors="replace")
    except OSError as err:
        return D.OpsCheck(name, D.FAIL, f"{url}: {err}")
    if "# TYPE" not in body:
        return D.OpsCheck(name, D.FAIL, f"{url} answered without Prometheus metrics")
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    detail = f"{url}: {series} series"
    if "ciliary_bpf_map_pressure" not in body:
        detail += " (no ciliary_bpf_map_pressure series yet: no node executor has reported its maps)"
    return D.OpsCheck(name, D.PASS, detail)


async def _explain(bus: Bus) -> tuple[bool, str]:
    reply = await bus.request(schema.SUBJECT_IDENTITY_EXPLAIN,
                              schema.IdentityExplainRequest(namespace="default", labels={"app": "preflight"}),
                              schema.IdentityExplainReply, timeout=OPS_TIMEOUT)
    return reply.ok, reply.error or f"{len(reply.identity_labels)} identity labels for app=preflight"


async def _trace(bus: Bus) -> tuple[bool, str]:
    request = schema.PolicyTraceRequest(
        from_labels=["k8s:app=preflight", "k8s:io.kubernetes.pod.namespace=default"],
        to_cidr="192.0.2.1/32", port=443, proto="TCP")
    reply = await bus.request(schema.SUBJECT_POLICY_TRACE, request, schema.PolicyTraceReply, timeout=OPS_TIMEOUT)
    return reply.ok, reply.error or f"app=preflight -> 192.0.2.1:443 would be {reply.verdict}"


async def _map_views(bus: Bus, state: config.InstanceState) -> tuple[bool, str]:
    async def ask(node: str) -> schema.NodeDebugReply:
        subject = schema.SUBJECT_NODE_DEBUG.format(cluster=state.cluster, node=node)
        try:
            return await bus.request(subject, schema.NodeDebugRequest(view="metrics"), schema.NodeDebugReply,
                                     timeout=OPS_TIMEOUT)
        except BusError as err:
            return schema.NodeDebugReply(ok=False, node=node, error=str(err))

    replies = await asyncio.gather(*(ask(n) for n in state.nodes))
    failed = [f"{r.node or n}: {r.error}" for n, r in zip(state.nodes, replies, strict=True) if not r.ok]
    if failed:
        return False, "; ".join(failed)
    return True, f"{len(replies)} nodes answer map dumps"


def run_connectivity(args: argparse.Namespace) -> D.OpsCheck:
    """``ciliary connectivity test -o json`` as its own process."""
    name = "connectivity test"
    argv = [sys.executable, "-m", "ciliary.cli", "connectivity", "test", "-o", "json",
            "--data-dir", str(args.data_dir_path)]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CONNECTIVITY_TIMEOUT)
    except subprocess.TimeoutExpired:
        return D.OpsCheck(name, D.FAIL, f"did not finish in {CONNECTIVITY_TIMEOUT:.0f}s")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return D.OpsCheck(name, D.FAIL, f"exit code {done.returncode}: {last}")
    failed = [t["name"] for t in result.get("tests", []) if t.get("status") == "fail"]
    detail = (f"{result.get('passed', 0)} passed, {result.get('failed', 0)} failed, "
              f"{result.get('skipped', 0)} skipped in {time.monotonic() - started:.0f}s")
    if failed:
        detail += f": {', '.join(failed)}"
    return D.OpsCheck(name, D.PASS if result.get("ok") and not failed else D.FAIL, detail)
