"""What this cluster exports to the mesh: pure, from the mirrored local buckets.

Invariants:
- Exported are exactly: the ipcache entries of this cluster's pods (source ``pod``), the
  identities those entries name, every shared global Service (``ciliary.resources.
  clustermesh``) with the backends servicelb computed for its ClusterIP frontends, and
  every node that reported an underlay address. Nothing else of the cluster is readable
  by a remote (its export bucket is the whole interface).
- Only this cluster's own backends are exported (a global Service's frontend also holds
  the backends it imported; they are never passed on).
- A shared global Service is exported even with no backend: a remote then knows its
  backends here are gone, not merely unheard of.
- Keys are those of ``ciliary.schema.mesh`` (``identity.<id>``, ``ipcache.<key>``,
  ``service.<ns>.<name>``, ``node.<name>``); the ``cluster`` heartbeat key is the
  service's, not computed here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from ciliary import schema
from ciliary.resources.clustermesh import global_service

LB_CLUSTER_IP = "ClusterIP"


def mcs_names(resources: Iterable[schema.ResourceRecord], kind: str) -> set[tuple[str, str]]:
    """``(namespace, name)`` of every object of ``kind`` (ServiceExport / ServiceImport)."""
    return {(r.namespace, r.name) for r in resources if r.kind == kind}


class ExportMemo:
    """What earlier passes derived, reused while the inputs are the very same objects (a
    mirror replaces an object when its key changes): whether a Service is a shared global
    one (``shared``), and the export record of each shared one (``services``). An
    unchanged Service costs no new record, and the writer can tell "unchanged" by
    identity. The memo holds the input objects, so their ids cannot be reused while it
    does. A pass over N Services of which none is global allocates nothing that outlives
    it (its frontends are not even grouped)."""

    def __init__(self) -> None:
        # (namespace, name) -> (Service record, exported, shared)
        self.shared: dict[tuple[str, str], tuple[Any, bool, bool]] = {}
        # (namespace, name) -> (Service record, exported, its frontends, export key, export record)
        self.services: dict[tuple[str, str], tuple[Any, bool, tuple[Any, ...], str, Any]] = {}


def export_state(
    cluster: str,
    cluster_id: int,
    identities: Mapping[str, schema.IdentityRecord],
    ipcache: Mapping[str, schema.IPCacheRecord],
    services: Collection[schema.ResourceRecord],
    exported: set[tuple[str, str]],
    frontends: Iterable[schema.LBFrontend],
    node_status: Mapping[str, schema.StatusRecord],
    memo: ExportMemo | None = None,
) -> dict[str, Any]:
    """Export key -> record (see the module invariants); with ``memo``, unchanged Services
    give the record object of the pass before."""
    out: dict[str, Any] = {}
    wanted_ids: set[int] = set()
    for key, entry in ipcache.items():
        if entry.source == "pod" and entry.cluster == cluster:
            out[schema.mesh_key(schema.MESH_IPCACHE_PREFIX, key)] = entry
            wanted_ids.add(entry.identity)
    for record in identities.values():
        if record.id in wanted_ids:
            out[schema.mesh_key(schema.MESH_IDENTITY_PREFIX, record.id)] = record
    memo = memo if memo is not None else ExportMemo()
    shared = _shared_services(services, exported, memo)
    by_service: dict[tuple[str, str], list[schema.LBFrontend]] = {}
    if shared:
        for fe in frontends:
            if fe.type == LB_CLUSTER_IP and (fe.namespace, fe.name) in shared:
                by_service.setdefault((fe.namespace, fe.name), []).append(fe)
    for ref, svc in shared.items():
        is_exported = ref in exported
        fes = tuple(by_service.get(ref, ()))
        held = memo.services.get(ref)
        # tuples compare element by element, identity first: unchanged frontends cost no field compare
        if held is not None and held[0] is svc and held[1] == is_exported and held[2] == fes:
            key, record = held[3], held[4]
        else:
            key = f"{schema.MESH_SERVICE_PREFIX}.{svc.namespace}.{svc.name}"
            record = service_record(cluster, cluster_id, svc, is_exported, fes)
            memo.services[ref] = (svc, is_exported, fes, key, record)
        if record is not None:
            out[key] = record
    for ref in [r for r in memo.services if r not in shared]:
        del memo.services[ref]
    for key, status in node_status.items():
        node = node_record(cluster, cluster_id, key.split(".", 2)[-1], status)
        if node is not None:
            out[schema.mesh_key(schema.MESH_NODE_PREFIX, node.name)] = node
    return out


def _shared_services(services: Collection[schema.ResourceRecord], exported: set[tuple[str, str]],
                     memo: ExportMemo) -> dict[tuple[str, str], schema.ResourceRecord]:
    """``(namespace, name)`` -> Service, of the shared global ones; ``memo.shared`` keeps the
    verdict of every Service and drops those that are gone."""
    out: dict[tuple[str, str], schema.ResourceRecord] = {}
    seen = 0
    for svc in services:
        seen += 1
        ref = (svc.namespace, svc.name)
        is_exported = ref in exported
        held = memo.shared.get(ref)
        if held is None or held[0] is not svc or held[1] != is_exported:
            held = (svc, is_exported, global_service(svc.manifest, exported=is_exported).shared)
            memo.shared[ref] = held
        if held[2]:
            out[ref] = svc
    if len(memo.shared) != seen:  # every Service seen is in the memo: the rest are gone
        live = {(svc.namespace, svc.name) for svc in services}
        for ref in [r for r in memo.shared if r not in live]:
            del memo.shared[ref]
    return out


def service_record(cluster: str, cluster_id: int, svc: schema.ResourceRecord, exported: bool,
                   frontends: Iterable[schema.LBFrontend]) -> schema.MeshService | None:
    """The export of one Service, or None when it is not a shared global Service."""
    how = global_service(svc.manifest, exported=exported)
    if not how.shared:
        return None
    ports: list[schema.MeshServicePort] = []
    backends: dict[tuple[str, int, str], schema.MeshBackend] = {}
    for fe in sorted(frontends, key=lambda f: (f.port, f.proto)):
        ports.append(schema.MeshServicePort(name=fe.port_name, port=fe.port, proto=fe.proto))
        for be in fe.backends:
            if be.cluster:
                continue  # a connected cluster's backend: its own cluster shares it
            ready = be.state == schema.LB_STATE_ACTIVE
            backends.setdefault((be.ip, be.port, be.proto), schema.MeshBackend(
                ip=be.ip, port=be.port, proto=be.proto, port_name=fe.port_name, ready=ready,
                node=be.node, pod=be.pod))
    return schema.MeshService(namespace=svc.namespace, name=svc.name, cluster=cluster, cluster_id=cluster_id,
                              ports=ports, backends=[backends[k] for k in sorted(backends)], source=how.source)


def node_record(cluster: str, cluster_id: int, name: str, status: schema.StatusRecord) -> schema.MeshNode | None:
    """The exported view of Node ``name``'s status; None without an InternalIP."""
    body = status.status or {}
    address = next((a.get("address", "") for a in body.get("addresses") or []
                    if isinstance(a, dict) and a.get("type") == "InternalIP"), "")
    if not address or not name:
        return None
    return schema.MeshNode(name=name, cluster=cluster, cluster_id=cluster_id, address=address,
                           pod_cidr=str(body.get("podCIDR") or ""))
