"""``ciliary policy trace`` and ``ciliary policy get``.

Invariants:
- ``trace`` sends no traffic: the policy service evaluates the policies in force for the
  two sides and answers with the verdict and the exact rules per direction. A side is a
  pod (resolved to the labels of the identity the identity service gave it), labels, or
  an IP/CIDR (resolved by the service to the identity the ipcache maps it to: a pod, a
  node, a policy CIDR or world).
- Traffic from an endpoint to itself (the same pod named twice, or a pod and its own IP)
  is not subject to policy, as in Cilium: ``trace`` says so and allows it without asking
  the policy service.
- ``get`` shows each policy with the state its policy service reported (ok / error with
  the reason), its warnings (accepted but not enforced) and the endpoints it selects.
- The CLI never imports a service package; it talks to services over NATS.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ciliary import output, schema
from ciliary.bus import Bus, BusError
from ciliary.cli import common
from ciliary.store import ResourceStore

POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")


def parse_port(value: str) -> tuple[int, str]:
    """``8080``, ``8080/TCP``, ``53/udp`` → (port, PROTO)."""
    port_s, _, proto = value.partition("/")
    proto = (proto or "TCP").upper()
    try:
        port = int(port_s)
    except ValueError:
        raise common.CliError(f"--port: expected PORT[/PROTO], got {value!r}") from None
    if not 0 <= port <= 65535:
        raise common.CliError(f"--port: {port} is not between 0 and 65535")
    if proto not in ("TCP", "UDP", "SCTP", "ICMP", "ANY"):
        raise common.CliError(f"--port: unknown protocol {proto!r} (TCP, UDP, SCTP, ICMP, ANY)")
    return port, proto


def parse_labels(value: str) -> list[str]:
    """``app=web,tier=api`` → ``["k8s:app=web", "k8s:tier=api", namespace default]``."""
    labels = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        if "=" not in part:
            raise common.CliError(f"label {part!r}: expected key=value")
        labels.append(part if ":" in part.split("=", 1)[0] else f"k8s:{part}")
    if not any(label.startswith("k8s:io.kubernetes.pod.namespace=") for label in labels):
        labels.append("k8s:io.kubernetes.pod.namespace=default")
    return sorted(labels)


SELF_REASON = "self"


@dataclass
class _Side:
    labels: list[str] = field(default_factory=list)
    identity: int = 0
    cidr: str = ""
    pod: str = ""  # namespace/name when the side is a known pod


async def _side(bus: Bus, value: str) -> _Side:
    if _is_cidr(value):
        return _Side(cidr=value, pod=await _pod_at(bus, value))
    if "=" in value:
        return _Side(labels=parse_labels(value))
    labels, identity = await _pod_labels(bus, value)
    namespace, _, name = value.rpartition("/")
    return _Side(labels=labels, identity=identity, pod=f"{namespace or 'default'}/{name}")


async def _pod_at(bus: Bus, value: str) -> str:
    """The pod whose IP a host address (``/32``, ``/128`` or a bare IP) is, else ``""``."""
    net = ipaddress.ip_network(value, strict=False)
    if net.prefixlen != net.max_prefixlen:
        return ""
    key = schema.ipcache_key(f"{net.network_address}/{net.prefixlen}")
    found = await bus.kv_get_record(schema.BUCKET_IPCACHE, key, schema.IPCacheRecord)
    if found is None or found[0].source != "pod" or not found[0].pod:
        return ""
    return f"{found[0].namespace or 'default'}/{found[0].pod}"


def self_reply() -> schema.PolicyTraceReply:
    """Traffic from an endpoint to itself: not subject to policy."""
    return schema.PolicyTraceReply(
        verdict="allow",
        egress=schema.PolicyTraceStep(direction="egress", verdict="allow", reason=SELF_REASON),
        ingress=schema.PolicyTraceStep(direction="ingress", verdict="allow", reason=SELF_REASON),
    )


async def _pod_labels(bus: Bus, ref: str) -> tuple[list[str], int]:
    namespace, _, name = ref.rpartition("/")
    namespace = namespace or "default"
    status = await bus.kv_get_record(schema.BUCKET_STATUS, f"Pod.{namespace}.{name}", schema.StatusRecord)
    pod = await bus.kv_get(schema.BUCKET_RESOURCES, f"Pod.{namespace}.{name}")
    if pod is None:
        raise common.CliError(f"pod {namespace}/{name} not found")
    ip = (status[0].status if status else {}).get("podIP", "")
    if not ip:
        raise common.CliError(f"pod {namespace}/{name} has no IP yet")
    found = await bus.kv_get_record(schema.BUCKET_IPCACHE, schema.ipcache_key(f"{ip}/32"), schema.IPCacheRecord)
    if found is None:
        raise common.CliError(f"pod {namespace}/{name} ({ip}) has no identity yet")
    identity = found[0].identity
    record = await bus.kv_get_record(schema.BUCKET_IDENTITIES, schema.identity_id_key(identity), schema.IdentityRecord)
    if record is None:
        raise common.CliError(f"identity {identity} of pod {namespace}/{name} is not in the identities bucket")
    return list(record[0].labels), identity


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
        return True
    except ValueError:
        return False


def cmd_trace(args: argparse.Namespace) -> int:
    port, proto = parse_port(args.port)

    async def work(bus: Bus) -> schema.PolicyTraceReply:
        src = await _side(bus, args.source)
        dst = await _side(bus, args.destination)
        if src.pod and src.pod == dst.pod:
            return self_reply()
        req = schema.PolicyTraceRequest(
            from_labels=src.labels, from_cidr=src.cidr, from_identity=src.identity,
            to_labels=dst.labels, to_cidr=dst.cidr, to_identity=dst.identity,
            port=port, proto=proto,
        )
        try:
            return await bus.request(schema.SUBJECT_POLICY_TRACE, req, schema.PolicyTraceReply, timeout=common.REQUEST_TIMEOUT)
        except BusError as err:
            raise common.CliError(f"the policy service did not answer: {err}") from err

    reply = common.run_with_bus(args, work)
    if not reply.ok:
        raise common.CliError(reply.error)
    if args.output == "json":
        print(output.to_json(msgspec.to_builtins(reply)))
        return 0
    print(f"Tracing {args.source} -> {args.destination} {port}/{proto}")
    if reply.egress is not None and reply.egress.reason == SELF_REASON:
        print("  traffic from an endpoint to itself is not subject to policy")
        print(f"Final verdict: {reply.verdict.upper()}")
        return 0
    for step in (reply.egress, reply.ingress):
        if step is None:
            continue
        print(f"  {step.direction:<8} {step.verdict.upper():<6} ({step.reason}){' AUDIT' if step.audit else ''}")
        for rule in step.rules:
            print(f"      by {rule}")
    print(f"Final verdict: {reply.verdict.upper()}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:

    async def work(bus: Bus) -> list[dict[str, Any]]:
        store = ResourceStore(bus)
        rows = []
        for kind in POLICY_KINDS:
            namespace = None if args.all_namespaces or kind == "CiliumClusterwideNetworkPolicy" else (args.namespace or "default")
            for obj in await store.list(kind, "" if kind == "CiliumClusterwideNetworkPolicy" else namespace):
                if args.name and obj.record.name != args.name:
                    continue
                status = obj.status or {}
                rows.append({
                    "kind": kind, "namespace": obj.record.namespace, "name": obj.record.name,
                    "state": status.get("state", "pending"), "error": status.get("error", ""),
                    "warnings": status.get("warnings", []),
                    "selected_identities": status.get("selected_identities", []),
                })
        return rows

    rows = common.run_with_bus(args, work)
    if args.name and not rows:
        raise common.CliError(f"policy {args.name} not found")
    if args.output == "json":
        print(output.to_json(rows))
        return 0
    print(output.table(
        ["KIND", "NAMESPACE", "NAME", "STATE", "SELECTS", "DETAIL"],
        [[r["kind"], r["namespace"] or "-", r["name"], r["state"],
          f"{len(r['selected_identities'])} identities", r["error"] or "; ".join(r["warnings"])]
         for r in rows],
    ))
    return 0


def add_commands(sub: Any, common_parent: argparse.ArgumentParser) -> None:
    pol = sub.add_parser("policy", parents=[common_parent], help="policy trace and status")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    p = pol_sub.add_parser("trace", parents=[common_parent], help="verdict and rules for a flow, without sending it")
    p.add_argument("--from", dest="source", required=True, help="POD (ns/name), labels k=v,... or an IP/CIDR")
    p.add_argument("--to", dest="destination", required=True, help="POD, labels k=v,... or a CIDR/IP")
    p.add_argument("--port", required=True, help="PORT[/PROTO], e.g. 8080/TCP")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_trace)
    p = pol_sub.add_parser("get", parents=[common_parent], help="policies, their state and what they select")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_get)


__all__ = ["add_commands"]
