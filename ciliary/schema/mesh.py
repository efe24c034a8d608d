"""ClusterMesh: what a cluster exports, which remotes it follows, and what it imported.

Three buckets (names in ``names``):
- ``mesh-remotes`` (writer: ``ciliary clustermesh connect|disconnect``): ``remote.<name>`` ->
  MeshRemote, how to reach one connected cluster's NATS.
- ``mesh-export`` (writer: mesh): what remote clusters may read, keys without a cluster:
  ``cluster`` -> MeshCluster (name, id, pod CIDR; ``heartbeat`` rewritten every
  ``ttl / 3`` seconds so a follower can tell a live exporter from a stale one),
  ``identity.<id>`` -> IdentityRecord of a pod identity, ``ipcache.<ipcache key>`` ->
  IPCacheRecord of a pod IP, ``service.<namespace>.<name>`` -> MeshService (a shared
  global service with its backends), ``node.<name>`` -> MeshNode.
- ``mesh`` (writer: mesh, single writer; read by identity, servicelb, policy, node): the
  state imported from every remote, keys prefixed by the remote cluster's name:
  ``status.<cluster>`` -> MeshRemoteStatus, ``identity.<cluster>.<id>``,
  ``ipcache.<cluster>.<ipcache key>``, ``service.<cluster>.<namespace>.<name>``,
  ``node.<cluster>.<name>`` with the same records as the export.
A remote that disconnects, or whose export was not heard for the TTL, keeps only its
``status.`` key in ``mesh``: everything else of it is withdrawn.
"""

from __future__ import annotations

from .wire import Record

__all__ = [
    "MESH_CLUSTER_KEY",
    "MESH_IDENTITY_PREFIX",
    "MESH_IPCACHE_PREFIX",
    "MESH_NODE_PREFIX",
    "MESH_REMOTE_PREFIX",
    "MESH_SERVICE_PREFIX",
    "MESH_STATUS_PREFIX",
    "MeshBackend",
    "MeshCluster",
    "MeshNode",
    "MeshRemote",
    "MeshRemoteStatus",
    "MeshService",
    "MeshServicePort",
    "mesh_key",
]

MESH_REMOTE_PREFIX = "remote"
MESH_CLUSTER_KEY = "cluster"
MESH_STATUS_PREFIX = "status"
MESH_IDENTITY_PREFIX = "identity"
MESH_IPCACHE_PREFIX = "ipcache"
MESH_SERVICE_PREFIX = "service"
MESH_NODE_PREFIX = "node"


def mesh_key(*parts: str | int) -> str:
    """``mesh_key("service", "west", "shop", "payments")`` -> ``service.west.shop.payments``."""
    return ".".join(str(part) for part in parts)


class MeshRemote(Record):
    """``mesh-remotes`` ``remote.<name>``: a connected cluster and how to reach it."""

    name: str
    cluster_id: int
    nats_url: str
    pod_cidr: str = ""
    data_dir: str = ""  # the remote's data dir when it runs on this machine
    credentials: str = ""  # path of a NATS credentials file with read access to its export
    connected_at: float = 0.0  # unix time of ``clustermesh connect``


class MeshCluster(Record):
    """``mesh-export`` ``cluster``: who exports, and a heartbeat."""

    name: str
    cluster_id: int
    pod_cidr: str = ""
    heartbeat: float = 0.0  # unix time of the exporter's last beat
    ttl: float = 0.0  # the exporter's own TTL setting


class MeshNode(Record):
    """A node of an exporting cluster: where its pods are routed."""

    name: str
    cluster: str
    cluster_id: int
    address: str  # underlay (InternalIP) address
    pod_cidr: str = ""


class MeshServicePort(Record):
    name: str = ""
    port: int = 0
    proto: str = "TCP"


class MeshBackend(Record):
    """One backend of a global service, as its own cluster sees it."""

    ip: str
    port: int
    proto: str = "TCP"
    port_name: str = ""
    ready: bool = True
    node: str = ""
    pod: str = ""  # "namespace/name"


class MeshService(Record):
    """A shared global service: the backends its cluster offers to the mesh."""

    namespace: str
    name: str
    cluster: str
    cluster_id: int
    ports: list[MeshServicePort] = []
    backends: list[MeshBackend] = []
    source: str = "annotation"  # "annotation" | "ServiceExport"
    imported: bool = False  # in ``mesh``: this cluster has a ServiceImport of the same name


class MeshRemoteStatus(Record):
    """``mesh`` ``status.<cluster>``: how following one remote goes."""

    name: str
    cluster_id: int = 0
    connected: bool = False  # its NATS answers and its export was heard within the TTL
    last_sync: float = 0.0  # unix time its export was last heard
    nodes: int = 0
    endpoints: int = 0
    identities: int = 0
    services: int = 0
    errors: list[str] = []
