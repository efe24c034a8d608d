"""The service model: Services + EndpointSlices (+ Pods, Nodes) -> load-balancer frontends.

Pure code over plain data: no NATS, no clock, no randomness. `compute` is a function of
its inputs and the allocator state, so a restarted servicelb that re-reads the same
inputs and allocations produces byte-identical output.

`compute` is made of per-object steps that `incremental.Engine` reuses to recompute
single Services: `Views` decodes each Node, Pod and EndpointSlice on its own; per
Service, `claim_requested` (every Service's, before any dynamic allocation), then
`plan_service` (frontends, status, derived slices; Service order), then `build_rows`
(frontend rows, service and backend ids; Service order) fill its `ServicePart`, and
`assemble` puts the parts together.

Invariants:
- Frontends per Service (Kubernetes semantics): ClusterIP (allocated from the service
  CIDR when ``clusterIP`` is empty; none when headless), NodePort on every node's
  InternalIP (type NodePort/LoadBalancer; ``nodePort`` allocated when absent),
  ``externalIPs`` and LoadBalancer ingress IPs. ExternalName and headless Services have
  no frontends. Only TCP/UDP/SCTP over IPv4 (the lb4 maps).
- A frontend address:port/proto belongs to one Service; on a clash the Service that sorts
  first (namespace/name) keeps it and the other's frontend is reported as a problem.
- Backends come from EndpointSlices labelled ``kubernetes.io/service-name`` (always) and,
  when ``Config.derive_slices``, from slices derived here from the selector and pod
  readiness (what the EndpointSlice controller does in a real cluster). A slice port
  matches a Service port by name and protocol; a named ``targetPort`` is resolved per pod
  through its containers' port names.
- Conditions (Cilium's behaviour): ready -> ``active`` (slots); terminating -> state
  ``terminating``, kept in the backend list so established connections survive, and put
  into the slots only when no backend is active and it is still serving; not ready and not
  terminating -> state ``not-ready``: kept in the backend list (its established
  connections survive a failing readiness probe, as with kube-proxy's conntrack) but
  never in the slots, not even as a fallback.
- ClusterMesh: slices labelled ``multicluster.kubernetes.io/source-cluster`` hold a
  connected cluster's backends (``meshslices``); they count only for a Service that is
  global here (``ciliary.resources.clustermesh``), and its affinity orders the slot choice:
  ``local`` takes remote backends only while no local backend is active, ``remote`` the
  other way round, ``none`` all alike. Each such backend keeps its cluster name.
- Traffic policy ``Local`` (external for NodePort/ExternalIP/LoadBalancer frontends,
  internal for ClusterIP) gives per-node slot lists (the same fallback rule per node).
- Backend order: slot backends first, then the others; each group by (IP, port).
- IDs: service id (= rev-NAT id) per frontend address, backend id per backend address,
  both from persistent pools, so the same address keeps its id across restarts.
- A Service that exists but does not decode keeps its cluster IP and node ports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ciliary import schema
from ciliary.resources import decode
from ciliary.resources.clustermesh import (
    AFFINITY_LOCAL,
    AFFINITY_NONE,
    AFFINITY_REMOTE,
    SERVICE_IMPORT_LABEL,
    SOURCE_CLUSTER_LABEL,
    global_service,
)
from ciliary.resources.discovery import SERVICE_NAME_LABEL
from ciliary.resources.model import EndpointSlice, Node, Pod, Service, ServicePort
from ciliary.schema import (
    ALLOC_LB_BACKEND_ID,
    ALLOC_LB_CLUSTER_IP,
    ALLOC_LB_NODE_PORT,
    ALLOC_LB_SERVICE_ID,
    LB_ENDPOINTS_PREFIX,
    LB_STATE_ACTIVE,
    LB_STATE_NOT_READY,
    LB_STATE_TERMINATING,
    LBBackend,
    LBEndpoints,
    LBFrontend,
    lb_frontend_key,
)
from services.servicelb import allocator, maglev

LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
LB_IPAM_ANNOTATIONS = ("lbipam.cilium.io/ips", "io.cilium/lb-ipam-ips")
ZONE_LABEL = "topology.kubernetes.io/zone"
DERIVED_SLICE_MANAGER = "servicelb.ciliary.io"
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
MAX_SERVICE_ID = 0xFFFF  # rev_nat_index is __u16
MAX_BACKEND_ID = 0xFFFFFFFF
PROTOCOLS = ("TCP", "UDP", "SCTP")

Ref = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Config:
    cluster: str = schema.DEFAULT_CLUSTER_NAME
    cluster_id: int = schema.DEFAULT_CLUSTER_ID
    service_cidr: str = DEFAULT_SERVICE_CIDR
    maglev_table_size: int = maglev.DEFAULT_TABLE_SIZE
    derive_slices: bool = True
    node_port_range: tuple[int, int] = (30000, 32767)


@dataclass
class Allocations:
    """The four persistent pools servicelb owns in bucket ``allocations``."""

    cluster_ip: allocator.Pool
    node_port: allocator.Pool
    service_id: allocator.Pool
    backend_id: allocator.Pool

    @classmethod
    def create(cls, cfg: Config) -> Allocations:
        lo, hi = cfg.node_port_range
        return cls(
            cluster_ip=allocator.ip_pool(ALLOC_LB_CLUSTER_IP, cfg.service_cidr),
            node_port=allocator.node_port_pool(ALLOC_LB_NODE_PORT, lo, hi),
            service_id=allocator.id_pool(ALLOC_LB_SERVICE_ID, MAX_SERVICE_ID),
            backend_id=allocator.id_pool(ALLOC_LB_BACKEND_ID, MAX_BACKEND_ID),
        )

    def pools(self) -> tuple[allocator.Pool, ...]:
        return (self.cluster_ip, self.node_port, self.service_id, self.backend_id)

    def begin(self) -> None:
        for pool in self.pools():
            pool.begin()

    def tracking(self) -> Usage:
        """``with alloc.tracking() as used:`` the values looked up, claimed or allocated
        inside the block, per pool (they also count as used by the pass, as without
        tracking), and the pools where a claim or an allocation failed."""
        return Usage(self.pools())


class Usage:
    """Values used per pool (`Allocations.pools` order) while the block ran; ``missed``:
    indexes of the pools where a claim or an allocation failed."""

    __slots__ = ("_before", "_misses", "_pools", "missed", "sets")

    def __init__(self, pools: tuple[allocator.Pool, ...]) -> None:
        self._pools = pools
        self.sets: tuple[set[int], ...] = tuple(set() for _ in pools)
        self.missed: set[int] = set()
        self._before: list[set[int]] = []
        self._misses: list[int] = []

    def __enter__(self) -> Usage:
        self._before = [pool.used for pool in self._pools]
        self._misses = [pool.misses for pool in self._pools]
        for pool, fresh in zip(self._pools, self.sets, strict=True):
            pool.used = fresh
        return self

    def __exit__(self, *_exc: object) -> None:
        for i, (pool, used, fresh) in enumerate(zip(self._pools, self._before, self.sets, strict=True)):
            used |= fresh
            pool.used = used
            if pool.misses != self._misses[i]:
                self.missed.add(i)

    def frozen(self) -> tuple[frozenset[int], ...]:
        return tuple(frozenset(s) if s else _EMPTY for s in self.sets)


_EMPTY: frozenset[int] = frozenset()


class DecodeMemo:
    """Decoded manifests of earlier computes, keyed by the identity of the manifest dict.

    Invariant: a manifest handed to ``compute`` is never mutated afterwards (the service
    keeps one dict per KV revision and builds a new one for a new revision), so the same
    object always decodes to the same value. Decoding failures are not remembered (the
    problem is reported on every compute). ``prune`` forgets the manifests the last
    compute did not see.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[str, dict[str, Any], Any]] = {}
        self._seen: set[int] = set()

    def decode(self, kind: str, manifest: dict[str, Any]) -> Any:
        key = id(manifest)
        self._seen.add(key)
        hit = self._items.get(key)
        if hit is not None and hit[1] is manifest and hit[0] == kind:
            return hit[2]
        value = decode(kind, manifest)
        self._items[key] = (kind, manifest, value)
        return value

    def forget(self, manifest: dict[str, Any]) -> None:
        """Drop ``manifest`` (it was replaced or removed)."""
        hit = self._items.get(id(manifest))
        if hit is not None and hit[1] is manifest:
            del self._items[id(manifest)]

    def prune(self) -> None:
        self._items = {k: v for k, v in self._items.items() if k in self._seen}
        self._seen = set()


@dataclass
class Inputs:
    """Raw manifests (as stored) and status dicts (bucket ``status``). Treated as
    immutable by ``compute`` (see ``DecodeMemo``)."""

    services: dict[Ref, tuple[dict[str, Any], int]] = field(default_factory=dict)  # -> (manifest, generation)
    slices: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    pods: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pod_status: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    node_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    memo: DecodeMemo = field(default_factory=DecodeMemo)  # reused across computes by the service

    @classmethod
    def from_manifests(cls, docs: list[dict[str, Any]]) -> Inputs:
        """Inputs from a list of manifests (tests, golden scenarios)."""
        inputs = cls()
        for doc in docs:
            kind = doc.get("kind")
            meta = doc.get("metadata") or {}
            ref = (meta.get("namespace") or "default", meta.get("name") or "")
            if kind == "Service":
                inputs.services[ref] = (doc, int(meta.get("generation") or 1))
            elif kind == "EndpointSlice":
                inputs.slices[ref] = doc
            elif kind == "Pod":
                inputs.pods[ref] = doc
            elif kind == "Node":
                inputs.nodes[ref[1]] = doc
        return inputs


@dataclass
class Desired:
    frontends: dict[str, LBFrontend] = field(default_factory=dict)
    endpoints: dict[str, LBEndpoints] = field(default_factory=dict)
    statuses: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    generations: dict[Ref, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    views: Views = field(default_factory=lambda: Views())  # what compute decoded
    parts: dict[Ref, ServicePart] = field(default_factory=dict)  # per Service, in Service order


# ---------------------------------------------------------------- views of the inputs


@dataclass(frozen=True)
class NodeView:
    name: str
    internal_ip: str
    zone: str


@dataclass(frozen=True)
class PodView:
    namespace: str
    name: str
    uid: str
    labels: dict[str, str]
    node: str
    ip: str
    serving: bool
    terminating: bool
    ports: tuple[tuple[str, int, str], ...]  # (name, containerPort, protocol)


@dataclass(frozen=True)
class BackendView:
    ip: str
    port: int
    proto: str
    state: str
    serving: bool
    node: str
    zone: str
    pod: str
    cluster: str = ""  # a connected cluster's backend (ClusterMesh); "" for this cluster's

    @property
    def owner(self) -> str:
        return f"{self.ip}:{self.port}/{self.proto}"

    def rank(self) -> int:
        return 0 if self.state == LB_STATE_ACTIVE else (1 if self.serving else 2)


def node_view(name: str, manifest: dict[str, Any], status: dict[str, Any] | None, memo: DecodeMemo) -> NodeView:
    """One Node as the model sees it (its InternalIP from the status bucket wins). Raises when
    the manifest does not decode."""
    node: Node = memo.decode("Node", manifest)
    ip = node.status.address("InternalIP")
    for addr in (status or {}).get("addresses") or []:
        if isinstance(addr, dict) and addr.get("type") == "InternalIP" and addr.get("address"):
            ip = str(addr["address"])
            break
    return NodeView(name, ip, node.metadata.labels.get(ZONE_LABEL, ""))


def pod_view(ref: Ref, manifest: dict[str, Any], status: dict[str, Any] | None, memo: DecodeMemo) -> PodView | None:
    """One Pod as the model sees it (status from the status bucket wins over the manifest's);
    None for a finished pod. Raises when the manifest does not decode."""
    pod: Pod = memo.decode("Pod", manifest)
    status = status or {}
    own = pod.status
    phase = str(status.get("phase") or (own.phase if own else "") or "")
    ip = str(status.get("podIP") or (own.pod_ip if own else "") or "")
    if "conditions" in status and isinstance(status["conditions"], list):
        conditions = [c for c in status["conditions"] if isinstance(c, dict)]
        has_conditions = True
    elif own is not None and own.conditions:
        conditions = [{"type": c.type, "status": c.status} for c in own.conditions]
        has_conditions = True
    else:
        conditions, has_conditions = [], False
    if has_conditions:
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    else:  # a runner that reports no conditions: running means ready
        ready = phase == "Running"
    if phase in ("Succeeded", "Failed"):
        return None
    serving = ready and phase in ("Running", "Terminating")
    raw_meta = manifest.get("metadata") or {}
    terminating = bool(
        status.get("terminating") or phase == "Terminating" or raw_meta.get("deletionTimestamp")
    )
    node = pod.spec.node_name or str(status.get("nodeName") or "")
    ports = tuple(
        (p.name, p.container_port, p.protocol) for c in pod.spec.containers for p in c.ports
    )
    return PodView(ref[0], ref[1], pod.metadata.uid, dict(pod.metadata.labels), node,
                   ip, serving, terminating, ports)


@dataclass
class Views:
    """The decoded non-Service inputs, one entry per object, and each object's decoding problem.

    ``set_node``/``set_pod``/``set_slice`` recompute one object; ``build`` does all of them.
    Pods are left out (no views, no problems) unless ``Config.derive_slices``.
    """

    nodes: dict[str, NodeView] = field(default_factory=dict)
    pods: dict[Ref, PodView] = field(default_factory=dict)
    slices: dict[Ref, EndpointSlice] = field(default_factory=dict)
    node_problems: dict[str, str] = field(default_factory=dict)
    pod_problems: dict[Ref, str] = field(default_factory=dict)
    slice_problems: dict[Ref, str] = field(default_factory=dict)

    @classmethod
    def build(cls, inputs: Inputs, cfg: Config) -> Views:
        views = cls()
        for name in sorted(inputs.nodes):
            views.set_node(name, inputs.nodes[name], inputs.node_status.get(name), inputs.memo)
        if cfg.derive_slices:
            for ref in sorted(inputs.pods):
                views.set_pod(ref, inputs.pods[ref], inputs.pod_status.get(ref), inputs.memo)
        for ref in sorted(inputs.slices):
            views.set_slice(ref, inputs.slices[ref], inputs.memo)
        return views

    def set_node(self, name: str, manifest: dict[str, Any] | None, status: dict[str, Any] | None,
                 memo: DecodeMemo) -> NodeView | None:
        """Recompute one Node (``manifest`` None: gone); its view, or None."""
        self.nodes.pop(name, None)
        self.node_problems.pop(name, None)
        if manifest is None:
            return None
        try:
            self.nodes[name] = node_view(name, manifest, status, memo)
        except Exception as err:
            self.node_problems[name] = f"Node {name}: {err}"
            return None
        return self.nodes[name]

    def set_pod(self, ref: Ref, manifest: dict[str, Any] | None, status: dict[str, Any] | None,
                memo: DecodeMemo) -> PodView | None:
        """Recompute one Pod (``manifest`` None: gone); its view, or None."""
        self.pods.pop(ref, None)
        self.pod_problems.pop(ref, None)
        if manifest is None:
            return None
        try:
            view = pod_view(ref, manifest, status, memo)
        except Exception as err:
            self.pod_problems[ref] = f"Pod {ref[0]}/{ref[1]}: {err}"
            return None
        if view is not None:
            self.pods[ref] = view
        return view

    def set_slice(self, ref: Ref, manifest: dict[str, Any] | None, memo: DecodeMemo) -> EndpointSlice | None:
        """Recompute one EndpointSlice (``manifest`` None: gone); the decoded slice, or None."""
        self.slices.pop(ref, None)
        self.slice_problems.pop(ref, None)
        if manifest is None:
            return None
        try:
            self.slices[ref] = memo.decode("EndpointSlice", manifest)
        except Exception as err:
            self.slice_problems[ref] = f"EndpointSlice {ref[0]}/{ref[1]}: {err}"
            return None
        return self.slices[ref]

    def sorted_nodes(self) -> dict[str, NodeView]:
        return dict(sorted(self.nodes.items()))

    def problems(self) -> list[str]:
        """Decoding problems in the model's order: nodes, pods, slices, each by name."""
        return ([self.node_problems[k] for k in sorted(self.node_problems)]
                + [self.pod_problems[k] for k in sorted(self.pod_problems)]
                + [self.slice_problems[k] for k in sorted(self.slice_problems)])


# ---------------------------------------------------------------- derived endpoint slices


def resolve_target_port(sport: ServicePort, pod: PodView) -> int | None:
    """The pod port a Service port targets: a number, or a container port found by name."""
    target = sport.effective_target_port()
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    for name, number, proto in pod.ports:
        if name == target and proto == sport.protocol:
            return number
    return None


def derive_slices(svc: Service, pods: list[PodView], nodes: dict[str, NodeView]) -> list[dict[str, Any]]:
    """EndpointSlice manifests for ``svc`` from its selector, as the EndpointSlice controller
    would build them: pods grouped by their resolved port set, IPv4 only."""
    ns, name = svc.metadata.namespace or "default", svc.metadata.name
    selector = svc.spec.selector
    publish = svc.spec.publish_not_ready_addresses
    groups: dict[tuple[tuple[str, int, str], ...], list[dict[str, Any]]] = {}
    for pod in pods:
        if pod.namespace != ns or not has_address(pod):
            continue
        if any(pod.labels.get(k) != v for k, v in selector.items()):
            continue
        ports: list[tuple[str, int, str]] = []
        for sport in svc.spec.ports:
            number = resolve_target_port(sport, pod)
            if number is not None:
                ports.append((sport.name, number, sport.protocol))
        ready = publish or (pod.serving and not pod.terminating)
        endpoint: dict[str, Any] = {
            "addresses": [pod.ip],
            "conditions": {"ready": ready, "serving": pod.serving, "terminating": pod.terminating},
            "targetRef": {"kind": "Pod", "namespace": pod.namespace, "name": pod.name},
        }
        if pod.uid:
            endpoint["targetRef"]["uid"] = pod.uid
        if pod.node:
            endpoint["nodeName"] = pod.node
            zone = nodes[pod.node].zone if pod.node in nodes else ""
            if zone:
                endpoint["zone"] = zone
        groups.setdefault(tuple(ports), []).append(endpoint)
    slices = []
    for ports_key in sorted(groups):
        digest = hashlib.blake2b(repr(ports_key).encode(), digest_size=3).hexdigest()
        slices.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-{digest}",
                "namespace": ns,
                "labels": {
                    SERVICE_NAME_LABEL: name,
                    "endpointslice.kubernetes.io/managed-by": DERIVED_SLICE_MANAGER,
                },
            },
            "addressType": "IPv4",
            "endpoints": groups[ports_key],
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports_key],
        })
    return slices


def has_address(pod: PodView) -> bool:
    """Whether a pod can be a derived backend: it has an IPv4 address."""
    return bool(pod.ip) and _is_ipv4(pod.ip)


def _is_ipv4(address: str) -> bool:
    try:
        allocator.ip_token(address)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- backends


def port_backends(sport: ServicePort, slices: list[EndpointSlice], nodes: dict[str, NodeView],
                  *, use_remote: bool = False) -> list[BackendView]:
    """Backends of one Service port from its slices, deduplicated by address (best state wins);
    slices of connected clusters (``SOURCE_CLUSTER_LABEL``) only when ``use_remote``."""
    found: dict[tuple[str, int], BackendView] = {}
    for eps in slices:
        source = eps.metadata.labels.get(SOURCE_CLUSTER_LABEL, "")
        if eps.address_type != "IPv4" or (source and not use_remote):
            continue
        for p in eps.ports:
            if p.name != sport.name or p.protocol != sport.protocol or not p.port:
                continue
            for ep in eps.endpoints:
                if not ep.addresses or not _is_ipv4(ep.addresses[0]):
                    continue
                if ep.is_terminating() and ep.conditions.ready is not True:
                    state = LB_STATE_TERMINATING
                elif ep.is_ready():
                    state = LB_STATE_ACTIVE
                else:
                    state = LB_STATE_NOT_READY
                zone = ep.zone or (nodes[ep.node_name].zone if ep.node_name in nodes else "")
                ref = ep.target_ref
                pod = f"{ref.namespace or eps.metadata.namespace}/{ref.name}" if ref and ref.kind == "Pod" and ref.name else ""
                backend = BackendView(ep.addresses[0], p.port, p.protocol, state, ep.is_serving(),
                                      ep.node_name, zone, pod, source)
                key = (backend.ip, backend.port)
                held = found.get(key)
                if held is None or (backend.rank(), bool(backend.cluster)) < (held.rank(), bool(held.cluster)):
                    found[key] = backend  # the best state; on a tie this cluster's own
    return sorted(found.values(), key=_addr_order)


def _addr_order(b: BackendView) -> tuple[int, int]:
    return allocator.ip_token(b.ip), b.port


def select_slots(backends: list[BackendView], affinity: str = AFFINITY_NONE) -> list[BackendView]:
    """Active backends; if there are none, the serving terminating ones (fallback). With
    ClusterMesh affinity ``local`` (``remote``) the active backends of this cluster (of
    connected clusters) come first and the others are used only while there are none."""
    if affinity in (AFFINITY_LOCAL, AFFINITY_REMOTE):
        want_remote = affinity == AFFINITY_REMOTE
        groups = [[b for b in backends if bool(b.cluster) == want_remote],
                  [b for b in backends if bool(b.cluster) != want_remote]]
    else:
        groups = [backends]
    for group in groups:
        active = [b for b in group if b.state == LB_STATE_ACTIVE]
        if active:
            return active
    for group in groups:
        fallback = [b for b in group if b.state == LB_STATE_TERMINATING and b.serving]
        if fallback:
            return fallback
    return []


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class FrontendPlan:
    type: str
    address: str
    port: int
    proto: str
    node: str = ""

    @property
    def key(self) -> str:
        return lb_frontend_key(self.address, self.port, self.proto)


NO_USE: tuple[frozenset[int], ...] = (frozenset(),) * 4


@dataclass
class ServicePart:
    """What one Service contributes to the desired state, and what it was computed from.

    Three steps fill it: `claim_requested` and `plan_service` (its frontends, allocating its
    cluster IP and node ports; ``used_plan``), then `build_rows` once every Service's plans
    are known (who owns which frontend address, service and backend ids; ``used_rows``).
    ``used_*`` are the values per pool (`Allocations.pools` order) the steps looked up or
    allocated: what the Service keeps from being released; ``missed_*`` the pools where
    it wanted a value it did not get (it may get it once values are released).
    """

    ref: Ref
    manifest: dict[str, Any]
    generation: int
    svc: Service | None = None
    decode_problem: str = ""  # the Service does not decode: no frontends, its values kept
    status: dict[str, Any] = field(default_factory=dict)
    plans: list[tuple[ServicePort, FrontendPlan]] = field(default_factory=list)
    slices: list[EndpointSlice] = field(default_factory=list)  # manual, then derived
    endpoints: LBEndpoints | None = None  # the derived slices' row
    plan_problems: list[str] = field(default_factory=list)
    clash_problems: list[str] = field(default_factory=list)
    frontends: dict[str, LBFrontend] = field(default_factory=dict)
    row_problems: list[str] = field(default_factory=list)
    used_plan: tuple[frozenset[int], ...] = NO_USE
    used_rows: tuple[frozenset[int], ...] = NO_USE
    missed_plan: frozenset[int] = frozenset()  # pools (indexes) where a claim/allocation failed
    missed_rows: frozenset[int] = frozenset()

    @property
    def endpoints_key(self) -> str:
        return f"{LB_ENDPOINTS_PREFIX}.{self.ref[0]}.{self.ref[1]}"

    def wanted(self) -> list[str]:
        """The frontend keys this Service's plans ask for, first occurrence first."""
        return list(dict.fromkeys(plan.key for _, plan in self.plans))

    def has_problems(self) -> bool:
        return bool(self.decode_problem or self.plan_problems or self.clash_problems or self.row_problems)


def compute(inputs: Inputs, alloc: Allocations, cfg: Config) -> Desired:
    """Desired ``services`` rows, derived endpoints and Service statuses.

    New allocations are left in the pools' ``pending``; the caller persists them before
    publishing the result. ``Desired.views`` and ``Desired.parts`` keep what every Service
    was computed from, for a caller that recomputes single Services afterwards.
    """
    alloc.begin()
    views = Views.build(inputs, cfg)
    nodes = views.sorted_nodes()
    pods = [views.pods[ref] for ref in sorted(views.pods)]
    manual: dict[Ref, list[EndpointSlice]] = {}
    for ref in sorted(views.slices):
        eps = views.slices[ref]
        if eps.service_name:
            manual.setdefault((ref[0], eps.service_name), []).append(eps)

    parts = {ref: new_part(ref, *inputs.services[ref], inputs.memo) for ref in sorted(inputs.services)}
    claims = {ref: claim_requested(part, alloc, cfg) for ref, part in parts.items()}
    for ref, part in parts.items():
        plan_service(part, manual.get(ref, []), pods, nodes, alloc, cfg, claims[ref])
    owners: dict[str, Ref] = {}
    for ref, part in parts.items():
        for key in part.wanted():
            owners.setdefault(key, ref)
    for part in parts.values():
        build_rows(part, owners, nodes, alloc, cfg)
    inputs.memo.prune()
    return assemble(views, parts)


def new_part(ref: Ref, manifest: dict[str, Any], generation: int, memo: DecodeMemo) -> ServicePart:
    """A Service's part with its manifest decoded (or its decoding problem)."""
    part = ServicePart(ref, manifest, generation)
    try:
        part.svc = memo.decode("Service", manifest)
    except Exception as err:
        part.decode_problem = f"Service {ref[0]}/{ref[1]}: {err}"
    return part


def assemble(views: Views, parts: dict[Ref, ServicePart]) -> Desired:
    """The desired state from the parts of every Service (``parts`` in Service order)."""
    out = Desired(views=views, parts=parts)
    problems = views.problems()
    problems += [part.decode_problem for part in parts.values() if part.decode_problem]
    for part in parts.values():
        problems += part.plan_problems + part.clash_problems
    for part in parts.values():
        problems += part.row_problems
    out.problems = list(dict.fromkeys(problems))
    for ref, part in parts.items():
        out.frontends.update(part.frontends)
        if part.svc is None:
            continue
        out.generations[ref] = part.generation
        out.statuses[ref] = part.status
        if part.endpoints is not None:
            out.endpoints[part.endpoints_key] = part.endpoints
    out.frontends = dict(sorted(out.frontends.items()))
    out.endpoints = dict(sorted(out.endpoints.items()))
    return out


def claim_requested(part: ServicePart, alloc: Allocations, cfg: Config) -> Usage:
    """Claim the cluster IP and node ports a Service asks for explicitly. Every Service's
    claims come before any dynamic allocation, so a dynamic value never takes one a later
    Service asks for. Returns the values used."""
    with alloc.tracking() as used:
        svc = part.svc
        if svc is None:
            return used
        lo, hi = cfg.node_port_range
        owner = f"{part.ref[0]}/{part.ref[1]}"
        ip = svc.spec.cluster_ip
        if ip and not svc.spec.is_headless() and allocator.ip_in_pool(alloc.cluster_ip, ip):
            alloc.cluster_ip.claim(owner, allocator.ip_token(ip))
        if svc.spec.type in ("NodePort", "LoadBalancer"):
            for p in svc.spec.ports:
                if p.node_port and lo <= p.node_port <= hi:
                    alloc.node_port.claim(f"{owner}:{p.port}/{p.protocol}", p.node_port)
    return used


def plan_service(
    part: ServicePart, manual: list[EndpointSlice], pods: list[PodView], nodes: dict[str, NodeView],
    alloc: Allocations, cfg: Config, claimed: Usage | None = None,
) -> None:
    """A Service's frontends (allocating its cluster IP and node ports), status and slices.

    ``pods`` need only hold the pods the selector may pick (in Pod order); ``claimed`` is
    what `claim_requested` used. A Service that does not decode keeps its cluster IP and
    node ports."""
    part.status, part.plans, part.slices, part.endpoints, part.plan_problems = {}, [], [], None, []
    with alloc.tracking() as used:
        svc = part.svc
        if svc is None:
            owner = f"{part.ref[0]}/{part.ref[1]}"
            alloc.cluster_ip.lookup(owner)
            for node_owner in [o for o in alloc.node_port.by_owner if o.startswith(owner + ":")]:
                alloc.node_port.lookup(node_owner)
        else:
            part.slices = list(manual)
            if cfg.derive_slices and svc.spec.selector:
                derived = derive_slices(svc, pods, nodes)
                if derived:
                    part.endpoints = LBEndpoints(namespace=part.ref[0], name=part.ref[1], slices=derived)
                part.slices += [decode("EndpointSlice", d) for d in derived]
            part.plans, part.status = _frontends(part.ref, svc, part.manifest, nodes, alloc, cfg,
                                                 part.plan_problems)
    if claimed is not None:
        for mine, theirs in zip(used.sets, claimed.sets, strict=True):
            mine |= theirs
        used.missed |= claimed.missed
    part.used_plan, part.missed_plan = used.frozen(), frozenset(used.missed)


def build_rows(part: ServicePart, owners: dict[str, Ref], nodes: dict[str, NodeView],
               alloc: Allocations, cfg: Config) -> None:
    """A Service's frontend rows, given who owns each frontend key (on a clash the Service
    that sorts first); allocates service ids and backend ids."""
    part.clash_problems, part.frontends, part.row_problems = [], {}, []
    ref, svc = part.ref, part.svc
    owned: list[tuple[ServicePort, FrontendPlan]] = []
    taken: set[str] = set()
    for sport, plan in part.plans:
        key = plan.key
        owner = owners[key]
        if owner != ref:
            part.clash_problems.append(
                f"Service {ref[0]}/{ref[1]}: frontend {plan.address}:{plan.port}/{plan.proto} "
                f"is already used by Service {owner[0]}/{owner[1]}; skipped")
            continue
        if key in taken:
            continue  # the same frontend twice in one Service (e.g. externalIP = LB IP)
        taken.add(key)
        owned.append((sport, plan))
    imported = any(s.metadata.labels.get(SERVICE_IMPORT_LABEL) == "true" for s in part.slices)
    mesh = global_service(part.manifest, imported=imported)
    with alloc.tracking() as used:
        for sport, plan in owned:
            assert svc is not None
            backends = port_backends(sport, part.slices, nodes, use_remote=mesh.is_global)
            service_id = alloc.service_id.allocate(f"{plan.address}:{plan.port}/{plan.proto}")
            if service_id is None:
                part.row_problems.append(f"Service {ref[0]}/{ref[1]}: service ids exhausted")
                continue
            frontend = _frontend(ref, svc, sport, backends, plan, service_id, alloc, cfg, part.row_problems,
                                 mesh.affinity)
            if frontend is not None:
                part.frontends[plan.key] = frontend
    part.used_rows, part.missed_rows = used.frozen(), frozenset(used.missed)


def _lb_ips(svc: Service) -> list[str]:
    ips: list[str] = []
    if svc.status is not None:
        ips += [i.ip for i in svc.status.load_balancer.ingress if i.ip]
    if svc.spec.load_balancer_ip:
        ips.append(svc.spec.load_balancer_ip)
    for annotation in LB_IPAM_ANNOTATIONS:
        value = svc.metadata.annotations.get(annotation, "")
        ips += [v.strip() for v in value.split(",") if v.strip()]
    return list(dict.fromkeys(ips))


def _frontends(
    ref: Ref, svc: Service, manifest: dict[str, Any], nodes: dict[str, NodeView],
    alloc: Allocations, cfg: Config, problems: list[str],
) -> tuple[list[tuple[ServicePort, FrontendPlan]], dict[str, Any]]:
    """Frontends of one Service (allocating its cluster IP and node ports) and its status."""
    spec = svc.spec
    name = f"{ref[0]}/{ref[1]}"
    status: dict[str, Any] = {}
    if spec.type == "ExternalName":
        return [], status
    plans: list[tuple[ServicePort, FrontendPlan]] = []

    cluster_ip = ""
    if spec.is_headless():
        status["clusterIP"] = "None"
    elif spec.cluster_ip:
        cluster_ip = spec.cluster_ip
        if not _is_ipv4(cluster_ip):
            problems.append(f"Service {name}: clusterIP {cluster_ip!r} is not an IPv4 address")
            cluster_ip = ""
        elif allocator.ip_in_pool(alloc.cluster_ip, cluster_ip) and not alloc.cluster_ip.claim(
            name, allocator.ip_token(cluster_ip)
        ):
            problems.append(f"Service {name}: clusterIP {cluster_ip} is already allocated to "
                            f"{alloc.cluster_ip.owners[allocator.ip_token(cluster_ip)]}")
            cluster_ip = ""
    else:
        value = alloc.cluster_ip.allocate(name)
        if value is None:
            problems.append(f"Service {name}: service CIDR {cfg.service_cidr} is exhausted")
        else:
            cluster_ip = allocator.ip_text(value)
    if cluster_ip:
        status["clusterIP"] = cluster_ip
        status["clusterIPs"] = [cluster_ip]
    if spec.is_headless():
        return [], status

    ports = [p for p in spec.ports if p.protocol in PROTOCOLS]
    if cluster_ip:
        plans += [(p, FrontendPlan("ClusterIP", cluster_ip, p.port, p.protocol)) for p in ports]

    wants_node_ports = spec.type == "NodePort" or (
        spec.type == "LoadBalancer" and (manifest.get("spec") or {}).get("allocateLoadBalancerNodePorts", True) is not False
    )
    if wants_node_ports:
        node_ports: list[dict[str, Any]] = []
        lo, hi = cfg.node_port_range
        for p in ports:
            owner = f"{name}:{p.port}/{p.protocol}"
            if p.node_port:
                if not lo <= p.node_port <= hi:
                    problems.append(f"Service {name}: nodePort {p.node_port} is outside {lo}-{hi}")
                    continue
                if not alloc.node_port.claim(owner, p.node_port):
                    problems.append(f"Service {name}: nodePort {p.node_port} is already allocated to "
                                    f"{alloc.node_port.owners[p.node_port]}")
                    continue
                node_port = p.node_port
            else:
                allocated = alloc.node_port.allocate(owner)
                if allocated is None:
                    problems.append(f"Service {name}: node ports exhausted")
                    continue
                node_port = allocated
            node_ports.append({"port": p.port, "protocol": p.protocol, "nodePort": node_port,
                               **({"name": p.name} if p.name else {})})
            for node in nodes.values():
                if node.internal_ip and _is_ipv4(node.internal_ip):
                    plans.append((p, FrontendPlan("NodePort", node.internal_ip, node_port, p.protocol, node.name)))
        if node_ports:
            status["nodePorts"] = node_ports

    for ip in spec.external_ips:
        if not _is_ipv4(ip):
            problems.append(f"Service {name}: externalIP {ip!r} is not an IPv4 address")
            continue
        plans += [(p, FrontendPlan("ExternalIP", ip, p.port, p.protocol)) for p in ports]

    if spec.type == "LoadBalancer":
        lb_ips = [ip for ip in _lb_ips(svc) if _is_ipv4(ip)]
        for ip in lb_ips:
            plans += [(p, FrontendPlan("LoadBalancer", ip, p.port, p.protocol)) for p in ports]
        if lb_ips:
            status["loadBalancer"] = {"ingress": [{"ip": ip} for ip in lb_ips]}
    return plans, status


def _frontend(
    ref: Ref, svc: Service, sport: ServicePort, backends: list[BackendView], plan: FrontendPlan,
    service_id: int, alloc: Allocations, cfg: Config, problems: list[str], affinity: str = AFFINITY_NONE,
) -> LBFrontend | None:
    spec = svc.spec
    name = f"{ref[0]}/{ref[1]}"
    policy = spec.internal_traffic_policy if plan.type == "ClusterIP" else spec.external_traffic_policy
    algorithm = svc.metadata.annotations.get(LB_ALGORITHM_ANNOTATION, "random") or "random"
    if algorithm not in ("random", "maglev"):
        problems.append(f"Service {name}: annotation {LB_ALGORITHM_ANNOTATION}={algorithm!r} "
                        "is not maglev or random; using random")
        algorithm = "random"

    ids: dict[tuple[str, int], int] = {}
    for b in backends:
        backend_id = alloc.backend_id.allocate(b.owner)
        if backend_id is None:
            problems.append(f"Service {name}: backend ids exhausted")
            return None
        ids[(b.ip, b.port)] = backend_id

    def slot_ids(chosen: list[BackendView]) -> list[int]:
        return [ids[(b.ip, b.port)] for b in chosen]

    def table(chosen: list[BackendView]) -> list[int]:
        warning = maglev.table_size_warning(cfg.maglev_table_size, len(chosen))
        if warning:
            problems.append(f"Service {name}: {warning}")
        return maglev.maglev_table(
            ((f"{b.ip}:{b.port}", ids[(b.ip, b.port)]) for b in chosen), cfg.maglev_table_size)

    slots: list[BackendView] = []
    slots_by_node: dict[str, list[int]] = {}
    maglev_table: list[int] = []
    maglev_by_node: dict[str, list[int]] = {}
    if policy == "Local":
        by_node: dict[str, list[BackendView]] = {}
        for b in backends:
            if b.node:
                by_node.setdefault(b.node, []).append(b)
        for node in sorted(by_node):
            chosen = select_slots(by_node[node], affinity)
            if chosen:
                slots_by_node[node] = slot_ids(chosen)
                if algorithm == "maglev":
                    maglev_by_node[node] = table(chosen)
        in_slots = {(b.ip, b.port) for node in by_node for b in select_slots(by_node[node], affinity)}
        ordered = [b for b in backends if (b.ip, b.port) in in_slots]
    else:
        slots = select_slots(backends, affinity)
        if algorithm == "maglev" and slots:
            maglev_table = table(slots)
        ordered = list(slots)
    ordered += [b for b in backends if b not in ordered]

    return LBFrontend(
        namespace=ref[0],
        name=ref[1],
        type=plan.type,
        address=plan.address,
        port=plan.port,
        proto=plan.proto,
        service_id=service_id,
        rev_nat_id=service_id,
        port_name=sport.name,
        backends=[
            LBBackend(id=ids[(b.ip, b.port)], ip=b.ip, port=b.port, proto=b.proto, state=b.state,
                      serving=b.serving, node=b.node, zone=b.zone, pod=b.pod, cluster=b.cluster)
            for b in ordered
        ],
        slots=slot_ids(slots),
        slots_by_node=slots_by_node,
        algorithm=algorithm,
        maglev=maglev_table,
        maglev_by_node=maglev_by_node,
        affinity_timeout=spec.affinity_timeout(),
        traffic_policy=policy,
        ext_traffic_policy=spec.external_traffic_policy,
        int_traffic_policy=spec.internal_traffic_policy,
        node=plan.node,
        cluster=cfg.cluster,
        cluster_id=cfg.cluster_id,
    )


# ---------------------------------------------------------------- stable text


def render(desired: Desired) -> str:
    """The desired rows as stable text (golden files, debugging)."""
    lines: list[str] = []
    for key, fe in desired.frontends.items():
        lines.append(
            f"{key}: {fe.namespace}/{fe.name} {fe.type} {fe.address}:{fe.port}/{fe.proto}"
            + (f" port={fe.port_name}" if fe.port_name else "")
            + f" id={fe.service_id} revnat={fe.rev_nat_id} algo={fe.algorithm}"
            + f" affinity={fe.affinity_timeout} policy={fe.traffic_policy}"
            + f" (ext={fe.ext_traffic_policy} int={fe.int_traffic_policy})"
            + (f" node={fe.node}" if fe.node else "")
            + f" cluster={fe.cluster}/{fe.cluster_id}"
        )
        lines.append(f"  slots: {' '.join(map(str, fe.slots)) or '-'}")
        for node, ids in fe.slots_by_node.items():
            lines.append(f"  slots@{node}: {' '.join(map(str, ids))}")
        for b in fe.backends:
            extra = "" if b.serving else " not-serving"
            lines.append(
                f"  backend {b.id} {b.ip}:{b.port}/{b.proto} {b.state}{extra}"
                f" node={b.node or '-'} zone={b.zone or '-'} pod={b.pod or '-'}"
            )
        if fe.maglev:
            lines.append(f"  maglev: {_table_summary(fe.maglev)}")
        for node, table in fe.maglev_by_node.items():
            lines.append(f"  maglev@{node}: {_table_summary(table)}")
    for key, eps in desired.endpoints.items():
        for s in eps.slices:
            ports = ",".join(f"{p['name'] or '-'}={p['port']}/{p['protocol']}" for p in s["ports"])
            lines.append(f"{key}: slice {s['metadata']['name']} ports {ports or '-'}")
            for e in s["endpoints"]:
                c = e["conditions"]
                lines.append(
                    f"  {e['addresses'][0]} ready={c['ready']} serving={c['serving']}"
                    f" terminating={c['terminating']} node={e.get('nodeName', '-')}"
                    f" pod={e['targetRef']['name']}"
                )
    for ref, status in sorted(desired.statuses.items()):
        if status:
            lines.append(f"status Service.{ref[0]}.{ref[1]}: {_flat(status)}")
    for problem in desired.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines) + "\n"


def _table_summary(table: list[int]) -> str:
    counts: dict[int, int] = {}
    for backend_id in table:
        counts[backend_id] = counts.get(backend_id, 0) + 1
    digest = hashlib.blake2b(repr(table).encode(), digest_size=6).hexdigest()
    share = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
    return f"M={len(table)} sha={digest} head={table[:8]} share={share}"


def _flat(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
