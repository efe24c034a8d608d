"""Hubble's flow metrics, counted from flows and rendered as Prometheus text (pure).

Invariants:
- Names and label sets are Hubble's: ``hubble_flows_processed_total{type,subtype,verdict}``,
  ``hubble_drop_total{reason,protocol}``, ``hubble_dns_queries_total`` /
  ``hubble_dns_responses_total{rcode,qtypes,ips_returned}``,
  ``hubble_dns_response_types_total{type,qtypes}``, ``hubble_tcp_flags_total{flag,family}``,
  ``hubble_lost_events_total{source}``, ``hubble_policy_verdicts_total{action,direction,match}``
  (Hubble's ``policy`` metric: every policy-verdict flow except those from the host (1) or
  to/from health (4); lower-case verdict, direction and match type as Hubble writes them).
- Counters only grow; ``render`` is the Prometheus text exposition format 0.0.4 with
  label names sorted and values escaped, families and series in a stable order.
"""

from __future__ import annotations

from collections.abc import Iterable

from ciliary import schema
from ciliary.hubble import (
    MSG_ACCESS_LOG,
    MSG_DROP,
    MSG_POLICY_VERDICT,
    MSG_TRACE,
    POLICY_MATCH_TYPES,
    TRACE_POINTS,
)

from .dns import RCODE_NAMES

FAMILIES: dict[str, str] = {
    "hubble_flows_processed_total": "Total number of flows processed",
    "hubble_drop_total": "Number of drops",
    "hubble_dns_queries_total": "Number of DNS queries observed",
    "hubble_dns_responses_total": "Number of DNS responses observed",
    "hubble_dns_response_types_total": "Number of DNS response types",
    "hubble_tcp_flags_total": "TCP flag occurrences",
    "hubble_lost_events_total": "Number of lost events",
    "hubble_policy_verdicts_total": "Total number of Cilium network policy verdicts",
}

LOST_RING_BUFFER = "perf_event_ring_buffer"
LOST_DECODE = "decode"
LOST_BUS = "bus"  # events of raw batches the bus dropped while the service ran (losses.py)
LOST_OUTAGE = "observer_events_queue"  # events published while the flows service was not running
LOST_PUBLISH = "publish"  # flows too large for one bus message (never published)


def flow_protocol(flow: schema.Flow) -> str:
    """Hubble's ``v1.FlowProtocol``: DNS for DNS L7 flows, else the L4 protocol."""
    if flow.l7 is not None and flow.l7.dns is not None:
        return "DNS"
    if flow.l4 is not None:
        for name in ("TCP", "UDP", "ICMPv4", "ICMPv6", "SCTP"):
            if getattr(flow.l4, name) is not None:
                return name
    if flow.ip is not None:
        return flow.ip.ipVersion or "IP"
    return "Unknown flow"


def _kind(et_type: int, et_sub: int, dns: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """The ``subtype`` and ``type`` labels of ``hubble_flows_processed_total``."""
    subtype = ""
    if et_type == MSG_ACCESS_LOG:
        type_name = "L7"
        if dns:
            subtype = "DNS"
    elif et_type == MSG_DROP:
        type_name = "Drop"
    elif et_type == MSG_TRACE:
        type_name = "Trace"
        subtype = TRACE_POINTS.get(et_sub, (str(et_sub), ""))[0]
    elif et_type == MSG_POLICY_VERDICT:
        type_name = "PolicyVerdict"
    else:
        type_name = "Unknown"
        subtype = str(et_type)
    return ("subtype", subtype), ("type", type_name)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class FlowMetrics:
    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {n: {} for n in FAMILIES}
        # (event type, sub type, is DNS) -> (("subtype", …), ("type", …)) label pairs
        self._kinds: dict[tuple[int, int, bool], tuple[tuple[str, str], tuple[str, str]]] = {}

    def inc(self, name: str, labels: dict[str, str], by: float = 1) -> None:
        key = tuple(sorted(labels.items()))
        family = self.counters[name]
        family[key] = family.get(key, 0) + by

    def value(self, name: str, **labels: str) -> float:
        return self.counters[name].get(tuple(sorted(labels.items())), 0)

    def lost(self, source: str, count: int) -> None:
        if count > 0:
            self.inc("hubble_lost_events_total", {"source": source}, count)

    def process(self, flow: schema.Flow) -> None:
        self.process_many((flow,))

    def process_many(self, flows: Iterable[schema.Flow]) -> None:
        """Count every flow (``hubble_flows_processed_total`` and the families below)."""
        processed = self.counters["hubble_flows_processed_total"]
        tcp = self.counters["hubble_tcp_flags_total"]
        kinds = self._kinds
        for flow in flows:
            et = flow.event_type
            et_type, et_sub = (et.type, et.sub_type) if et is not None else (0, 0)
            l7 = flow.l7
            dns = l7.dns if l7 is not None else None
            kind = kinds.get((et_type, et_sub, dns is not None))
            if kind is None:
                kind = kinds[(et_type, et_sub, dns is not None)] = _kind(et_type, et_sub, dns is not None)
            # label tuples built already sorted (subtype < type < verdict): no dict, no sort per flow
            key = (kind[0], kind[1], ("verdict", flow.verdict))
            processed[key] = processed.get(key, 0) + 1

            if et_type == MSG_DROP:
                self.inc("hubble_drop_total",
                         {"reason": flow.drop_reason_desc, "protocol": flow_protocol(flow)})
            elif et_type == MSG_POLICY_VERDICT:
                self._policy_verdict(flow)

            if dns is not None:
                qtypes = ",".join(dns.qtypes)
                if l7.type == "REQUEST":  # type: ignore[union-attr]
                    self.inc("hubble_dns_queries_total", {"rcode": "", "qtypes": qtypes, "ips_returned": ""})
                elif l7.type == "RESPONSE":  # type: ignore[union-attr]
                    self.inc("hubble_dns_responses_total", {
                        "rcode": RCODE_NAMES.get(dns.rcode, str(dns.rcode)),
                        "qtypes": qtypes,
                        "ips_returned": str(len(dns.ips)),
                    })
                    for rrtype in dns.rrtypes:
                        self.inc("hubble_dns_response_types_total", {"type": rrtype, "qtypes": qtypes})

            if et_type == MSG_TRACE and flow.verdict == "FORWARDED":
                l4 = flow.l4
                if l4 is None or l4.TCP is None or l4.TCP.flags is None:
                    continue
                flags = l4.TCP.flags
                ipv = flow.ip.ipVersion if flow.ip is not None else ""
                for on, name in ((flags.SYN, "SYN-ACK" if flags.ACK else "SYN"), (flags.FIN, "FIN"),
                                 (flags.RST, "RST")):
                    if on:
                        key = (("family", ipv), ("flag", name))
                        tcp[key] = tcp.get(key, 0) + 1

    def _policy_verdict(self, flow: schema.Flow) -> None:
        src = flow.source.identity if flow.source is not None else 0
        dst = flow.destination.identity if flow.destination is not None else 0
        if src == schema.IDENTITY_HOST or schema.IDENTITY_HEALTH in (src, dst):
            return
        match = POLICY_MATCH_TYPES.get(flow.policy_match_type, "unknown").lower()
        direction = (flow.traffic_direction or "TRAFFIC_DIRECTION_UNKNOWN").lower()
        self.inc("hubble_policy_verdicts_total",
                 {"action": (flow.verdict or "VERDICT_UNKNOWN").lower(), "direction": direction,
                  "match": match})

    def render(self) -> str:
        lines: list[str] = []
        for name, help_text in FAMILIES.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            for key in sorted(self.counters[name]):
                value = self.counters[name][key]
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                text = str(int(value)) if float(value).is_integer() else repr(value)
                lines.append(f"{name}{{{labels}}} {text}" if labels else f"{name} {text}")
        return "\n".join(lines) + "\n"
