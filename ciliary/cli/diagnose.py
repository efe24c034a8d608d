"""``ciliary diagnose SRC DST``: walk the fixed debug order and name the layer at fault.

Invariants:
- SRC is a pod (``namespace/pod``); DST a pod, a Service (``namespace/service``), an IP
  or a DNS name. Anything else is an error naming the argument.
- Evidence is read, never made: the flows of the last ``--since`` (default 10m) between
  the two in both directions (and, for a DNS name, the source's lookups of it), the
  sidecars' L7 spans of the pair, the pods' sidecar and socket-LB state, and — only when
  a flow was dropped by policy — the policy service's trace of that flow. The verdict
  is ``ciliary.diagnose`` (pure).
- Every request carries a timeout; the two sides' DNS lookups and the two pods' spans are
  asked for at once, so the whole command answers within a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import Any

from ciliary import diagnose, flowfilter, output, schema
from ciliary.bus import Bus
from ciliary.cli import common, l7data


def _ip_of(address: str) -> str:
    host, _, _ = address.rpartition(":")
    return host.strip("[]")


async def gather(bus: Bus, args: argparse.Namespace) -> diagnose.Evidence:
    if "/" not in args.source:
        raise common.CliError(f"SRC {args.source!r}: expected a pod as namespace/pod")
    src = await l7data.pod(bus, args.source)
    if not src.ip:
        raise common.CliError(f"SRC {src.ref}: the pod has no IP yet")
    since_ns = time.time_ns() - flowfilter.parse_duration(args.since)
    proto = args.protocol.lower()
    dst_pod: l7data.Pod | None = None
    dst_ips: list[str] = []
    dst_service = ""
    dns_name = ""
    dns_flows: list[schema.Flow] = []
    target = args.destination
    if l7data.is_ip(target):
        dst_ips = [target]
    elif "/" in target:
        try:
            dst_pod = await l7data.pod(bus, target)
            dst_ips = [dst_pod.ip] if dst_pod.ip else []
        except common.CliError:
            found = await l7data.service_ips(bus, target)
            if found is None:
                raise common.CliError(f"DST {target!r}: neither a pod nor a Service") from None
            dst_ips, dst_service = found, target
    elif re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", target):
        dns_name = target.rstrip(".")
        pattern = "^" + re.escape(dns_name) + r"(\..*)?\.?$"
        for found_flows in await asyncio.gather(*(
                l7data.flows(bus, [schema.FlowFilter(protocol=["dns"], dns_query=[pattern], **{side: [src.ref]})],
                             since_ns=since_ns, timeout=args.timeout)
                for side in ("source_pod", "destination_pod"))):
            dns_flows += found_flows
        dns_flows.sort(key=lambda f: f.time)
        dst_ips = sorted({ip for f in dns_flows if f.l7 and f.l7.dns and f.l7.dns.rcode == 0 for ip in f.l7.dns.ips})
    else:
        raise common.CliError(f"DST {target!r}: expected namespace/pod, namespace/service, an IP or a DNS name")
    port = [str(args.port)] if args.port else []
    forward = schema.FlowFilter(source_pod=[src.ref], protocol=[proto], destination_port=port,
                                **({"destination_pod": [dst_pod.ref]} if dst_pod else {"destination_ip": dst_ips}))
    backward = schema.FlowFilter(destination_pod=[src.ref], protocol=[proto], source_port=port,
                                 **({"source_pod": [dst_pod.ref]} if dst_pod else {"source_ip": dst_ips}))
    whitelist = [forward, backward] if (dst_pod or dst_ips) else []
    if dst_service:
        whitelist.append(schema.FlowFilter(source_pod=[src.ref], protocol=[proto], destination_port=port,
                                           destination_service=[dst_service]))
    flows = await l7data.flows(bus, whitelist, since_ns=since_ns, number=500, timeout=args.timeout) if whitelist else []
    spans: list[schema.L7Span] = []
    for reply in await asyncio.gather(*(
            l7data.spans(bus, schema.L7Query(workload=who, number=200), timeout=args.timeout)
            for who in {src.ref, *([dst_pod.ref] if dst_pod else [])})):
        spans += reply.spans
    wanted = set(dst_ips)
    spans = [s for s in {(s.trace_id, s.span_id): s for s in spans}.values()
             if s.start_ns >= since_ns and (
                 (s.direction == "outbound" and f"{s.namespace}/{s.pod}" == src.ref
                  and (_ip_of(s.upstream_address) in wanted or s.destination_workload == (dst_pod.ref if dst_pod else "")))
                 or (s.direction == "inbound" and dst_pod is not None and f"{s.namespace}/{s.pod}" == dst_pod.ref
                     and (_ip_of(s.downstream_remote_address) == src.ip or s.source_workload == src.ref)))]
    spans.sort(key=lambda s: s.start_ns)
    trace = None
    dropped = [f for f in flows if f.verdict == "DROPPED" and f.drop_reason_desc in diagnose.POLICY_DROPS]
    if dropped:
        last = dropped[-1]
        l4 = (last.l4.TCP or last.l4.UDP) if last.l4 else None
        trace = await l7data.policy_trace(bus, last, args.port or (l4.destination_port if l4 else 0),
                                          args.protocol.upper())
    # socket-LB reaches a sidecar pod's sockets only when the pod is in the node cgroup
    # and the node attaches it for every namespace (mode "on")
    in_pod = src.sidecar and src.in_node_cgroup and await l7data.socket_lb_mode(bus, src.node) == "on"
    return diagnose.Evidence(
        source=src.ref, destination=target, port=args.port or 0, protocol=args.protocol.upper(),
        dns_name=dns_name, dns_flows=dns_flows, flows=flows, spans=spans, policy_trace=trace,
        sidecar=src.sidecar or bool(dst_pod and dst_pod.sidecar), socket_lb_in_pods=in_pod,
        service_ips=dst_ips if dst_service else [])


def cmd_diagnose(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise common.CliError(f"--port {args.port}: expected 1-65535")
    try:
        flowfilter.parse_duration(args.since)
    except ValueError as err:
        raise common.CliError(f"--since {args.since!r}: {err}") from None
    started = time.monotonic()
    evidence = common.run_with_bus(args, lambda bus: gather(bus, args))
    result = diagnose.diagnose(evidence)
    seconds = time.monotonic() - started
    if args.output == "json":
        print(output.to_json({**result.to_dict(), "source": evidence.source,
                              "destination": evidence.destination, "seconds": round(seconds, 3)}))
        return 0 if result.layer == diagnose.LAYER_HEALTHY else 1
    print(f"{evidence.source} -> {evidence.destination}"
          f"{f' port {evidence.port}/{evidence.protocol}' if evidence.port else ''}")
    print(f"Layer:   {result.layer}")
    print(f"Finding: {result.summary}")
    if result.evidence:
        print("Evidence:")
        for line in result.evidence:
            print(f"  {line}")
    looked = ", ".join(f"{k}={v}" for k, v in result.looked_at.items())
    print(f"Looked at: {looked} ({seconds:.2f}s)")
    return 0 if result.layer == diagnose.LAYER_HEALTHY else 1


def add_commands(sub: Any, common_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("diagnose", parents=[common_parent],
                       help="which layer fails between two endpoints: DNS, flow, policy, sidecar, L7")
    p.add_argument("source", metavar="SRC", help="namespace/pod")
    p.add_argument("destination", metavar="DST", help="namespace/pod, namespace/service, an IP or a DNS name")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--protocol", type=str.upper, choices=["TCP", "UDP"], default="TCP")
    p.add_argument("--since", default="10m", help="how far back to look (default 10m)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument("--timeout", type=float, default=3.0, help="per request, in seconds")
    p.set_defaults(func=cmd_diagnose)


__all__ = ["add_commands"]
