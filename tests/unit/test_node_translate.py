"""Bucket records to map entries: ipcache, endpoints, policy selection, frontends, routes."""

from __future__ import annotations

from dataclasses import dataclass

from ciliary import schema
from services.node import layouts as L
from services.node import maps as M
from services.node import translate as T


@dataclass
class Ep:
    ip: str
    host_ifindex: int
    ep_id: int


def _ipcache(prefix: str, identity: int, source: str = "pod", node: str = "") -> schema.IPCacheRecord:
    return schema.IPCacheRecord(prefix=prefix, identity=identity, source=source, cluster="c1",
                                cluster_id=1, node=node)


def _by_key(*records: schema.IPCacheRecord) -> dict[str, schema.IPCacheRecord]:
    return {schema.ipcache_key(r.prefix): r for r in records}


def _entry(peer: int, port: int, verdict: str = "allow", *, end_port: int = 0, proto: int = 6,
           direction: str = "ingress", rule_ref: int = 0) -> schema.PolicyEntryRecord:
    return schema.PolicyEntryRecord(peer=peer, port=port, proto=proto, direction=direction,
                                    verdict=verdict, end_port=end_port, rule_ref=rule_ref)


def _policy(identity: int, *entries: schema.PolicyEntryRecord, ingress: bool = True,
            audit_egress: bool = False) -> schema.PolicyMapRecord:
    return schema.PolicyMapRecord(identity=identity, cluster="c1", cluster_id=1,
                                  ingress_enforced=ingress, egress_enforced=False,
                                  audit_egress=audit_egress, entries=list(entries))


def _policies(*records: schema.PolicyMapRecord) -> dict[str, schema.PolicyMapRecord]:
    return {schema.policy_key(r.identity): r for r in records}


# ---- ipcache and endpoints --------------------------------------------------------------


def test_ipcache_entries_skip_ipv6_and_map_this_node_to_host() -> None:
    records = [_ipcache("10.200.1.5/32", 300), _ipcache("fd00::5/128", 300),
               _ipcache("172.30.1.1/32", 6, source="node", node="node-1"),
               _ipcache("172.30.2.1/32", 6, source="node", node="node-2")]
    entries = T.ipcache_entries(records, "node-1")
    assert [(L.ip4_str(e.key.ip), e.key.prefixlen, e.value.identity) for e in entries] == [
        ("10.200.1.5", 32, 300), ("172.30.1.1", 32, L.IDENTITY_HOST), ("172.30.2.1", 32, 6)]


def test_endpoint_identity_is_init_until_the_ipcache_knows_the_address() -> None:
    ipcache = _by_key(_ipcache("10.200.1.5/32", 300))
    assert T.identity_of_ip(ipcache, "10.200.1.5") == 300
    assert T.identity_of_ip(ipcache, "10.200.1.6") == T.IDENTITY_INIT
    eps = [Ep("10.200.1.5", 7, 1), Ep("10.200.1.6", 8, 2)]
    assert T.endpoint_identities(T.ipcache_identities(eps, ipcache), {}, {}) == {1: 300, 2: T.IDENTITY_INIT}


def test_a_relabelled_endpoint_keeps_its_enforced_identity_until_the_new_one_has_policy() -> None:
    eps = [Ep("10.200.1.5", 7, 1)]
    relabelled = T.ipcache_identities(eps, _by_key(_ipcache("10.200.1.5/32", 301)))
    old_only = _policies(_policy(300))
    # the new identity's record is not there yet: the old identity (and its policy) stays
    assert T.endpoint_identities(relabelled, old_only, {1: 300}) == {1: 300}
    entries = T.endpoint_entries(eps, {1: 300}, old_only)
    assert entries == [M.endpoint_entry(7, 1, 300, "10.200.1.5", policy_ingress=True)]
    # its record arrives (here: selected by nothing, open): the endpoint moves
    both = _policies(_policy(300), _policy(301, ingress=False))
    assert T.endpoint_identities(relabelled, both, {1: 300}) == {1: 301}
    # no record for the old identity either (no policy service writes records): no hold
    assert T.endpoint_identities(relabelled, {}, {1: 300}) == {1: 301}
    # a new endpoint has no previous identity to keep
    assert T.endpoint_identities(relabelled, old_only, {}) == {1: 301}


def test_endpoint_entries_by_endpoint_id_with_their_identitys_policy_flags() -> None:
    policies = _policies(_policy(300, audit_egress=True))
    entries = T.endpoint_entries([Ep("10.200.1.6", 8, 2), Ep("10.200.1.5", 7, 1)], {1: 300, 2: 301}, policies)
    assert entries == [
        M.endpoint_entry(7, 1, 300, "10.200.1.5", policy_ingress=True, audit_egress=True),
        M.endpoint_entry(8, 2, 301, "10.200.1.6"),
    ]


# ---- policy -----------------------------------------------------------------------------


def test_policy_ranges_expand_per_port_and_deny_wins_on_overlap() -> None:
    record = _policy(300, _entry(400, 80, end_port=82, rule_ref=1), _entry(400, 81, "deny", rule_ref=2),
                     _entry(0, 0, proto=0, direction="egress"))
    entries = T.policy_map_entries(record)
    got = {(e.key.peer_id, L.port_int(e.key.dport), e.key.direction): (e.value.verdict, e.value.rule_ref)
           for e in entries}
    assert got == {
        (400, 80, L.DIR_INGRESS): (L.POLICY_ALLOW, 1),
        (400, 81, L.DIR_INGRESS): (L.POLICY_DENY, 2),
        (400, 82, L.DIR_INGRESS): (L.POLICY_ALLOW, 1),
        (0, 0, L.DIR_EGRESS): (L.POLICY_ALLOW, 0),
    }
    assert all(e.key.local_id == 300 for e in entries)


def test_policy_selection_writes_local_identities_and_clears_departed_ones() -> None:
    sel = T.PolicySelection(capacity=100)
    policies = _policies(_policy(300, _entry(400, 80)), _policy(301, _entry(400, 81), _entry(400, 82)))
    plan = sel.select({300, 301}, policies)
    assert {owner: len(e) for owner, e in plan.writes.items()} == {"policy:300": 1, "policy:301": 2}
    assert (plan.total, plan.overflow, sel.owners) == (3, [], {300, 301})

    again = sel.select({300, 301}, policies)  # the same records: nothing to write
    assert (again.writes, again.total) == ({}, 3)

    gone = sel.select({300}, policies)
    assert (gone.writes, gone.total, sel.owners) == ({"policy:301": []}, 1, {300})


def test_policy_selection_rewrites_an_identity_whose_record_changed() -> None:
    sel = T.PolicySelection(capacity=100)
    sel.select({300}, _policies(_policy(300, _entry(400, 80))))
    plan = sel.select({300}, _policies(_policy(300, _entry(400, 80), _entry(400, 443))))
    assert [len(e) for e in plan.writes.values()] == [2] and plan.total == 2


def test_policy_selection_leaves_out_whole_identities_that_do_not_fit() -> None:
    sel = T.PolicySelection(capacity=3)
    policies = _policies(_policy(300, _entry(400, 80), _entry(400, 81)),
                         _policy(301, _entry(400, 80, end_port=81)), _policy(302, _entry(400, 90)))
    plan = sel.select({300, 301, 302}, policies)
    assert {o: len(e) for o, e in plan.writes.items()} == {"policy:300": 2, "policy:301": 0, "policy:302": 1}
    assert (plan.total, plan.overflow, sel.owners) == (3, [301], {300, 302})
    # room again: the identity left out is written, the others stay as they are
    freed = sel.select({301, 302}, policies)
    assert {o: len(e) for o, e in freed.writes.items()} == {"policy:300": 0, "policy:301": 2}
    assert (freed.total, freed.overflow) == (3, [])


def test_policy_selection_without_a_record_writes_nothing_for_a_new_identity() -> None:
    plan = T.PolicySelection(capacity=10).select({300}, {})
    assert (plan.writes, plan.total) == ({"policy:300": []}, 0)


# ---- frontends --------------------------------------------------------------------------


def _fe(**kw) -> schema.LBFrontend:
    base = dict(namespace="default", name="web", type="ClusterIP", address="10.96.0.20", port=80,
                proto="TCP", service_id=9, rev_nat_id=9,
                backends=[schema.LBBackend(id=5, ip="10.200.1.10", port=8080, proto="TCP", node="node-1"),
                          schema.LBBackend(id=6, ip="10.200.2.10", port=8080, proto="TCP", node="node-2"),
                          schema.LBBackend(id=7, ip="10.200.2.11", port=8080, proto="TCP", node="node-2",
                                           state="terminating")],
                slots=[5, 6], slots_by_node={"node-1": [5], "node-2": [6]})
    base.update(kw)
    return schema.LBFrontend(**base)


def test_frontend_entries_none_when_deleted_or_another_nodes_nodeport() -> None:
    assert T.frontend_entries(None, "node-1", 7) == []
    nodeport = _fe(type="NodePort", address="172.30.2.1", port=30080, node="node-2")
    assert T.frontend_entries(nodeport, "node-1", 7) == []
    assert T.frontend_entries(nodeport, "node-2", 7) == T.lb_frontend_entries(nodeport, "node-2", 7) != []
    assert T.frontend_entries(_fe(), "node-1", 7) == T.lb_frontend_entries(_fe(), "node-1", 7)
    assert T.frontend_owner("fe.10-96-0-20.80.TCP") == "lb:fe.10-96-0-20.80.TCP"


def _slot0(entries: list[M.Entry]) -> L.Lb4Service:
    (v,) = [e.value for e in entries if e.map == L.LB4_SERVICES and e.key.backend_slot == 0]
    return v


def test_frontend_entries_random_default_order_and_slot0():
    entries = T.lb_frontend_entries(_fe(), "node-1")
    assert [e.map for e in entries] == [L.LB4_BACKENDS] * 3 + [L.LB4_REVERSE_NAT] + [L.LB4_SERVICES] * 3
    assert entries[-1].key.backend_slot == 0  # slot 0 last
    s0 = _slot0(entries)
    assert (s0.count, s0.rev_nat_index, s0.flags, s0.flags2, s0.backend_id) == (2, 9, 0, 0, 0)
    # the same bytes as the plain builder: random ClusterIP frontends are unchanged
    assert entries[4:] == M.lb_service_entries("10.96.0.20", 80, "tcp", 9, [5, 6])


def test_frontend_entries_maglev_affinity_local_and_types():
    table = [5, 6, 6, 5, 5, 6, 5]
    fe = _fe(algorithm="maglev", maglev=table, affinity_timeout=10800)
    entries = T.lb_frontend_entries(fe, "node-1", maglev_table_size=7)
    maps_in_order = [e.map for e in entries]
    first = {m: maps_in_order.index(m) for m in set(maps_in_order)}
    assert first[L.LB_AFFINITY_MATCH] < first[L.LB4_MAGLEV] < first[L.LB4_SERVICES]
    s0 = _slot0(entries)
    assert s0.flags == L.SVC_FLAG_AFFINITY and s0.flags2 == L.SVC_FLAG2_MAGLEV
    assert s0.backend_id == 10800  # the affinity timeout in the slot-0 union
    mag = {e.key.index: e.value.backend_id for e in entries if e.map == L.LB4_MAGLEV}
    assert [mag[i] for i in range(7)] == table
    assert all(e.key.rev_nat_id == 9 for e in entries if e.map == L.LB4_MAGLEV)
    match = [(e.key.backend_id, e.key.rev_nat_id) for e in entries if e.map == L.LB_AFFINITY_MATCH]
    assert match == [(5, 9), (6, 9)]  # slot backends only, not the terminating one

    # a table for another M is resampled to the datapath's M
    assert len([e for e in T.lb_frontend_entries(fe, "node-1", 13) if e.map == L.LB4_MAGLEV]) == 13
    assert M.fit_maglev_table(table, 14) == [t for t in table for _ in (0, 1)]

    # traffic policy Local: the node's own slots and table
    local = _fe(type="NodePort", address="172.30.1.1", port=30080, node="node-1",
                traffic_policy="Local", ext_traffic_policy="Local", algorithm="maglev",
                maglev_by_node={"node-1": [5] * 7, "node-2": [6] * 7})
    entries = T.lb_frontend_entries(local, "node-1", 7)
    s0 = _slot0(entries)
    assert s0.count == 1 and s0.flags == L.SVC_FLAG_NODEPORT | L.SVC_FLAG_EXT_LOCAL_SCOPE
    assert {e.value.backend_id for e in entries if e.map == L.LB4_MAGLEV} == {5}
    # Local without local backends: count 0 (drops 158), no Maglev table
    empty = T.lb_frontend_entries(local, "node-3", 7)
    assert _slot0(empty).count == 0 and not [e for e in empty if e.map == L.LB4_MAGLEV]
    assert _slot0(empty).flags2 == 0

    assert _slot0(T.lb_frontend_entries(_fe(type="ExternalIP"), "n")).flags == L.SVC_FLAG_EXTERNAL_IP
    assert _slot0(T.lb_frontend_entries(_fe(type="LoadBalancer"), "n")).flags == L.SVC_FLAG_LOADBALANCER
    assert _slot0(T.lb_frontend_entries(_fe(int_traffic_policy="Local", traffic_policy="Local"),
                                        "node-1")).flags2 == L.SVC_FLAG2_INT_LOCAL_SCOPE
    assert T.lb_frontend_entries(_fe(proto="SCTP"), "node-1") == []


def test_selects_backend_only_in_slots_this_node_serves() -> None:
    fe = _fe()
    assert T.selects_backend([fe], "node-1", "10.200.1.10")
    assert not T.selects_backend([fe], "node-1", "10.200.2.11")  # terminating: in no slot
    local = _fe(traffic_policy="Local")
    assert T.selects_backend([local], "node-2", "10.200.2.10")
    assert not T.selects_backend([local], "node-1", "10.200.2.10")
    elsewhere = _fe(type="NodePort", node="node-2")
    assert not T.selects_backend([elsewhere], "node-1", "10.200.1.10")


# ---- peer routes ------------------------------------------------------------------------


def _node_status(ip: str, cidr: str) -> schema.StatusRecord:
    status = {"podCIDR": cidr, "addresses": [{"type": "InternalIP", "address": ip} if ip else {},
                                             {"type": "Hostname", "address": "x"}]}
    return schema.StatusRecord(reporter="node/x", status=status)


def test_peer_routes_of_other_nodes_with_address_and_cidr() -> None:
    statuses = {"Node._.node-1": _node_status("172.30.1.1", "10.200.1.0/24"),
                "Node._.node-2": _node_status("172.30.2.1", "10.200.2.0/24"),
                "Node._.node-3": _node_status("", "10.200.3.0/24"),
                "Node._.node-4": _node_status("172.30.4.1", "")}
    assert T.peer_routes(statuses, "node-1") == {"10.200.2.0/24": ("172.30.2.1", "node-2")}


def test_translation_imports_no_kernel_bus_or_event_loop() -> None:
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, services.node.translate; "
             "print(sorted(m for m in ('asyncio', 'bcc', 'pyroute2', 'nats', 'ciliary.bus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
