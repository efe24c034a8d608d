"""Raw datapath events -> Hubble flows (pure).

Invariants:
- ``decode_event`` is a pure function of the raw event, its batch context and the
  enrichment lookups; the same input gives the same flows (UUIDs are derived from the
  event, not random).
- One raw event gives the flows Cilium's monitor would report for the same packet:
  a drop gives a ``drop`` flow, preceded by a ``policy-verdict`` (DENIED) flow when the
  reason is a policy (133 POLICY_DENIED, 181 POLICY_DENY); an AUDIT verdict gives a
  ``policy-verdict`` (AUDITED) flow then the ``trace`` (FORWARDED) flow; every other
  event gives one ``trace`` flow; a DNS message seen on the client side (request leaving
  the pod, response entering it) adds an L7 ``dns-request``/``dns-response`` flow.
- Every flow carries ``node_name`` = ``<cluster>/<node>``; endpoints carry identity,
  labels and, when known, cluster, namespace, pod and workloads; an IP nobody knows
  resolves to the ``world`` identity (2) with labels ``["reserved:world"]``.
- A DNS payload that does not parse never fails the event: the flow just has no L7 part.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ciliary import schema
from ciliary.flowrender import (
    IDENTITY_WORLD,
    MSG_ACCESS_LOG,
    MSG_DROP,
    MSG_POLICY_VERDICT,
    MSG_TRACE,
    RESERVED_IDENTITIES,
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

EVENT_TRACE = 1
EVENT_DROP = 2
DIR_INGRESS = 1
DIR_EGRESS = 2
VERDICT_FORWARDED = 1
VERDICT_DROPPED = 2
VERDICT_AUDIT = 4
CT_RELATED = 3
POLICY_DROP_REASONS = frozenset({133, 181})
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


@dataclass
class StaticLookups:
    """Dict-backed lookups: exact IPs first, then the longest matching CIDR."""

    ips: dict[str, IPInfo] = field(default_factory=dict)
    cidrs: dict[str, IPInfo] = field(default_factory=dict)
    identities: dict[int, list[str]] = field(default_factory=dict)
    frontends: dict[tuple[str, int, str], tuple[str, str]] = field(default_factory=dict)

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


NO_LOOKUPS = StaticLookups()


@dataclass(frozen=True)
class BatchContext:
    cluster: str
    node: str
    boot_time_ns: int = 0
    seq: int = 0

    @classmethod
    def of(cls, batch: schema.RawEventBatch) -> BatchContext:
        return cls(batch.cluster, batch.node, batch.boot_time_ns, batch.seq)


# ---------------------------------------------------------------- decoding


def _flow_uuid(ctx: BatchContext, index: int, ev: schema.RawFlowEvent, part: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(
        f"{ctx.cluster}/{ctx.node}/{ctx.boot_time_ns}/{ctx.seq}/{index}/{part}/{ev.ts_ns}/"
        f"{ev.saddr}/{ev.daddr}/{ev.sport}/{ev.dport}/{ev.proto}/{ev.type}".encode()
    )
    raw = bytearray(h.digest())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4 layout
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"  # str(uuid.UUID(bytes=raw))


def _ip_version(address: str) -> str:
    return "IPv6" if ":" in address else "IPv4"


def _tcp_flags(bits: int) -> schema.TCPFlags:
    return schema.TCPFlags(
        FIN=bool(bits & 0x01), SYN=bool(bits & 0x02), RST=bool(bits & 0x04),
        PSH=bool(bits & 0x08), ACK=bool(bits & 0x10), URG=bool(bits & 0x20),
        ECE=bool(bits & 0x40), CWR=bool(bits & 0x80),
    )


def _layer4(ev: schema.RawFlowEvent) -> tuple[schema.FlowLayer4 | None, str]:
    """(l4, summary) for the packet's protocol, as Hubble's L3/L4 parser writes them."""
    if ev.proto == 6:
        flags = _tcp_flags(ev.tcp_flags)
        tcp = schema.FlowTCP(source_port=ev.sport, destination_port=ev.dport, flags=flags)
        return schema.FlowLayer4(TCP=tcp), "TCP Flags: " + tcp_flags_text(flags)
    if ev.proto == 17:
        return schema.FlowLayer4(UDP=schema.FlowUDP(source_port=ev.sport, destination_port=ev.dport)), "UDP"
    if ev.proto == 132:
        return schema.FlowLayer4(SCTP=schema.FlowUDP(source_port=ev.sport, destination_port=ev.dport)), "SCTP"
    if ev.proto == 1:
        # The datapath keeps the echo id as a port: request (id, 0), reply (0, id).
        if ev.ct_state == CT_RELATED:
            return schema.FlowLayer4(ICMPv4=schema.FlowICMP()), "ICMPv4"
        if ev.sport and not ev.dport:
            icmp_type = 8
        elif ev.dport and not ev.sport:
            icmp_type = 0
        else:
            icmp_type = 0 if ev.is_reply else 8
        return (
            schema.FlowLayer4(ICMPv4=schema.FlowICMP(type=icmp_type, code=0)),
            "ICMPv4 " + icmpv4_typecode(icmp_type, 0),
        )
    return None, _ip_version(ev.saddr)


def _reserved_labels(identity: int) -> list[str]:
    name = RESERVED_IDENTITIES.get(identity)
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
        identity = info.identity if info is not None and info.identity else IDENTITY_WORLD
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
    proto = PROTO_NAMES.get(ev.proto, str(ev.proto))
    if ev.orig_daddr and ev.orig_daddr != "0.0.0.0":
        hit = lookups.frontend(ev.orig_daddr, ev.orig_dport, proto)
        if hit is None:
            return None, None
        svc = schema.FlowService(namespace=hit[0], name=hit[1])
        return (svc, None) if ev.is_reply else (None, svc)
    src_hit = lookups.frontend(ev.saddr, ev.sport, proto)
    dst_hit = lookups.frontend(ev.daddr, ev.dport, proto)
    return (
        schema.FlowService(namespace=src_hit[0], name=src_hit[1]) if src_hit else None,
        schema.FlowService(namespace=dst_hit[0], name=dst_hit[1]) if dst_hit else None,
    )


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


def decode_event(
    ev: schema.RawFlowEvent,
    ctx: BatchContext,
    lookups: Lookups = NO_LOOKUPS,
    index: int = 0,
) -> list[schema.Flow]:
    """The flows for one raw event (see the module invariants)."""
    time = rfc3339_nano(ctx.boot_time_ns + ev.ts_ns)
    node_name = f"{ctx.cluster}/{ctx.node}"
    egress = ev.direction == DIR_EGRESS
    src = _endpoint(ev.saddr, ev.src_identity, ev.ep_id if egress else 0, lookups, ctx.cluster)
    dst = _endpoint(ev.daddr, ev.dst_identity, ev.ep_id if ev.direction == DIR_INGRESS else 0,
                    lookups, ctx.cluster)
    l4, summary = _layer4(ev)
    src_svc, dst_svc = _services(ev, lookups)
    hook_direction = "EGRESS" if egress else ("INGRESS" if ev.direction == DIR_INGRESS else "")
    conn_direction = hook_direction
    if ev.is_reply and hook_direction:
        conn_direction = "INGRESS" if egress else "EGRESS"
    ip = schema.FlowIP(source=ev.saddr, destination=ev.daddr, ipVersion=_ip_version(ev.saddr))
    base = schema.Flow(
        time=time,
        ip=ip,
        l4=l4,
        source=src,
        destination=dst,
        flow_type="L3_L4",
        node_name=node_name,
        source_service=src_svc,
        destination_service=dst_svc,
        summary=summary,
    )
    flows: list[schema.Flow] = []

    def add(**changes: object) -> None:
        part = len(flows)
        flows.append(_replace(base, uuid=_flow_uuid(ctx, index, ev, part), **changes))

    if ev.type == EVENT_DROP or ev.verdict == VERDICT_DROPPED:
        reason = ev.drop_reason
        if reason in POLICY_DROP_REASONS:
            add(verdict="DROPPED", drop_reason=reason, drop_reason_desc=drop_reason_desc(reason),
                event_type=schema.FlowEventType(type=MSG_POLICY_VERDICT),
                traffic_direction=hook_direction, is_reply=False)
        add(verdict="DROPPED", drop_reason=reason, drop_reason_desc=drop_reason_desc(reason),
            event_type=schema.FlowEventType(type=MSG_DROP, sub_type=reason),
            traffic_direction=hook_direction)
        return flows

    verdict = VERDICTS.get(ev.verdict, "VERDICT_UNKNOWN")
    if ev.verdict == VERDICT_AUDIT:
        add(verdict="AUDIT", event_type=schema.FlowEventType(type=MSG_POLICY_VERDICT),
            traffic_direction=hook_direction, is_reply=False)
        verdict = "FORWARDED"
    point = TRACE_FROM_ENDPOINT if egress else TRACE_TO_ENDPOINT
    add(verdict=verdict, event_type=schema.FlowEventType(type=MSG_TRACE, sub_type=point),
        trace_observation_point=TRACE_POINTS[point][1], traffic_direction=conn_direction,
        is_reply=ev.is_reply, reply=ev.is_reply,
        interface={"index": ev.ifindex} if ev.ifindex else {})

    if _is_dns(ev):
        msg = parse_dns(ev.payload)
        client_side = (msg is not None) and (
            (not msg.response and egress) or (msg.response and ev.direction == DIR_INGRESS)
        )
        if msg is not None and client_side:
            add(verdict=verdict, flow_type="L7", l7=_dns_layer7(msg),
                event_type=schema.FlowEventType(type=MSG_ACCESS_LOG),
                traffic_direction=conn_direction, is_reply=msg.response, reply=msg.response,
                summary=dns_summary(msg))
    return flows


def _replace(flow: schema.Flow, **changes: object) -> schema.Flow:
    import msgspec

    return msgspec.structs.replace(flow, **changes)


@dataclass
class DecodeResult:
    flows: list[schema.Flow]
    undecodable: int = 0
    times: list[int] = field(default_factory=list)  # unix ns of each flow (same order)


def decode_batch(
    batch: schema.RawEventBatch, lookups: Lookups = NO_LOOKUPS
) -> DecodeResult:
    """Every flow of a batch in event order; an event that fails to decode is counted."""
    ctx = BatchContext.of(batch)
    out: list[schema.Flow] = []
    times: list[int] = []
    bad = 0
    for i, ev in enumerate(batch.events):
        try:
            flows = decode_event(ev, ctx, lookups, i)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError):
            bad += 1
            continue
        out.extend(flows)
        times.extend([ctx.boot_time_ns + ev.ts_ns] * len(flows))
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
