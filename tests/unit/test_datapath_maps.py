"""MapOps contract on the fake and faulty implementations (no kernel needed)."""

from __future__ import annotations

import pytest

from services.node import layouts as L
from services.node import maps as M


def desired() -> list[M.Entry]:
    return [
        M.ipcache_entry("10.200.1.10/32", 1001),
        M.ipcache_entry("10.200.2.0/24", 1003, flags=L.IPCACHE_F_LOCAL),
        M.endpoint_entry(7, 11, 1001, "10.200.1.10", policy_ingress=True, audit_egress=True),
        M.policy_entry(1001, 1002, 8080, "tcp", "ingress", rule_ref=3),
        M.policy_entry(1001, 0, 0, "any", "egress", deny=True),
        *M.lb_service_entries("10.96.0.10", 80, "tcp", rev_nat_id=1, backend_ids=[5, 6]),
        M.lb_backend_entry(5, "10.200.1.10", 8080, "tcp"),
        M.lb_backend_entry(6, "10.200.2.10", 8080, "tcp"),
        M.lb_revnat_entry(1, "10.96.0.10", 80),
    ]


GOLDEN = """\
ciliary_ipcache IpcacheKey(prefixlen=24 ip=10.200.2.0) => IpcacheValue(identity=1003 flags=1)
ciliary_ipcache IpcacheKey(prefixlen=32 ip=10.200.1.10) => IpcacheValue(identity=1001 flags=0)
ciliary_lb4_backends Lb4BackendKey(backend_id=5) => Lb4Backend(address=10.200.1.10 port=8080 proto=6 flags=0)
ciliary_lb4_backends Lb4BackendKey(backend_id=6) => Lb4Backend(address=10.200.2.10 port=8080 proto=6 flags=0)
ciliary_lb4_reverse_nat Lb4ReverseNatKey(rev_nat_id=1) => Lb4ReverseNat(address=10.96.0.10 port=80)
ciliary_lb4_services Lb4Key(address=10.96.0.10 dport=80 backend_slot=0 proto=6 scope=0) => Lb4Service(backend_id=0 count=2 rev_nat_index=1 flags=0 flags2=0)
ciliary_lb4_services Lb4Key(address=10.96.0.10 dport=80 backend_slot=1 proto=6 scope=0) => Lb4Service(backend_id=5 count=0 rev_nat_index=1 flags=0 flags2=0)
ciliary_lb4_services Lb4Key(address=10.96.0.10 dport=80 backend_slot=2 proto=6 scope=0) => Lb4Service(backend_id=6 count=0 rev_nat_index=1 flags=0 flags2=0)
ciliary_lxc EndpointKey(ifindex=7) => EndpointInfo(ep_id=11 identity=1001 ipv4=10.200.1.10 flags=9)
ciliary_policy PolicyKey(local_id=1001 peer_id=0 dport=0 proto=0 direction=2) => PolicyValue(verdict=2 flags=0 rule_ref=0)
ciliary_policy PolicyKey(local_id=1001 peer_id=1002 dport=8080 proto=6 direction=1) => PolicyValue(verdict=1 flags=0 rule_ref=3)
"""


def test_fake_dump_text_is_stable_and_sorted():
    a, b = M.FakeMapOps(), M.FakeMapOps()
    M.apply(a, desired())
    M.apply(b, list(reversed(desired())))
    assert a.dump_text() == b.dump_text() == GOLDEN


def test_fake_is_idempotent():
    ops = M.FakeMapOps()
    M.apply(ops, desired())
    once = ops.dump_text()
    M.apply(ops, desired())
    assert ops.dump_text() == once
    M.remove(ops, desired())
    M.remove(ops, desired())  # deleting what is gone succeeds
    assert ops.dump_text() == ""


def test_fake_dump_decodes_layouts():
    ops = M.FakeMapOps()
    M.apply(ops, desired())
    eps = ops.dump(L.LXC)
    ((key, value),) = eps.items()
    assert key == L.EndpointKey(ifindex=7)
    assert L.ip4_str(value.ipv4) == "10.200.1.10"
    assert value.flags == L.EP_F_POLICY_INGRESS | L.EP_F_AUDIT_EGRESS


def test_wrong_layout_or_map_is_rejected():
    ops = M.FakeMapOps()
    with pytest.raises(M.MapOpsError):
        ops.update(L.LXC, L.IpcacheKey(), L.EndpointInfo())
    with pytest.raises(M.MapOpsError):
        ops.dump("cilium_nope")


def test_gc_conntrack_deletes_only_expired():
    ops = M.FakeMapOps()
    live = L.CtKey(saddr=L.ip4("10.0.0.1"), daddr=L.ip4("10.0.0.2"), sport=L.port(1),
                   dport=L.port(80), proto=6, flags=L.DIR_EGRESS)
    dead = L.CtKey(saddr=L.ip4("10.0.0.1"), daddr=L.ip4("10.0.0.2"), sport=L.port(2),
                   dport=L.port(80), proto=6, flags=L.DIR_EGRESS)
    ops.update(L.CT, live, L.CtEntry(expires_ns=2000))
    ops.update(L.CT, dead, L.CtEntry(expires_ns=1000))
    assert M.gc_conntrack(ops, now_ns=1500) == 1
    assert list(ops.dump(L.CT)) == [live]


def test_faulty_fails_a_seeded_fraction_and_retries_converge():
    inner = M.FakeMapOps()
    faulty = M.FaultyMapOps(inner, rate=0.3, seed=42)
    pending = list(desired())
    attempts = 0
    while pending and attempts < 200:
        attempts += 1
        e = pending.pop(0)
        try:
            faulty.update(e.map, e.key, e.value)
        except M.MapOpsError:
            pending.append(e)
    assert not pending
    assert faulty.failures > 0
    reference = M.FakeMapOps()
    M.apply(reference, desired())
    assert inner.dump_text() == reference.dump_text()


def test_faulty_is_deterministic_per_seed():
    def run(seed: int) -> list[bool]:
        f = M.FaultyMapOps(M.FakeMapOps(), rate=0.5, seed=seed)
        out = []
        for _ in range(32):
            try:
                f.dump(L.IPCACHE)
                out.append(True)
            except M.MapOpsError:
                out.append(False)
        return out

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert M.FaultyMapOps(M.FakeMapOps(), rate=0.0).dump(L.IPCACHE) == {}
    with pytest.raises(ValueError):
        M.FaultyMapOps(M.FakeMapOps(), rate=1.5)


def test_protocols_are_satisfied():
    assert isinstance(M.FakeMapOps(), M.MapOps)
    assert isinstance(M.FaultyMapOps(M.FakeMapOps(), 0.1), M.MapOps)
    assert isinstance(M.BccMapOps({}), M.MapOps)


# ---- lb map helpers ---------------------------------------------------------------------


def test_maglev_hash_is_the_datapath_jhash():
    # jhash_3words(saddr, dport << 16 | sport, proto, seed) over the raw __be16 fields
    h = M.maglev_hash("10.200.1.10", 42000, 80, "tcp")
    assert h == M.jhash_3words(L.ip4("10.200.1.10"), (L.port(80) << 16) | L.port(42000), 6,
                               L.LB_MAGLEV_SEED)
    assert 0 <= h < 2**32 and h != M.maglev_hash("10.200.1.10", 42001, 80, "tcp")


def test_state_maps_are_not_reconciler_owned():
    from services.node.reconciler import Reconciler

    owned = Reconciler().owned_maps
    assert L.LB4_MAGLEV in owned and L.LB_AFFINITY_MATCH in owned
    assert not owned & set(L.STATE_MAPS)
    ops = M.FakeMapOps()
    key = L.CtKey(saddr=L.ip4("10.0.0.1"), daddr=L.ip4("10.0.0.2"), sport=L.port(1),
                  dport=L.port(2), proto=6, flags=L.NAT_KEY_REV)
    ops.update(L.NAT4, key, L.Nat4Entry(expires_ns=10, addr=L.ip4("10.0.0.9"), port=L.port(3)))
    live = L.CtKey.from_bytes(bytes(key))
    live.sport = L.port(9)
    ops.update(L.NAT4, live, L.Nat4Entry(expires_ns=1000))
    assert M.gc_nat(ops, now_ns=100) == 1 and list(ops.dump(L.NAT4)) == [live]
