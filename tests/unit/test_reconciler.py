"""Reconciler of desired BPF map entries, against the fake, faulty and recording MapOps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary.backoff import backoff_delay
from services.node import layouts as L
from services.node import maps as M
from services.node import translate as T
from services.node.layouts import Layout
from services.node.reconciler import (
    ORPHAN_OWNER,
    ReconcileLoop,
    Reconciler,
    Status,
)


class RecordingOps:
    """MapOps that logs every call (and every entry a call touches) before delegating."""

    def __init__(self, inner: M.MapOps | None = None) -> None:
        self.inner = inner if inner is not None else M.FakeMapOps()
        self.calls: list[tuple[str, str, int]] = []  # (op, map, number of entries)
        self.ops: list[tuple[str, str, Layout]] = []  # ("update"|"delete", map, key)

    @property
    def writes(self) -> int:
        return sum(1 for op, _, _ in self.calls if op != "dump")

    def update(self, map_name: str, key: Layout, value: Layout) -> None:
        self.calls.append(("update", map_name, 1))
        self.ops.append(("update", map_name, key))
        self.inner.update(map_name, key, value)

    def update_batch(self, map_name: str, items: Sequence[tuple[Layout, Layout]]) -> None:
        self.calls.append(("update_batch", map_name, len(items)))
        self.ops.extend(("update", map_name, k) for k, _ in items)
        self.inner.update_batch(map_name, items)

    def delete(self, map_name: str, key: Layout) -> None:
        self.calls.append(("delete", map_name, 1))
        self.ops.append(("delete", map_name, key))
        self.inner.delete(map_name, key)

    def delete_batch(self, map_name: str, keys: Sequence[Layout]) -> None:
        self.calls.append(("delete_batch", map_name, len(keys)))
        self.ops.extend(("delete", map_name, k) for k in keys)
        self.inner.delete_batch(map_name, keys)

    def dump(self, map_name: str) -> dict[Layout, Layout]:
        self.calls.append(("dump", map_name, 0))
        return self.inner.dump(map_name)


class BadKeyOps(M.FakeMapOps):
    """Batches always fail; single updates fail for ``bad`` keys only."""

    def __init__(self, bad: set[bytes]) -> None:
        super().__init__()
        self.bad = bad

    def update_batch(self, map_name, items):
        raise M.MapOpsError("batch not supported")

    def update(self, map_name, key, value):
        if bytes(key) in self.bad:
            raise M.MapOpsError("bad key")
        super().update(map_name, key, value)


def svc(backends: list[int], rev_nat: int = 1, vip: str = "10.96.0.10") -> list[M.Entry]:
    return M.lb_service_entries(vip, 80, "tcp", rev_nat_id=rev_nat, backend_ids=backends)


def lb_owner(backends: list[int], rev_nat: int = 1, vip: str = "10.96.0.10") -> list[M.Entry]:
    return [*(M.lb_backend_entry(b, f"10.200.1.{b}", 8080, "tcp") for b in backends),
            M.lb_revnat_entry(rev_nat, vip, 80), *svc(backends, rev_nat, vip)]


def slot(vip: str, s: int) -> L.Lb4Key:
    return L.Lb4Key(address=L.ip4(vip), dport=L.port(80), backend_slot=s, proto=L.IPPROTO_TCP)


def converge(rec: Reconciler, ops: M.MapOps, now: float = 0.0, rounds: int = 200) -> float:
    """Reconcile with an advancing clock until every row is done; return the clock."""
    for _ in range(rounds):
        rec.reconcile(ops, now)
        due = rec.next_retry()
        if due is None:
            return now
        now = max(now, due)
    raise AssertionError(f"did not converge: {rec.stats()}")


def fake_of(entries: list[M.Entry]) -> M.FakeMapOps:
    f = M.FakeMapOps()
    M.apply(f, entries)
    return f


# ---- golden -----------------------------------------------------------------------------


def golden_sequence(rec: Reconciler, ops: M.MapOps) -> float:
    rec.set_desired("ipcache", [M.ipcache_entry("10.200.1.10/32", 1001),
                                M.ipcache_entry("10.200.2.0/24", 1003, flags=L.IPCACHE_F_LOCAL)])
    rec.set_desired("endpoint:7", [M.endpoint_entry(7, 11, 1001, "10.200.1.10",
                                                    policy_ingress=True)])
    rec.set_desired("policy:1001", [M.policy_entry(1001, 1002, 8080, "tcp", "ingress", rule_ref=3),
                                    M.policy_entry(1001, 0, 0, "any", "egress", deny=True)])
    rec.set_desired("lb:default/web:80/TCP", lb_owner([5, 6, 7]))
    now = converge(rec, ops, 0.0)
    # Second generation: the service shrinks, policy changes, an endpoint goes away.
    rec.set_desired("lb:default/web:80/TCP", lb_owner([5]))
    rec.set_desired("policy:1001", [M.policy_entry(1001, 1002, 8080, "tcp", "ingress", rule_ref=4)])
    rec.set_desired("endpoint:7", [])
    rec.set_desired("ipcache", [M.ipcache_entry("10.200.1.10/32", 1001),
                                M.ipcache_entry("10.200.2.0/24", 1004, flags=L.IPCACHE_F_LOCAL)])
    return converge(rec, ops, now + 1.0)


GOLDEN = """\
ciliary_ipcache IpcacheKey(prefixlen=24 ip=10.200.2.0) => IpcacheValue(identity=1004 flags=1)
ciliary_ipcache IpcacheKey(prefixlen=32 ip=10.200.1.10) => IpcacheValue(identity=1001 flags=0)
ciliary_lb4_backends Lb4BackendKey(backend_id=5) => Lb4Backend(address=10.200.1.5 port=8080 proto=6 flags=0)
ciliary_lb4_reverse_nat Lb4ReverseNatKey(rev_nat_id=1) => Lb4ReverseNat(address=10.96.0.10 port=80)
ciliary_lb4_services Lb4Key(address=10.96.0.10 dport=80 backend_slot=0 proto=6 scope=0) => Lb4Service(backend_id=0 count=1 rev_nat_index=1 flags=0 flags2=0)
ciliary_lb4_services Lb4Key(address=10.96.0.10 dport=80 backend_slot=1 proto=6 scope=0) => Lb4Service(backend_id=5 count=0 rev_nat_index=1 flags=0 flags2=0)
ciliary_policy PolicyKey(local_id=1001 peer_id=1002 dport=8080 proto=6 direction=1) => PolicyValue(verdict=1 flags=0 rule_ref=4)
"""


def test_golden_dump_after_two_generations():
    rec, ops = Reconciler(), M.FakeMapOps()
    golden_sequence(rec, ops)
    assert ops.dump_text() == GOLDEN
    st_ = rec.stats()
    assert (st_.pending, st_.error, st_.done, st_.pending_deletes) == (0, 0, 7, 0)
    assert all(e.status is Status.DONE for e in rec.entries())


@pytest.mark.parametrize("seed", range(8))
def test_golden_converges_under_faults(seed):
    inner = M.FakeMapOps()
    faulty = M.FaultyMapOps(inner, rate=0.3, seed=seed)
    rec = Reconciler()
    golden_sequence(rec, faulty)
    assert inner.dump_text() == GOLDEN
    assert {e.status for e in rec.entries()} == {Status.DONE}
    assert faulty.failures > 0


def test_unchanged_desired_state_writes_nothing():
    rec, ops = Reconciler(), RecordingOps()
    golden_sequence(rec, ops)
    n = len(ops.calls)
    rec.set_desired("lb:default/web:80/TCP", lb_owner([5]))
    rec.set_desired("ipcache", rec.owner_entries("ipcache"))
    assert rec.reconcile(ops, 100.0).batches == 0
    assert len(ops.calls) == n


def test_desired_entries_are_copied():
    rec, ops = Reconciler(), M.FakeMapOps()
    e = M.ipcache_entry("10.0.0.1/32", 1001)
    rec.set_desired("ipcache", [e])
    e.value.identity = 9  # a producer mutating its entry later changes nothing
    rec.reconcile(ops, 0.0)
    assert ops.dump(L.IPCACHE) == {e.key: L.IpcacheValue(identity=1001)}


# ---- convergence under faults (property) ---------------------------------------------

IPC = [M.ipcache_entry(f"10.0.0.{i}/32", ident) for i in range(4) for ident in (1001, 1002)]
POL = [M.policy_entry(1001, peer, 80, "tcp", "ingress", deny=deny)
       for peer in (0, 1002, 1003) for deny in (False, True)]
OWNERS = ["endpoint:7", "ipcache", "lb:a", "lb:b", "mesh", "policy:1001"]


def owner_entries() -> st.SearchStrategy[list[M.Entry]]:
    simple = st.lists(st.sampled_from(IPC + POL), max_size=6)
    lb = st.builds(lambda bs, rn, vip: lb_owner(bs, rn, vip),
                   st.lists(st.integers(1, 6), unique=True, max_size=4),
                   st.integers(1, 2), st.sampled_from(["10.96.0.1", "10.96.0.2"]))
    return st.one_of(simple, lb)


action = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(OWNERS), owner_entries()),
    st.tuples(st.just("reconcile"), st.floats(0.0, 5.0), st.just(None)),
    st.tuples(st.just("resync"), st.floats(0.0, 5.0), st.just(None)),
)


def expected_text(final: dict[str, list[M.Entry]]) -> str:
    """Independent model: per key, the smallest owner tag wins; within an owner, the last."""
    want: dict[tuple[str, bytes], M.Entry] = {}
    for owner in sorted(final, reverse=True):
        mine: dict[tuple[str, bytes], M.Entry] = {}
        for e in final[owner]:
            mine[(e.map, bytes(e.key))] = e
        want.update(mine)
    return fake_of(list(want.values())).dump_text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(action, max_size=25), seed=st.integers(0, 2**16),
       leftovers=st.lists(st.sampled_from(IPC + POL), max_size=4))
def test_converges_to_desired_under_30_percent_faults(actions, seed, leftovers):
    inner = fake_of(leftovers)  # a previous agent left entries nobody may want now
    ct_key = L.CtKey(saddr=L.ip4("10.0.0.1"), daddr=L.ip4("10.0.0.2"), proto=6)
    inner.update(L.CT, ct_key, L.CtEntry(packets=1))
    ops = M.FaultyMapOps(inner, rate=0.3, seed=seed)
    rec = Reconciler()
    for _ in range(50):
        try:
            rec.restore(ops)
            break
        except M.MapOpsError:
            continue
    final: dict[str, list[M.Entry]] = {}
    now = 0.0
    for kind, a, b in actions:
        if kind == "set":
            rec.set_desired(a, b)
            final[a] = b
        elif kind == "reconcile":
            now += a
            rec.reconcile(ops, now)
        else:
            now += a
            rec.full_resync(ops, now)
        assert rec.stats() == rec.recount()  # the running totals never drift from the table
    want = expected_text(final) + f"{L.CT} {ct_key!r} => {L.CtEntry(packets=1)!r}\n"
    want = "".join(sorted(want.splitlines(keepends=True)))
    for _ in range(300):
        now += 61.0
        rec.full_resync(ops, now)
        st_ = rec.stats()
        assert st_ == rec.recount()
        if inner.dump_text() == want and st_.pending == st_.error == 0:
            break
    assert inner.dump_text() == want
    assert {e.status for e in rec.entries()} <= {Status.DONE}
    assert [(e.map, e.key, e.value) for e in rec.entries()] == \
        [(e.map, e.key, e.value) for e in rec.desired_entries()]


# ---- backoff ----------------------------------------------------------------------------


def test_backoff_delay_doubles_from_100ms_to_60s():
    assert [backoff_delay(n) for n in range(1, 12)] == \
        [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 60.0]
    assert backoff_delay(10_000) == 60.0
    assert backoff_delay(0) == 0.0


def test_failed_entry_retries_on_backoff_schedule_with_injected_clock():
    inner = M.FakeMapOps()
    always = RecordingOps(M.FaultyMapOps(inner, rate=1.0))
    rec = Reconciler()
    e = M.ipcache_entry("10.0.0.1/32", 1001)
    rec.set_desired("ipcache", [e])
    now, delays = 1000.0, []
    for attempt in range(1, 13):
        rec.reconcile(always, now)
        s = rec.status(e.map, e.key)
        assert s.status is Status.ERROR and s.attempts == attempt
        assert "injected failure" in s.last_error
        delays.append(round(s.next_retry - now, 6))
        # not due yet: nothing is attempted
        before = len(always.calls)
        rec.reconcile(always, s.next_retry - 0.001)
        assert len(always.calls) == before
        now = s.next_retry
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 51.2, 60.0, 60.0]
    assert rec.stats().total_errors == 12
    # recovery: the next due attempt succeeds and clears the error
    rec.reconcile(RecordingOps(inner), now)
    s = rec.status(e.map, e.key)
    assert (s.status, s.attempts, s.last_error) == (Status.DONE, 0, None)
    assert inner.dump(L.IPCACHE) == {e.key: e.value}


def test_new_desired_value_retries_immediately():
    rec = Reconciler()
    failing = M.FaultyMapOps(M.FakeMapOps(), rate=1.0)
    rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1001)])
    for t in range(5):
        rec.reconcile(failing, float(t) * 100)
    e2 = M.ipcache_entry("10.0.0.1/32", 1002)
    rec.set_desired("ipcache", [e2])
    s = rec.status(e2.map, e2.key)
    assert (s.status, s.attempts, s.next_retry) == (Status.PENDING, 0, 0.0)
    # an unchanged value keeps the schedule
    rec.reconcile(failing, 500.0)
    rec.set_desired("ipcache", [e2])
    assert rec.status(e2.map, e2.key).next_retry == pytest.approx(500.1)


# ---- ordering ---------------------------------------------------------------------------


def test_owner_replacement_upserts_new_before_deleting_old():
    rec, ops = Reconciler(), RecordingOps()
    a, b, c = (M.ipcache_entry(f"10.0.0.{i}/32", 1001) for i in (1, 2, 3))
    b2 = M.ipcache_entry("10.0.0.2/32", 1005)
    rec.set_desired("ipcache", [a, b])
    rec.set_desired("policy:1001", [M.policy_entry(1001, 1002, 80, "tcp", "ingress")])
    rec.reconcile(ops, 0.0)
    ops.ops.clear()
    rec.set_desired("ipcache", [b2, c])
    rec.set_desired("policy:1001", [M.policy_entry(1001, 1003, 80, "tcp", "ingress")])
    rec.reconcile(ops, 1.0)
    kinds = [op for op, _, _ in ops.ops]
    assert kinds == ["update"] * 3 + ["delete"] * 2
    assert ("update", L.IPCACHE, c.key) in ops.ops and ("delete", L.IPCACHE, a.key) in ops.ops
    assert ops.ops.index(("update", L.IPCACHE, b2.key)) < ops.ops.index(("delete", L.IPCACHE, a.key))


def test_lb_growth_writes_slots_before_slot0_and_shrink_writes_slot0_before_deletes():
    vip = "10.96.0.10"
    rec, ops = Reconciler(), RecordingOps()
    rec.set_desired("lb:web", svc([5]))
    rec.reconcile(ops, 0.0)
    ops.ops.clear()
    rec.set_desired("lb:web", svc([5, 6, 7]))
    rec.reconcile(ops, 1.0)
    assert ops.ops == [("update", L.LB4_SERVICES, slot(vip, 2)),
                       ("update", L.LB4_SERVICES, slot(vip, 3)),
                       ("update", L.LB4_SERVICES, slot(vip, 0))]
    ops.ops.clear()
    rec.set_desired("lb:web", svc([5]))
    rec.reconcile(ops, 2.0)
    assert ops.ops == [("update", L.LB4_SERVICES, slot(vip, 0)),
                       ("delete", L.LB4_SERVICES, slot(vip, 3)),
                       ("delete", L.LB4_SERVICES, slot(vip, 2))]
    ops.ops.clear()
    rec.set_desired("lb:web", [])  # removal is the reverse of creation: slot 0 goes first
    rec.reconcile(ops, 3.0)
    assert ops.ops == [("delete", L.LB4_SERVICES, slot(vip, 0)),
                       ("delete", L.LB4_SERVICES, slot(vip, 1))]
    assert ops.inner.dump_text() == ""


class FailKeys(M.FakeMapOps):
    """Updates of ``failing`` keys fail (batch and single) while ``failing`` holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[bytes] = set()

    def update_batch(self, map_name, items):
        if any(bytes(k) in self.failing for k, _ in items):
            raise M.MapOpsError("batch with a failing key")
        super().update_batch(map_name, items)

    def update(self, map_name, key, value):
        if bytes(key) in self.failing:
            raise M.MapOpsError("failing key")
        super().update(map_name, key, value)


def test_deletes_wait_while_the_same_owner_has_a_failing_upsert():
    vip = "10.96.0.10"
    fake = FailKeys()
    ops = RecordingOps(fake)
    rec = Reconciler()
    rec.set_desired("lb:web", lb_owner([5, 6, 7]))
    rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1)])
    rec.reconcile(ops, 0.0)
    fake.failing.add(bytes(slot(vip, 0)))
    rec.set_desired("lb:web", lb_owner([5]))  # shrink: slot 0 must change before deletes
    rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.2/32", 1)])  # other owners go on
    ops.ops.clear()
    res = rec.reconcile(ops, 1.0)
    assert (res.failed, res.held, res.deleted) == (1, 4, 1)
    assert [op for op in ops.ops if op[0] == "delete"] == \
        [("delete", L.IPCACHE, M.ipcache_entry("10.0.0.1/32", 1).key)]
    assert len(fake.dump(L.LB4_SERVICES)) == 4 and len(fake.dump(L.LB4_BACKENDS)) == 3
    assert res.next_retry == pytest.approx(1.1)
    assert rec.reconcile(ops, 1.05).batches == 0  # held deletes follow the upsert's schedule
    fake.failing.clear()
    ops.ops.clear()
    res = rec.reconcile(ops, 1.1)
    assert (res.upserted, res.deleted, res.held) == (1, 4, 0)
    assert ops.ops[0] == ("update", L.LB4_SERVICES, slot(vip, 0))
    assert [k.backend_slot for op, m, k in ops.ops if m == L.LB4_SERVICES][1:] == [3, 2]
    assert fake.dump_text() == fake_of([*lb_owner([5]),
                                        M.ipcache_entry("10.0.0.2/32", 1)]).dump_text()


def test_deletes_stop_waiting_after_hold_deletes_failures():
    fake = FailKeys()
    rec = Reconciler(hold_deletes=3)
    old, new = M.ipcache_entry("10.0.0.1/32", 1), M.ipcache_entry("10.0.0.2/32", 1)
    rec.set_desired("ipcache", [old])
    rec.reconcile(fake, 0.0)
    fake.failing.add(bytes(new.key))  # e.g. the map is full: new keys cannot go in
    rec.set_desired("ipcache", [new])
    now, held = 0.0, []
    for _ in range(4):
        now = rec.next_retry()
        held.append(rec.reconcile(fake, now).held)
    assert held == [1, 1, 0, 0]
    assert fake.dump(L.IPCACHE) == {}  # the old entry went after 3 failed attempts
    assert rec.status(new.map, new.key).attempts == 4


def test_batches_group_maps_across_owners_without_reordering_an_owner():
    rec, ops = Reconciler(), RecordingOps()
    for i in range(1, 4):
        rec.set_desired(f"lb:svc{i}", lb_owner([10 * i, 10 * i + 1], rev_nat=i, vip=f"10.96.0.{i}"))
    rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1001)])
    res = rec.reconcile(ops, 0.0)
    assert res.batches == 4 and res.upserted == 3 * 6 + 1
    assert [(op, m) for op, m, _ in ops.calls] == [
        ("update_batch", L.IPCACHE), ("update_batch", L.LB4_BACKENDS),
        ("update_batch", L.LB4_REVERSE_NAT), ("update_batch", L.LB4_SERVICES)]
    services = [k.backend_slot for op, m, k in ops.ops if m == L.LB4_SERVICES]
    assert services == [1, 2, 0] * 3


def test_batch_size_chunks_keep_order():
    rec, ops = Reconciler(batch_size=2), RecordingOps()
    rec.set_desired("lb:web", svc([1, 2, 3, 4]))
    assert rec.reconcile(ops, 0.0).batches == 3
    assert [n for _, _, n in ops.calls] == [2, 2, 1]
    assert [k.backend_slot for _, _, k in ops.ops] == [1, 2, 3, 4, 0]


def test_failed_batch_falls_back_to_single_entries():
    bad = M.ipcache_entry("10.0.0.2/32", 1001)
    ops = BadKeyOps({bytes(bad.key)})
    rec = Reconciler()
    good = [M.ipcache_entry(f"10.0.0.{i}/32", 1001) for i in (1, 3, 4)]
    rec.set_desired("ipcache", [good[0], bad, *good[1:]])
    res = rec.reconcile(ops, 0.0)
    assert (res.upserted, res.failed, res.next_retry) == (3, 1, pytest.approx(0.1))
    assert ops.dump(L.IPCACHE) == {e.key: e.value for e in good}
    assert rec.status(bad.map, bad.key).status is Status.ERROR
    st_ = rec.stats()
    assert (st_.done, st_.error, st_.batch_fallbacks, st_.total_errors) == (3, 1, 1, 1)


# ---- resync and restore -----------------------------------------------------------------


def test_full_resync_repairs_drift_and_prunes_orphans_in_owned_maps_only():
    ops = RecordingOps()
    fake = ops.inner
    rec = Reconciler(max_entries={L.IPCACHE: 100})
    want = [M.ipcache_entry(f"10.0.0.{i}/32", 1001) for i in range(1, 4)]
    rec.set_desired("ipcache", want)
    rec.set_desired("lb:web", lb_owner([5]))
    rec.reconcile(ops, 0.0)
    clean = fake.dump_text()
    # drift: one entry deleted behind our back, one overwritten; plus orphans
    fake.delete(L.IPCACHE, want[0].key)
    fake.update(L.IPCACHE, want[1].key, L.IpcacheValue(identity=6666))
    orphan_ipc = M.ipcache_entry("10.9.9.9/32", 4242)
    orphan_pol = M.policy_entry(77, 0, 0, "any", "ingress")
    M.apply(fake, [orphan_ipc, orphan_pol, *svc([9], rev_nat=9, vip="10.96.9.9")])
    ct_key = L.CtKey(saddr=L.ip4("10.0.0.1"), daddr=L.ip4("10.0.0.2"), proto=6)
    fake.update(L.CT, ct_key, L.CtEntry(packets=3))
    fake.update(L.METRICS, L.MetricsKey(reason=133, direction=1), L.MetricsValue(packets=1))
    ops.ops.clear()
    res = rec.full_resync(ops, 50.0)
    assert (res.drifted, res.orphans, res.failed_maps) == (2, 4, ())
    assert (res.reconcile.upserted, res.reconcile.deleted) == (2, 4)
    assert ("dump", L.CT, 0) not in ops.calls and ("dump", L.METRICS, 0) not in ops.calls
    not_owned = (f"{L.CT} {ct_key!r} => {L.CtEntry(packets=3)!r}\n"
                 f"{L.METRICS} {L.MetricsKey(reason=133, direction=1)!r} => "
                 f"{L.MetricsValue(packets=1)!r}\n")
    assert fake.dump_text() == "".join(sorted((clean + not_owned).splitlines(keepends=True)))
    st_ = rec.stats()
    assert st_.last_resync == 50.0 and st_.pending == st_.error == 0
    assert st_.maps[L.IPCACHE].entries == 3 and st_.maps[L.IPCACHE].fill == pytest.approx(0.03)
    # a second resync finds nothing to do and writes nothing
    ops.ops.clear()
    res = rec.full_resync(ops, 60.0)
    assert (res.drifted, res.orphans, res.reconcile.batches, ops.ops) == (0, 0, 0, [])


def test_full_resync_with_a_failed_dump_checks_the_rest_and_keeps_last_resync():
    class FailDump(M.FakeMapOps):
        def dump(self, map_name):
            if map_name == L.POLICY:
                raise M.MapOpsError("dump failed")
            return super().dump(map_name)

    ops = FailDump()
    rec = Reconciler()
    M.apply(ops, [M.ipcache_entry("10.9.9.9/32", 4242), M.policy_entry(77, 0, 0, "any", "ingress")])
    res = rec.full_resync(ops, 5.0)
    assert res.failed_maps == (L.POLICY,) and res.orphans == 1
    assert ops.dump(L.IPCACHE) == {} and len(ops.maps[L.POLICY]) == 1
    assert rec.stats().last_resync is None and rec.stats().total_errors == 1


def test_not_owned_is_configuration():
    rec, fake = Reconciler(not_owned={L.CT, L.METRICS, L.POLICY}), M.FakeMapOps()
    M.apply(fake, [M.policy_entry(77, 0, 0, "any", "ingress"), M.ipcache_entry("10.9.9.9/32", 1)])
    assert rec.full_resync(fake, 0.0).orphans == 1
    assert fake.dump(L.IPCACHE) == {} and len(fake.maps[L.POLICY]) == 1
    assert L.POLICY not in rec.owned_maps
    with pytest.raises(ValueError):
        Reconciler(not_owned={"cilium_nope"})


def test_restore_marks_matching_entries_done_with_zero_writes():
    desired = [*lb_owner([5, 6]), M.ipcache_entry("10.0.0.1/32", 1001)]
    changed = M.ipcache_entry("10.0.0.2/32", 1002)
    fake = fake_of([*desired, M.ipcache_entry("10.0.0.2/32", 9999)])
    ops = RecordingOps(fake)
    rec = Reconciler()
    rec.set_desired("lb:web", desired[:-1])
    rec.set_desired("ipcache", [desired[-1], changed])
    dumped = rec.restore(ops)
    assert ops.writes == 0
    assert {op for op, _, _ in ops.calls} == {"dump"}
    assert set(dumped) == rec.owned_maps
    assert set(dumped[L.LB4_BACKENDS]) == {L.Lb4BackendKey(backend_id=b) for b in (5, 6)}
    assert rec.status(changed.map, changed.key).status is Status.PENDING
    st_ = rec.stats()
    assert (st_.done, st_.pending) == (len(desired), 1)
    res = rec.reconcile(ops, 0.0)
    assert (res.upserted, res.deleted) == (1, 0)
    assert ops.ops == [("update", L.IPCACHE, changed.key)]


def test_restore_before_desired_state_arrives():
    desired = [*lb_owner([5, 6]), M.ipcache_entry("10.0.0.1/32", 1001)]
    leftover = M.ipcache_entry("10.0.0.9/32", 1009)
    ops = RecordingOps(fake_of([*desired, leftover]))
    rec = Reconciler()
    rec.restore(ops)
    rec.set_desired("lb:web", desired[:-1])
    rec.set_desired("ipcache", desired[-1:])
    assert rec.stats().done == len(desired)
    assert rec.reconcile(ops, 0.0).batches == 0 and ops.writes == 0
    # the leftover is only pruned by a full resync, once desired state is complete
    assert leftover.key in ops.inner.dump(L.IPCACHE)
    assert rec.full_resync(ops, 1.0).orphans == 1
    assert ops.ops == [("delete", L.IPCACHE, leftover.key)]


def test_restore_failure_raises_and_changes_nothing():
    rec = Reconciler()
    rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1001)])
    with pytest.raises(M.MapOpsError):
        rec.restore(M.FaultyMapOps(M.FakeMapOps(), rate=1.0))
    assert rec.stats().pending == 1 and rec.table_sizes() == {"rows": 1, "owners": 1, "observed": 0}


def test_restore_keeps_no_copy_of_the_dump() -> None:
    desired = lb_owner([5, 6])
    leftovers = [M.ipcache_entry(f"10.0.1.{i}/32", 2000 + i) for i in range(50)]
    rec = Reconciler()
    rec.set_desired("lb:web", desired)
    dumped = rec.restore(RecordingOps(fake_of([*desired, *leftovers])))
    assert len(dumped[L.IPCACHE]) == 50
    # what stays: the desired rows, and the 50 entries nobody desires (until a resync)
    assert rec.table_sizes() == {"rows": len(desired), "owners": 1, "observed": 50}
    rec.set_desired("ipcache", leftovers[:10])  # claimed entries leave "observed"
    assert rec.table_sizes()["observed"] == 40


# ---- owners, validation, stats ----------------------------------------------------------


def test_smallest_owner_wins_conflicts_regardless_of_order():
    a = M.ipcache_entry("10.0.0.1/32", 1001)
    b = M.ipcache_entry("10.0.0.1/32", 2002)
    for order in (("ipcache", "mesh"), ("mesh", "ipcache")):
        rec, ops = Reconciler(), M.FakeMapOps()
        for owner in order:
            rec.set_desired(owner, [a] if owner == "ipcache" else [b])
        rec.reconcile(ops, 0.0)
        assert ops.dump(L.IPCACHE) == {a.key: a.value}
        assert rec.status(a.map, a.key).owner == "ipcache"
        assert rec.stats().conflicts == 1
        rec.clear_owner("ipcache")  # the other claim takes over, nothing is deleted
        rec.reconcile(ops, 1.0)
        assert ops.dump(L.IPCACHE) == {b.key: b.value}
        rec.clear_owner("mesh")
        assert rec.status(a.map, a.key).value is None  # pending delete
        rec.reconcile(ops, 2.0)
        assert ops.dump(L.IPCACHE) == {} and rec.status(a.map, a.key) is None


def test_redesiring_a_pending_delete_that_is_still_in_the_kernel_needs_no_write():
    rec, ops = Reconciler(), RecordingOps()
    e = M.ipcache_entry("10.0.0.1/32", 1001)
    rec.set_desired("ipcache", [e])
    rec.reconcile(ops, 0.0)
    rec.set_desired("ipcache", [])
    assert rec.stats().pending_deletes == 1
    rec.set_desired("ipcache", [e])
    assert rec.status(e.map, e.key).status is Status.DONE
    assert rec.reconcile(ops, 1.0).batches == 0


def test_orphan_rows_are_tagged_and_claimable():
    class NoDeletes(M.FakeMapOps):
        def delete_batch(self, map_name, keys):
            raise M.MapOpsError("no")

        def delete(self, map_name, key):
            raise M.MapOpsError("no")

    ops = NoDeletes()
    e = M.ipcache_entry("10.9.9.8/32", 1)
    M.apply(ops, [e])
    rec = Reconciler()
    res = rec.full_resync(ops, 0.0)
    assert (res.orphans, res.reconcile.failed) == (1, 1)
    (orphan,) = rec.entries()
    assert orphan.owner == ORPHAN_OWNER and orphan.value is None
    assert orphan.status is Status.ERROR and orphan.attempts == 1
    # Claimed after a failed delete: the kernel value is unknown now, so it is rewritten.
    rec.set_desired("ipcache", [e])
    assert rec.status(e.map, e.key).status is Status.PENDING
    rec.reconcile(ops, 0.0)
    assert rec.status(e.map, e.key).status is Status.DONE
    assert ops.dump(L.IPCACHE) == {e.key: e.value}


def test_set_desired_validates_entries():
    rec = Reconciler()
    with pytest.raises(ValueError):
        rec.set_desired("", [])
    with pytest.raises(ValueError):
        rec.set_desired("x", [M.Entry("cilium_nope", L.EndpointKey(), L.EndpointInfo())])
    with pytest.raises(ValueError):
        rec.set_desired("x", [M.Entry(L.LXC, L.IpcacheKey(), L.EndpointInfo())])
    assert rec.owners() == []


def test_duplicate_key_in_one_owner_keeps_first_position_and_last_value():
    rec, ops = Reconciler(), RecordingOps()
    a1 = M.ipcache_entry("10.0.0.1/32", 1)
    a2 = M.ipcache_entry("10.0.0.1/32", 2)
    b = M.ipcache_entry("10.0.0.2/32", 3)
    rec.set_desired("ipcache", [a1, b, a2])
    rec.reconcile(ops, 0.0)
    assert [k for _, _, k in ops.ops] == [a1.key, b.key]
    assert ops.inner.dump(L.IPCACHE)[a1.key] == a2.value


def test_stats_counts_and_fill():
    rec = Reconciler(max_entries={L.LB4_SERVICES: 8, L.POLICY: 4})
    rec.set_desired("lb:web", svc([1, 2, 3]))
    rec.set_desired("policy:1", [M.policy_entry(1, 0, 0, "any", "ingress")])
    st_ = rec.stats()
    assert (st_.pending, st_.done, st_.error) == (5, 0, 0)
    assert st_.maps[L.LB4_SERVICES].desired == 4 and st_.maps[L.LB4_SERVICES].entries == 0
    rec.reconcile(M.FakeMapOps(), 0.0)
    st_ = rec.stats()
    assert (st_.pending, st_.done) == (0, 5)
    assert st_.maps[L.LB4_SERVICES].fill == pytest.approx(0.5)
    assert st_.maps[L.POLICY].fill == pytest.approx(0.25)
    assert st_.maps[L.IPCACHE].fill is None and st_.last_resync is None


# ---- async driver -----------------------------------------------------------------------


async def test_reconcile_loop_restores_then_reconciles_on_kick():
    inner = fake_of([M.ipcache_entry("10.0.0.1/32", 1001)])
    ops = RecordingOps(inner)
    rec = Reconciler()
    loop = ReconcileLoop(rec, ops, resync_interval=3600.0)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(loop.restored.wait(), 2.0)
        assert ops.writes == 0
        rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1001),
                                    M.ipcache_entry("10.0.0.2/32", 1002)])
        loop.kick()
        for _ in range(200):
            if rec.next_retry() is None:
                break
            await asyncio.sleep(0.01)
        assert len(inner.dump(L.IPCACHE)) == 2
        assert ops.writes == 1  # the restored entry was not rewritten
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_reconcile_loop_prunes_only_once_ready():
    orphan = M.ipcache_entry("10.9.9.9/32", 4242)
    inner = fake_of([orphan])
    ready = [False]
    loop = ReconcileLoop(Reconciler(), inner, resync_interval=3600.0, ready=lambda: ready[0])
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(loop.restored.wait(), 2.0)
        loop.request_resync()
        await asyncio.sleep(0.05)
        assert orphan.key in inner.dump(L.IPCACHE)  # inputs not complete: no pruning
        ready[0] = True
        loop.request_resync()
        for _ in range(200):
            if not inner.dump(L.IPCACHE):
                break
            await asyncio.sleep(0.01)
        assert inner.dump(L.IPCACHE) == {}
        assert loop.reconciler.stats().last_resync is not None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- lb frontends through their whole life (scaling, draining) -----------------------------


class LbChecked(M.FakeMapOps):
    """Checks the lb maps after every single operation: every slot 1..count of the frontend
    exists and names a backend that exists, and no backend in ``keep`` is ever missing."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: set[int] = set()
        self.checked = 0

    def _check(self) -> None:
        self.checked += 1
        services = {k.backend_slot: v for k, v in self.dump(L.LB4_SERVICES).items()}
        backends = {k.backend_id for k in self.dump(L.LB4_BACKENDS)}
        if 0 in services:
            for s in range(1, services[0].count + 1):
                assert s in services, f"slot {s} of {services[0].count} missing"
                assert services[s].backend_id in backends, f"slot {s} names a missing backend"
        assert self.keep <= backends, f"backends {self.keep - backends} removed too early"

    def update(self, map_name, key, value):
        super().update(map_name, key, value)
        self._check()

    def delete(self, map_name, key):
        super().delete(map_name, key)
        self._check()

    def update_batch(self, map_name, items):
        for k, v in items:
            self.update(map_name, k, v)

    def delete_batch(self, map_name, keys):
        for k in keys:
            self.delete(map_name, k)


def frontend(active: list[int], terminating: list[int] = ()) -> object:
    from ciliary import schema

    def backend(i: int, state: str) -> schema.LBBackend:
        return schema.LBBackend(id=i, ip=f"10.200.1.{i}", port=8080, proto="TCP", state=state)

    return schema.LBFrontend(
        namespace="default", name="web", type="ClusterIP", address="10.96.0.10", port=80, proto="TCP",
        service_id=1, rev_nat_id=1,
        backends=[backend(i, "active") for i in active] + [backend(i, "terminating") for i in terminating],
        slots=list(active))


def test_lb_scaling_and_draining_never_expose_a_missing_slot_or_drop_a_kept_backend():
    ops = LbChecked()
    rec = Reconciler(batch_size=1)
    generations = [
        ([1, 2, 3], []),  # three backends
        ([1, 2, 3, 4, 5], []),  # scaled to five
        ([4, 5], [1, 2, 3]),  # three deleted: out of the slots, still backends (terminating)
        ([4, 5], []),  # their grace period over
        ([], [4, 5]),  # every backend terminating and not serving: count 0
    ]
    previous: set[int] = set()
    for now, (active, terminating) in enumerate(generations):
        current = set(active) | set(terminating)
        ops.keep = previous & current  # established connections may use these throughout
        rec.set_desired("lb:fe.10-96-0-10.80.TCP", T.lb_frontend_entries(frontend(active, terminating), "node-1"))
        assert rec.unsettled("lb:")
        converge(rec, ops, float(now))
        assert not rec.unsettled("lb:")
        services = {k.backend_slot: v.backend_id for k, v in ops.dump(L.LB4_SERVICES).items() if k.backend_slot}
        assert sorted(services.values()) == sorted(active)
        assert {k.backend_id for k in ops.dump(L.LB4_BACKENDS)} == current
        previous = current
    assert ops.checked > 10


def test_unsettled_looks_at_one_owner_prefix_and_at_failures():
    rec = Reconciler()
    assert not rec.unsettled() and not rec.unsettled("lb:")
    rec.set_desired("ipcache", [M.ipcache_entry("10.0.0.1/32", 1001)])
    assert rec.unsettled() and not rec.unsettled("lb:")
    rec.set_desired("lb:web", lb_owner([5]))
    failing = M.FaultyMapOps(M.FakeMapOps(), rate=1.0)
    rec.reconcile(failing, 0.0)
    assert rec.unsettled("lb:")  # failed writes are not settled
    ops = M.FakeMapOps()
    converge(rec, ops, 1.0)
    assert not rec.unsettled()
    rec.set_desired("lb:web", [])  # pending deletes are not settled either
    assert rec.unsettled("lb:")
    converge(rec, ops, 2.0)
    assert not rec.unsettled("lb:") and ops.dump(L.LB4_SERVICES) == {}


# ---- resync in steps ----------------------------------------------------------------------


class HeldDumps(M.FakeMapOps):
    """Dumps that wait (in the dumping thread) until the test releases them."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.release = threading.Event()
        self.dumping = threading.Event()

    def maps_snapshot(self, map_name):
        """What the map holds now (never held)."""
        return super().dump(map_name)

    def dump(self, map_name):
        snapshot = super().dump(map_name)  # taken now, returned only when released
        self.dumping.set()
        assert self.release.wait(10), "test never released the dump"
        return snapshot


async def test_a_change_during_a_resync_is_applied_at_once_and_not_undone_by_the_stale_dump():
    ops = HeldDumps()
    ops.release.set()
    loop = ReconcileLoop(Reconciler(), ops, resync_interval=3600.0)
    task = asyncio.create_task(loop.run())
    try:
        await asyncio.wait_for(loop.restored.wait(), 2.0)
        old = M.ipcache_entry("10.0.0.1/32", 1001)
        loop.reconciler.set_desired("ipcache", [old])
        loop.kick()
        for _ in range(100):
            if old.key in ops.maps_snapshot(L.IPCACHE):
                break
            await asyncio.sleep(0.01)
        ops.release.clear()
        ops.dumping.clear()
        loop.request_resync()
        assert await asyncio.to_thread(ops.dumping.wait, 5)  # a map's dump is now held
        new = M.ipcache_entry("10.0.0.2/32", 1002)
        loop.reconciler.set_desired("ipcache", [new])  # replaces old while the dump is held
        loop.kick()
        for _ in range(100):
            if new.key in ops.maps_snapshot(L.IPCACHE) and old.key not in ops.maps_snapshot(L.IPCACHE):
                break
            await asyncio.sleep(0.01)
        # written although the resync has not finished (its dumps are still held)
        assert loop.reconciler.stats().last_resync is None
        assert set(ops.maps_snapshot(L.IPCACHE)) == {new.key}
        ops.release.set()
        for _ in range(200):
            if loop.reconciler.stats().last_resync is not None:
                break
            await asyncio.sleep(0.01)
        assert loop.reconciler.stats().last_resync is not None
        timing = loop.last_resync  # the resync's phases, for the health detail
        assert set(timing) == {"start", "ms", "longest_step_ms", "begin_ms", "dump_ms", "learn_ms", "finish_ms"}
        assert timing["ms"] >= timing["dump_ms"] > 0 and timing["longest_step_ms"] <= timing["ms"]
        # stale dumps (they may still hold old and lack new) changed nothing
        assert set(ops.maps_snapshot(L.IPCACHE)) == {new.key}
        assert loop.reconciler.stats() == loop.reconciler.recount()
        assert {e.status for e in loop.reconciler.entries()} == {Status.DONE}
    finally:
        ops.release.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_resync_in_steps_yields_between_chunks_of_a_large_map():
    rec = Reconciler()
    ops = M.FakeMapOps()
    rec.set_desired("ipcache", [M.ipcache_entry(f"10.{i // 250}.{i % 250}.1/32", 1000 + i)
                                for i in range(5000)])
    rec.reconcile(ops, 0.0)
    resync = rec.begin_resync()
    resync.GROUP_CHUNK = 1000
    assert sum(1 for _ in resync.prepare()) == 5  # grouping the rows by map is stepped too
    steps = 0
    for m in resync.maps:
        resync.dump_starting()
        steps += sum(1 for _ in resync.learn(m, ops.dump(m)))
    result = resync.finish(ops, 1.0)
    assert steps >= 5000 // resync.CHUNK  # the ipcache rows alone take several steps
    assert (result.drifted, result.orphans) == (0, 0)
    assert rec.stats().last_resync == 1.0


def test_rows_added_and_dropped_while_a_resync_groups_the_table_end_as_desired():
    rec = Reconciler()
    ops = M.FakeMapOps()
    first = [M.ipcache_entry(f"10.1.{i // 250}.{i % 250}/32", 1000 + i) for i in range(3000)]
    rec.set_desired("a", first)
    rec.reconcile(ops, 0.0)
    resync = rec.begin_resync()
    resync.GROUP_CHUNK = 1000
    steps = resync.prepare()
    next(steps)  # one chunk grouped; the table changes before the rest
    added = M.ipcache_entry("10.2.0.1/32", 7)
    rec.set_desired("a", first[1000:])  # the first thousand rows go
    rec.set_desired("b", [added])
    rec.reconcile(ops, 0.5)
    for _ in steps:
        pass
    for m in resync.maps:
        resync.dump_starting()
        for _ in resync.learn(m, ops.dump(m)):
            pass
    result = resync.finish(ops, 1.0)
    assert result.orphans == 0 and result.drifted == 0
    assert set(ops.dump(L.IPCACHE)) == {e.key for e in first[1000:]} | {added.key}
    assert rec.stats() == rec.recount()
    assert {e.status for e in rec.entries()} == {Status.DONE}
