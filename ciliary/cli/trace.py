"""``ciliary trace show TRACE_ID``: one request's timeline across the layers.

Invariants:
- The timeline merges, oldest first: the client's DNS lookups in the minute before the
  request, the L3/L4 flows joined to the trace (verdict, policy, service translation,
  node) and the sidecars' Envoy spans (route, upstream, status, flags, retries).
- ``-o json`` prints the same rows as data (with the spans and flows in full); a trace
  the flows service does not hold is an error naming the trace id.
- The CLI never imports a service package; it reads over NATS (``l7data``).
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from ciliary import output, schema
from ciliary.bus import Bus
from ciliary.cli import common, l7data
from ciliary.hubble import flow_time_ns, rfc3339_nano

DNS_WINDOW_NS = 60 * 10**9


def _flow_row(flow: schema.Flow, layer: str) -> dict[str, Any]:
    ip = flow.ip or schema.FlowIP()
    l4 = (flow.l4.TCP or flow.l4.UDP) if flow.l4 is not None else None
    src = f"{ip.source}:{l4.source_port}" if l4 else ip.source
    dst = f"{ip.destination}:{l4.destination_port}" if l4 else ip.destination
    detail = []
    if flow.l7 is not None and flow.l7.dns is not None:
        dns = flow.l7.dns
        detail.append(f"{flow.l7.type.lower()} {dns.query} rcode={dns.rcode} {','.join(dns.ips)}".strip())
    if flow.destination_service is not None and flow.destination_service.name:
        detail.append(f"service {flow.destination_service.namespace}/{flow.destination_service.name}")
    policies = [f"{p.namespace}/{p.name}" for p in (*flow.egress_allowed_by, *flow.ingress_allowed_by,
                                                     *flow.egress_denied_by, *flow.ingress_denied_by)]
    if policies:
        detail.append("policy " + ",".join(policies))
    if flow.drop_reason_desc:
        detail.append(flow.drop_reason_desc)
    if flow.trace_observation_point:
        detail.append(flow.trace_observation_point)
    return {"time_ns": flow_time_ns(flow), "layer": layer, "what": f"{src} -> {dst}",
            "verdict": flow.verdict, "node": flow.node_name, "detail": " ".join(detail),
            "flow": msgspec.to_builtins(flow)}


def _span_row(span: schema.L7Span) -> dict[str, Any]:
    who = f"{span.namespace}/{span.pod}" if span.pod else span.service
    retries = span.attributes.get("upstream.attempts", "")
    detail = [f"{span.method} {span.url}".strip(), f"status={span.status_code}",
              f"flags={span.response_flags or '-'}", f"upstream={span.upstream_address or '-'}",
              f"cluster={span.upstream_cluster or '-'}",
              f"{(span.end_ns - span.start_ns) / 1e6:.1f}ms"]
    if retries:
        detail.append(f"attempts={retries}")
    return {"time_ns": span.start_ns, "layer": f"L7 {span.direction or span.kind.lower()}",
            "what": f"{who} span {span.span_id}", "verdict": span.verdict or "-", "node": span.node,
            "detail": " ".join(d for d in detail if d), "span": msgspec.to_builtins(span)}


def cmd_show(args: argparse.Namespace) -> int:
    trace_id = args.trace_id.strip().lower()
    if len(trace_id) != 32 or any(c not in "0123456789abcdef" for c in trace_id):
        raise common.CliError(f"trace id {args.trace_id!r}: expected 32 hex digits")

    async def work(bus: Bus) -> list[dict[str, Any]]:
        reply = await l7data.spans(bus, schema.L7Query(trace_id=trace_id), timeout=args.timeout)
        if not reply.spans:
            raise common.CliError(f"trace {trace_id}: no spans held by the flows service "
                                  "(not traced by a sidecar, or older than the L7 store)")
        rows = [_span_row(s) for s in reply.spans]
        rows += [_flow_row(schema.decode(f, schema.Flow), "L4") for f in reply.flows]
        first = min(s.start_ns for s in reply.spans)
        clients = {f"{s.namespace}/{s.pod}" for s in reply.spans if s.direction == "outbound" and s.pod}
        clients |= {s.source_workload for s in reply.spans if s.source_workload}
        for client in sorted(clients):
            for side in ("source_pod", "destination_pod"):
                dns = await l7data.flows(bus, [schema.FlowFilter(protocol=["dns"], **{side: [client]})],
                                         since_ns=first - DNS_WINDOW_NS, until_ns=first + 10**9,
                                         number=20, timeout=args.timeout)
                rows += [_flow_row(f, "DNS") for f in dns if f.l7 is not None and f.l7.dns is not None]
        rows.sort(key=lambda r: (r["time_ns"], r["layer"]))
        return rows

    rows = common.run_with_bus(args, work)
    if args.output == "json":
        print(output.to_json({"trace_id": trace_id, "timeline": [
            {**{k: v for k, v in r.items() if k != "time_ns"}, "time": rfc3339_nano(r["time_ns"])} for r in rows]}))
        return 0
    print(f"Trace {trace_id}")
    print(output.table(["TIME", "LAYER", "WHAT", "VERDICT", "NODE", "DETAIL"],
                       [[rfc3339_nano(r["time_ns"])[11:], r["layer"], r["what"], r["verdict"], r["node"] or "-",
                         r["detail"]] for r in rows]))
    return 0


def add_commands(sub: Any, common_parent: argparse.ArgumentParser) -> None:
    trace = sub.add_parser("trace", parents=[common_parent], help="one traced request across DNS, L4 and L7")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    p = trace_sub.add_parser("show", parents=[common_parent], help="the timeline of one trace id")
    p.add_argument("trace_id", metavar="TRACE_ID", help="32 hex digits (W3C traceparent trace id)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument("--timeout", type=float, default=common.REQUEST_TIMEOUT)
    p.set_defaults(func=cmd_show)


__all__ = ["add_commands"]
