"""Flow visibility (Hubble-style): raw datapath events, enriched flows, queries.

Invariants:
- The node executor publishes every ring-buffer batch as a ``RawEventBatch`` on core NATS
  ``flows.raw.<cluster>.<node>`` (SUBJECT_FLOWS_RAW): one ``RawFlowEvent`` per
  ``struct flow_event`` (bpf/lib/types.h), addresses as dotted strings, ports in host
  order, the payload cut to ``payload_len``.
- The flows service decodes and enriches them into ``Flow`` records (field names and JSON
  shape of Hubble's flow.Flow as printed by ``hubble observe -o json``) and publishes them
  as one ``FlowBatch`` per raw batch on ``flows.enriched.<cluster>.<node>``
  (SUBJECT_FLOWS; split to fit the bus's maximum message size).
- It answers ``FlowQuery`` on SUBJECT_FLOWS_QUERY with a stream of ``FlowQueryReply``
  chunks (``more`` set on all but the last) and ``FlowMetricsRequest`` on
  SUBJECT_FLOWS_METRICS.
- Every sequenced ``RawEventBatch`` says where it stands in its executor run (``run``,
  ``seq``, ``events_total``, ``lost_total``); the flows service copies that into the
  ``FlowBatch`` messages it stores (``position``), so the ``FLOWS`` stream's last message of
  a node is the position the service last stored. Events missing between two positions are
  counted as lost and reported as Hubble ``LostEvent`` records (``FlowQueryReply.lost_events``).
- Flow records are trees without reference cycles, so they are not tracked by Python's
  cyclic garbage collector (``gc=False``): the service creates ~100k of them per second.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .names import DEFAULT_CLUSTER_ID
from .wire import Record

__all__ = [
    "FLOWS_RING_CAPACITY",
    "BatchPosition",
    "Flow",
    "FlowBatch",
    "FlowDNS",
    "FlowEndpoint",
    "FlowEventType",
    "FlowEventTypeFilter",
    "FlowFilter",
    "FlowICMP",
    "FlowIP",
    "FlowLayer4",
    "FlowLayer7",
    "FlowMetricsReply",
    "FlowMetricsRequest",
    "FlowPolicy",
    "FlowQuery",
    "FlowQueryReply",
    "FlowService",
    "FlowTCP",
    "FlowTraceContext",
    "FlowTraceParent",
    "FlowUDP",
    "FlowWorkload",
    "LostEvent",
    "RawEventBatch",
    "RawFlowEvent",
    "TCPFlags",
]

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
    seq: int = 0  # batch sequence number per node executor run (1, 2, …; 0 = not sequenced)
    run: int = 0  # the executor run: unix ns when it started publishing (0 = not told)
    events_total: int = 0  # events this run put into batches, this batch's included
    lost_total: int = 0  # ``lost`` summed over this run's batches, this batch's included


class BatchPosition(Record, gc=False):
    """Where a raw batch stands in its node executor's run (the fields of
    ``RawEventBatch`` of the same names); stored with the flows of that batch."""

    run: int = 0
    seq: int = 0
    events_total: int = 0
    lost_total: int = 0


class LostEvent(Record):
    """Hubble ``flow.LostEvent`` with the ``node_name`` and ``time`` of the
    ``GetFlowsResponse`` that carries it: events counted as lost, never shown as flows."""

    source: str  # Hubble's LostEventSource name, e.g. "OBSERVER_EVENTS_QUEUE"
    num_events_lost: int
    node_name: str = ""  # "<cluster>/<node>"
    time_ns: int = 0  # unix ns when the loss was noticed


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


class FlowTraceParent(Record, gc=False):
    trace_id: str = ""  # 32 hex digits


class FlowTraceContext(Record, gc=False):
    """Hubble ``flow.TraceContext``: the trace of the request that rode on the flow's
    connection (set by the join with the sidecars' L7 spans)."""

    parent: FlowTraceParent | None = None


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
    trace_context: FlowTraceContext | None = None


class FlowBatch(Record, forbid_unknown_fields=True, gc=False):
    """Enriched flows of one node, oldest first: the payload of SUBJECT_FLOWS."""

    flows: list[Flow] = []
    position: BatchPosition | None = None  # the raw batch these flows came from


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
    source_cluster_name: list[str] = []  # ClusterMesh: the endpoint's cluster
    destination_cluster_name: list[str] = []
    trace_id: list[str] = []  # trace_context.parent.trace_id


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
    lost_events: list[LostEvent] = []  # losses noticed within the answer's time span (last chunk)


class FlowMetricsRequest(Record):
    pass


class FlowMetricsReply(Record):
    text: str = ""  # Prometheus text exposition format 0.0.4
