"""Node-facing commands: ``ciliary exec``, ``ciliary endpoint list`` and ``ciliary bpf …``.

Invariants:
- The CLI never opens a BPF map or a namespace of its own accord: map views are answered
  by each node executor over NATS (``ciliary.node.<cluster>.<node>.debug``), the way
  cilium-dbg asks its agent; ``exec`` only enters the namespace the pod's node executor
  reported in the pod's status.
- Every view has ``-o json``; tables are aligned.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from ciliary import output, schema
from ciliary.bus import Bus, BusError
from ciliary.cli import common
from ciliary.store import ResourceStore


async def _nodes(bus: Bus) -> list[str]:
    entries = await bus.kv_list(schema.BUCKET_STATUS, "Node.>")
    return sorted(key.split(".", 2)[2] for key in entries)


async def _ask(bus: Bus, cluster: str, node: str, req: schema.NodeDebugRequest) -> schema.NodeDebugReply:
    subject = schema.SUBJECT_NODE_DEBUG.format(cluster=cluster, node=node)
    try:
        return await bus.request(subject, req, schema.NodeDebugReply, timeout=common.REQUEST_TIMEOUT)
    except BusError as err:
        return schema.NodeDebugReply(ok=False, node=node, error=f"no answer from node executor: {err}")


async def _collect(bus: Bus, cluster: str, nodes: list[str], req: schema.NodeDebugRequest) -> list[schema.NodeDebugReply]:
    return list(await asyncio.gather(*(_ask(bus, cluster, n, req) for n in nodes)))


def _pod_status(bus_result: Any, namespace: str, name: str) -> dict[str, Any]:
    if bus_result is None:
        raise common.CliError(f"pod {namespace}/{name} not found")
    status = bus_result.status or {}
    if not status.get("ciliary", {}).get("netns"):
        raise common.CliError(f"pod {namespace}/{name} is not running on any node yet (no network namespace reported)")
    return status


# ---------------------------------------------------------------- exec


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise common.CliError("usage: ciliary exec [-n NS] POD -- COMMAND [ARGS…]")
    namespace = args.namespace or "default"

    async def work(bus: Bus) -> dict[str, Any]:
        return _pod_status(await ResourceStore(bus).get("Pod", namespace, args.pod), namespace, args.pod)

    status = common.run_with_bus(args, work)
    netns_name = status["ciliary"]["netns"]
    if not os.path.exists(f"/var/run/netns/{netns_name}"):
        raise common.CliError(f"the network namespace of pod {namespace}/{args.pod} is gone ({netns_name})")
    _join_pod_cgroup(status.get("ciliary", {}).get("cgroup"))
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", netns_name, *command])
    return 0  # not reached


def _join_pod_cgroup(cgroup: str | None) -> None:
    """Move this process into the pod's cgroup, so the exec'd command gets the node's
    socket-level load balancing like the pod's own containers. A cgroup that is gone
    (socket LB off, node torn down) is not an error: the command then uses the per-packet path."""
    if not cgroup:
        return
    try:
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    except OSError:
        pass


# ---------------------------------------------------------------- views


VIEW_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "endpoints": [("ENDPOINT", "endpoint_id"), ("POD", "pod"), ("IPv4", "ipv4"), ("IDENTITY", "identity"),
                  ("INGRESS-ENF", "ingress_enforcement"), ("EGRESS-ENF", "egress_enforcement"),
                  ("INTERFACE", "interface"), ("STATUS", "status")],
    "ipcache": [("PREFIX", "prefix"), ("IDENTITY", "identity")],
    "ct": [("PROTO", "proto"), ("SOURCE", "source"), ("DESTINATION", "destination"),
           ("EXPIRES", "expires_in_s"), ("PACKETS", "packets"), ("BYTES", "bytes"),
           ("SRC-IDENTITY", "src_identity"), ("BACKEND", "backend_id"), ("REVNAT", "rev_nat_id")],
    "policy": [("LOCAL", "local_identity"), ("DIRECTION", "direction"), ("PEER", "peer_identity"),
               ("PORT", "port"), ("PROTO", "proto"), ("VERDICT", "verdict"), ("AUDIT", "audit")],
    "lb": [("ID", "id"), ("FRONTEND", "frontend"), ("BACKENDS", "backends")],
    "metrics": [("REASON", "reason_desc"), ("DIRECTION", "direction"), ("PACKETS", "packets"), ("BYTES", "bytes")],
}


def _render(view: str, replies: list[schema.NodeDebugReply], fmt: str) -> str:
    if fmt == "json":
        return output.to_json([{"node": r.node, "ok": r.ok, "error": r.error, "rows": r.rows} for r in replies])
    columns = VIEW_COLUMNS[view]
    rows = []
    for reply in replies:
        if not reply.ok:
            common.print_error(f"node {reply.node}: {reply.error}")
            continue
        for row in reply.rows:
            values = []
            for _, field in columns:
                value = row.get(field, "")
                if isinstance(value, list):
                    value = ", ".join(str(v) for v in value) or "-"
                elif isinstance(value, bool):
                    value = "yes" if value else "no"
                values.append(value)
            rows.append([reply.node, *values])
    return output.table(["NODE", *[c for c, _ in columns]], rows)


def _run_view(args: argparse.Namespace, view: str, identity: int = 0) -> int:
    state = common.running_instance(args.data_dir_path)

    async def work(bus: Bus) -> list[schema.NodeDebugReply]:
        nodes = [args.node] if getattr(args, "node", None) else await _nodes(bus)
        if not nodes:
            raise common.CliError("no node has reported status yet")
        return await _collect(bus, state.cluster, nodes, schema.NodeDebugRequest(view=view, identity=identity))

    replies = common.run_with_bus(args, work)
    print(_render(view, replies, args.output))
    return 0 if all(r.ok for r in replies) else 1


def cmd_endpoint_list(args: argparse.Namespace) -> int:
    return _run_view(args, "endpoints")


def cmd_bpf_list(args: argparse.Namespace) -> int:
    return _run_view(args, args.view)


def cmd_bpf_policy_get(args: argparse.Namespace) -> int:
    namespace = args.namespace or "default"

    async def work(bus: Bus) -> tuple[str, int]:
        status = _pod_status(await ResourceStore(bus).get("Pod", namespace, args.pod), namespace, args.pod)
        ip = status.get("podIP", "")
        found = await bus.kv_get_record(schema.BUCKET_IPCACHE, schema.ipcache_key(f"{ip}/32"), schema.IPCacheRecord)
        if found is None:
            raise common.CliError(f"pod {namespace}/{args.pod} ({ip}) has no identity in the ipcache yet")
        return status["ciliary"]["node"], found[0].identity

    node, identity = common.run_with_bus(args, work)
    args.node = node
    print(f"pod {namespace}/{args.pod}: identity {identity} on {node}", file=sys.stderr)
    return _run_view(args, "policy", identity)


def add_commands(sub: Any, common_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("exec", parents=[common_parent], help="run a command inside a pod's network namespace")
    p.add_argument("-n", "--namespace")
    p.add_argument("pod")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)

    ep = sub.add_parser("endpoint", parents=[common_parent], help="endpoints of the node executors")
    ep_sub = ep.add_subparsers(dest="endpoint_command", required=True)
    p = ep_sub.add_parser("list", parents=[common_parent], help="every endpoint, its identity and enforcement")
    p.add_argument("--node")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_endpoint_list)

    bpf = sub.add_parser("bpf", parents=[common_parent], help="the BPF maps of the node executors")
    bpf_sub = bpf.add_subparsers(dest="bpf_map", required=True)
    for view, help_text in (("ct", "conntrack entries"), ("ipcache", "IP prefix → identity"),
                            ("lb", "service frontends and backends"), ("metrics", "forward/drop counters")):
        m = bpf_sub.add_parser(view, parents=[common_parent], help=help_text)
        m_sub = m.add_subparsers(dest="bpf_verb", required=True)
        p = m_sub.add_parser("list", parents=[common_parent])
        p.add_argument("--node")
        p.add_argument("-o", "--output", choices=["table", "json"], default="table")
        p.set_defaults(func=cmd_bpf_list, view=view)
    pol = bpf_sub.add_parser("policy", parents=[common_parent], help="policy map entries of a pod's identity")
    pol_sub = pol.add_subparsers(dest="bpf_verb", required=True)
    p = pol_sub.add_parser("get", parents=[common_parent])
    p.add_argument("pod")
    p.add_argument("-n", "--namespace")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_bpf_policy_get)
    p = pol_sub.add_parser("list", parents=[common_parent])
    p.add_argument("--node")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_bpf_list, view="policy")


__all__ = ["add_commands"]
