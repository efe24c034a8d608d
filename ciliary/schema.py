"""Every value that crosses the bus: KV bucket values and subject payloads.

Invariants:
- Each bucket, stream and subject name is a constant defined here and nowhere else.
- Every payload is a frozen ``msgspec.Struct``; on the wire it is msgpack
  (``encode``/``decode`` below), for humans it is JSON.
- Every identity- or flow-bearing record carries the cluster name and cluster ID so that
  ClusterMesh can merge records of several clusters without rewriting them.
- A KV bucket has exactly one writing service (see ``BUCKET_WRITERS``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

# ---------------------------------------------------------------- buckets and subjects

BUCKET_RESOURCES = "resources"  # source objects (Pods, Services, policies, ...)
BUCKET_STATUS = "status"  # per-object status reported by the service that owns it
BUCKET_IDENTITIES = "identities"  # identity service: id -> labels, labels hash -> id
BUCKET_IPCACHE = "ipcache"  # identity service: IP -> identity + owner
BUCKET_SERVICES = "services"  # servicelb: frontends -> ordered backends
BUCKET_POLICY = "policy"  # policy service: per-identity policy entries
BUCKET_ALLOCATIONS = "allocations"  # persistent allocators (IPAM, cluster IPs)

ALL_BUCKETS = (
    BUCKET_RESOURCES,
    BUCKET_STATUS,
    BUCKET_IDENTITIES,
    BUCKET_IPCACHE,
    BUCKET_SERVICES,
    BUCKET_POLICY,
    BUCKET_ALLOCATIONS,
)

BUCKET_WRITERS: dict[str, str] = {
    BUCKET_RESOURCES: "sources (ciliary apply, the Kubernetes bridge, node registration)",
    BUCKET_STATUS: "the service that owns the object's status (node executor for Pods)",
    BUCKET_IDENTITIES: "identity",
    BUCKET_IPCACHE: "identity",
    BUCKET_SERVICES: "servicelb",
    BUCKET_POLICY: "policy",
    BUCKET_ALLOCATIONS: "the allocator owning the key prefix",
}

STREAM_FLOWS = "FLOWS"
SUBJECT_FLOWS_RAW = "flows.raw.{cluster}.{node}"
SUBJECT_FLOWS_RAW_ALL = "flows.raw.>"
SUBJECT_FLOWS = "flows.enriched.{cluster}.{node}"
SUBJECT_HEALTH = "ciliary.health.{instance}"
SUBJECT_HEALTH_ALL = "ciliary.health"  # every instance answers: scatter-gather status

DEFAULT_CLUSTER_NAME = "default"
DEFAULT_CLUSTER_ID = 1

SERVICE_NAMES = ("identity", "servicelb", "policy", "flows", "mesh", "node")


class Record(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base for every bus payload."""


# ---------------------------------------------------------------- resources


class ResourceRecord(Record):
    """One source object in bucket ``resources``.

    ``manifest`` is the object as the user wrote it (metadata.namespace defaulted,
    uid/creationTimestamp/generation filled). The KV revision of the entry is the
    object's resourceVersion; it is not stored inside the value.
    """

    kind: str
    api_version: str
    namespace: str  # "" for cluster-scoped kinds
    name: str
    uid: str
    generation: int
    created: str  # RFC 3339
    manifest: dict[str, Any]


class StatusRecord(Record):
    """The status of one object in bucket ``status``, keyed like the object itself."""

    reporter: str  # service instance that wrote it, e.g. "node/node-1"
    observed_generation: int = 0
    status: dict[str, Any] = {}
    updated: str = ""


# ---------------------------------------------------------------- service health


class HealthReport(Record):
    """Answer of a service instance on ``ciliary.health.<instance>``."""

    service: str
    instance: str
    pid: int
    version: str
    started: float  # unix time
    healthy: bool
    cluster: str = DEFAULT_CLUSTER_NAME
    node: str = ""
    watching: list[str] = []
    detail: dict[str, Any] = {}


# ---------------------------------------------------------------- wire helpers

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(record: Any) -> bytes:
    """msgpack bytes for the wire."""
    return _encoder.encode(record)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode msgpack bytes into ``type_``; raises ``msgspec.ValidationError`` on bad input."""
    return msgspec.msgpack.decode(data, type=type_)


def to_json(record: Any) -> bytes:
    return msgspec.json.encode(record)


def json_schema(types: list[type]) -> dict[str, Any]:
    """JSON Schema for the given records, for the docs."""
    return msgspec.json.schema_components(types)[1]
