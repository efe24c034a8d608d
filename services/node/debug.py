"""Readable dumps of this node's BPF maps for ``ciliary bpf …`` and ``ciliary endpoint list``.

Invariants:
- The ``*_rows`` functions are pure formatting over dumped map entries (``{Layout: Layout}``)
  and the agent's endpoint records; rows are plain dicts of JSON-able values, sorted for
  stable output.
- ``view_rows`` is the one reader: it dumps the maps a view needs through ``MapOps`` (its
  caller runs it off the event loop) and formats them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from ciliary import schema
from services.node import layouts as L
from services.node.maps import MapOps

PROTO_NAMES = {0: "ANY", L.IPPROTO_ICMP: "ICMP", L.IPPROTO_TCP: "TCP", L.IPPROTO_UDP: "UDP"}
DIRECTIONS = {L.DIR_INGRESS: "ingress", L.DIR_EGRESS: "egress", L.DIR_SERVICE: "service"}


def _proto(value: int) -> str:
    return PROTO_NAMES.get(value, str(value))


def ipcache_rows(dump: Mapping[L.Layout, L.Layout]) -> list[dict[str, Any]]:
    rows = [{"prefix": f"{L.ip4_str(k.ip)}/{k.prefixlen}", "identity": v.identity, "flags": v.flags}
            for k, v in dump.items()]
    return sorted(rows, key=lambda r: (r["prefix"].split("/")[1], r["prefix"]))


def ct_rows(dump: Mapping[L.Layout, L.Layout], now_ns: int | None = None) -> list[dict[str, Any]]:
    now = time.monotonic_ns() if now_ns is None else now_ns
    rows = []
    for k, v in dump.items():
        rows.append({
            "proto": _proto(k.proto),
            "source": f"{L.ip4_str(k.saddr)}:{L.port_int(k.sport)}",
            "destination": f"{L.ip4_str(k.daddr)}:{L.port_int(k.dport)}",
            "flags": k.flags,
            "expires_in_s": max(0, (v.expires_ns - now) // 1_000_000_000),
            "packets": v.packets,
            "bytes": v.bytes,
            "src_identity": v.src_identity,
            "backend_id": v.backend_id,
            "rev_nat_id": v.rev_nat_id,
        })
    return sorted(rows, key=lambda r: (r["proto"], r["source"], r["destination"]))


def policy_rows(dump: Mapping[L.Layout, L.Layout], identity: int = 0) -> list[dict[str, Any]]:
    rows = []
    for k, v in dump.items():
        if identity and k.local_id != identity:
            continue
        rows.append({
            "local_identity": k.local_id,
            "direction": DIRECTIONS.get(k.direction, str(k.direction)),
            "peer_identity": k.peer_id or "ANY",
            "port": L.port_int(k.dport) or "ANY",
            "proto": _proto(k.proto),
            "verdict": "deny" if v.verdict == L.POLICY_DENY else "allow",
            "audit": bool(v.flags & L.POLICY_F_AUDIT),
            "rule_ref": v.rule_ref,
        })
    return sorted(rows, key=lambda r: (r["local_identity"], r["direction"], str(r["peer_identity"]), str(r["port"])))


def lb_rows(services: Mapping[L.Layout, L.Layout], backends: Mapping[L.Layout, L.Layout],
            revnat: Mapping[L.Layout, L.Layout]) -> list[dict[str, Any]]:
    """One row per frontend: like ``cilium-dbg service list``."""
    by_backend = {k.backend_id: v for k, v in backends.items()}
    frontends: dict[tuple[int, int, int], dict[str, Any]] = {}
    slots: dict[tuple[int, int, int], dict[int, int]] = {}
    for k, v in services.items():
        fe = (k.address, k.dport, k.proto)
        if k.backend_slot == 0:
            frontends[fe] = {"count": v.count, "rev_nat_id": v.rev_nat_index, "flags": v.flags,
                             "flags2": v.flags2, "affinity": v.backend_id}
        else:
            slots.setdefault(fe, {})[k.backend_slot] = v.backend_id
    rows = []
    for fe, info in frontends.items():
        addr, dport, proto = fe
        listed = []
        for slot in range(1, info["count"] + 1):
            bid = slots.get(fe, {}).get(slot)
            b = by_backend.get(bid) if bid is not None else None
            listed.append(f"{L.ip4_str(b.address)}:{L.port_int(b.port)}" if b else f"#{bid} (missing)")
        rows.append({
            "id": info["rev_nat_id"],
            "frontend": f"{L.ip4_str(addr)}:{L.port_int(dport)}/{_proto(proto)}",
            "backends": listed,
            "flags": _svc_flags(info["flags"], info["flags2"]),
            "algorithm": "maglev" if info["flags2"] & L.SVC_FLAG2_MAGLEV else "random",
            "affinity_timeout": info["affinity"] if info["flags"] & L.SVC_FLAG_AFFINITY else 0,
        })
    return sorted(rows, key=lambda r: r["id"])


_SVC_FLAG_NAMES = ((L.SVC_FLAG_EXTERNAL_IP, "ExternalIP"), (L.SVC_FLAG_NODEPORT, "NodePort"),
                   (L.SVC_FLAG_LOADBALANCER, "LoadBalancer"), (L.SVC_FLAG_EXT_LOCAL_SCOPE, "ExtLocal"),
                   (L.SVC_FLAG_AFFINITY, "ClientIP"))


def _svc_flags(flags: int, flags2: int) -> list[str]:
    names = [name for bit, name in _SVC_FLAG_NAMES if flags & bit]
    if flags2 & L.SVC_FLAG2_INT_LOCAL_SCOPE:
        names.append("IntLocal")
    return names


def endpoint_rows(endpoints: Iterable[Any], lxc: Mapping[L.Layout, L.Layout]) -> list[dict[str, Any]]:
    by_ifindex = {k.ifindex: v for k, v in lxc.items()}
    rows = []
    for ep in endpoints:
        info = by_ifindex.get(ep.host_ifindex)
        flags = info.flags if info is not None else 0
        rows.append({
            "endpoint_id": ep.ep_id,
            "pod": f"{ep.namespace}/{ep.pod}",
            "ipv4": ep.ip,
            "identity": info.identity if info is not None else None,
            "ingress_enforcement": bool(flags & L.EP_F_POLICY_INGRESS),
            "egress_enforcement": bool(flags & L.EP_F_POLICY_EGRESS),
            "interface": ep.host_ifname,
            "status": "ready" if info is not None else "not-in-datapath",
        })
    return sorted(rows, key=lambda r: r["endpoint_id"])


def metrics_rows(dump: Mapping[L.Layout, L.Layout]) -> list[dict[str, Any]]:
    rows = [{
        "reason": k.reason,
        "reason_desc": "FORWARDED" if k.reason == 0 else (
            L.DROP_REASONS.get(k.reason, str(k.reason))),
        "direction": DIRECTIONS.get(k.direction, str(k.direction)),
        "packets": v.packets,
        "bytes": v.bytes,
    } for k, v in dump.items()]
    return sorted(rows, key=lambda r: (r["reason"], r["direction"]))


def view_rows(view: str, maps: MapOps, endpoints: Iterable[Any], identity: int = 0) -> list[dict[str, Any]]:
    """Rows of one of ``schema.NODE_DEBUG_VIEWS`` (``identity`` filters the policy view)."""
    if view == "ipcache":
        return ipcache_rows(maps.dump(L.IPCACHE))
    if view == "ct":
        return ct_rows(maps.dump(L.CT))
    if view == "policy":
        return policy_rows(maps.dump(L.POLICY), identity)
    if view == "lb":
        return lb_rows(maps.dump(L.LB4_SERVICES), maps.dump(L.LB4_BACKENDS), maps.dump(L.LB4_REVERSE_NAT))
    if view == "endpoints":
        return endpoint_rows(endpoints, maps.dump(L.LXC))
    if view == "metrics":
        return metrics_rows(maps.dump(L.METRICS))
    raise ValueError(f"unknown view {view!r}; one of {', '.join(schema.NODE_DEBUG_VIEWS)}")
