"""``ciliary service list|get``: the load-balancer state servicelb wrote to bucket ``services``.

Invariants:
- Read-only: reads bucket ``services`` through `ciliary.bus.Bus` and never imports a
  service package (the import-linter contract forbids ``ciliary`` -> ``services``).
- The table has the shape of ``cilium-dbg service list``: ID, Frontend, Service Type and
  one ``N => ip:port/proto (state)`` line per backend (with ClusterMesh backends:
  ``[cluster <name>]`` and ``(preferred)``); ``-o json`` prints the records.
- Rows that do not decode are skipped (a reader never crashes on a foreign writer).
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from ciliary import output, schema
from ciliary.cli import common


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Register ``service list`` and ``service get`` on the top-level subparsers."""
    p = subparsers.add_parser(
        "service", parents=[common_parent],
        help="show load-balancer frontends and their backends (like cilium-dbg service list)",
    )
    sub = p.add_subparsers(dest="service_command", required=True)

    lp = sub.add_parser("list", parents=[common_parent], help="every frontend with its backends")
    lp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    lp.set_defaults(func=cmd_service_list)

    gp = sub.add_parser("get", parents=[common_parent], help="the frontends of one Service")
    gp.add_argument("name")
    gp.add_argument("-n", "--namespace", default="default")
    gp.add_argument("-o", "--output", choices=["table", "json"], default="table")
    gp.set_defaults(func=cmd_service_get)


async def read_services(bus: Any) -> tuple[list[schema.LBFrontend], dict[str, schema.LBEndpoints]]:
    """Every decodable frontend (sorted by service id, address) and derived endpoints."""
    entries = await bus.kv_list(schema.BUCKET_SERVICES)
    frontends: list[schema.LBFrontend] = []
    endpoints: dict[str, schema.LBEndpoints] = {}
    for key, entry in entries.items():
        if entry.value is None:
            continue
        try:
            if key.startswith(schema.LB_FRONTEND_PREFIX + "."):
                frontends.append(schema.decode(entry.value, schema.LBFrontend))
            elif key.startswith(schema.LB_ENDPOINTS_PREFIX + "."):
                eps = schema.decode(entry.value, schema.LBEndpoints)
                endpoints[f"{eps.namespace}/{eps.name}"] = eps
        except msgspec.DecodeError:
            continue
    frontends.sort(key=lambda fe: (fe.service_id, fe.address, fe.port, fe.proto))
    return frontends, endpoints


def frontend_text(fe: schema.LBFrontend) -> str:
    return f"{fe.address}:{fe.port}/{fe.proto}"


def backend_lines(fe: schema.LBFrontend, node: str = "") -> list[str]:
    """``N => ip:port/proto (state)`` per backend; slot backends first, as stored. A
    frontend with backends of connected clusters (ClusterMesh) names each backend's
    cluster and marks the ones new connections go to ``(preferred)``, as ``cilium-dbg
    service list --clustermesh-affinity`` does."""
    in_slots = set(fe.slots) | {i for ids in fe.slots_by_node.values() for i in ids}
    meshed = any(b.cluster for b in fe.backends)
    lines = []
    for index, b in enumerate(fe.backends, start=1):
        state = b.state
        if b.id not in in_slots and b.state == schema.LB_STATE_ACTIVE and not meshed:
            state = "active, other node"
        extra = f" @{b.node}" if fe.traffic_policy == "Local" and b.node else ""
        if meshed:
            extra += f" [cluster {b.cluster or fe.cluster}]" + (" (preferred)" if b.id in in_slots else "")
        lines.append(f"{index} => {b.ip}:{b.port}/{b.proto} ({state}){extra}")
    return lines


def render_service_table(frontends: list[schema.LBFrontend]) -> str:
    rows: list[list[Any]] = []
    for fe in frontends:
        lines = backend_lines(fe) or [""]
        rows.append([fe.service_id, frontend_text(fe), fe.type, lines[0]])
        rows += [["", "", "", line] for line in lines[1:]]
    return output.table(["ID", "Frontend", "Service Type", "Backend"], rows)


def _json(frontends: list[schema.LBFrontend]) -> list[Any]:
    return [msgspec.to_builtins(fe) for fe in frontends]


def cmd_service_list(args: argparse.Namespace) -> int:
    frontends, _ = common.run_with_bus(args, read_services)
    if args.output == "json":
        print(output.to_json(_json(frontends)))
    elif frontends:
        print(render_service_table(frontends))
    else:
        print("No service frontends.")
    return 0


def cmd_service_get(args: argparse.Namespace) -> int:
    frontends, endpoints = common.run_with_bus(args, read_services)
    ref = f"{args.namespace}/{args.name}"
    mine = [fe for fe in frontends if fe.namespace == args.namespace and fe.name == args.name]
    derived = endpoints.get(ref)
    if not mine and derived is None:
        raise common.CliError(
            f"service {ref} has no load-balancer frontends "
            "(not found, headless, ExternalName, or not reconciled yet)"
        )
    if args.output == "json":
        print(output.to_json({
            "namespace": args.namespace,
            "name": args.name,
            "frontends": _json(mine),
            "endpointSlices": derived.slices if derived else [],
        }))
        return 0
    first = mine[0] if mine else None
    if first is not None:
        affinity = f"ClientIP {first.affinity_timeout}s" if first.affinity_timeout else "None"
        print(f"Service {ref}: algorithm {first.algorithm}, session affinity {affinity}, "
              f"traffic policy external {first.ext_traffic_policy} / internal {first.int_traffic_policy}, "
              f"cluster {first.cluster} ({first.cluster_id})")
        print(render_service_table(mine))
    else:
        print(f"Service {ref}: headless (no frontends)")
    if derived is not None:
        count = sum(len(s.get("endpoints") or []) for s in derived.slices)
        print(f"Derived endpoint slices: {len(derived.slices)} ({count} endpoints)")
    return 0
