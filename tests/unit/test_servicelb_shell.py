"""The servicelb shell against a fake bus: write ordering, CAS races, restart, bad input,
passes over changed keys between resyncs, writes in flight together."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import yaml

from ciliary import schema
from ciliary.bus import BusError, KVEntry
from ciliary.runtime import Context, Settings
from ciliary.testing import FakeBus
from services.servicelb import model
from services.servicelb.service import (
    RESYNC_LATEST_S,
    RESYNC_QUIET_S,
    RESYNC_S,
    WRITES_IN_FLIGHT,
    ServiceLB,
    in_flight,
)


def resource_entries(text: str) -> dict[str, dict[str, KVEntry]]:
    state: dict[str, dict[str, KVEntry]] = {k: {} for k in ("Service", "EndpointSlice", "Pod", "Node")}
    for i, doc in enumerate(d for d in yaml.safe_load_all(text) if d):
        meta = doc["metadata"]
        ns = meta.get("namespace", "default") if doc["kind"] != "Node" else ""
        record = schema.ResourceRecord(kind=doc["kind"], api_version=doc["apiVersion"], namespace=ns,
                                       name=meta["name"], uid=f"u{i}", generation=1, created="t",
                                       manifest=doc)
        key = f"{doc['kind']}.{ns or '_'}.{meta['name']}"
        state[doc["kind"]][key] = KVEntry(schema.BUCKET_RESOURCES, key, i + 1, schema.encode(record))
    return state


def slice_yaml(*ips: str) -> str:
    endpoints = "".join(f"\n- addresses: [{ip}]" for ip in ips)
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status: {{addresses: [{{type: InternalIP, address: 192.168.1.1}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:{endpoints}
"""


def make_lb(bus: FakeBus) -> ServiceLB:
    ctx = Context(service="servicelb", settings=Settings(nats_url="nats://fake"), bus=bus)
    return ServiceLB(ctx, model.Config())


def positions(ops: list[tuple[str, str, str]], op: str, bucket: str) -> list[int]:
    return [i for i, o in enumerate(ops) if o[0] == op and o[1] == bucket]


async def test_writes_are_ordered_allocate_add_remove_release() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1", "10.0.0.2"))
    await lb.load()
    await lb.reconcile()
    creates = positions(bus.ops, "put", schema.BUCKET_ALLOCATIONS)
    rows = positions(bus.ops, "put", schema.BUCKET_SERVICES)
    assert creates and rows and max(creates) < min(rows)

    # a backend is replaced: new rows first, the old backend id is released last
    bus.ops.clear()
    lb.resources = resource_entries(slice_yaml("10.0.0.2", "10.0.0.3"))
    await lb.reconcile()
    kinds = [(op, bucket) for op, bucket, _ in bus.ops]
    assert kinds == [
        ("put", schema.BUCKET_ALLOCATIONS),  # backend id for 10.0.0.3
        ("put", schema.BUCKET_SERVICES), ("put", schema.BUCKET_SERVICES),  # ClusterIP + NodePort rows
        ("delete", schema.BUCKET_ALLOCATIONS),  # backend id of 10.0.0.1
    ]
    assert bus.ops[-1][2] == f"{schema.ALLOC_LB_BACKEND_ID}.1"

    # the Service goes away: rows deleted before its values are released
    bus.ops.clear()
    lb.resources = {k: {} for k in lb.resources}
    await lb.reconcile()
    deletes_rows = positions(bus.ops, "delete", schema.BUCKET_SERVICES)
    releases = positions(bus.ops, "delete", schema.BUCKET_ALLOCATIONS)
    assert len(deletes_rows) == 2 and len(releases) == 6  # clusterIP, nodePort, 2 service ids, 2 backend ids
    assert max(deletes_rows) < min(releases)
    assert ("delete", schema.BUCKET_STATUS, "Service.default.web") in bus.ops
    assert bus.kv[schema.BUCKET_ALLOCATIONS] == {} and bus.kv[schema.BUCKET_SERVICES] == {}


async def test_restart_writes_nothing_and_keeps_ids() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    await lb.reconcile()
    before = {b: dict(v) for b, v in bus.kv.items()}
    bus.ops.clear()
    again = make_lb(bus)
    again.resources = resource_entries(slice_yaml("10.0.0.1"))
    await again.load()
    await again.reconcile()
    assert bus.ops == [] and bus.kv == before


async def test_lost_allocation_race_rereads_and_never_shares_a_value() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    # another writer took the first dynamic cluster IP and node port after we loaded
    await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_CLUSTER_IP}.10-96-1-1",
                     schema.LBAllocation(owner="other/svc"), last_revision=0)
    await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_NODE_PORT}.30086",
                     schema.LBAllocation(owner="other/svc:1/TCP"), last_revision=0)
    await lb.reconcile()
    status = schema.decode(bus.kv[schema.BUCKET_STATUS]["Service.default.web"][1], schema.StatusRecord).status
    assert status["clusterIP"] == "10.96.1.2" and status["nodePorts"][0]["nodePort"] == 30087
    owners = [schema.decode(v, schema.LBAllocation).owner for _, v in bus.kv[schema.BUCKET_ALLOCATIONS].values()]
    assert len(owners) == len(set(owners))


async def test_garbage_inputs_are_skipped_and_a_broken_service_keeps_its_values() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    await lb.reconcile()
    cip = dict(bus.kv[schema.BUCKET_ALLOCATIONS])
    # the Service becomes undecodable, and garbage appears next to it
    broken = yaml.safe_load(slice_yaml("10.0.0.1").split("---")[0])
    broken["spec"]["ports"] = [{"port": "eighty"}]
    lb.resources["Service"]["Service.default.web"] = KVEntry(
        schema.BUCKET_RESOURCES, "Service.default.web", 99, schema.encode(schema.ResourceRecord(
            kind="Service", api_version="v1", namespace="default", name="web", uid="u", generation=2,
            created="t", manifest=broken)))
    lb.resources["Service"]["Service.default.junk"] = KVEntry(schema.BUCKET_RESOURCES, "Service.default.junk", 100, b"\xc1")
    await lb.reconcile()
    kept = {k for k in bus.kv[schema.BUCKET_ALLOCATIONS]
            if k.startswith((schema.ALLOC_LB_CLUSTER_IP, schema.ALLOC_LB_NODE_PORT))}
    assert kept == {k for k in cip if k.startswith((schema.ALLOC_LB_CLUSTER_IP, schema.ALLOC_LB_NODE_PORT))}
    assert lb.ctx.detail["problems"] == 1
    assert any("undecodable" in p for p in lb.logged)



# ---------------------------------------------------------------- passes between resyncs


def many_services(n: int, changed: int | None = None) -> str:
    """``n`` selector-less Services with one slice each; ``changed``: that one's second
    endpoint is another address."""
    docs = []
    for i in range(n):
        second = "10.2.0.9" if i == changed else f"10.1.{i}.2"
        docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: s{i}}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s{i}-1
  labels: {{kubernetes.io/service-name: s{i}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.1.{i}.1]}}, {{addresses: [{second}]}}]
""")
    return "---\n".join(docs)


def changed_entries(lb: ServiceLB, text: str) -> None:
    """Put the entries of ``text`` that differ into the mirrors, as a watch would, with
    revisions past the current ones, and note their keys as changed."""
    top = max(e.revision for entries in lb.resources.values() for e in entries.values())
    for kind, entries in resource_entries(text).items():
        for key, entry in entries.items():
            old = lb.resources[kind].get(key)
            if old is None or schema.decode(old.value, schema.ResourceRecord).manifest != \
                    schema.decode(entry.value, schema.ResourceRecord).manifest:
                top += 1
                lb.resources[kind][key] = KVEntry(entry.bucket, key, top, entry.value)
                lb.changes[(kind, key)] = None


async def test_a_changed_slice_rewrites_only_its_service() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(40))
    await lb.load()
    await lb.reconcile()
    assert lb.ctx.detail["services_recomputed"] == 40
    cluster_ip = lb.service_status["Service.default.s7"][1]["clusterIP"]
    row = schema.lb_frontend_key(cluster_ip, 80, "TCP")
    (old_id,) = [b.id for b in schema.decode(bus.kv[schema.BUCKET_SERVICES][row][1], schema.LBFrontend).backends
                 if b.ip == "10.1.7.2"]
    bus.ops.clear()
    changed_entries(lb, many_services(40, changed=7))
    await lb.reconcile_changes()
    assert bus.ops == [
        ("put", schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_BACKEND_ID}.81"),  # 10.2.0.9: a new id
        ("put", schema.BUCKET_SERVICES, row),
        ("delete", schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_BACKEND_ID}.{old_id}"),  # 10.1.7.2's
    ]
    assert lb.ctx.detail["services_recomputed"] == 1 and lb.ctx.detail["frontends"] == 40
    # a whole pass over the same inputs finds nothing left to write
    bus.ops.clear()
    await lb.load()
    await lb.reconcile()
    assert bus.ops == []


async def test_a_burst_is_handled_in_passes_of_at_most_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst larger than ``PASS_CHANGES_MAX`` keys: each pass takes at most that many and
    writes its rows, asks for the next pass at once, and the end state is the whole pass's."""
    from services.servicelb import service as shell

    monkeypatch.setattr(shell, "PASS_CHANGES_MAX", 7)
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(1))
    await lb.load()
    await lb.reconcile()
    changed_entries(lb, many_services(20))  # 19 new Services with a slice each: 38 keys
    lb.loaded, lb.resynced = True, time.monotonic()  # between resyncs: passes over changed keys
    rows_after: list[int] = []
    while True:
        before = len(lb.changes)
        again = await lb._pass()
        assert before - len(lb.changes) <= 7
        rows_after.append(len(bus.kv[schema.BUCKET_SERVICES]))
        if not again:
            break
        assert lb.changes  # keys left over are the reason for the next pass
    assert not lb.changes and len(rows_after) == 6
    assert rows_after == sorted(rows_after) and rows_after[0] < rows_after[-1] == 20  # written in waves
    chunked = {k: v for k, (_, v) in bus.kv[schema.BUCKET_SERVICES].items()}
    # the same inputs in one whole pass: nothing left to write, same rows
    bus.ops.clear()
    await lb.load()
    await lb.reconcile()
    assert [op for op in bus.ops if op[1] == schema.BUCKET_SERVICES] == []
    assert {k: v for k, (_, v) in bus.kv[schema.BUCKET_SERVICES].items()} == chunked


async def test_a_deleted_service_goes_with_its_rows_status_and_values() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(3))
    await lb.load()
    await lb.reconcile()
    bus.ops.clear()
    del lb.resources["Service"]["Service.default.s1"]
    lb.changes[("Service", "Service.default.s1")] = None
    await lb.reconcile_changes()
    kinds = [(op, bucket) for op, bucket, _ in bus.ops]
    assert kinds == [("delete", schema.BUCKET_SERVICES), ("delete", schema.BUCKET_STATUS)] + [
        ("delete", schema.BUCKET_ALLOCATIONS)] * 4  # cluster IP, service id, 2 backend ids
    assert "Service.default.s1" not in bus.kv[schema.BUCKET_STATUS]
    assert lb.ctx.detail["services"] == 2


async def test_a_lost_allocation_race_between_resyncs_recomputes_everything() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(2))
    await lb.load()
    await lb.reconcile()
    taken = f"{schema.ALLOC_LB_CLUSTER_IP}.10-96-1-3"  # the next dynamic cluster IP
    await bus.kv_put(schema.BUCKET_ALLOCATIONS, taken, schema.LBAllocation(owner="other/svc"), last_revision=0)
    changed_entries(lb, many_services(3))
    await lb.reconcile_changes()
    assert lb.service_status["Service.default.s2"][1]["clusterIP"] == "10.96.1.4"
    assert lb.ctx.detail["services_recomputed"] == 3
    owners = [schema.decode(v, schema.LBAllocation).owner for _, v in bus.kv[schema.BUCKET_ALLOCATIONS].values()]
    assert len(owners) == len(set(owners))


async def test_a_lost_release_makes_the_next_pass_a_whole_one() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(2))
    lb.loaded = True
    await lb.load()
    await lb.reconcile()
    old_id = f"{schema.ALLOC_LB_BACKEND_ID}.2"  # 10.1.0.2
    await bus.kv_put(schema.BUCKET_ALLOCATIONS, old_id, schema.LBAllocation(owner="10.1.0.2:8080/TCP"))
    changed_entries(lb, many_services(2, changed=0))
    await lb.reconcile_changes()
    assert not lb.loaded and lb.loop.dirty.is_set()
    assert old_id in bus.kv[schema.BUCKET_ALLOCATIONS]  # someone else's write: not ours to delete


class SlowBus(FakeBus):
    """Every KV write takes a moment; counts how many were in flight together."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.peak = 0

    async def kv_put(self, bucket: str, key: str, record: Any, *, last_revision: int | None = None) -> int:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            return await super().kv_put(bucket, key, record, last_revision=last_revision)
        finally:
            self.in_flight -= 1


async def test_writes_are_in_flight_together_and_stay_ordered() -> None:
    bus = SlowBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(300))
    await lb.load()
    await lb.reconcile()
    assert 1 < bus.peak <= WRITES_IN_FLIGHT
    creates = positions(bus.ops, "put", schema.BUCKET_ALLOCATIONS)
    rows = positions(bus.ops, "put", schema.BUCKET_SERVICES)
    statuses = positions(bus.ops, "put", schema.BUCKET_STATUS)
    assert len(rows) == 300 and max(creates) < min(rows) and max(rows) < min(statuses)
    # the Services go: every row removed before any value is released
    bus.ops.clear()
    lb.resources = {k: {} for k in lb.resources}
    await lb.reconcile()
    assert max(positions(bus.ops, "delete", schema.BUCKET_SERVICES)) < min(
        positions(bus.ops, "delete", schema.BUCKET_ALLOCATIONS))
    assert bus.kv[schema.BUCKET_SERVICES] == {} and bus.kv[schema.BUCKET_ALLOCATIONS] == {}


async def test_in_flight_stops_starting_writes_after_a_failure() -> None:
    started: list[int] = []

    async def write(item: int) -> None:
        started.append(item)
        await asyncio.sleep(0)
        if item == 3:
            raise BusError("down")

    with pytest.raises(BusError):
        await in_flight(list(range(100)), write, limit=4)
    assert len(started) < 10


async def test_the_mirrors_feed_changed_keys_to_the_passes() -> None:
    """The service on its own mirrors and pass loop: a changed slice reaches bucket
    ``services`` through one pass that recomputes one Service."""
    bus = FakeBus()
    for entries in resource_entries(many_services(5)).values():
        for key, entry in entries.items():
            bus.put(schema.BUCKET_RESOURCES, key, entry.value)
    lb = make_lb(bus)

    async def rows() -> dict[str, schema.LBFrontend]:
        return {k: schema.decode(v, schema.LBFrontend) for k, (_, v) in bus.kv[schema.BUCKET_SERVICES].items()}

    async def until(condition: Any) -> None:
        for _ in range(500):
            if await condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition never held")

    with pytest.raises(ExceptionGroup) as stopped:
        async with asyncio.TaskGroup() as tg:
            lb.start(tg)

            async def loaded() -> bool:
                return len(await rows()) == 5 and lb.ctx.healthy

            await until(loaded)
            passes = lb.loop.passes
            changed = resource_entries(many_services(5, changed=3))["EndpointSlice"]["EndpointSlice.default.s3-1"]
            bus.put(schema.BUCKET_RESOURCES, "EndpointSlice.default.s3-1", changed.value)

            async def moved() -> bool:
                return any(b.ip == "10.2.0.9" for fe in (await rows()).values() for b in fe.backends)

            await until(moved)
            assert lb.loop.passes > passes and lb.ctx.detail["services_recomputed"] == 1
            raise Stop
    assert stopped.group_contains(Stop)


class Stop(Exception):
    """Ends a test's task group."""


def test_a_due_resync_waits_for_quiet_inputs_at_most_until_the_latest() -> None:
    lb = make_lb(FakeBus())
    lb.loaded, lb.resynced = True, 100.0
    assert lb._resync_at() == 100.0 + RESYNC_S
    lb.last_change = 100.0 + RESYNC_S + 5  # inputs still changing when it is due: wait for a quiet moment
    assert lb._resync_at() == lb.last_change + RESYNC_QUIET_S
    lb.last_change = 100.0 + RESYNC_LATEST_S  # never quiet: it runs anyway
    assert lb._resync_at() == 100.0 + RESYNC_LATEST_S
    assert lb._wake_at() == 100.0 + RESYNC_LATEST_S


class FailingBus(FakeBus):
    """The third write to bucket ``services`` fails."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    async def kv_put(self, bucket: str, key: str, record: Any, *, last_revision: int | None = None) -> int:
        if bucket == schema.BUCKET_SERVICES:
            self.rows += 1
            if self.rows == 3:
                raise BusError("down")
        return await super().kv_put(bucket, key, record, last_revision=last_revision)


async def test_a_failed_write_keeps_what_was_written_and_the_next_whole_pass_completes() -> None:
    bus = FailingBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(many_services(5))
    await lb.load()
    with pytest.raises(BusError):
        await lb.reconcile()
    assert set(lb.written) == set(bus.kv[schema.BUCKET_SERVICES])  # exactly what was acknowledged
    await lb.load()
    await lb.reconcile()
    assert len(bus.kv[schema.BUCKET_SERVICES]) == 5 and set(lb.written) == set(bus.kv[schema.BUCKET_SERVICES])


async def test_logged_problems_are_capped_and_reported(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CILIARY_SERVICELB_LOGGED_MAX", "2")
    bus = FakeBus()
    lb = make_lb(bus)
    for problem in ("p1", "p2", "p1", "p3"):
        lb._log_once(problem)
    assert list(lb.logged) == ["p2", "p3"] and lb.logged.evicted == 1
    caplog.clear()
    lb._log_once("p1")  # forgotten, so logged again; the set stays at its cap
    assert "p1" in caplog.text and len(lb.logged) == 2
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    await lb.reconcile()
    caches = lb.ctx.detail["caches"]
    assert caches["logged_problems"] == {"size": 2, "cap": 2, "evicted": 2}
    assert caches["written_rows"]["size"] == len(bus.kv[schema.BUCKET_SERVICES]) > 0
