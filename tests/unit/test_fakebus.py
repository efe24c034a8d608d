"""``ciliary.testing.FakeBus``: KV compare-and-set, watches, messaging, streams and the
helpers tests use (its agreement with a real server: tests/integration/test_fakebus_parity.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciliary import schema
from ciliary.bus import SYNCED, Bus, BusError, KVEntry, Message, NoReply, RevisionMismatch
from ciliary.testing import FakeBus, subject_matches

B = schema.BUCKET_ALLOCATIONS


@pytest.mark.parametrize(("pattern", "subject", "matches"), [
    (">", "a", True), (">", "a.b.c", True),
    ("Pod.>", "Pod.default.web", True), ("Pod.>", "Pod", False), ("Pod.>", "Service.a.b", False),
    ("id.>", "id.300", True), ("fe.>", "fe", False),
    ("*", "a", True), ("*", "a.b", False),
    ("a.*.c", "a.b.c", True), ("a.*.c", "a.b.d", False), ("a.*.c", "a.c", False),
    ("a.*", "a.b", True), ("a.*", "a.b.c", False), ("*.>", "a.b", True), ("*.>", "a", False),
    ("a.b", "a.b", True), ("a.b", "a.b.c", False), ("a.b", "a", False), ("a", "ab", False),
])
def test_subject_patterns(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


def test_fake_bus_rejects_a_stale_create() -> None:
    bus = FakeBus()
    asyncio.run(bus.kv_put(B, "k", b"x", last_revision=0))
    with pytest.raises(RevisionMismatch):
        asyncio.run(bus.kv_put(B, "k", b"y", last_revision=0))


async def test_compare_and_set() -> None:
    bus = FakeBus()
    assert isinstance(bus, Bus) and bus.connected
    rev = await bus.kv_put(B, "a", b"1", last_revision=0)
    assert rev == 1
    with pytest.raises(RevisionMismatch):
        await bus.kv_put(B, "a", b"2", last_revision=0)
    assert await bus.kv_put(B, "a", b"2", last_revision=rev) == 2
    with pytest.raises(RevisionMismatch):
        await bus.kv_put(B, "a", b"3", last_revision=rev)
    with pytest.raises(RevisionMismatch):
        await bus.kv_put(B, "absent", b"3", last_revision=7)
    assert await bus.kv_get(B, "a") == KVEntry(B, "a", 2, b"2")
    # a deleted key keeps a delete marker: create semantics, or its revision, write over it
    with pytest.raises(RevisionMismatch):
        await bus.kv_delete(B, "a", last_revision=1)
    await bus.kv_delete(B, "a", last_revision=2)
    assert await bus.kv_get(B, "a") is None
    with pytest.raises(RevisionMismatch):
        await bus.kv_delete(B, "a", last_revision=0)
    assert await bus.kv_put(B, "a", b"4", last_revision=0) == 4
    await bus.kv_delete(B, "a")
    assert await bus.kv_put(B, "a", b"5", last_revision=5) == 6
    # deleting what was never written leaves a marker too (create semantics allowed)
    await bus.kv_delete(B, "never", last_revision=0)
    with pytest.raises(RevisionMismatch):
        await bus.kv_delete(B, "never-either", last_revision=3)
    assert bus.log == [("put", B, "a"), ("put", B, "a"), ("delete", B, "a"), ("put", B, "a"),
                       ("delete", B, "a"), ("put", B, "a"), ("delete", B, "never")]
    assert bus.ops is bus.log


async def test_records_revisions_per_bucket_and_unknown_buckets() -> None:
    bus = FakeBus()
    await bus.kv_put(B, "a", schema.LBAllocation(owner="x"))
    assert await bus.kv_put(schema.BUCKET_STATUS, "s", b"1") == 1  # its own sequence
    assert await bus.kv_get_record(B, "a", schema.LBAllocation) == (schema.LBAllocation(owner="x"), 1)
    assert await bus.kv_get_record(B, "b", schema.LBAllocation) is None
    with pytest.raises(BusError):
        await bus.kv_get("nope", "k")
    with pytest.raises(BusError):
        await bus.kv_list("nope")
    with pytest.raises(BusError):
        await bus.kv_put("nope", "k", b"1")
    with pytest.raises(BusError):
        await bus.kv_delete("nope", "k")
    await bus.ensure_buckets(("nope",))
    assert await bus.kv_put("nope", "k", b"1") == 1
    assert FakeBus(buckets=()).data == {}


async def test_kv_list_patterns() -> None:
    bus = FakeBus()
    for key in ("Pod.default.a", "Pod.default.b", "Pod.kube.c", "Pod", "Service.default.a"):
        await bus.kv_put(schema.BUCKET_RESOURCES, key, key.encode())
    await bus.kv_delete(schema.BUCKET_RESOURCES, "Pod.default.b")

    async def keys(pattern: str) -> list[str]:
        return list(await bus.kv_list(schema.BUCKET_RESOURCES, pattern))

    assert await keys(">") == ["Pod.default.a", "Pod.kube.c", "Pod", "Service.default.a"]
    assert await keys("Pod.>") == ["Pod.default.a", "Pod.kube.c"]
    assert await keys("*.default.*") == ["Pod.default.a", "Service.default.a"]
    assert await keys("Pod") == ["Pod"]
    assert await keys("Node.>") == []


async def test_watch_state_then_synced_then_changes() -> None:
    bus = FakeBus()
    bus.put(B, "k.2", b"2")
    bus.put(B, "k.1", b"1")
    bus.put(B, "other", b"o")
    bus.put(B, "k.3", b"3")
    bus.delete(B, "k.3")
    it = bus.watch(B, "k.>").__aiter__()
    assert [await it.__anext__() for _ in range(3)] == [
        KVEntry(B, "k.2", 1, b"2"), KVEntry(B, "k.1", 2, b"1"), SYNCED]  # revision order
    await bus.kv_put(B, "k.1", b"1b", last_revision=2)
    await bus.kv_put(B, "other", b"o2")
    await bus.kv_delete(B, "k.2")
    await bus.kv_delete(B, "k.9")  # never seen: delivered all the same
    assert [await asyncio.wait_for(it.__anext__(), 1) for _ in range(3)] == [
        KVEntry(B, "k.1", 6, b"1b", {"Nats-Expected-Last-Subject-Sequence": "2"}),
        KVEntry(B, "k.2", 8, None, {"KV-Operation": "DEL"}),
        KVEntry(B, "k.9", 9, None, {"KV-Operation": "DEL"}),
    ]
    await it.aclose()  # type: ignore[attr-defined]
    assert [e async for e in bus.watch(B, "k.>", once=True)] == [KVEntry(B, "k.1", 6, b"1b", {
        "Nats-Expected-Last-Subject-Sequence": "2"}), SYNCED]
    assert [e async for e in bus.watch(schema.BUCKET_POLICY, once=True)] == [SYNCED]
    with pytest.raises(BusError):
        [e async for e in bus.watch("nope", once=True)]


async def test_a_watch_waits_for_its_bucket() -> None:
    bus = FakeBus(buckets=())
    it = bus.watch("late").__aiter__()
    first = asyncio.ensure_future(it.__anext__())
    await asyncio.sleep(0.05)
    assert not first.done()
    await bus.ensure_buckets(("late",))
    assert await asyncio.wait_for(first, 2) is SYNCED
    await it.aclose()  # type: ignore[attr-defined]


async def test_watch_events_arrive_after_the_write_returns() -> None:
    bus = FakeBus()
    it = bus.watch(B).__aiter__()
    assert await it.__anext__() is SYNCED
    seen: list[KVEntry] = []

    async def consume() -> None:
        async for event in it:
            assert isinstance(event, KVEntry)
            seen.append(event)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    bus.put(B, "a", b"1")
    bus.put(B, "b", b"2")
    assert seen == []  # queued, not delivered inside the writer
    await asyncio.sleep(0)
    assert [e.key for e in seen] == ["a", "b"]
    task.cancel()


async def test_seeding_helpers_and_snapshots() -> None:
    bus = FakeBus()
    assert bus.put(B, "a", schema.LBAllocation(owner="x")) == 1
    assert bus.put(B, "b", b"raw", revision=99) == 99
    with pytest.raises(ValueError):
        bus.put(B, "c", b"late", revision=50)
    assert bus.put("new-bucket", "k", b"v") == 1
    bus.delete(B, "a")
    assert bus.data[B] == {"b": (99, b"raw")} and bus.kv == bus.data
    assert bus.data["new-bucket"] == {"k": (1, b"v")}
    assert bus.data[schema.BUCKET_POLICY] == {}
    snapshot = bus.data
    snapshot[B].clear()  # a copy: the bus is untouched
    assert bus.data[B] == {"b": (99, b"raw")}
    assert bus.log == []  # seeding is not logged
    with pytest.raises(AttributeError):
        bus.nc  # noqa: B018


async def test_publish_reaches_subscribers_and_one_per_queue_group() -> None:
    bus = FakeBus()
    got: dict[str, list[bytes]] = {"plain": [], "wild": [], "q1": [], "q2": [], "q3": []}

    def into(name: str) -> Any:
        async def handler(msg: Message) -> None:
            got[name].append(msg.data)

        return handler

    await bus.subscribe_raw("a.b", into("plain"))
    await bus.subscribe_raw("a.>", into("wild"))
    await bus.subscribe_raw("a.b", into("q1"), queue="g")
    await bus.subscribe_raw("a.*", into("q2"), queue="g")
    await bus.subscribe_raw("a.b", into("q3"), queue="h")
    for i in range(4):
        await bus.publish("a.b", str(i).encode())
    assert all(not v for v in got.values())  # delivered later, on the loop
    await asyncio.sleep(0)
    assert got["plain"] == got["wild"] == got["q3"] == [b"0", b"1", b"2", b"3"]
    assert got["q1"] == [b"0", b"2"] and got["q2"] == [b"1", b"3"]  # round robin
    assert bus.published == [("a.b", str(i).encode()) for i in range(4)]


async def test_handlers_run_one_at_a_time_in_order_and_survive_errors() -> None:
    bus = FakeBus()
    running = 0
    order: list[int] = []

    async def slow(record: schema.LBAllocation, msg: Message) -> None:
        nonlocal running
        running += 1
        assert running == 1
        await asyncio.sleep(0.001)
        order.append(int(record.owner))
        running -= 1
        if record.owner == "1":
            raise RuntimeError("boom")

    sub = await bus.subscribe("t", schema.LBAllocation, slow)
    await bus.publish("t", b"\xc1")  # undecodable: dropped
    for i in range(5):
        await bus.publish("t", schema.LBAllocation(owner=str(i)))
    for _ in range(100):
        if len(order) == 5:
            break
        await asyncio.sleep(0.005)
    assert order == [0, 1, 2, 3, 4]
    assert [str(e) for e in bus.handler_errors] == ["boom"]
    await sub.unsubscribe()
    await bus.publish("t", schema.LBAllocation(owner="5"))
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2, 3, 4]


async def test_requests() -> None:
    bus = FakeBus()

    async def echo(req: schema.LBAllocation, msg: Message) -> None:
        assert msg.subject == "r.echo" and msg.reply
        await msg.respond(schema.LBAllocation(owner=req.owner + "!"))

    async def parts(msg: Message) -> None:
        for i in range(3):
            await msg.respond(f"p{i}".encode())

    async def silent(msg: Message) -> None:
        await Message(bus, msg.subject, msg.data).respond(b"no reply subject: not sent")

    await bus.subscribe("r.echo", schema.LBAllocation, echo, queue="w")
    await bus.subscribe_raw("r.parts", parts)
    await bus.subscribe_raw("r.parts", parts)
    await bus.subscribe_raw("r.silent", silent)
    reply = await bus.request("r.echo", schema.LBAllocation(owner="me"), schema.LBAllocation)
    assert reply == schema.LBAllocation(owner="me!")
    with pytest.raises(BusError):
        await bus.request("r.nobody", b"", bytes)
    with pytest.raises(BusError):
        await bus.request("r.silent", b"", bytes, timeout=0.05)

    got: list[bytes] = []
    with pytest.raises(NoReply):
        async for part in bus.request_stream("r.parts", b"", timeout=0.05):
            got.append(part)
    assert sorted(got) == [b"p0", b"p0", b"p1", b"p1", b"p2", b"p2"]
    with pytest.raises(NoReply):
        async for _ in bus.request_stream("r.nobody", b"", timeout=1):
            pass
    assert sorted(await bus.request_many("r.parts", timeout=1, quiet=0.05)) == sorted(got)
    assert await bus.request_many("r.nobody", timeout=0.05) == []
    assert not [s for s in bus._subs if s.subject.startswith("_INBOX.")]  # inboxes all gone


async def test_register_service_answers_its_endpoints_until_stopped() -> None:
    bus = FakeBus()
    reg = await bus.register_service("svc", version="1", description="d", metadata={"k": "v"},
                                     endpoints={"health": ("svc.health", lambda: b"ok")})
    assert bus.services["svc"]["endpoints"] == {"health": "svc.health"}
    assert await bus.request_many("svc.health", timeout=1, quiet=0.01) == [b"ok"]
    await reg.stop()
    assert bus.services == {}
    assert await bus.request_many("svc.health", timeout=0.05) == []


async def test_max_payload() -> None:
    bus = FakeBus()
    assert bus.max_payload == 1024 * 1024
    bus.max_payload = 10
    await bus.publish("x", b"0123456789")
    with pytest.raises(BusError):
        await bus.publish("x", b"0123456789A")
    assert bus.published == [("x", b"0123456789")]


async def test_streams() -> None:
    bus = FakeBus()
    with pytest.raises(BusError):
        await bus.stream_last_seq("S")
    await bus.ensure_stream("S", ["s.>"], max_bytes=1 << 20, max_age_s=60)
    assert await bus.stream_last_seq("S") == 0
    for i in range(5):
        await bus.publish(f"s.{'ab'[i % 2]}", bytes([i]))
    await bus.publish("t.x", b"elsewhere")
    assert await bus.stream_last_seq("S") == 5
    batches = [[m.seq for m in b] async for b in bus.read_stream("S", batch=2)]
    assert batches == [[1, 2], [3, 4], [5]]
    assert [[m.data for m in b] async for b in bus.read_stream("S", "s.b")] == [[b"\x01", b"\x03"]]
    assert [[m.seq for m in b] async for b in bus.read_stream("S", start_seq=2, end_seq=3)] == [[2, 3]]
    msgs = [m async for b in bus.read_stream("S") for m in b]
    assert all(m.time_ns % 1000 == 0 for m in msgs)
    later = [m.seq async for b in bus.read_stream("S", start_time_ns=msgs[3].time_ns) for m in b]
    assert later[-2:] == [4, 5]
    # limits: the oldest go first
    await bus.ensure_stream("S", ["s.>"], max_bytes=3 * (22 + 3 + 1), max_age_s=60)
    assert [m.seq async for b in bus.read_stream("S") for m in b] == [3, 4, 5]
    await bus.ensure_stream("S", ["s.>"], max_bytes=0, max_age_s=0.001)
    await asyncio.sleep(0.01)
    await bus.publish("s.a", b"new")
    assert [m.seq async for b in bus.read_stream("S") for m in b] == [6]


async def test_close() -> None:
    bus = FakeBus()
    got: list[bytes] = []

    async def handler(msg: Message) -> None:
        got.append(msg.data)

    await bus.subscribe_raw("x", handler)
    await bus.publish("x", b"0")
    await bus.close()
    assert not bus.connected and bus.closing
    for call in (bus.publish("x", b"1"), bus.kv_put(B, "k", b"1"), bus.kv_get(B, "k"),
                 bus.kv_list(B), bus.request("x", b"", bytes), bus.subscribe_raw("x", handler)):
        with pytest.raises(BusError):
            await call
    await asyncio.sleep(0)
    assert got == []  # what was pending when it closed is dropped
    assert bus.published == [("x", b"0")]
    bus.connected = True
    assert bus.connected
