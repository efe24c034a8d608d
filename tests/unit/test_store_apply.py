"""``ResourceStore.apply`` over ``ciliary.testing.FakeBus``: bulk reads, pipelined
compare-and-set writes, and all-or-nothing when a write fails in the middle."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciliary import schema
from ciliary.bus import SYNCED, BusError, KVEntry
from ciliary.resources import Resource, loads
from ciliary.store import READ_BY_LIST_MIN, ResourceStore, kv_key
from ciliary.testing import FakeBus

RES = schema.BUCKET_RESOURCES


def services(n: int, *, namespace: str = "bench", port: int = 80, start: int = 0) -> list[Resource]:
    docs = [f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05d}, namespace: {namespace}}}\n"
            f"spec:\n  ports:\n  - {{port: {port}}}\n" for i in range(start, start + n)]
    return loads("---\n".join(docs))


def stored(bus: FakeBus) -> dict[str, tuple[int, schema.ResourceRecord]]:
    return {key: (rev, schema.decode(value, schema.ResourceRecord))
            for key, (rev, value) in bus.data[RES].items()}


class CountingBus(FakeBus):
    """Counts the reads an apply makes."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.lists: list[str] = []

    async def kv_get(self, bucket: str, key: str, *, deleted: bool = False) -> KVEntry | None:
        self.gets += 1
        return await super().kv_get(bucket, key, deleted=deleted)

    async def kv_list(self, bucket: str, pattern: str = ">") -> dict[str, KVEntry]:
        self.lists.append(pattern)
        return await super().kv_list(bucket, pattern)


async def test_apply_creates_updates_and_keeps_input_order() -> None:
    bus = FakeBus()
    store = ResourceStore(bus)
    objects = services(600)
    seen: list[tuple[int, int]] = []
    results = await store.apply(objects, concurrency=16, progress=lambda d, t: seen.append((d, t)))
    assert [(r.name, r.action) for r in results] == [(o.name, "created") for o in objects]
    assert seen == [(i, 600) for i in range(1, 601)]
    first = stored(bus)
    assert set(first) == {kv_key("Service", "bench", o.name) for o in objects}
    assert {record.generation for _, record in first.values()} == {1}
    assert len({record.uid for _, record in first.values()}) == 600

    changed = services(10, port=81) + services(590, start=10)
    results = await store.apply(changed, concurrency=16)
    assert [r.action for r in results] == ["configured"] * 10 + ["unchanged"] * 590
    second = stored(bus)
    for key, (revision, record) in second.items():
        old_revision, old = first[key]
        if record.name < "svc-00010":
            assert (record.generation, record.uid, record.created) == (2, old.uid, old.created)
            assert revision > old_revision and record.manifest["spec"]["ports"] == [{"port": 81}]
        else:
            assert (revision, record) == (old_revision, old)


async def test_existing_objects_are_read_by_list_per_kind_and_namespace_or_one_by_one() -> None:
    bus = CountingBus()
    store = ResourceStore(bus)
    await store.apply(services(READ_BY_LIST_MIN) + services(3, namespace="small"))
    assert bus.lists == ["Service.bench.>"] and bus.gets == 3
    bus.lists.clear()
    bus.gets = 0
    results = await store.apply(services(READ_BY_LIST_MIN) + services(3, namespace="small"))
    assert {r.action for r in results} == {"unchanged"}
    assert bus.lists == ["Service.bench.>"] and bus.gets == 3


async def test_recreating_a_deleted_object_writes_over_its_delete_marker_in_one_compare_and_set() -> None:
    bus = FakeBus()
    store = ResourceStore(bus)
    await store.apply(services(1))
    key = next(iter(stored(bus)))
    await bus.kv_delete(RES, key)
    marker = await bus.kv_get(RES, key, deleted=True)
    assert marker is not None and marker.value is None
    puts: list[int | None] = []
    real_put = bus.kv_put

    async def recording_put(bucket: str, k: str, record: Any, *, last_revision: int | None = None) -> int:
        puts.append(last_revision)
        return await real_put(bucket, k, record, last_revision=last_revision)

    bus.kv_put = recording_put  # type: ignore[method-assign]
    results = await store.apply(services(1))
    assert [r.action for r in results] == ["created"]
    # compare-and-set against the marker read with the object, not a create (0) that the
    # server refuses and the bus retries
    assert puts == [marker.revision]
    assert key in stored(bus)


async def _write_when(bus: FakeBus, after: int, key: str, record: Any, wrote: asyncio.Event) -> None:
    """A concurrent writer: once ``after`` writes of the apply happened, it writes ``key``."""
    count, synced = 0, False
    async for event in bus.watch(RES, ">"):
        if event is SYNCED:
            synced = True
        elif synced:
            count += 1
            if count == after:
                await bus.kv_put(RES, key, record)
                wrote.set()
                return


async def test_a_conflict_in_the_middle_rolls_every_write_back() -> None:
    bus = FakeBus()
    store = ResourceStore(bus)
    await store.apply(services(100))  # svc-00000..00099 exist (generation 1)
    before = stored(bus)
    update = services(100, port=81) + services(1900, start=100)  # 100 updates, 1,900 creations
    target = kv_key("Service", "bench", "svc-01999")
    theirs = schema.encode(schema.ResourceRecord(kind="Service", api_version="v1", namespace="bench",
                                                 name="svc-01999", uid="theirs", generation=1,
                                                 created="", manifest={}))
    wrote = asyncio.Event()
    writer = asyncio.create_task(_write_when(bus, 500, target, theirs, wrote))
    for _ in range(3):
        await asyncio.sleep(0)  # the writer's watch is set up before the apply writes
    with pytest.raises(BusError) as caught:
        await store.apply(update, concurrency=64)
    await writer
    assert wrote.is_set()
    assert str(caught.value).startswith("apply failed, nothing changed: Service bench/svc-01999: ")
    assert "changed since it was read" in str(caught.value)
    after = stored(bus)
    assert set(after) == set(before) | {target}, "every creation was deleted again"
    assert bus.data[RES][target][1] == theirs, "the concurrent write is kept"
    for key, (_, record) in before.items():
        assert after[key][1] == record, "every update was put back"


class LosingBus(FakeBus):
    """Fails the write of one key: before storing it, or after (its answer lost)."""

    def __init__(self, key: str, *, stored: bool) -> None:
        super().__init__()
        self.failing, self.stored = key, stored

    async def kv_put(self, bucket: str, key: str, record: Any, *, last_revision: int | None = None) -> int:
        if bucket == RES and key == self.failing:
            if self.stored:
                await super().kv_put(bucket, key, record, last_revision=last_revision)
            raise BusError(f"write {bucket}/{key}: timed out")
        return await super().kv_put(bucket, key, record, last_revision=last_revision)


@pytest.mark.parametrize("stored_anyway", [False, True])
async def test_a_failed_write_rolls_back_also_when_it_was_stored(stored_anyway: bool) -> None:
    bus = LosingBus(kv_key("Service", "bench", "svc-00300"), stored=stored_anyway)
    with pytest.raises(BusError, match=r"^apply failed, nothing changed: Service bench/svc-00300: "
                                       r"write resources/Service.bench.svc-00300: timed out$"):
        await ResourceStore(bus).apply(services(1000), concurrency=32)
    assert stored(bus) == {}, "nothing is left, not even the write whose answer was lost"
    assert (("put", RES, "Service.bench.svc-00300") in bus.log) is stored_anyway


async def test_an_object_given_twice_changes_nothing() -> None:
    bus = FakeBus()
    objects = services(3)
    with pytest.raises(BusError, match="Service bench/svc-00001 is given twice"):
        await ResourceStore(bus).apply([*objects, objects[1]])
    assert bus.log == []


async def test_an_undecodable_stored_object_is_named() -> None:
    bus = FakeBus()
    bus.put(RES, "Service.bench.svc-00000", b"\x01garbage")
    with pytest.raises(BusError, match="the stored Service bench/svc-00000 cannot be read"):
        await ResourceStore(bus).apply(services(2))
    assert bus.log == []
