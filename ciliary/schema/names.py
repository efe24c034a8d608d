"""Names on the bus: KV buckets, streams and subjects; cluster defaults; service names.

Invariants:
- Every bucket, stream and subject name is a constant defined here and nowhere else. The
  layout of keys inside a bucket (prefixes, key functions) lives with the records stored
  under them (``identity``, ``servicelb``, ``policy``).
- A KV bucket has exactly one writing service (``BUCKET_WRITERS``).
- Subject templates are filled with ``str.format`` (``{cluster}``, ``{node}``,
  ``{instance}``); a ``*_ALL`` subject is the wildcard that matches every filled template.
"""

from __future__ import annotations

__all__ = [
    "ALL_BUCKETS",
    "BUCKET_ALLOCATIONS",
    "BUCKET_IDENTITIES",
    "BUCKET_IPCACHE",
    "BUCKET_MESH",
    "BUCKET_MESH_EXPORT",
    "BUCKET_MESH_REMOTES",
    "BUCKET_POLICY",
    "BUCKET_RESOURCES",
    "BUCKET_SERVICES",
    "BUCKET_STATUS",
    "BUCKET_WRITERS",
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_CLUSTER_NAME",
    "SERVICE_NAMES",
    "STREAM_FLOWS",
    "SUBJECT_EVENTS",
    "SUBJECT_EVENTS_ALL",
    "SUBJECT_EVENTS_INTEREST",
    "SUBJECT_EVENTS_NODE",
    "SUBJECT_FLOWS",
    "SUBJECT_FLOWS_ALL",
    "SUBJECT_FLOWS_METRICS",
    "SUBJECT_L7_QUERY",
    "SUBJECT_FLOWS_QUERY",
    "SUBJECT_FLOWS_RAW",
    "SUBJECT_FLOWS_RAW_ALL",
    "SUBJECT_FQDN_DNS",
    "SUBJECT_FQDN_DNS_ALL",
    "SUBJECT_HEALTH",
    "SUBJECT_HEALTH_ALL",
    "SUBJECT_IDENTITY_EXPLAIN",
    "SUBJECT_IDENTITY_REPORT",
    "SUBJECT_NODE_DEBUG",
    "SUBJECT_NODE_ENDPOINT",
    "SUBJECT_POLICY_TRACE",
]

# ---------------------------------------------------------------- KV buckets

BUCKET_RESOURCES = "resources"  # source objects (Pods, Services, policies, ...)
BUCKET_STATUS = "status"  # per-object status reported by the service that owns it
BUCKET_IDENTITIES = "identities"  # identity service: id -> labels, labels hash -> id
BUCKET_IPCACHE = "ipcache"  # identity service: IP -> identity + owner
BUCKET_SERVICES = "services"  # servicelb: frontends -> ordered backends
BUCKET_POLICY = "policy"  # policy service: per-identity policy entries
BUCKET_ALLOCATIONS = "allocations"  # persistent allocators (IPAM, cluster IPs)
BUCKET_MESH_REMOTES = "mesh-remotes"  # ClusterMesh: the connected clusters (records: ``mesh``)
BUCKET_MESH_EXPORT = "mesh-export"  # mesh: what connected clusters may read of this one
BUCKET_MESH = "mesh"  # mesh: the state imported from every connected cluster

ALL_BUCKETS = (
    BUCKET_RESOURCES,
    BUCKET_STATUS,
    BUCKET_IDENTITIES,
    BUCKET_IPCACHE,
    BUCKET_SERVICES,
    BUCKET_POLICY,
    BUCKET_ALLOCATIONS,
    BUCKET_MESH_REMOTES,
    BUCKET_MESH_EXPORT,
    BUCKET_MESH,
)

BUCKET_WRITERS: dict[str, str] = {
    BUCKET_RESOURCES: "sources (ciliary apply, the Kubernetes bridge, node registration)",
    BUCKET_STATUS: "the service that owns the object's status (node executor for Pods)",
    BUCKET_IDENTITIES: "identity",
    BUCKET_IPCACHE: "identity",
    BUCKET_SERVICES: "servicelb",
    BUCKET_POLICY: "policy",
    BUCKET_ALLOCATIONS: "the allocator owning the key prefix",
    BUCKET_MESH_REMOTES: "ciliary clustermesh connect / disconnect",
    BUCKET_MESH_EXPORT: "mesh",
    BUCKET_MESH: "mesh",
}

# ---------------------------------------------------------------- flows (payloads: ``flows``)

STREAM_FLOWS = "FLOWS"
SUBJECT_FLOWS_RAW = "flows.raw.{cluster}.{node}"  # RawEventBatch, core NATS
SUBJECT_FLOWS_RAW_ALL = "flows.raw.>"
SUBJECT_FLOWS = "flows.enriched.{cluster}.{node}"  # FlowBatch
SUBJECT_FLOWS_ALL = "flows.enriched.>"
SUBJECT_FLOWS_QUERY = "ciliary.flows.query"  # FlowQuery -> stream of FlowQueryReply
SUBJECT_FLOWS_METRICS = "ciliary.flows.metrics"  # FlowMetricsRequest -> FlowMetricsReply
SUBJECT_L7_QUERY = "ciliary.flows.l7"  # L7Query -> L7QueryReply (spans from the OTLP receiver)

# ---------------------------------------------------------------- public event API (JSON, ``ciliary.events``)

SUBJECT_EVENTS = "ciliary.events.{topic}.{cluster}"  # identities, policy, services
SUBJECT_EVENTS_NODE = "ciliary.events.{topic}.{cluster}.{node}"  # flows, endpoints
SUBJECT_EVENTS_ALL = "ciliary.events.>"
SUBJECT_EVENTS_INTEREST = "ciliary.events.interest"  # a subscriber's lease (JSON)

# ---------------------------------------------------------------- identity (payloads: ``identity``)

# DNS responses delivered to local endpoints (a ``RawEventBatch`` holding only those
# events, payload included), published by the node executor for the identity service's
# toFQDNs name cache; core NATS, like SUBJECT_FLOWS_RAW.
SUBJECT_FQDN_DNS = "fqdn.dns.{cluster}.{node}"
SUBJECT_FQDN_DNS_ALL = "fqdn.dns.>"
SUBJECT_IDENTITY_EXPLAIN = "ciliary.identity.explain"  # IdentityExplainRequest -> Reply
SUBJECT_IDENTITY_REPORT = "ciliary.identity.report"  # IdentityReportRequest -> Reply

# ---------------------------------------------------------------- policy, node, health

SUBJECT_POLICY_TRACE = "ciliary.policy.trace"  # PolicyTraceRequest -> PolicyTraceReply
SUBJECT_NODE_ENDPOINT = "ciliary.node.{cluster}.{node}.endpoint"  # EndpointRegistration
SUBJECT_NODE_DEBUG = "ciliary.node.{cluster}.{node}.debug"  # NodeDebugRequest -> Reply
SUBJECT_HEALTH = "ciliary.health.{instance}"  # -> HealthReport
SUBJECT_HEALTH_ALL = "ciliary.health"  # every instance answers: scatter-gather status

# ---------------------------------------------------------------- clusters and services

DEFAULT_CLUSTER_NAME = "default"
DEFAULT_CLUSTER_ID = 1

SERVICE_NAMES = ("identity", "servicelb", "policy", "flows", "mesh", "node")
