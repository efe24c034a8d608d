"""``ciliary diagnose``: the fixed debug order walked over recorded evidence (pure).

Invariants:
- The order is the seed's: network first, then policy, then L7, then the application:
  1. DNS (only when the destination was given as a name): a lookup answered with an
     error (NXDOMAIN, SERVFAIL, ...) or never answered → ``dns``, naming the server;
  2. no flow at all between source and destination → ``no-flow``;
  3. a dropped flow → ``policy`` when the datapath's reason is a policy denial (naming
     the policy that denied, or the missing allow rule, with the ``policy trace``
     answer), else ``network`` with the drop reason;
  4. flows forwarded but a sidecar pod's request bypassed its Envoy → ``sidecar-bypass``:
     socket-LB translating in the pod (known from the node, or seen as an outbound span
     whose upstream is a backend rather than one of the Service's ClusterIPs), or no span
     at all (no redirection);
  5. an Envoy span with a 5xx, a response flag (UF, UH, URX, NR, UT, ...) or an error
     → ``l7`` with status, flags, upstream and retries (from the source's outbound span
     when there is one: it names the upstream as the caller addressed it);
  6. otherwise ``healthy``.
- The first layer at fault wins; the answer always carries its evidence lines and the
  counts it looked at, so an empty input is reported as such, never guessed around.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ciliary import schema
from ciliary.dnswire import RCODE_MNEMONICS

LAYER_DNS = "dns"
LAYER_NO_FLOW = "no-flow"
LAYER_POLICY = "policy"
LAYER_NETWORK = "network"
LAYER_SIDECAR = "sidecar-bypass"
LAYER_L7 = "l7"
LAYER_HEALTHY = "healthy"
LAYERS = (LAYER_DNS, LAYER_NO_FLOW, LAYER_POLICY, LAYER_NETWORK, LAYER_SIDECAR, LAYER_L7, LAYER_HEALTHY)

DNS_RCODES = RCODE_MNEMONICS
POLICY_DROPS = {"POLICY_DENIED", "POLICY_DENY", "AUTH_REQUIRED"}
FLAG_MEANINGS = {
    "UF": "upstream connection failure", "UH": "no healthy upstream", "URX": "retry limit exceeded",
    "NR": "no route", "UT": "upstream request timeout", "UC": "upstream connection termination",
    "UO": "upstream overflow (circuit breaker)", "DC": "downstream connection termination",
    "LR": "connection local reset", "UR": "upstream remote reset",
}


@dataclass(frozen=True)
class Evidence:
    source: str  # as given: namespace/pod
    destination: str  # namespace/pod, namespace/service, an IP or a DNS name
    port: int = 0
    protocol: str = "TCP"
    dns_name: str = ""  # the destination, when it is a DNS name
    dns_flows: list[schema.Flow] = field(default_factory=list)  # the source's lookups of dns_name
    flows: list[schema.Flow] = field(default_factory=list)  # source -> destination, either direction
    spans: list[schema.L7Span] = field(default_factory=list)  # the sidecars' spans of source -> destination
    policy_trace: schema.PolicyTraceReply | None = None
    sidecar: bool = False  # the source or destination pod runs an Envoy sidecar
    socket_lb_in_pods: bool = False  # socket-LB translates in pod namespaces on the source's node
    service_ips: list[str] = field(default_factory=list)  # DST's ClusterIPs, when DST is a Service


@dataclass(frozen=True)
class Diagnosis:
    layer: str
    summary: str
    evidence: list[str]
    looked_at: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "summary": self.summary, "evidence": self.evidence,
                "looked_at": self.looked_at, "details": self.details}


def _flow_line(flow: schema.Flow) -> str:
    ip = flow.ip or schema.FlowIP()
    l4 = flow.l4.TCP or flow.l4.UDP if flow.l4 is not None else None
    sport = f":{l4.source_port}" if l4 else ""
    dport = f":{l4.destination_port}" if l4 else ""
    reason = f" {flow.drop_reason_desc}" if flow.drop_reason_desc else ""
    service = ""
    if flow.destination_service is not None and flow.destination_service.name:
        service = f" (service {flow.destination_service.namespace}/{flow.destination_service.name})"
    return f"{flow.time} {ip.source}{sport} -> {ip.destination}{dport}{service} {flow.verdict}{reason} on {flow.node_name}"


def _policy_names(flows: list[schema.Flow]) -> list[str]:
    return sorted({f"{p.kind or 'policy'} {p.namespace}/{p.name}" if p.namespace else f"{p.kind or 'policy'} {p.name}"
                   for f in flows for p in (*f.egress_denied_by, *f.ingress_denied_by)})


def _trace_lines(reply: schema.PolicyTraceReply | None) -> list[str]:
    if reply is None or not reply.ok:
        return [f"policy trace: {reply.error if reply else 'not available'}"]
    lines = []
    for step in (reply.egress, reply.ingress):
        if step is None:
            continue
        rules = f": {', '.join(step.rules)}" if step.rules else ""
        lines.append(f"policy trace {step.direction}: {step.verdict.upper()} ({step.reason}){rules}")
    lines.append(f"policy trace final verdict: {reply.verdict.upper()}")
    return lines


def _span_problem(span: schema.L7Span) -> bool:
    return span.status_code >= 500 or bool(span.response_flags) or span.error or span.status_code == 0


def _dns(ev: Evidence) -> Diagnosis | None:
    if not ev.dns_name:
        return None
    answers = [f for f in ev.dns_flows if f.l7 is not None and f.l7.dns is not None and f.l7.type == "RESPONSE"]
    queries = [f for f in ev.dns_flows if f.l7 is not None and f.l7.dns is not None and f.l7.type == "REQUEST"]
    looked = {"dns_queries": len(queries), "dns_responses": len(answers)}
    failed = [f for f in answers if f.l7 and f.l7.dns and f.l7.dns.rcode != 0]
    ok = [f for f in answers if f.l7 and f.l7.dns and f.l7.dns.rcode == 0 and f.l7.dns.ips]
    if ok:
        return None
    if failed:
        last = failed[-1]
        rcode = DNS_RCODES.get(last.l7.dns.rcode, str(last.l7.dns.rcode))  # type: ignore[union-attr]
        server = last.ip.source if last.ip else "?"
        return Diagnosis(LAYER_DNS, f"DNS lookup of {ev.dns_name} failed: {rcode} from server {server}",
                         [_flow_line(f) + f" {DNS_RCODES.get(f.l7.dns.rcode, f.l7.dns.rcode)}"  # type: ignore[union-attr]
                          for f in failed[-5:]], looked, {"rcode": rcode, "server": server})
    if queries:
        server = queries[-1].ip.destination if queries[-1].ip else "?"
        return Diagnosis(LAYER_DNS, f"DNS lookup of {ev.dns_name} was never answered (timeout) by server {server}",
                         [_flow_line(f) for f in queries[-5:]], looked, {"rcode": "TIMEOUT", "server": server})
    return Diagnosis(LAYER_DNS, f"{ev.dns_name} does not resolve and the source made no DNS lookup of it",
                     [], looked, {"rcode": "", "server": ""})


def diagnose(ev: Evidence) -> Diagnosis:
    looked = {"flows": len(ev.flows), "spans": len(ev.spans), "dns_flows": len(ev.dns_flows)}
    target = f"{ev.source} -> {ev.destination}{f' port {ev.port}/{ev.protocol}' if ev.port else ''}"
    found = _dns(ev)
    if found is not None:
        return Diagnosis(found.layer, found.summary, found.evidence, {**looked, **found.looked_at}, found.details)
    if not ev.flows:
        return Diagnosis(LAYER_NO_FLOW, f"no flow at all for {target}: the packets never reached the datapath "
                         "(no route, wrong address or port, or the client never sent)", [], looked)
    dropped = [f for f in ev.flows if f.verdict == "DROPPED"]
    forwarded = [f for f in ev.flows if f.verdict == "FORWARDED"]
    if dropped:
        policy_drops = [f for f in dropped if f.drop_reason_desc in POLICY_DROPS]
        if policy_drops:
            names = _policy_names(policy_drops)
            who = f"denied by {', '.join(names)}" if names else "no policy rule allows it (default deny)"
            last = policy_drops[-1]
            details = {"policies": names, "drops": len(policy_drops),
                       "source_identity": last.source.identity if last.source else 0,
                       "destination_identity": last.destination.identity if last.destination else 0}
            if ev.policy_trace is not None:
                details["policy_trace"] = schema.msgspec.to_builtins(ev.policy_trace)
            return Diagnosis(LAYER_POLICY, f"{target} is dropped by policy: {who}",
                             [_flow_line(f) for f in policy_drops[-5:]] + _trace_lines(ev.policy_trace)
                             + [f"identities: {details['source_identity']} -> {details['destination_identity']}"],
                             looked, details)
        if not forwarded:
            reasons = sorted({f.drop_reason_desc or str(f.drop_reason) for f in dropped})
            return Diagnosis(LAYER_NETWORK, f"{target} is dropped by the datapath: {', '.join(reasons)}",
                             [_flow_line(f) for f in dropped[-5:]], looked, {"drop_reasons": reasons})
    outbound = [s for s in ev.spans if s.direction == "outbound"]
    translated = [s for s in outbound if ev.service_ips and s.upstream_address
                  and s.upstream_address.rpartition(":")[0] not in ev.service_ips]
    if ev.sidecar and (ev.socket_lb_in_pods or translated):
        seen = sorted({s.upstream_address for s in translated})
        why = ("socket-LB translates the Service address inside the pod namespace, before Envoy: "
               + (f"Envoy saw the backend {', '.join(seen)} instead of the ClusterIP"
                  if seen else "Envoy sees backends, never the ClusterIP"))
        lines = [f"span {s.trace_id}/{s.span_id} outbound {s.canonical_service or s.service}: upstream "
                 f"{s.upstream_address} (ClusterIPs {', '.join(ev.service_ips) or '-'})" for s in translated[-3:]]
        return Diagnosis(LAYER_SIDECAR, f"{target} bypasses the sidecar's view of the Service: {why}",
                         lines + [_flow_line(f) for f in forwarded[-3:]], looked,
                         {"socket_lb_in_pods": ev.socket_lb_in_pods, "upstreams": seen})
    if ev.sidecar and not ev.spans:
        return Diagnosis(LAYER_SIDECAR, f"{target} never reached the sidecar: no redirection into the "
                         "sidecar (or the sidecar did not export)",
                         [_flow_line(f) for f in forwarded[-5:]], looked,
                         {"socket_lb_in_pods": ev.socket_lb_in_pods})
    bad = [s for s in ev.spans if _span_problem(s)]
    if bad:
        # the caller's sidecar names the upstream as the source sees it (the Service)
        last = next((s for s in reversed(bad) if s.direction == "outbound"), bad[-1])
        flags = [f for f in last.response_flags.split(",") if f]
        attempts = last.attributes.get("upstream.attempts", "")
        retries = int(attempts) - 1 if attempts.isdigit() and int(attempts) > 0 else 0
        upstream = last.upstream_address or last.upstream_cluster or "?"
        meaning = "; ".join(FLAG_MEANINGS.get(f, f) for f in flags)
        summary = (f"{target} reached L7 and failed: status {last.status_code or 'none'}"
                   f"{f', flags {last.response_flags} ({meaning})' if flags else ''}, upstream {upstream}"
                   f"{f', {retries} retries' if retries else ''}")
        lines = [f"span {s.trace_id}/{s.span_id} {s.direction or s.kind} {s.canonical_service or s.service}: "
                 f"status {s.status_code} flags {s.response_flags or '-'} upstream {s.upstream_address or '-'} "
                 f"({s.upstream_cluster or '-'}) verdict {s.verdict or '-'}" for s in bad[-5:]]
        return Diagnosis(LAYER_L7, summary, lines, looked, {
            "status": last.status_code, "response_flags": flags, "upstream": upstream,
            "upstream_cluster": last.upstream_cluster, "trace_id": last.trace_id, "retries": retries,
            "failed_spans": len(bad)})
    lines = [_flow_line(f) for f in forwarded[-3:]]
    lines += [f"span {s.trace_id} status {s.status_code}" for s in ev.spans[-3:]]
    return Diagnosis(LAYER_HEALTHY, f"{target} looks healthy: {len(forwarded)} forwarded flows"
                     f"{f', {len(ev.spans)} L7 spans without errors' if ev.spans else ''}", lines, looked)
