"""Service load balancing: the records of bucket ``services`` and servicelb's allocations.

Invariants:
- Bucket ``services`` (writer: servicelb) holds two kinds of keys:
  ``fe.<address>.<port>.<proto>`` -> LBFrontend, one load-balancer frontend (watch
  ``fe.>``), and ``eps.<namespace>.<name>`` -> LBEndpoints, the EndpointSlices servicelb
  derived from a selector. ``<address>`` is the IP with ``.`` -> ``-`` and ``:`` -> ``_``
  (``lb_key_token``, ``lb_frontend_key``).
- Bucket ``allocations`` keys owned by servicelb: ``<ALLOC_LB_*>.<value>`` -> LBAllocation,
  one key per allocated value, created with compare-and-set so no value is handed out
  twice.
- A backend id is stable for one ``ip:port/proto`` across all frontends; a service id is
  stable per frontend and equals its reverse-NAT id (Cilium's convention).
"""

from __future__ import annotations

from typing import Any

from .names import DEFAULT_CLUSTER_ID, DEFAULT_CLUSTER_NAME
from .wire import Record

__all__ = [
    "ALLOC_LB_BACKEND_ID",
    "ALLOC_LB_CLUSTER_IP",
    "ALLOC_LB_NODE_PORT",
    "ALLOC_LB_SERVICE_ID",
    "LB_ALGORITHMS",
    "LB_ENDPOINTS_PREFIX",
    "LB_FRONTEND_PREFIX",
    "LB_STATE_ACTIVE",
    "LB_STATE_NOT_READY",
    "LB_STATE_TERMINATING",
    "LB_TYPES",
    "LBAllocation",
    "LBBackend",
    "LBEndpoints",
    "LBFrontend",
    "lb_frontend_key",
    "lb_key_token",
]

LB_FRONTEND_PREFIX = "fe"
LB_ENDPOINTS_PREFIX = "eps"
ALLOC_LB_CLUSTER_IP = "servicelb-clusterip"  # value: cluster IP (dots as dashes); owner "ns/name"
ALLOC_LB_NODE_PORT = "servicelb-nodeport"  # value: node port; owner "ns/name:port/proto"
ALLOC_LB_SERVICE_ID = "servicelb-serviceid"  # value: service id = rev-NAT id; owner "addr:port/proto"
ALLOC_LB_BACKEND_ID = "servicelb-backendid"  # value: backend id; owner "ip:port/proto"

LB_TYPES = ("ClusterIP", "NodePort", "ExternalIP", "LoadBalancer")
LB_STATE_ACTIVE = "active"  # ready: may take new connections
LB_STATE_TERMINATING = "terminating"  # keeps existing connections; new ones only as fallback
LB_STATE_NOT_READY = "not-ready"  # fails readiness: keeps existing connections, no new ones
LB_ALGORITHMS = ("random", "maglev")


def lb_key_token(address: str) -> str:
    """An IP address as one KV key token (``.`` -> ``-``, ``:`` -> ``_``)."""
    return address.replace(".", "-").replace(":", "_")


def lb_frontend_key(address: str, port: int, proto: str) -> str:
    """Key of a frontend in bucket ``services``: ``fe.10-96-1-0.80.TCP``."""
    return f"{LB_FRONTEND_PREFIX}.{lb_key_token(address)}.{port}.{proto}"


class LBBackend(Record):
    """One backend of a frontend; ``id`` keys the lb4 backends map -> {ip, port, proto}."""

    id: int  # stable backend id (u32), the same for the same ip:port/proto in every frontend
    ip: str
    port: int
    proto: str  # "TCP" | "UDP" | "SCTP"
    state: str = LB_STATE_ACTIVE  # LB_STATE_ACTIVE | LB_STATE_TERMINATING | LB_STATE_NOT_READY
    serving: bool = True  # a terminating backend that still passes readiness
    node: str = ""  # node the backend runs on (traffic policy Local selects on it)
    zone: str = ""
    pod: str = ""  # "namespace/name" of the backing pod when known
    cluster: str = ""  # the connected cluster it runs in (ClusterMesh); "" for this cluster


class LBFrontend(Record):
    """One load-balancer frontend {address, port, proto} and everything the lb4 maps need.

    Map mapping for the node executor (``node`` = this node):
    - slots = ``slots_by_node.get(node, [])`` when ``traffic_policy == "Local"``, else
      ``slots``; lb4 services {address, port, proto, slot 0} -> {count=len(slots),
      rev_nat_index=rev_nat_id, flags from type/affinity/policy}; slot i (1..count) ->
      backend_id slots[i-1].
    - lb4 backends: every entry of ``backends`` (id -> ip, port, proto), including
      terminating ones that are in no slot, so their established connections survive.
    - lb4 reverse NAT: rev_nat_id -> {address, port}.
    - Maglev (``algorithm == "maglev"``): ``maglev`` (or ``maglev_by_node[node]`` for
      Local) is the whole lookup table, ``len`` = M entries of backend ids.
    Update order: add backends, then slots/service, then remove stale backends.
    """

    namespace: str
    name: str
    type: str  # one of LB_TYPES
    address: str
    port: int
    proto: str  # "TCP" | "UDP" | "SCTP"
    service_id: int  # stable per frontend (u16); allocations/servicelb-serviceid.<id>
    rev_nat_id: int  # == service_id (Cilium's convention)
    port_name: str = ""
    backends: list[LBBackend] = []  # slot backends first (in slot order), then the rest
    slots: list[int] = []  # backend ids for new connections, traffic policy Cluster
    slots_by_node: dict[str, list[int]] = {}  # traffic policy Local: node -> its slot ids
    algorithm: str = "random"  # one of LB_ALGORITHMS
    maglev: list[int] = []  # algorithm maglev, policy Cluster: M backend ids
    maglev_by_node: dict[str, list[int]] = {}  # algorithm maglev, policy Local
    affinity_timeout: int = 0  # ClientIP session affinity in seconds; 0 = none
    traffic_policy: str = "Cluster"  # the policy that applies to this frontend's type
    ext_traffic_policy: str = "Cluster"
    int_traffic_policy: str = "Cluster"
    node: str = ""  # NodePort frontends: the node whose InternalIP this is
    cluster: str = DEFAULT_CLUSTER_NAME
    cluster_id: int = DEFAULT_CLUSTER_ID


class LBEndpoints(Record):
    """EndpointSlices servicelb derived from a Service selector and pod readiness."""

    namespace: str
    name: str
    slices: list[dict[str, Any]] = []  # discovery.k8s.io/v1 EndpointSlice manifests


class LBAllocation(Record):
    """One allocated value (key ``<ALLOC_LB_*>.<value>``) and who holds it."""

    owner: str
    created: str = ""
