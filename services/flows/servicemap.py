"""The service map: which workloads talk to which, and with what verdict (pure).

Invariants:
- ``build_service_map`` is a pure function of the flows it is given (and ``now_ns``): the
  same flows give the same JSON-ready dict, nodes and edges sorted.
- A node is a workload: a pod's first ``workloads`` entry (a Deployment, …) or the pod
  itself; an endpoint without a pod is its reserved identity (``world``, ``host``, …),
  or the Service it was still addressed to (a drop before load balancing), or
  ``identity:<n>``. Nodes carry their namespace (``""`` for reserved ones) so a view can
  group them. A pod of a connected cluster (ClusterMesh: its ``cluster_name`` is not
  ``local_cluster``) is a node of its own, ``<cluster>:<namespace>/<workload>``, labelled
  with its cluster and carrying it in ``cluster``.
- One edge per (source node, destination node, verdict class) with class ``forwarded``,
  ``dropped`` or ``audit``. A packet is counted once per hook that reported it, from the
  connection's point of view: replies are not counted (they travel the same edge back),
  the ``policy-verdict`` flow that precedes a drop flow of the same packet is not counted
  (the drop is), an AUDIT ``policy-verdict`` counts as ``audit`` and the FORWARDED trace
  flow of the same packet is not counted again. L7 (DNS) flows add to the edge's ``l7``
  counts, not to ``flows``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ciliary import schema
from ciliary.hubble import MSG_ACCESS_LOG, MSG_DROP, MSG_POLICY_VERDICT, MSG_TRACE, flow_time_ns

VERDICT_CLASSES = ("forwarded", "dropped", "audit")
COLOURS = {"forwarded": "#2e9d4f", "dropped": "#d93636", "audit": "#e0a100"}


@dataclass
class _Node:
    id: str
    label: str
    namespace: str
    kind: str
    identity: int = 0
    pods: set[str] = field(default_factory=set)
    labels: list[str] = field(default_factory=list)
    cluster: str = ""  # a connected cluster's workload; "" for this cluster's and reserved ones


@dataclass
class _Edge:
    source: str
    destination: str
    verdict: str
    flows: int = 0
    ports: set[str] = field(default_factory=set)
    drop_reasons: dict[str, int] = field(default_factory=dict)
    services: set[str] = field(default_factory=set)
    l7: dict[str, int] = field(default_factory=dict)
    last_ns: int = 0


def endpoint_node(ep: schema.FlowEndpoint | None, service: schema.FlowService | None = None,
                  local_cluster: str = "") -> _Node:
    """The service-map node an endpoint belongs to."""
    if ep is None:
        ep = schema.FlowEndpoint()
    if ep.pod_name:
        if ep.workloads:
            w = ep.workloads[0]
            name, kind = w.name, w.kind or "Workload"
        else:
            name, kind = ep.pod_name, "Pod"
        if local_cluster and ep.cluster_name and ep.cluster_name != local_cluster:
            return _Node(id=f"{ep.cluster_name}:{ep.namespace}/{name}", label=f"{name} ({ep.cluster_name})",
                         namespace=ep.namespace, kind=kind, identity=ep.identity, pods={ep.pod_name},
                         labels=list(ep.labels), cluster=ep.cluster_name)
        return _Node(id=f"{ep.namespace}/{name}", label=name, namespace=ep.namespace, kind=kind,
                     identity=ep.identity, pods={ep.pod_name}, labels=list(ep.labels))
    reserved = [lab.split(":", 1)[1] for lab in ep.labels if lab.startswith("reserved:")]
    if service is not None and service.name and (not reserved or reserved == ["world"]):
        return _Node(id=f"{service.namespace}/svc/{service.name}", label=service.name,
                     namespace=service.namespace, kind="Service", identity=ep.identity)
    if reserved:
        name = reserved[0]
        return _Node(id=name, label=name, namespace="", kind="reserved", identity=ep.identity,
                     labels=list(ep.labels))
    if ep.namespace:
        return _Node(id=f"{ep.namespace}/identity:{ep.identity}", label=f"identity {ep.identity}",
                     namespace=ep.namespace, kind="Identity", identity=ep.identity, labels=list(ep.labels))
    return _Node(id=f"identity:{ep.identity}", label=f"identity {ep.identity}", namespace="",
                 kind="Identity", identity=ep.identity, labels=list(ep.labels))


def verdict_class(flow: schema.Flow) -> str | None:
    """``forwarded``/``dropped``/``audit`` for a flow the map counts, else ``None``."""
    et = flow.event_type.type if flow.event_type is not None else 0
    if et == MSG_DROP:
        return "dropped"
    if et == MSG_POLICY_VERDICT:
        return "audit" if flow.verdict == "AUDIT" else None
    if et == MSG_TRACE:
        if flow.is_reply:
            return None
        return "forwarded" if flow.verdict in ("FORWARDED", "REDIRECTED", "TRANSLATED", "TRACED") else None
    return None


def _port(flow: schema.Flow) -> str:
    l4 = flow.l4
    if l4 is None:
        return ""
    if l4.TCP is not None:
        return f"{l4.TCP.destination_port}/TCP"
    if l4.UDP is not None:
        return f"{l4.UDP.destination_port}/UDP"
    if l4.SCTP is not None:
        return f"{l4.SCTP.destination_port}/SCTP"
    if l4.ICMPv4 is not None:
        return "ICMPv4"
    if l4.ICMPv6 is not None:
        return "ICMPv6"
    return ""


def _audited_packets(flows: list[schema.Flow]) -> set[tuple[str, str, str]]:
    """(node, time, source ip) of packets that already have an AUDIT policy-verdict flow."""
    out = set()
    for f in flows:
        if f.event_type is not None and f.event_type.type == MSG_POLICY_VERDICT and f.verdict == "AUDIT":
            out.add((f.node_name, f.time, f.ip.source if f.ip else ""))
    return out


def build_service_map(
    flows: Iterable[schema.Flow], *, since_ns: int = 0, now_ns: int = 0,
    seen: int = 0, lost: int = 0, local_cluster: str = "",
) -> dict[str, Any]:
    """The service map of ``flows`` (oldest first) as a JSON-ready dict; ``local_cluster``
    tells a connected cluster's pods apart."""
    flows = list(flows)
    audited = _audited_packets(flows)
    # (client node, service) -> the backend node its L3/L4 flows went to: a DNS response
    # that enters the client from the reverse-NATed VIP belongs to that backend's edge
    backends: dict[tuple[str, str], str] = {}
    for f in flows:
        svc = f.destination_service
        if (svc is not None and svc.name and f.destination is not None and f.destination.pod_name
                and verdict_class(f) == "forwarded"):
            client = endpoint_node(f.source, f.source_service, local_cluster).id
            backends[(client, f"{svc.namespace}/{svc.name}")] = endpoint_node(f.destination, None, local_cluster).id
    nodes: dict[str, _Node] = {}
    edges: dict[tuple[str, str, str], _Edge] = {}
    counted = 0

    def node_of(ep: schema.FlowEndpoint | None, svc: schema.FlowService | None) -> str:
        n = endpoint_node(ep, svc, local_cluster)
        have = nodes.get(n.id)
        if have is None:
            nodes[n.id] = n
        else:
            have.pods |= n.pods
            if not have.identity:
                have.identity = n.identity
        return n.id

    for f in flows:
        t = flow_time_ns(f) if f.time else 0
        if since_ns and t < since_ns:
            continue
        is_l7 = f.event_type is not None and f.event_type.type == MSG_ACCESS_LOG
        if is_l7:
            if f.l7 is None:
                continue
            # the L7 edge goes from the client to the server whatever the message direction
            client, server = (f.destination, f.source) if f.l7.type == "RESPONSE" else (f.source, f.destination)
            csvc, ssvc = ((f.destination_service, f.source_service) if f.l7.type == "RESPONSE"
                          else (f.source_service, f.destination_service))
            src = node_of(client, csvc)
            backend = None
            if (server is None or not server.pod_name) and ssvc is not None and ssvc.name:
                backend = backends.get((src, f"{ssvc.namespace}/{ssvc.name}"))
            dst = backend if backend is not None and backend in nodes else node_of(server, ssvc)
            cls = "dropped" if f.verdict == "DROPPED" else "forwarded"
            edge = edges.get((src, dst, cls))
            if edge is None:
                edge = edges[(src, dst, cls)] = _Edge(src, dst, cls)
            kind = "dns" if f.l7.dns is not None else "l7"
            key = f"{kind}-{f.l7.type.lower()}" if f.l7.type else kind
            edge.l7[key] = edge.l7.get(key, 0) + 1
            if f.l7.dns is not None and f.l7.type == "RESPONSE" and f.l7.dns.rcode:
                rc = f"dns-rcode-{f.l7.dns.rcode}"
                edge.l7[rc] = edge.l7.get(rc, 0) + 1
            edge.last_ns = max(edge.last_ns, t)
            continue
        cls = verdict_class(f)
        if cls is None:
            continue
        if (cls == "forwarded" and f.verdict == "FORWARDED" and audited
                and (f.node_name, f.time, f.ip.source if f.ip else "") in audited):
            continue  # the AUDIT policy-verdict flow of this packet was counted
        src = node_of(f.source, f.source_service)
        dst = node_of(f.destination, f.destination_service)
        key = (src, dst, cls)
        edge = edges.get(key)
        if edge is None:
            edge = edges[key] = _Edge(src, dst, cls)
        edge.flows += 1
        counted += 1
        port = _port(f)
        if port:
            edge.ports.add(port)
        if cls == "dropped" and f.drop_reason_desc:
            edge.drop_reasons[f.drop_reason_desc] = edge.drop_reasons.get(f.drop_reason_desc, 0) + 1
        if f.destination_service is not None and f.destination_service.name:
            edge.services.add(f"{f.destination_service.namespace}/{f.destination_service.name}")
        edge.last_ns = max(edge.last_ns, t)

    namespaces = sorted({n.namespace for n in nodes.values()})
    return {
        "nodes": [
            {"id": n.id, "label": n.label, "namespace": n.namespace, "kind": n.kind,
             "identity": n.identity, "pods": sorted(n.pods), "labels": sorted(n.labels),
             **({"cluster": n.cluster} if n.cluster else {})}
            for n in sorted(nodes.values(), key=lambda n: (n.namespace, n.id))
        ],
        "edges": [
            {"source": e.source, "destination": e.destination, "verdict": e.verdict,
             "colour": COLOURS[e.verdict], "flows": e.flows, "ports": sorted(e.ports),
             "drop_reasons": dict(sorted(e.drop_reasons.items())), "services": sorted(e.services),
             "l7": dict(sorted(e.l7.items())), "last_ns": e.last_ns}
            for e in sorted(edges.values(), key=lambda e: (e.source, e.destination,
                                                            VERDICT_CLASSES.index(e.verdict)))
        ],
        "namespaces": namespaces,
        "totals": {
            "flows": counted,
            **{c: sum(e.flows for e in edges.values() if e.verdict == c) for c in VERDICT_CLASSES},
        },
        "seen": seen,
        "lost": lost,
        "since_ns": since_ns,
        "generated_ns": now_ns,
    }
