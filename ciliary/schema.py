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
# DNS responses delivered to local endpoints (a ``RawEventBatch`` holding only those
# events, payload included), published by the node executor for the identity service's
# toFQDNs name cache; core NATS, like SUBJECT_FLOWS_RAW.
SUBJECT_FQDN_DNS = "fqdn.dns.{cluster}.{node}"
SUBJECT_FQDN_DNS_ALL = "fqdn.dns.>"
SUBJECT_HEALTH = "ciliary.health.{instance}"
SUBJECT_HEALTH_ALL = "ciliary.health"  # every instance answers: scatter-gather status

DEFAULT_CLUSTER_NAME = "default"
DEFAULT_CLUSTER_ID = 1

SERVICE_NAMES = ("identity", "servicelb", "policy", "flows", "mesh", "node")

# Cilium's reserved security identities (numeric id -> name after ``reserved:``).
RESERVED_IDENTITIES: dict[int, str] = {
    1: "host",
    2: "world",
    3: "unmanaged",
    4: "health",
    5: "init",
    6: "remote-node",
    7: "kube-apiserver",
    8: "ingress",
    9: "world-ipv4",
    10: "world-ipv6",
    11: "encrypted-overlay",
}


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


# ======================================================================== identity (issue 4)
# Section owned by services/identity: the records of buckets ``identities`` and ``ipcache``
# and the request/reply payloads of ``ciliary identity explain|report``.
#
# Bucket ``identities`` holds every identity both ways:
#   ``id.<numeric id>``         -> IdentityRecord       (id -> labels, cluster name + id)
#   ``labels.<sha256 of set>``  -> IdentityLabelsRecord (label set -> id, reference count)
# A ``labels.`` key is created only after its ``id.`` key, and deleted before it, both
# with compare-and-set, so a ``labels.`` key always names a live ``id.`` key with the
# same labels and no two ``labels.`` keys name the same id.
# Bucket ``ipcache`` holds ``ipcache_key(prefix)`` -> IPCacheRecord for every pod IP, node
# IP, policy CIDR and the world default route.

IDENTITY_ID_PREFIX = "id."
IDENTITY_LABELS_PREFIX = "labels."
SUBJECT_IDENTITY_EXPLAIN = "ciliary.identity.explain"
SUBJECT_IDENTITY_REPORT = "ciliary.identity.report"


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


# ==================================================================== end identity (issue 4)


# ---- servicelb
# Bucket ``services`` (writer: servicelb) holds two kinds of keys:
#   fe.<address>.<port>.<proto>  -> LBFrontend   one load-balancer frontend (watch ``fe.>``)
#   eps.<namespace>.<name>       -> LBEndpoints  EndpointSlices servicelb derived from a selector
# ``<address>`` is the IP with ``.`` -> ``-`` and ``:`` -> ``_`` (see ``lb_frontend_key``).
# Bucket ``allocations`` keys owned by servicelb: ``<ALLOC_LB_*>.<value>`` -> LBAllocation,
# one key per allocated value, created with compare-and-set so no value is handed out twice.

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


# ---- flows
# Section owned by services/flows (issue 7: Hubble-style flow visibility).
#
# The node executor publishes every ring-buffer batch as a ``RawEventBatch`` on core NATS
# ``flows.raw.<cluster>.<node>`` (SUBJECT_FLOWS_RAW); one ``RawFlowEvent`` per
# ``struct flow_event`` (bpf/lib/types.h), addresses as dotted strings, ports in host order,
# the payload cut to ``payload_len``. The flows service decodes and enriches them into
# ``Flow`` records (field names and JSON shape of Hubble's flow.Flow as printed by
# ``hubble observe -o json``), publishes them as one ``FlowBatch`` per raw batch on
# ``flows.enriched.<cluster>.<node>`` (SUBJECT_FLOWS; split to fit the bus's maximum
# message size) and answers ``FlowQuery`` on SUBJECT_FLOWS_QUERY with a stream of
# ``FlowQueryReply`` chunks (``more`` set on all but the last) and
# ``FlowMetricsRequest`` on SUBJECT_FLOWS_METRICS.
#
# Flow records are trees without reference cycles, so they are not tracked by Python's
# cyclic garbage collector (``gc=False``): the service creates ~100k of them per second.

SUBJECT_FLOWS_ALL = "flows.enriched.>"
SUBJECT_FLOWS_QUERY = "ciliary.flows.query"
SUBJECT_FLOWS_METRICS = "ciliary.flows.metrics"
FLOWS_RING_CAPACITY = 4095  # Hubble's default ring buffer size, per node


class RawFlowEvent(Record):
    """One ``struct flow_event`` from the ``ciliary_events`` ring buffer, as plain data."""

    ts_ns: int  # bpf_ktime_get_ns (CLOCK_MONOTONIC); wall time = batch.boot_time_ns + ts_ns
    saddr: str  # "10.0.1.5" (already translated addresses, as the packet was seen)
    daddr: str
    sport: int = 0  # host byte order; ICMP echo: id / 0
    dport: int = 0
    src_identity: int = 0
    dst_identity: int = 0
    ep_id: int = 0  # the local endpoint whose hook saw the packet
    ifindex: int = 0
    rule_ref: int = 0
    orig_daddr: str = ""  # service VIP when DNATed / reverse-NATed; "" or "0.0.0.0" = none
    orig_dport: int = 0
    pkt_len: int = 0
    type: int = 1  # EVENT_TRACE 1, EVENT_DROP 2
    verdict: int = 1  # Hubble numbering: FORWARDED 1, DROPPED 2, AUDIT 4
    drop_reason: int = 0  # Cilium drop reason (bpf/lib/drop.h), 0 when forwarded
    direction: int = 0  # DIR_INGRESS 1 (to-container), DIR_EGRESS 2 (from-container)
    proto: int = 0  # IPPROTO_*
    tcp_flags: int = 0  # TCP header flag byte (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 ...)
    is_reply: bool = False
    ct_state: int = 0  # CT_NEW 0, CT_ESTABLISHED 1, CT_REPLY 2, CT_RELATED 3
    payload: bytes = b""  # first bytes after the UDP header (DNS only), len == payload_len
    icmp_type: int = 0  # ICMP header type and code (0 for other protocols)
    icmp_code: int = 0
    policy_match: int = 0  # Cilium POLICY_MATCH_* of the policy entry that decided (rule_ref's)
    flags: int = 0  # EVENT_F_*: 1 = allowed new connection, report its policy verdict


class RawEventBatch(Record):
    """What the node executor publishes on ``flows.raw.<cluster>.<node>``."""

    cluster: str
    node: str
    events: list[RawFlowEvent] = []
    cluster_id: int = DEFAULT_CLUSTER_ID
    boot_time_ns: int = 0  # unix ns at CLOCK_MONOTONIC 0 on this node
    lost: int = 0  # events the ring buffer lost since the previous batch
    seq: int = 0  # batch sequence number per node executor run


class FlowWorkload(Record, gc=False):
    name: str = ""
    kind: str = ""


class FlowEndpoint(Record, gc=False):
    """Hubble ``flow.Endpoint``."""

    id: int = msgspec.field(default=0, name="ID")
    identity: int = 0
    cluster_name: str = ""
    namespace: str = ""
    labels: list[str] = []  # sorted ``source:key=value``
    pod_name: str = ""
    workloads: list[FlowWorkload] = []


class FlowService(Record, gc=False):
    name: str = ""
    namespace: str = ""


class FlowIP(Record, gc=False):
    source: str = ""
    destination: str = ""
    ipVersion: str = ""  # noqa: N815 - Hubble's JSON name; "IPv4" | "IPv6"
    encrypted: bool = False


class TCPFlags(Record, gc=False):
    FIN: bool = False
    SYN: bool = False
    RST: bool = False
    PSH: bool = False
    ACK: bool = False
    URG: bool = False
    ECE: bool = False
    CWR: bool = False
    NS: bool = False


class FlowTCP(Record, gc=False):
    source_port: int = 0
    destination_port: int = 0
    flags: TCPFlags | None = None


class FlowUDP(Record, gc=False):
    source_port: int = 0
    destination_port: int = 0


class FlowICMP(Record, gc=False):
    type: int = 0
    code: int = 0


class FlowLayer4(Record, gc=False):
    """Hubble ``flow.Layer4``: exactly one member is set."""

    TCP: FlowTCP | None = None
    UDP: FlowUDP | None = None
    ICMPv4: FlowICMP | None = None
    ICMPv6: FlowICMP | None = None
    SCTP: FlowUDP | None = None


class FlowDNS(Record, gc=False):
    query: str = ""
    ips: list[str] = []
    ttl: int = 0
    cnames: list[str] = []
    observation_source: str = ""
    rcode: int = 0
    qtypes: list[str] = []
    rrtypes: list[str] = []


class FlowLayer7(Record, gc=False):
    type: str = ""  # "REQUEST" | "RESPONSE"
    latency_ns: str = ""  # uint64 as string, like protojson
    dns: FlowDNS | None = None


class FlowEventType(Record, gc=False):
    type: int = 0  # Cilium monitor message type: drop 1, trace 4, policy-verdict 5, l7 129
    sub_type: int = 0  # trace observation point / drop reason


class FlowPolicy(Record, gc=False):
    """Hubble ``flow.Policy``: a policy that allowed or denied a flow."""

    name: str = ""
    namespace: str = ""
    labels: list[str] = []  # sorted k8s:io.cilium.k8s.policy.{derived-from,name,namespace}=…
    revision: str = ""  # uint64 as string, like protojson; the policy record's KV revision
    kind: str = ""  # CiliumNetworkPolicy | NetworkPolicy | CiliumClusterwideNetworkPolicy


class Flow(Record, gc=False):
    """Hubble ``flow.Flow``; JSON field names and zero-value omission follow protojson."""

    time: str = ""  # RFC 3339 with nanoseconds, UTC
    uuid: str = ""
    verdict: str = ""  # FORWARDED DROPPED ERROR AUDIT REDIRECTED TRACED TRANSLATED
    drop_reason: int = 0
    ip: FlowIP | None = msgspec.field(default=None, name="IP")
    l4: FlowLayer4 | None = None
    source: FlowEndpoint | None = None
    destination: FlowEndpoint | None = None
    flow_type: str = msgspec.field(default="", name="Type")  # L3_L4 | L7
    node_name: str = ""  # "<cluster>/<node>"
    source_names: list[str] = []
    destination_names: list[str] = []
    l7: FlowLayer7 | None = None
    reply: bool = False
    event_type: FlowEventType | None = None
    source_service: FlowService | None = None
    destination_service: FlowService | None = None
    traffic_direction: str = ""  # INGRESS | EGRESS
    policy_match_type: int = 0
    trace_observation_point: str = ""  # TO_ENDPOINT, FROM_ENDPOINT, ...
    drop_reason_desc: str = ""  # POLICY_DENIED, SERVICE_BACKEND_NOT_FOUND, ...
    is_reply: bool | None = None  # absent when unknown (drops)
    interface: dict[str, Any] = {}
    summary: str = msgspec.field(default="", name="Summary")
    # policy verdict flows: the policies whose rule decided (Hubble's policy correlation)
    egress_allowed_by: list[FlowPolicy] = []
    ingress_allowed_by: list[FlowPolicy] = []
    egress_denied_by: list[FlowPolicy] = []
    ingress_denied_by: list[FlowPolicy] = []


class FlowBatch(Record, forbid_unknown_fields=True, gc=False):
    """Enriched flows of one node, oldest first: the payload of SUBJECT_FLOWS."""

    flows: list[Flow] = []


class FlowEventTypeFilter(Record):
    type: int = 0
    match_sub_type: bool = False
    sub_type: int = 0


class FlowFilter(Record):
    """Hubble ``flow.FlowFilter``: set fields are AND'ed, values of one field OR'ed."""

    uuid: list[str] = []
    source_ip: list[str] = []  # exact or CIDR
    source_pod: list[str] = []  # "[namespace/]pod-name-prefix", "namespace/"
    source_label: list[str] = []  # label selectors, e.g. "k8s:app=x,env in (a,b)"
    source_service: list[str] = []
    source_identity: list[int] = []
    destination_ip: list[str] = []
    destination_pod: list[str] = []
    destination_label: list[str] = []
    destination_service: list[str] = []
    destination_identity: list[int] = []
    traffic_direction: list[str] = []
    verdict: list[str] = []
    drop_reason_desc: list[str] = []
    event_type: list[FlowEventTypeFilter] = []
    protocol: list[str] = []  # tcp udp icmp icmpv4 icmpv6 sctp dns
    source_port: list[str] = []
    destination_port: list[str] = []
    reply: list[bool] = []
    dns_query: list[str] = []  # regular expressions
    node_name: list[str] = []  # "node-glob" or "cluster/node-glob"
    tcp_flags: list[TCPFlags] = []
    ip_version: list[str] = []  # "IPv4" | "IPv6"
    source_fqdn: list[str] = []  # names or "*" patterns, against Flow.source_names
    destination_fqdn: list[str] = []  # against Flow.destination_names


class FlowQuery(Record):
    """``ciliary observe`` -> flows service (SUBJECT_FLOWS_QUERY)."""

    whitelist: list[FlowFilter] = []
    blacklist: list[FlowFilter] = []
    since_ns: int = 0  # unix ns, 0 = unbounded
    until_ns: int = 0
    number: int = 0  # 0 = all that match
    first: bool = False  # the oldest ``number`` instead of the newest
    rings_only: bool = False  # answer from the in-memory rings only (the default ``--last 20``)


class FlowQueryReply(Record):
    """One chunk of the answer to a ``FlowQuery``. The service sends chunks 0, 1, … to the
    request's reply subject, each within the bus's maximum message size; every chunk but
    the last has ``more`` set. Counters are set in the last chunk."""

    ok: bool = True
    error: str = ""
    flows: list[Flow] = []  # oldest first
    seen: int = 0  # flows processed since start
    capacity: int = 0
    lost: int = 0
    chunk: int = 0  # 0, 1, … in sending order
    more: bool = False  # further chunks follow
    scanned: int = 0  # flows read from the FLOWS stream so far (progress chunks and the last one)
    truncated: bool = False  # the stream scan stopped at the service's per-query bound
    notice: str = ""  # something the answer lacks, e.g. the stream could not be read


class FlowMetricsRequest(Record):
    pass


class FlowMetricsReply(Record):
    text: str = ""  # Prometheus text exposition format 0.0.4


# ---- node: endpoints registered by the CNI plugin with their node executor

SUBJECT_NODE_ENDPOINT = "ciliary.node.{cluster}.{node}.endpoint"


class EndpointRegistration(Record):
    """CNI ADD/DEL telling the node executor about a wired (or removed) endpoint."""

    op: str  # "add" | "del"
    container_id: str
    pod_namespace: str = ""
    pod_name: str = ""
    netns: str = ""
    ifname: str = ""
    host_ifname: str = ""
    host_ifindex: int = 0
    ip: str = ""
    mac: str = ""


class EndpointReply(Record):
    ok: bool
    error: str = ""
    endpoint_id: int = 0


# ---- policy
# Section owned by services/policy (issue 6: policy resolution over identities).
#
# Bucket ``policy`` (writer: policy) holds one key per local identity that at least one
# policy selects: ``policy_key(identity)`` = ``id.<identity>`` -> PolicyMapRecord. No key
# means no policy selects the identity: allow all in both directions. The writer puts new
# and changed keys before it deletes stale ones.
# Policy status goes to bucket ``status`` under the policy object's own key
# (``CiliumNetworkPolicy.<ns>.<name>``, ...) as a StatusRecord whose ``status`` is
# PolicyStatusRecord's fields.
# ``ciliary policy trace`` asks SUBJECT_POLICY_TRACE (PolicyTraceRequest -> PolicyTraceReply).

POLICY_ID_PREFIX = "id."
SUBJECT_POLICY_TRACE = "ciliary.policy.trace"
POLICY_DIRECTIONS = ("ingress", "egress")
POLICY_VERDICTS = ("allow", "deny")


def policy_key(identity: int) -> str:
    """Key of a local identity's entries in bucket ``policy``."""
    return f"{POLICY_ID_PREFIX}{identity}"


class PolicyEntryRecord(Record):
    """One policy map entry {local, peer, dport, proto, direction} -> {verdict, audit, rule}.

    ``peer``/``port``/``proto`` 0 are wildcards; ``proto`` is 0 only together with ``port``
    0. ``end_port`` > 0 is the range ``port..end_port`` that the executor expands into one
    map key per port. ICMP (proto 1 / 58) carries the ICMP type in ``port``.
    """

    peer: int
    port: int
    proto: int
    direction: str  # POLICY_DIRECTIONS
    verdict: str  # POLICY_VERDICTS; deny wins over allow at lookup
    end_port: int = 0
    audit: bool = False  # a deny that is only logged (policy audit mode)
    rule_ref: int = 0  # u32 for the map value and flow events; 0 = default allow-all


class PolicyMapRecord(Record):
    """``policy`` ``id.<identity>``: everything the executor writes for one local identity."""

    identity: int
    cluster: str
    cluster_id: int
    ingress_enforced: bool  # EP_F_POLICY_INGRESS: consult the map, miss = drop
    egress_enforced: bool  # EP_F_POLICY_EGRESS
    audit_ingress: bool = False  # EP_F_AUDIT_INGRESS: drops become audit verdicts
    audit_egress: bool = False  # EP_F_AUDIT_EGRESS
    entries: list[PolicyEntryRecord] = []  # sorted, one per key
    rules: dict[int, str] = {}  # rule_ref -> "CiliumNetworkPolicy/ns/name spec[0].ingress[1]"
    policies: list[str] = []  # status keys of the policies selecting this identity
    error: str = ""  # set when the identity's policy could not be applied (e.g. overflow)


class PolicyStatusRecord(Record):
    """``status`` of one policy object (stored as StatusRecord.status)."""

    state: str  # "ok" | "error"
    error: str = ""
    warnings: list[str] = []  # accepted but not enforced (toFQDNs, L7, ...)
    selected_identities: list[int] = []  # local identities (endpoints) the policy selects


class PolicyTraceRequest(Record):
    """Would traffic from ``from_labels`` (or ``from_cidr``) to ``to_labels`` (or ``to_cidr``)
    pass? An IP/CIDR side is the identity the ipcache maps it to (longest prefix)."""

    from_labels: list[str]
    to_labels: list[str] = []
    to_cidr: str = ""  # an IP or CIDR outside the cluster instead of to_labels
    port: int = 0
    proto: str = "TCP"  # TCP | UDP | SCTP | ICMP | ICMPv6
    from_identity: int = 0  # optional: the numeric identities, when known
    to_identity: int = 0
    from_cidr: str = ""  # an IP or CIDR instead of from_labels (resolved as the ipcache does)


class PolicyTraceStep(Record):
    direction: str
    verdict: str  # allow | deny
    reason: str  # rule | default-deny | no-default-deny | not-enforced | not-local
    rules: list[str] = []
    audit: bool = False


class PolicyTraceReply(Record):
    ok: bool = True
    error: str = ""
    verdict: str = ""  # allow | deny
    egress: PolicyTraceStep | None = None
    ingress: PolicyTraceStep | None = None


# ---- node: debug views answered by each node executor (``ciliary bpf …``, ``endpoint list``)

SUBJECT_NODE_DEBUG = "ciliary.node.{cluster}.{node}.debug"
NODE_DEBUG_VIEWS = ("ct", "ipcache", "policy", "lb", "endpoints", "metrics")


class NodeDebugRequest(Record):
    view: str  # one of NODE_DEBUG_VIEWS
    identity: int = 0  # policy: only entries of this local identity (0 = all)


class NodeDebugReply(Record):
    ok: bool
    node: str = ""
    error: str = ""
    rows: list[dict[str, Any]] = []
