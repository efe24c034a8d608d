"""Raw datapath events -> Hubble flows (pure).

Invariants:
- ``decode_event`` is a pure function of the raw event, its batch context and the
  enrichment lookups; the same input gives the same flows. UUIDs are derived, not random:
  a per-batch prefix (a hash of cluster, node, boot time, batch ``seq`` and the batch's
  first event time, so a restarted executor reusing ``seq`` values still gets new ones)
  followed by a counter (event index in the batch × 4 + flow number within the event),
  in the UUIDv4 layout.
- Immutable parts that repeat across flows (endpoints, event types, services, TCP
  flags) are shared instances, not rebuilt per flow.
- One raw event gives the flows Cilium's monitor would report for the same packet:
  a drop gives a ``drop`` flow, preceded by a ``policy-verdict`` (DENIED) flow when the
  reason is a policy (133 POLICY_DENIED, 181 POLICY_DENY); an AUDIT verdict gives a
  ``policy-verdict`` (AUDITED) flow then the ``trace`` (FORWARDED) flow; a trace event
  flagged ``EVENT_F_POLICY_VERDICT`` (the first packet of a connection a policy allowed)
  gives a ``policy-verdict`` (FORWARDED) flow then the ``trace`` flow; every other
  event gives one ``trace`` flow; a DNS message seen on the client side (request leaving
  the pod, response entering it) adds an L7 ``dns-request``/``dns-response`` flow.
- Policy-verdict flows carry the event's match type (``policy_match_type``) and, as
  Hubble's policy correlation does, the policy of the deciding entry in
  ``<direction>_allowed_by`` (FORWARDED) or ``<direction>_denied_by`` (POLICY_DENY):
  ``rule_ref`` resolved for the local endpoint's identity through ``Lookups.policy``.
  A ``rule_ref`` nobody knows (0, or not published) gives an empty list, never an error.
- Every flow carries ``node_name`` = ``<cluster>/<node>``; endpoints carry identity,
  labels and, when known, cluster, namespace, pod and workloads; an IP nobody knows
  resolves to the ``world`` identity (2) with labels ``["reserved:world"]``.
- A DNS payload that does not parse never fails the event: the flow just has no L7 part.
- With a ``EndpointNameCache`` (``names.py``), a DNS response delivered to a local endpoint
  (the client side, ingress) teaches the cache the names of its addresses, and every
  flow gets Hubble's ``destination_names`` (names the source endpoint resolved to the
  destination IP) and ``source_names`` (names the destination endpoint resolved to the
  source IP), looked up at the flow's own time. The decoded flows then also depend on
  the responses decoded before them, in order.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ciliary import schema
from ciliary.hubble import (
    MSG_ACCESS_LOG,
    MSG_DROP,
    MSG_POLICY_VERDICT,
    MSG_TRACE,
    TRACE_FROM_ENDPOINT,
    TRACE_POINTS,
    TRACE_TO_ENDPOINT,
    VERDICTS,
    drop_reason_desc,
    icmpv4_typecode,
    rfc3339_nano,
    tcp_flags_text,
)

from .dns import RCODE_NAMES, DNSMessage, parse_dns
from .names import EndpointNameCache, EndpointNames

EVENT_TRACE = 1
EVENT_DROP = 2
DIR_INGRESS = 1
DIR_EGRESS = 2
VERDICT_FORWARDED = 1
VERDICT_DROPPED = 2
VERDICT_AUDIT = 4
EVENT_F_POLICY_VERDICT = 1 << 0  # bpf/lib/types.h: an allowed new connection's first packet
DROP_POLICY_DENY = 181
POLICY_DROP_REASONS = frozenset({133, DROP_POLICY_DENY})
PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}
DNS_OBSERVATION_SOURCE = "datapath"


# ---------------------------------------------------------------- enrichment lookups


@dataclass(frozen=True)
class IPInfo:
    """What the cluster knows about one IP (ipcache, or a Pod's status as a fallback)."""

    identity: int = 0
    namespace: str = ""
    pod: str = ""
    node: str = ""
    cluster: str = ""
    labels: tuple[str, ...] = ()  # used when the identity's labels are unknown
    workloads: tuple[tuple[str, str], ...] = ()  # (name, kind)


class Lookups(Protocol):
    def ip(self, address: str) -> IPInfo | None: ...

    def labels(self, identity: int) -> list[str] | None: ...

    def frontend(self, address: str, port: int, proto: str) -> tuple[str, str] | None:
        """(namespace, name) of the Service owning this frontend."""
        ...

    def policy(self, identity: int, rule_ref: int) -> list[schema.FlowPolicy]:
        """The policies behind ``rule_ref`` in the entries of local identity ``identity``
        (empty when unknown)."""
        ...


@dataclass
class StaticLookups:
    """Dict-backed lookups: exact IPs first, then the longest matching CIDR."""

    ips: dict[str, IPInfo] = field(default_factory=dict)
    cidrs: dict[str, IPInfo] = field(default_factory=dict)
    identities: dict[int, list[str]] = field(default_factory=dict)
    frontends: dict[tuple[str, int, str], tuple[str, str]] = field(default_factory=dict)
    policies: dict[int, schema.FlowPolicy] = field(default_factory=dict)  # rule_ref -> policy

    def ip(self, address: str) -> IPInfo | None:
        hit = self.ips.get(address)
        if hit is not None or not self.cidrs:
            return hit
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return None
        best: tuple[int, IPInfo] | None = None
        for prefix, info in self.cidrs.items():
            net = ipaddress.ip_network(prefix, strict=False)
            if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, info)
        return best[1] if best else None

    def labels(self, identity: int) -> list[str] | None:
        return self.identities.get(identity)

    def frontend(self, address: str, port: int, proto: str) -> tuple[str, str] | None:
        return self.frontends.get((address, port, proto))

    def policy(self, identity: int, rule_ref: int) -> list[schema.FlowPolicy]:
        hit = self.policies.get(rule_ref) if rule_ref else None
        return [hit] if hit is not None else []


NO_LOOKUPS = StaticLookups()


@dataclass(frozen=True)
class BatchContext:
    cluster: str
    node: str
    boot_time_ns: int = 0
    seq: int = 0
    salt: int = 0  # the batch's first event time: keeps UUIDs unique when ``seq`` repeats
    node_name: str = field(init=False, default="")
    uuid_prefix: str = field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_name", f"{self.cluster}/{self.node}")
        object.__setattr__(self, "uuid_prefix", uuid_prefix(
            f"{self.cluster}/{self.node}/{self.boot_time_ns}/{self.seq}/{self.salt}"))

    @classmethod
    def of(cls, batch: schema.RawEventBatch) -> BatchContext:
        salt = batch.events[0].ts_ns if batch.events else 0
        return cls(batch.cluster, batch.node, batch.boot_time_ns, batch.seq, salt)


# ---------------------------------------------------------------- decoding


def uuid_prefix(seed: str) -> str:
    """The first 20 hex digits of a UUIDv4 (``xxxxxxxx-xxxx-4xxx-Vxxx-``) from a seed;
    the last 12 digits are a per-flow counter (``flow_uuid``)."""
    x = hashlib.blake2b(seed.encode(), digest_size=10).hexdigest()
    variant = "89ab"[int(x[15], 16) & 3]  # RFC 4122 variant
    return f"{x[:8]}-{x[8:12]}-4{x[12:15]}-{variant}{x[16:19]}-"


def flow_uuid(ctx: BatchContext, index: int, part: int) -> str:
    """UUID of flow ``part`` of event ``index`` in the batch ``ctx`` describes."""
    return f"{ctx.uuid_prefix}{(index << 2 | part) & 0xFFFFFFFFFFFF:012x}"


def _ip_version(address: str) -> str:
    return "IPv6" if ":" in address else "IPv4"


def _tcp_flags(bits: int) -> schema.TCPFlags:
    return schema.TCPFlags(
        FIN=bool(bits & 0x01), SYN=bool(bits & 0x02), RST=bool(bits & 0x04),
        PSH=bool(bits & 0x08), ACK=bool(bits & 0x10), URG=bool(bits & 0x20),
        ECE=bool(bits & 0x40), CWR=bool(bits & 0x80),
    )


# flag byte -> (TCPFlags, Hubble summary), shared by every flow with those flags
_TCP_FLAGS: list[tuple[schema.TCPFlags, str]] = [
    (flags, "TCP Flags: " + tcp_flags_text(flags)) for flags in map(_tcp_flags, range(256))
]


def _layer4(ev: schema.RawFlowEvent) -> tuple[schema.FlowLayer4 | None, str]:
    """(l4, summary) for the packet's protocol, as Hubble's L3/L4 parser writes them."""
    if ev.proto == 6:
        flags, summary = _TCP_FLAGS[ev.tcp_flags & 0xFF]
        tcp = schema.FlowTCP(source_port=ev.sport, destination_port=ev.dport, flags=flags)
        return schema.FlowLayer4(TCP=tcp), summary
    if ev.proto == 17:
        return schema.FlowLayer4(UDP=schema.FlowUDP(source_port=ev.sport, destination_port=ev.dport)), "UDP"
    if ev.proto == 132:
        return schema.FlowLayer4(SCTP=schema.FlowUDP(source_port=ev.sport, destination_port=ev.dport)), "SCTP"
    if ev.proto == 1:
        # The datapath reports the ICMP type and code. An event without them (type 0
        # with the echo id as source port: request (id, 0)) is an echo request from an
        # executor that predates the fields.
        icmp_type, icmp_code = ev.icmp_type, ev.icmp_code
        if icmp_type == 0 and icmp_code == 0 and ev.sport and not ev.dport:
            icmp_type = 8
        return (
            schema.FlowLayer4(ICMPv4=schema.FlowICMP(type=icmp_type, code=icmp_code)),
            "ICMPv4 " + icmpv4_typecode(icmp_type, icmp_code),
        )
    return None, _ip_version(ev.saddr)


def _reserved_labels(identity: int) -> list[str]:
    name = schema.RESERVED_IDENTITIES.get(identity)
    return [f"reserved:{name}"] if name else []


ENDPOINT_CACHE_MAX = 65536


def _endpoint(
    address: str, identity: int, ep_id: int, lookups: Lookups, cluster: str
) -> schema.FlowEndpoint:
    """The flow endpoint for an address; memoised in ``lookups.endpoint_cache`` when the
    lookups offer one (``EnrichmentState`` clears it on every change it is fed)."""
    cache: dict | None = getattr(lookups, "endpoint_cache", None)
    if cache is None:
        return _make_endpoint(address, identity, ep_id, lookups, cluster)
    key = (address, identity, ep_id, cluster)
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= ENDPOINT_CACHE_MAX:
            cache.clear()
        hit = cache[key] = _make_endpoint(address, identity, ep_id, lookups, cluster)
    return hit


def _make_endpoint(
    address: str, identity: int, ep_id: int, lookups: Lookups, cluster: str
) -> schema.FlowEndpoint:
    info = lookups.ip(address)
    if identity == 0:
        identity = info.identity if info is not None and info.identity else schema.IDENTITY_WORLD
    labels = lookups.labels(identity)
    if labels is None:
        labels = list(info.labels) if info is not None and info.labels else _reserved_labels(identity)
    if info is None:
        return schema.FlowEndpoint(id=ep_id, identity=identity, labels=sorted(labels),
                                   cluster_name=cluster if ep_id else "")
    return schema.FlowEndpoint(
        id=ep_id,
        identity=identity,
        cluster_name=info.cluster or (cluster if (info.pod or ep_id) else ""),
        namespace=info.namespace,
        labels=sorted(labels),
        pod_name=info.pod,
        workloads=[schema.FlowWorkload(name=n, kind=k) for n, k in info.workloads],
    )


def _services(
    ev: schema.RawFlowEvent, lookups: Lookups
) -> tuple[schema.FlowService | None, schema.FlowService | None]:
    """(source_service, destination_service): the frontend the packet was translated
    from/to (``orig_daddr``), else a frontend it is still addressed to/from."""
    proto = PROTO_NAMES.get(ev.proto) or str(ev.proto)
    if ev.orig_daddr and ev.orig_daddr != "0.0.0.0":
        hit = lookups.frontend(ev.orig_daddr, ev.orig_dport, proto)
        if hit is None:
            return None, None
        svc = _service(hit)
        return (svc, None) if ev.is_reply else (None, svc)
    src_hit = lookups.frontend(ev.saddr, ev.sport, proto)
    dst_hit = lookups.frontend(ev.daddr, ev.dport, proto)
    return (_service(src_hit) if src_hit else None, _service(dst_hit) if dst_hit else None)


_SERVICES: dict[tuple[str, str], schema.FlowService] = {}


def _service(hit: tuple[str, str]) -> schema.FlowService:
    svc = _SERVICES.get(hit)
    if svc is None:
        if len(_SERVICES) >= ENDPOINT_CACHE_MAX:
            _SERVICES.clear()
        svc = _SERVICES[hit] = schema.FlowService(namespace=hit[0], name=hit[1])
    return svc


_EVENT_TYPES: dict[tuple[int, int], schema.FlowEventType] = {}


def _event_type(type_: int, sub_type: int = 0) -> schema.FlowEventType:
    et = _EVENT_TYPES.get((type_, sub_type))
    if et is None:
        if len(_EVENT_TYPES) >= 4096:
            _EVENT_TYPES.clear()
        et = _EVENT_TYPES[(type_, sub_type)] = schema.FlowEventType(type=type_, sub_type=sub_type)
    return et


def dns_summary(msg: DNSMessage) -> str:
    """Hubble's DNS summary: ``DNS Query example.com. A`` / ``DNS Answer "1.2.3.4" TTL: 30 (Query example.com. A)``."""
    qtypes = ",".join(msg.qtypes)
    if not msg.response:
        return f"DNS Query {msg.query} {qtypes}"
    if msg.rcode != 0:
        answer = f"RCode: {RCODE_NAMES.get(msg.rcode, str(msg.rcode))}"
    else:
        answer = '"' + ",".join(msg.ips) + '"'
    return f"DNS Answer {answer} TTL: {msg.ttl} (Query {msg.query} {qtypes})"


def _dns_layer7(msg: DNSMessage) -> schema.FlowLayer7:
    return schema.FlowLayer7(
        type="RESPONSE" if msg.response else "REQUEST",
        dns=schema.FlowDNS(
            query=msg.query,
            ips=list(msg.ips),
            ttl=msg.ttl if msg.response else 0,
            cnames=list(msg.cnames),
            observation_source=DNS_OBSERVATION_SOURCE,
            rcode=msg.rcode,
            qtypes=list(msg.qtypes),
            rrtypes=list(msg.rrtypes),
        ),
    )


def _is_dns(ev: schema.RawFlowEvent) -> bool:
    return ev.proto == 17 and bool(ev.payload) and 53 in (ev.sport, ev.dport, ev.orig_dport)


def _policy_fields(
    ev: schema.RawFlowEvent, lookups: Lookups, hook_direction: str, verdict: str
) -> dict[str, object]:
    """``policy_match_type`` and the ``*_allowed_by``/``*_denied_by`` list of a
    policy-verdict flow (Hubble correlates only allowed and explicitly denied verdicts)."""
    out: dict[str, object] = {"policy_match_type": ev.policy_match}
    if verdict == "FORWARDED":
        kind = "allowed_by"
    elif verdict == "DROPPED" and ev.drop_reason == DROP_POLICY_DENY:
        kind = "denied_by"
    else:
        return out
    if not ev.rule_ref or not hook_direction:
        return out
    local = ev.dst_identity if hook_direction == "INGRESS" else ev.src_identity
    policies = lookups.policy(local, ev.rule_ref)
    if policies:
        out[f"{hook_direction.lower()}_{kind}"] = policies
    return out


def decode_event(
    ev: schema.RawFlowEvent,
    ctx: BatchContext,
    lookups: Lookups = NO_LOOKUPS,
    index: int = 0,
    names: EndpointNameCache | None = None,
    node_names: EndpointNames | None = None,
) -> list[schema.Flow]:
    """The flows for one raw event (see the module invariants). ``node_names`` is
    ``names.node(ctx.node_name)``, passed by ``decode_batch`` so it is fetched once."""
    direction = ev.direction
    egress = direction == DIR_EGRESS
    ingress = direction == DIR_INGRESS
    cluster = ctx.cluster
    src_key = (ev.saddr, ev.src_identity, ev.ep_id if egress else 0, cluster)
    dst_key = (ev.daddr, ev.dst_identity, ev.ep_id if ingress else 0, cluster)
    cache = getattr(lookups, "endpoint_cache", None)
    if cache is not None:  # the common case, inlined: both endpoints already known
        src = cache.get(src_key) or _endpoint(*src_key[:3], lookups, cluster)
        dst = cache.get(dst_key) or _endpoint(*dst_key[:3], lookups, cluster)
    else:
        src = _endpoint(*src_key[:3], lookups, cluster)
        dst = _endpoint(*dst_key[:3], lookups, cluster)
    l4, summary = _layer4(ev)
    src_svc, dst_svc = _services(ev, lookups)
    hook_direction = "EGRESS" if egress else ("INGRESS" if ingress else "")
    conn_direction = hook_direction
    if ev.is_reply and hook_direction:
        conn_direction = "INGRESS" if egress else "EGRESS"
    common = {
        "time": rfc3339_nano(ctx.boot_time_ns + ev.ts_ns),
        "ip": schema.FlowIP(source=ev.saddr, destination=ev.daddr, ipVersion=_ip_version(ev.saddr)),
        "l4": l4,
        "source": src,
        "destination": dst,
        "node_name": ctx.node_name,
        "source_service": src_svc,
        "destination_service": dst_svc,
    }
    if names is not None:
        if node_names is None:
            node_names = names.node(ctx.node_name)
        if node_names:  # empty unless some local endpoint of this node resolved a name
            t = ctx.boot_time_ns + ev.ts_ns
            if ev.saddr in node_names:
                dst_names = names.lookup(node_names, ev.saddr, ev.daddr, t)
                if dst_names:
                    common["destination_names"] = dst_names
            if ev.daddr in node_names:
                src_names = names.lookup(node_names, ev.daddr, ev.saddr, t)
                if src_names:
                    common["source_names"] = src_names
    flow = schema.Flow
    prefix = ctx.uuid_prefix
    counter = (index << 2) & 0xFFFFFFFFFFFF

    if ev.type == EVENT_DROP or ev.verdict == VERDICT_DROPPED:
        reason = ev.drop_reason
        desc = drop_reason_desc(reason)
        flows = []
        if reason in POLICY_DROP_REASONS:
            flows.append(flow(**common, uuid=f"{prefix}{counter:012x}", flow_type="L3_L4", summary=summary,
                              verdict="DROPPED", drop_reason=reason, drop_reason_desc=desc,
                              event_type=_event_type(MSG_POLICY_VERDICT),
                              traffic_direction=hook_direction, is_reply=False,
                              **_policy_fields(ev, lookups, hook_direction, "DROPPED")))
        flows.append(flow(**common, uuid=f"{prefix}{counter | len(flows):012x}", flow_type="L3_L4",
                          summary=summary, verdict="DROPPED", drop_reason=reason, drop_reason_desc=desc,
                          event_type=_event_type(MSG_DROP, reason), traffic_direction=hook_direction))
        return flows

    flows = []
    verdict = VERDICTS.get(ev.verdict, "VERDICT_UNKNOWN")
    if ev.verdict == VERDICT_AUDIT:
        flows.append(flow(**common, uuid=f"{prefix}{counter:012x}", flow_type="L3_L4", summary=summary,
                          verdict="AUDIT", event_type=_event_type(MSG_POLICY_VERDICT),
                          traffic_direction=hook_direction, is_reply=False,
                          policy_match_type=ev.policy_match))
        verdict = "FORWARDED"
    elif ev.flags & EVENT_F_POLICY_VERDICT and ev.verdict == VERDICT_FORWARDED:
        flows.append(flow(**common, uuid=f"{prefix}{counter:012x}", flow_type="L3_L4", summary=summary,
                          verdict="FORWARDED", event_type=_event_type(MSG_POLICY_VERDICT),
                          traffic_direction=hook_direction, is_reply=False,
                          **_policy_fields(ev, lookups, hook_direction, "FORWARDED")))
    point = TRACE_FROM_ENDPOINT if egress else TRACE_TO_ENDPOINT
    is_reply = ev.is_reply
    flows.append(flow(**common, uuid=f"{prefix}{counter | len(flows):012x}", flow_type="L3_L4",
                      summary=summary, verdict=verdict, event_type=_event_type(MSG_TRACE, point),
                      trace_observation_point=TRACE_POINTS[point][1], traffic_direction=conn_direction,
                      is_reply=is_reply, reply=is_reply,
                      interface={"index": ev.ifindex} if ev.ifindex else {}))

    if ev.proto == 17 and ev.payload and _is_dns(ev):
        msg = parse_dns(ev.payload)
        client_side = (msg is not None) and (
            (not msg.response and egress) or (msg.response and ingress)
        )
        if msg is not None and client_side:
            if names is not None and msg.response:
                names.learn(ctx.node_name, ev.daddr, msg, ctx.boot_time_ns + ev.ts_ns)
            flows.append(flow(**common, uuid=f"{prefix}{counter | len(flows):012x}", flow_type="L7",
                              verdict=verdict, l7=_dns_layer7(msg), event_type=_event_type(MSG_ACCESS_LOG),
                              traffic_direction=conn_direction, is_reply=msg.response, reply=msg.response,
                              summary=dns_summary(msg)))
    return flows


@dataclass
class DecodeResult:
    flows: list[schema.Flow]
    undecodable: int = 0
    times: list[int] = field(default_factory=list)  # unix ns of each flow (same order)


def decode_batch(
    batch: schema.RawEventBatch, lookups: Lookups = NO_LOOKUPS, names: EndpointNameCache | None = None
) -> DecodeResult:
    """Every flow of a batch in event order; an event that fails to decode is counted.
    With ``names``, DNS responses feed the cache and flows carry the names (see above)."""
    ctx = BatchContext.of(batch)
    node_names = names.node(ctx.node_name) if names is not None else None
    out: list[schema.Flow] = []
    times: list[int] = []
    bad = 0
    boot = ctx.boot_time_ns
    for i, ev in enumerate(batch.events):
        try:
            flows = decode_event(ev, ctx, lookups, i, names, node_names)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError):
            bad += 1
            continue
        out += flows
        t = boot + ev.ts_ns
        if len(flows) == 1:
            times.append(t)
        else:
            times += [t] * len(flows)
    return DecodeResult(out, bad, times)


def decode_raw_batch(data: bytes, lookups: Lookups = NO_LOOKUPS) -> DecodeResult | None:
    """Decode the msgpack of a ``RawEventBatch``; ``None`` if the payload is not one."""
    import msgspec

    try:
        batch = schema.decode(data, schema.RawEventBatch)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return decode_batch(batch, lookups)


def flows_of(batches: Iterable[schema.RawEventBatch], lookups: Lookups = NO_LOOKUPS) -> list[schema.Flow]:
    return [f for b in batches for f in decode_batch(b, lookups).flows]
