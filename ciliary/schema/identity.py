"""Identities: their numbering, and the records of buckets ``identities`` and ``ipcache``.

Numbering (Cilium ``pkg/identity``), the one definition every service and the CLI use:
- 0 is unknown; 1..11 are the reserved identities of ``RESERVED_IDENTITIES`` (numeric id
  -> the name after ``reserved:``), each also a named constant ``IDENTITY_<NAME>``.
- Cluster-scoped identities are ``cluster_id << 16 | n``: bits 16-23 carry the cluster ID
  (0..255). Cluster 0 allocates 256..65535 (below 256 is reserved); cluster ``c > 0``
  allocates the whole ``c << 16 .. (c + 1) << 16 - 1`` (``identity_cluster_range``), as
  Cilium's ClusterMesh layout does.
- Local-scope identities (CIDR identities, never shared between clusters) have bit 24 set:
  ``1 << 24 | n`` with n in 1..0xFFFFFF; their cluster ID is 0.

Bucket ``identities`` (writer: identity) holds every identity both ways:
- ``id.<numeric id>`` -> IdentityRecord (id -> labels, cluster name + id);
- ``labels.<sha256 of set>`` -> IdentityLabelsRecord (label set -> id, reference count).
A ``labels.`` key is created only after its ``id.`` key, and deleted before it, both with
compare-and-set, so a ``labels.`` key always names a live ``id.`` key with the same labels
and no two ``labels.`` keys name the same id.

Bucket ``ipcache`` (writer: identity) holds ``ipcache_key(prefix)`` -> IPCacheRecord for
every pod IP, node IP, policy CIDR and the world default route.

``ciliary identity explain|report`` ask the identity service with the request/reply
records below (subjects in ``names``).
"""

from __future__ import annotations

from .wire import Record

__all__ = [
    "IDENTITY_CLUSTER_ID_MAX",
    "IDENTITY_CLUSTER_SHIFT",
    "IDENTITY_ENCRYPTED_OVERLAY",
    "IDENTITY_HEALTH",
    "IDENTITY_HOST",
    "IDENTITY_ID_PREFIX",
    "IDENTITY_INGRESS",
    "IDENTITY_INIT",
    "IDENTITY_KUBE_APISERVER",
    "IDENTITY_LABELS_PREFIX",
    "IDENTITY_LOCAL_FLAG",
    "IDENTITY_LOCAL_MAX",
    "IDENTITY_LOCAL_MIN",
    "IDENTITY_MIN_CLUSTER",
    "IDENTITY_REMOTE_NODE",
    "IDENTITY_UNKNOWN",
    "IDENTITY_UNMANAGED",
    "IDENTITY_WORLD",
    "IDENTITY_WORLD_IPV4",
    "IDENTITY_WORLD_IPV6",
    "RESERVED_IDENTITIES",
    "RESERVED_IDENTITY_IDS",
    "IPCacheRecord",
    "IdentityExplainReply",
    "IdentityExplainRequest",
    "IdentityLabelsRecord",
    "IdentityRecord",
    "IdentityReportReply",
    "IdentityReportRequest",
    "LabelCardinality",
    "LabelVerdict",
    "describe_identity",
    "identity_cluster_id",
    "identity_cluster_range",
    "identity_id_key",
    "identity_labels_key",
    "ipcache_key",
    "ipcache_prefix",
    "is_local_identity",
    "is_reserved_identity",
]

# ---------------------------------------------------------------- numbering

IDENTITY_UNKNOWN = 0
IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_UNMANAGED = 3
IDENTITY_HEALTH = 4
IDENTITY_INIT = 5
IDENTITY_REMOTE_NODE = 6
IDENTITY_KUBE_APISERVER = 7
IDENTITY_INGRESS = 8
IDENTITY_WORLD_IPV4 = 9
IDENTITY_WORLD_IPV6 = 10
IDENTITY_ENCRYPTED_OVERLAY = 11

# Cilium's reserved security identities (numeric id -> name after ``reserved:``).
RESERVED_IDENTITIES: dict[int, str] = {
    IDENTITY_HOST: "host",
    IDENTITY_WORLD: "world",
    IDENTITY_UNMANAGED: "unmanaged",
    IDENTITY_HEALTH: "health",
    IDENTITY_INIT: "init",
    IDENTITY_REMOTE_NODE: "remote-node",
    IDENTITY_KUBE_APISERVER: "kube-apiserver",
    IDENTITY_INGRESS: "ingress",
    IDENTITY_WORLD_IPV4: "world-ipv4",
    IDENTITY_WORLD_IPV6: "world-ipv6",
    IDENTITY_ENCRYPTED_OVERLAY: "encrypted-overlay",
}
RESERVED_IDENTITY_IDS: dict[str, int] = {name: ident for ident, name in RESERVED_IDENTITIES.items()}

IDENTITY_CLUSTER_SHIFT = 16  # the cluster ID is in bits 16-23
IDENTITY_CLUSTER_ID_MAX = 255
IDENTITY_MIN_CLUSTER = 256  # lowest cluster-scoped identity of cluster 0
IDENTITY_LOCAL_FLAG = 1 << 24  # local-scope (CIDR) identities
IDENTITY_LOCAL_MIN = IDENTITY_LOCAL_FLAG | 1
IDENTITY_LOCAL_MAX = IDENTITY_LOCAL_FLAG | 0xFFFFFF


def identity_cluster_range(cluster_id: int) -> tuple[int, int]:
    """Inclusive ``(min, max)`` of cluster-scoped identities for ``cluster_id``."""
    if not 0 <= cluster_id <= IDENTITY_CLUSTER_ID_MAX:
        raise ValueError(f"cluster ID {cluster_id} out of range 0..{IDENTITY_CLUSTER_ID_MAX}")
    low = IDENTITY_MIN_CLUSTER if cluster_id == 0 else cluster_id << IDENTITY_CLUSTER_SHIFT
    return low, ((cluster_id + 1) << IDENTITY_CLUSTER_SHIFT) - 1


def identity_cluster_id(identity: int) -> int:
    """Cluster ID bits of a cluster-scoped identity (0 for reserved and local ones)."""
    if identity & IDENTITY_LOCAL_FLAG:
        return 0
    return (identity >> IDENTITY_CLUSTER_SHIFT) & 0xFF


def is_local_identity(identity: int) -> bool:
    """A local-scope (CIDR) identity."""
    return bool(identity & IDENTITY_LOCAL_FLAG)


def is_reserved_identity(identity: int) -> bool:
    return identity in RESERVED_IDENTITIES


def describe_identity(identity: int) -> str:
    """``reserved:world``, ``local 5`` or ``cluster 1 #300``."""
    if identity in RESERVED_IDENTITIES:
        return f"reserved:{RESERVED_IDENTITIES[identity]}"
    if is_local_identity(identity):
        return f"local {identity & 0xFFFFFF}"
    return f"cluster {identity_cluster_id(identity)} #{identity & 0xFFFF}"


# ---------------------------------------------------------------- bucket keys

IDENTITY_ID_PREFIX = "id."
IDENTITY_LABELS_PREFIX = "labels."


def identity_id_key(identity: int) -> str:
    return f"{IDENTITY_ID_PREFIX}{identity}"


def identity_labels_key(label_hash: str) -> str:
    return f"{IDENTITY_LABELS_PREFIX}{label_hash}"


def ipcache_key(prefix: str) -> str:
    """KV key for an IP prefix: ``10.0.0.5/32`` -> ``10.0.0.5_32``, ``fd00::1/128`` -> ``fd00--1_128``."""
    return prefix.replace("/", "_").replace(":", "-")


def ipcache_prefix(key: str) -> str:
    """Inverse of ``ipcache_key``."""
    return key.replace("_", "/").replace("-", ":")


class IdentityRecord(Record):
    """``identities`` ``id.<n>``: the labels a numeric identity stands for."""

    id: int
    labels: list[str]  # sorted ``source:key=value``
    scope: str  # "reserved" | "cluster" | "cidr"
    cluster: str
    cluster_id: int
    created: float = 0.0  # unix time of allocation


class IdentityLabelsRecord(Record):
    """``identities`` ``labels.<hash>``: the identity of a label set and who uses it."""

    id: int
    labels: list[str]
    refs: int = 0  # endpoints (pods) or policies using it
    unused_since: float = 0.0  # unix time refs dropped to 0; 0 while in use


class IPCacheRecord(Record):
    """``ipcache``: an IP prefix and the identity the datapath maps it to."""

    prefix: str  # "10.0.0.5/32", "0.0.0.0/0"
    identity: int
    source: str  # "pod" | "node" | "cidr" | "world"
    cluster: str
    cluster_id: int
    node: str = ""  # node running the pod, or the node itself
    namespace: str = ""
    pod: str = ""


class IdentityExplainRequest(Record):
    """Explain a pod's identity labels: by pod, or by raw labels in a namespace."""

    namespace: str = "default"
    pod: str = ""
    labels: dict[str, str] = {}
    service_account: str = ""


class LabelVerdict(Record):
    label: str  # ``source:key=value``
    origin: str  # "pod" | "namespace" | "injected"
    kept: bool
    rule: str = ""  # the deciding label pattern, e.g. ``!pod-template-hash``
    reason: str = ""


class IdentityExplainReply(Record):
    ok: bool = True
    error: str = ""
    namespace: str = ""
    pod: str = ""
    verdicts: list[LabelVerdict] = []
    identity_labels: list[str] = []
    identity: int = 0  # 0 when no identity is allocated for this label set yet


class IdentityReportRequest(Record):
    top: int = 20
    min_pods: int = 5  # labels on fewer pods are never flagged


class LabelCardinality(Record):
    key: str  # ``k8s:<key>``
    pods: int  # pods carrying the label
    values: int  # distinct values
    uniqueness: float  # values / pods
    identities_without: int  # estimated identities if this key were excluded
    flagged: bool = False
    reason: str = ""
    examples: list[str] = []


class IdentityReportReply(Record):
    ok: bool = True
    error: str = ""
    cluster: str = ""
    cluster_id: int = 0
    pods: int = 0
    identities_estimated: int = 0  # distinct identity label sets over current pods
    identities_allocated: int = 0
    limit: int = 0  # size of the cluster's identity range
    labels: list[LabelCardinality] = []
    advice: list[str] = []
