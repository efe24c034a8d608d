"""Bucket records to BPF map entries: what the node's kernel should hold, per owner.

Every producer of desired map state (ipcache, endpoints, policy, lb) is a pure function
here from the records the node executor mirrors (``IPCacheRecord``, ``PolicyMapRecord``,
``LBFrontend``, ``StatusRecord``) and its registered endpoints to ``maps.Entry`` lists,
each under one reconciler owner tag.

Invariants:
- Pure: no clock, no I/O, no asyncio, no bus, no kernel. The same records give the same
  entries in the same order. The one piece of state, ``PolicySelection``, only remembers
  what it handed out before, so an unchanged record is not expanded again.
- Owner tags: ``ipcache``, ``endpoints``, ``policy:<identity>`` (one per local identity)
  and ``lb:<KV key>`` (one per frontend).
- IPv4 datapath: ipcache prefixes with ``:`` are left out; the prefix of this node's own
  address maps to the host identity.
- An endpoint whose address has no ipcache record yet has identity ``reserved:init``; an
  endpoint whose new identity has no policy record yet keeps its previous one while that
  one has a record (`endpoint_identities`).
- Policy entries exist only for identities of local endpoints; port ranges expand to one
  key per port, and where expanded ranges overlap on one key, deny wins over allow.
  Identities are filled in ascending order while the policy map has room; an identity
  that does not fit gets no entries at all (``overflow``), never a partial set.
- A frontend on another node's address (a NodePort of that node) gives no entries: its
  traffic leaves this node untranslated and that node's ``from_netdev`` serves it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ciliary import schema
from services.node import layouts as L
from services.node import maps as M

IPCACHE_OWNER_PREFIX = "ipcache:"
ENDPOINTS_OWNER = "endpoints"
POLICY_OWNER_PREFIX = "policy:"
LB_OWNER_PREFIX = "lb:"
IDENTITY_INIT = schema.IDENTITY_INIT  # until the endpoint's identity resolves
# what endpoint translation reads of an identity's policy record: its flags
PolicyFlags = schema.PolicyMapHead | schema.PolicyMapRecord


def ipcache_owner(key: str) -> str:
    """Reconciler owner of one ``ipcache`` KV key's entry (one owner per prefix, so a change
    of one prefix touches one row)."""
    return f"{IPCACHE_OWNER_PREFIX}{key}"


def policy_owner(identity: int) -> str:
    return f"{POLICY_OWNER_PREFIX}{identity}"


def frontend_owner(key: str) -> str:
    return f"{LB_OWNER_PREFIX}{key}"


class EndpointAddress(Protocol):
    """What translation needs of a registered endpoint."""

    ip: str
    host_ifindex: int
    ep_id: int


# ---------------------------------------------------------------- ipcache and endpoints


def ipcache_entries(records: Iterable[schema.IPCacheRecord], node: str) -> list[M.Entry]:
    return [entry for record in records for entry in ipcache_record_entries(record, node)]


def ipcache_record_entries(record: schema.IPCacheRecord | None, node: str) -> list[M.Entry]:
    """The ipcache map entry of one record (none for IPv6: the datapath is IPv4); this
    node's own addresses map to the host identity."""
    if record is None or ":" in record.prefix:
        return []
    identity = record.identity
    if record.source == "node" and record.node == node:
        identity = L.IDENTITY_HOST
    return [M.ipcache_entry(record.prefix, identity)]


def identity_of_ip(ipcache: Mapping[str, schema.IPCacheRecord], ip: str) -> int:
    record = ipcache.get(schema.ipcache_key(f"{ip}/32"))
    return record.identity if record else IDENTITY_INIT


def ipcache_identities(endpoints: Iterable[EndpointAddress],
                       ipcache: Mapping[str, schema.IPCacheRecord]) -> dict[int, int]:
    """Endpoint id -> the ipcache's identity of its address (``reserved:init`` without one)."""
    return {ep.ep_id: identity_of_ip(ipcache, ep.ip) for ep in endpoints}


def endpoint_identities(wanted: Mapping[int, int], policies: Mapping[str, PolicyFlags],
                        previous: Mapping[int, int]) -> dict[int, int]:
    """Endpoint id -> the identity its lxc entry carries: ``wanted`` (`ipcache_identities`),
    except that an endpoint keeps its ``previous`` identity while that one has a policy
    record and the wanted one has none yet. The policy service writes a record for
    every local identity, so a missing one means "not resolved yet": a relabelled pod stays
    under its old policy until its new policy is there, never unenforced in between (as a
    Cilium endpoint keeps its identity until regeneration with the new one completes).
    Without any record for the old identity either (no policy service), nothing is held."""
    out: dict[int, int] = {}
    for ep_id, identity in wanted.items():
        held = previous.get(ep_id)
        if (held is not None and held != identity and schema.policy_key(identity) not in policies
                and schema.policy_key(held) in policies):
            identity = held
        out[ep_id] = identity
    return out


def endpoint_entries(endpoints: Iterable[EndpointAddress], identities: Mapping[int, int],
                     policies: Mapping[str, PolicyFlags]) -> list[M.Entry]:
    """One lxc entry per endpoint (by endpoint id), with its identity (``identities``, as
    `endpoint_identities` chose) and the policy enforcement and audit flags of that
    identity's record."""
    entries = []
    for ep in sorted(endpoints, key=lambda e: e.ep_id):
        identity = identities.get(ep.ep_id, IDENTITY_INIT)
        pol = policies.get(schema.policy_key(identity))
        entries.append(M.endpoint_entry(
            ep.host_ifindex, ep.ep_id, identity, ep.ip,
            policy_ingress=bool(pol and pol.ingress_enforced),
            policy_egress=bool(pol and pol.egress_enforced),
            audit_ingress=bool(pol and pol.audit_ingress),
            audit_egress=bool(pol and pol.audit_egress),
        ))
    return entries


# ---------------------------------------------------------------- policy


def policy_map_entries(record: schema.PolicyMapRecord) -> list[M.Entry]:
    """Map entries of one identity; port ranges expand to one key per port, and where
    expanded ranges overlap on one key, deny wins over allow."""
    chosen: dict[tuple[int, int, int, str], schema.PolicyEntryRecord] = {}
    for e in record.entries:
        last = e.end_port if e.end_port and e.port else e.port
        for port in range(e.port, last + 1):
            key = (e.peer, port, e.proto, e.direction)
            held = chosen.get(key)
            if held is None or (held.verdict != "deny" and e.verdict == "deny"):
                chosen[key] = e
    return [
        M.policy_entry(record.identity, peer, port, proto, direction,
                       deny=e.verdict == "deny", audit=e.audit, rule_ref=e.rule_ref)
        for (peer, port, proto, direction), e in chosen.items()
    ]


@dataclass
class PolicyPlan:
    """What one selection changes: entries to set per owner (an empty list clears the
    owner), the entries the policy map holds afterwards, identities left out."""

    writes: dict[str, list[M.Entry]] = field(default_factory=dict)
    total: int = 0
    overflow: list[int] = field(default_factory=list)


class PolicySelection:
    """Which identities get policy map entries, within ``capacity`` entries in all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.owners: set[int] = set()  # identities holding entries
        # identity -> (record last written, its entry count): unchanged records are not re-expanded
        self._applied: dict[int, tuple[schema.PolicyMapRecord | None, int]] = {}

    def select(self, local: set[int], policies: Mapping[str, schema.PolicyMapRecord]) -> PolicyPlan:
        """Entries for the identities in ``local``; identities that held entries and are
        no longer local (or no longer fit) are cleared. Owners whose record is the very
        one written last time, and that still fit, are not in ``writes``."""
        plan = PolicyPlan()
        for identity in sorted(self.owners | local):
            record = policies.get(schema.policy_key(identity)) if identity in local else None
            applied = self._applied.get(identity)
            if applied is not None and applied[0] is record and plan.total + applied[1] <= self.capacity:
                plan.total += applied[1]  # same record as last time: nothing to expand or write
                continue
            entries = policy_map_entries(record) if record else []
            if plan.total + len(entries) > self.capacity:
                plan.overflow.append(identity)
                entries = []
            plan.total += len(entries)
            plan.writes[policy_owner(identity)] = entries
            if entries:
                self.owners.add(identity)
                self._applied[identity] = (record, len(entries))
            else:
                self.owners.discard(identity)
                self._applied.pop(identity, None)
        return plan


# ---------------------------------------------------------------- load balancing

_SVC_TYPE_FLAGS = {"NodePort": L.SVC_FLAG_NODEPORT, "ExternalIP": L.SVC_FLAG_EXTERNAL_IP,
                   "LoadBalancer": L.SVC_FLAG_LOADBALANCER}


def lb_frontend_entries(fe: Any, node: str, maglev_table_size: int = L.LB_MAGLEV_TABLE_SIZE) -> list[M.Entry]:
    """Every lb map entry of one ``schema.LBFrontend`` on ``node``, in write order:
    backends, reverse NAT, affinity match, Maglev table, backend slots, slot 0.

    - slots (and the Maglev table) are the node's own (``slots_by_node`` /
      ``maglev_by_node``) when the frontend's traffic policy is ``Local``;
    - slot 0 carries the type flag, the traffic-policy scopes, ``SVC_FLAG_AFFINITY``
      with the timeout, and ``SVC_FLAG2_MAGLEV`` when a Maglev table is written;
    - a Maglev table whose length is not ``maglev_table_size`` (the datapath's M) is
      resampled to it (``maps.fit_maglev_table``).
    Frontends that are not TCP/UDP give no entries."""
    if fe.proto not in ("TCP", "UDP"):
        return []
    local = fe.traffic_policy == "Local"
    slots = list(fe.slots_by_node.get(node, []) if local else fe.slots)
    flags = _SVC_TYPE_FLAGS.get(fe.type, 0)
    flags2 = 0
    if fe.ext_traffic_policy == "Local" and fe.type != "ClusterIP":
        flags |= L.SVC_FLAG_EXT_LOCAL_SCOPE
    if fe.int_traffic_policy == "Local" and fe.type == "ClusterIP":
        flags2 |= L.SVC_FLAG2_INT_LOCAL_SCOPE
    timeout = max(0, int(fe.affinity_timeout or 0))
    if timeout:
        flags |= L.SVC_FLAG_AFFINITY
    table: list[int] = []
    if fe.algorithm == "maglev" and slots:
        table = M.fit_maglev_table(fe.maglev_by_node.get(node, []) if local else fe.maglev,
                                   maglev_table_size)
        if table:
            flags2 |= L.SVC_FLAG2_MAGLEV
    entries = [M.lb_backend_entry(b.id, b.ip, b.port, b.proto.lower())
               for b in fe.backends if b.proto in ("TCP", "UDP")]
    entries.append(M.lb_revnat_entry(fe.rev_nat_id, fe.address, fe.port))
    if timeout:
        entries += M.lb_affinity_match_entries(fe.rev_nat_id, slots)
    entries += M.lb_maglev_entries(fe.rev_nat_id, table)
    entries += M.lb_service_entries(fe.address, fe.port, fe.proto.lower(), fe.rev_nat_id, slots,
                                    flags=flags, flags2=flags2, affinity_timeout=timeout)
    return entries


def serves_here(fe: schema.LBFrontend, node: str) -> bool:
    """Whether ``node`` translates ``fe``: every frontend but another node's NodePort."""
    return not fe.node or fe.node == node


def frontend_entries(fe: schema.LBFrontend | None, node: str, maglev_table_size: int) -> list[M.Entry]:
    """The entries owner ``lb:<key>`` wants: none for a deleted frontend or another
    node's, else ``lb_frontend_entries`` (the reconciler adds before it removes)."""
    if fe is None or not serves_here(fe, node):
        return []
    return lb_frontend_entries(fe, node, maglev_table_size)


def selects_backend(frontends: Iterable[schema.LBFrontend], node: str, ip: str) -> bool:
    """Whether a frontend this node serves has a backend with address ``ip`` in its slots
    (this node's slots for a traffic policy ``Local``)."""
    for fe in frontends:
        if not serves_here(fe, node):
            continue
        slots = set(fe.slots_by_node.get(node, []) if fe.traffic_policy == "Local" else fe.slots)
        if slots and any(b.ip == ip and b.id in slots for b in fe.backends):
            return True
    return False


# ---------------------------------------------------------------- peer routes


def peer_routes(statuses: Mapping[str, schema.StatusRecord], node: str) -> dict[str, tuple[str, str]]:
    """Direct routing: {peer pod CIDR: (peer InternalIP, peer name)} from the ``Node``
    status records (KV key ``Node.<ns>.<name>``) of every other node that has both."""
    routes: dict[str, tuple[str, str]] = {}
    for key, record in statuses.items():
        _, _, name = key.split(".", 2)
        if name == node:
            continue
        status = record.status
        ip = next((a.get("address") for a in status.get("addresses", []) if a.get("type") == "InternalIP"), "")
        cidr = status.get("podCIDR", "")
        if ip and cidr:
            routes[cidr] = (ip, name)
    return routes


__all__ = [
    "ENDPOINTS_OWNER", "IDENTITY_INIT", "IPCACHE_OWNER_PREFIX", "LB_OWNER_PREFIX", "POLICY_OWNER_PREFIX",
    "EndpointAddress", "PolicyPlan", "PolicySelection", "endpoint_entries", "frontend_entries",
    "endpoint_identities", "frontend_owner", "identity_of_ip", "ipcache_entries", "ipcache_identities",
    "ipcache_owner",
    "ipcache_record_entries", "lb_frontend_entries",
    "peer_routes", "policy_map_entries", "policy_owner", "selects_backend", "serves_here",
]
