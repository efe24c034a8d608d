"""From stored objects to desired identities and ipcache entries.

Pure code: manifests and status dicts in, plain data out; no I/O.

Invariants:
- A pod counts as an endpoint (a reference to its identity) unless it runs in the host
  network or has finished (phase Succeeded/Failed), as Cilium manages no endpoint for it.
- A pod's IP comes from its status in bucket ``status`` (written by the node executor) or,
  failing that, from the manifest's own ``status.podIP`` (objects mirrored from a real
  cluster). When several live pods claim one IP the latest claim wins: status-bucket
  claims over manifest claims, then the higher KV revision, then the key.
- ``desired_ipcache`` is a pure function of its inputs: one entry per prefix. On a prefix
  claimed by several sources, node beats pod beats a connected cluster's pod (ClusterMesh,
  kept as that cluster wrote it: its identity, its cluster name; between two connected
  clusters the higher cluster ID) beats policy CIDR beats the world default.
- Policy CIDRs are the ``fromCIDR``/``toCIDR`` entries, the ``cidr`` and ``except`` of
  ``fromCIDRSet``/``toCIDRSet`` (CNP/CCNP, every rule in ``spec`` and ``specs``) and the
  ``ipBlock`` ``cidr``/``except`` of NetworkPolicy peers, normalised to network form.
  ``0.0.0.0/0`` and ``::/0`` are the world and get no CIDR identity.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ciliary import schema
from ciliary.schema import IDENTITY_REMOTE_NODE as REMOTE_NODE
from ciliary.schema import IDENTITY_WORLD as WORLD

from .labels import LabelFilter, identity_labels

WORLD_PREFIX_V4 = "0.0.0.0/0"
FINISHED_PHASES = ("Succeeded", "Failed")
SOURCE_RANK = {"node": 4, "pod": 3, "remote": 2, "cidr": 1, "world": 0}


@dataclass(frozen=True)
class PodInfo:
    key: str
    namespace: str
    name: str
    node: str
    labels: tuple[str, ...]  # identity labels
    ip: str  # "" when none yet
    claim: tuple[int, int, str]  # ordering among pods claiming one IP; larger wins


def pod_info(
    flt: LabelFilter,
    cluster: str,
    key: str,
    manifest: Mapping[str, Any],
    revision: int,
    namespace_labels: Mapping[str, str],
    status: Mapping[str, Any] | None,
    status_revision: int,
) -> PodInfo | None:
    """The endpoint a Pod object stands for, or None when it is not an endpoint."""
    meta = manifest.get("metadata") or {}
    spec = manifest.get("spec") or {}
    own_status = manifest.get("status") or {}
    if spec.get("hostNetwork"):
        return None
    merged = dict(own_status)
    if status:
        merged.update(status)
    if merged.get("phase") in FINISHED_PHASES:
        return None
    namespace = str(meta.get("namespace") or "default")
    name = str(meta.get("name") or key.rsplit(".", 1)[-1])
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    service_account = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
    ident = identity_labels(flt, labels, namespace, namespace_labels, service_account, cluster)
    ip, claim = "", (0, 0, key)
    if status and status.get("podIP"):
        ip, claim = str(status["podIP"]), (1, status_revision, key)
    elif own_status.get("podIP"):
        ip, claim = str(own_status["podIP"]), (0, revision, key)
    if ip:
        ip = host_prefix(ip)
    return PodInfo(key, namespace, name, str(spec.get("nodeName") or ""), ident, ip, claim)


def host_prefix(ip: str) -> str:
    """``10.0.0.5`` -> ``10.0.0.5/32``; "" when it is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip.split("/", 1)[0])
    except ValueError:
        return ""
    return f"{addr}/{addr.max_prefixlen}"


def node_addresses(manifest: Mapping[str, Any], status: Mapping[str, Any] | None) -> list[str]:
    """A Node's InternalIP and ExternalIP addresses as host prefixes."""
    addresses = list(((manifest.get("status") or {}).get("addresses")) or [])
    if status and status.get("addresses"):
        addresses = list(status["addresses"])
    out = []
    for entry in addresses:
        if isinstance(entry, dict) and entry.get("type") in ("InternalIP", "ExternalIP"):
            prefix = host_prefix(str(entry.get("address", "")))
            if prefix and prefix not in out:
                out.append(prefix)
    return out


# ---------------------------------------------------------------- policy CIDRs


def normalize_cidr(text: str) -> str:
    """Network form of a CIDR or address (``10.1.2.3/8`` -> ``10.0.0.0/8``); "" if invalid."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return ""
    return str(net)


def is_world(prefix: str) -> bool:
    return prefix in (WORLD_PREFIX_V4, "::/0")


def policy_cidrs(kind: str, manifest: Mapping[str, Any]) -> set[str]:
    """Every CIDR a policy names (see module invariants)."""
    raw: list[str] = []
    if kind in ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"):
        rules = [manifest.get("spec")] + list(manifest.get("specs") or [])
        for rule in _dicts(rules):
            for direction, single, sets in (
                ("ingress", "fromCIDR", "fromCIDRSet"),
                ("ingressDeny", "fromCIDR", "fromCIDRSet"),
                ("egress", "toCIDR", "toCIDRSet"),
                ("egressDeny", "toCIDR", "toCIDRSet"),
            ):
                for sub in _dicts(rule.get(direction)):
                    raw += [c for c in sub.get(single) or [] if isinstance(c, str)]
                    for entry in _dicts(sub.get(sets)):
                        raw += _cidr_and_except(entry)
    elif kind == "NetworkPolicy":
        spec = manifest.get("spec") or {}
        for rule in _dicts(spec.get("ingress")):
            for peer in _dicts(rule.get("from")):
                raw += _cidr_and_except(peer.get("ipBlock"))
        for rule in _dicts(spec.get("egress")):
            for peer in _dicts(rule.get("to")):
                raw += _cidr_and_except(peer.get("ipBlock"))
    out = set()
    for text in raw:
        prefix = normalize_cidr(text)
        if prefix and not is_world(prefix):
            out.add(prefix)
    return out


def _cidr_and_except(entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return []
    out = [entry["cidr"]] if isinstance(entry.get("cidr"), str) and entry.get("cidr") else []
    out += [c for c in entry.get("except") or [] if isinstance(c, str)]
    return out


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# ---------------------------------------------------------------- references and ipcache


Rank = tuple[int, tuple[int, int, str]]
Claim = tuple[Rank, schema.IPCacheRecord]


def world_claim(cluster: str, cluster_id: int) -> Claim:
    return (SOURCE_RANK["world"], (0, 0, "")), schema.IPCacheRecord(
        prefix=WORLD_PREFIX_V4, identity=WORLD, source="world", cluster=cluster, cluster_id=cluster_id)


def cidr_claim(prefix: str, ident: int, cluster: str, cluster_id: int) -> Claim:
    return (SOURCE_RANK["cidr"], (0, 0, prefix)), schema.IPCacheRecord(
        prefix=prefix, identity=ident, source="cidr", cluster=cluster, cluster_id=cluster_id)


def remote_claim(record: schema.IPCacheRecord) -> Claim:
    """A connected cluster's pod entry, as that cluster wrote it; between two clusters
    claiming one prefix the higher cluster ID wins."""
    return (SOURCE_RANK["remote"], (0, record.cluster_id, record.cluster)), record


def pod_claim(pod: PodInfo, ident: int, cluster: str, cluster_id: int) -> Claim:
    return (SOURCE_RANK["pod"], pod.claim), schema.IPCacheRecord(
        prefix=pod.ip, identity=ident, source="pod", cluster=cluster, cluster_id=cluster_id,
        node=pod.node, namespace=pod.namespace, pod=pod.name)


def node_claim(node: str, prefix: str, cluster: str, cluster_id: int) -> Claim:
    return (SOURCE_RANK["node"], (0, 0, node)), schema.IPCacheRecord(
        prefix=prefix, identity=REMOTE_NODE, source="node", cluster=cluster, cluster_id=cluster_id, node=node)


def desired_ipcache(
    pods: Iterable[PodInfo],
    pod_identities: Mapping[tuple[str, ...], int],
    nodes: Mapping[str, list[str]],
    cidr_identities: Mapping[str, int],
    cluster: str,
    cluster_id: int,
    remote: Iterable[schema.IPCacheRecord] = (),
) -> dict[str, schema.IPCacheRecord]:
    """``ipcache`` key -> record for every prefix (see module invariants); ``remote``: the
    pod entries of connected clusters (bucket ``mesh``), kept as their cluster wrote them.
    From scratch: the service keeps the same result current with ``IpcacheIndex``."""
    best: dict[str, Claim] = {}

    def offer(claim: Claim) -> None:
        key = schema.ipcache_key(claim[1].prefix)
        held = best.get(key)
        if held is None or claim[0] > held[0]:
            best[key] = claim

    offer(world_claim(cluster, cluster_id))
    for prefix, ident in cidr_identities.items():
        offer(cidr_claim(prefix, ident, cluster, cluster_id))
    for record in remote:
        offer(remote_claim(record))
    for pod in pods:
        ident = pod_identities.get(pod.labels)
        if pod.ip and ident:
            offer(pod_claim(pod, ident, cluster, cluster_id))
    for node, prefixes in nodes.items():
        for prefix in prefixes:
            offer(node_claim(node, prefix, cluster, cluster_id))
    return {key: record for key, (_, record) in best.items()}
