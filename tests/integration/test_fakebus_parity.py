"""``FakeBus`` against the real ``Bus`` on a real nats-server: every scenario runs on both
and must observe the same values, revisions, events and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ciliary import schema
from ciliary.bus import SYNCED, Bus, BusError, KVEntry, Message, Synced
from ciliary.testing import FakeBus, subject_matches

Seen = list[tuple[str, Any]]
Scenario = Callable[[Bus, Seen], Awaitable[None]]

ALLOC = schema.BUCKET_ALLOCATIONS
RES = schema.BUCKET_RESOURCES
MISSING = "parity-missing"


async def on_both(nats_server: Any, scenario: Scenario) -> Seen:
    """Run ``scenario`` on a real bus (fresh server) and on a fake; both must see the same."""
    real = await Bus.connect(nats_server.url, "parity")
    seen_real: Seen = []
    try:
        await real.ensure_buckets()
        await asyncio.wait_for(scenario(real, seen_real), 60)
    finally:
        await real.close()
    fake = FakeBus()
    seen_fake: Seen = []
    try:
        await asyncio.wait_for(scenario(fake, seen_fake), 60)
    finally:
        await fake.close()
    assert seen_fake == seen_real
    return seen_real


async def step(seen: Seen, label: str, call: Awaitable[Any]) -> Any:
    """Record what ``call`` returned, or the name of what it raised."""
    try:
        result = await call
    except Exception as err:  # noqa: BLE001 - the exception type is the observation
        seen.append((label, f"raises {type(err).__name__}"))
        return None
    seen.append((label, result))
    return result


async def until_synced(it: AsyncIterator[KVEntry | Synced]) -> list[KVEntry]:
    events: list[KVEntry] = []
    while (event := await asyncio.wait_for(it.__anext__(), 5)) is not SYNCED:
        assert isinstance(event, KVEntry)
        events.append(event)
    return events


async def until_write(it: AsyncIterator[KVEntry | Synced], key: str,
                      value: bytes | None) -> list[KVEntry | Synced]:
    """Events up to and including the one that writes ``value`` (None: deletes) to ``key``."""
    events: list[KVEntry | Synced] = []
    while True:
        event = await asyncio.wait_for(it.__anext__(), 5)
        events.append(event)
        if isinstance(event, KVEntry) and event.key == key and event.value == value:
            return events


async def settle(done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


async def kv_writes(bus: Bus, seen: Seen) -> None:
    rev = await step(seen, "create", bus.kv_put(ALLOC, "a", b"1", last_revision=0))
    await step(seen, "stale create", bus.kv_put(ALLOC, "a", b"x", last_revision=0))
    rev = await step(seen, "update", bus.kv_put(ALLOC, "a", b"2", last_revision=rev))
    await step(seen, "stale update", bus.kv_put(ALLOC, "a", b"x", last_revision=rev - 1))
    b1 = await step(seen, "plain put", bus.kv_put(ALLOC, "b.1", b"b1"))
    await step(seen, "record put", bus.kv_put(ALLOC, "b.2", schema.LBAllocation(owner="o")))
    await step(seen, "get", bus.kv_get(ALLOC, "a"))
    await step(seen, "get record", bus.kv_get_record(ALLOC, "b.2", schema.LBAllocation))
    await step(seen, "get absent", bus.kv_get(ALLOC, "nope"))
    await step(seen, "get record absent", bus.kv_get_record(ALLOC, "nope", schema.LBAllocation))
    await step(seen, "delete", bus.kv_delete(ALLOC, "a"))
    await step(seen, "get deleted", bus.kv_get(ALLOC, "a"))
    await step(seen, "stale delete", bus.kv_delete(ALLOC, "b.1", last_revision=b1 - 1))
    await step(seen, "delete at revision", bus.kv_delete(ALLOC, "b.1", last_revision=b1))
    await step(seen, "create on a deleted key", bus.kv_put(ALLOC, "a", b"3", last_revision=0))
    marker = (await bus.kv_get(ALLOC, "a")).revision + 1  # type: ignore[union-attr]
    await step(seen, "delete again", bus.kv_delete(ALLOC, "a"))
    await step(seen, "get deleted, marker asked for", bus.kv_get(ALLOC, "a", deleted=True))
    await step(seen, "get live, marker asked for", bus.kv_get(ALLOC, "b.2", deleted=True))
    await step(seen, "get absent, marker asked for", bus.kv_get(ALLOC, "nope", deleted=True))
    await step(seen, "put at the delete marker's revision",
               bus.kv_put(ALLOC, "a", b"4", last_revision=marker))
    await step(seen, "delete absent", bus.kv_delete(ALLOC, "never.1"))
    await step(seen, "delete absent, create semantics", bus.kv_delete(ALLOC, "never.2", last_revision=0))
    await step(seen, "delete absent at a revision", bus.kv_delete(ALLOC, "never.3", last_revision=5))
    await step(seen, "delete a deleted key, create semantics",
               bus.kv_delete(ALLOC, "never.1", last_revision=0))
    await step(seen, "create absent at a revision", bus.kv_put(ALLOC, "c", b"1", last_revision=99))
    await step(seen, "create over two delete markers", bus.kv_put(ALLOC, "never.1", b"1", last_revision=0))
    await step(seen, "get after", bus.kv_get(ALLOC, "never.1"))
    for pattern in (">", "b.>", "b.*", "*", "a", "never.>", "zz.>"):
        await step(seen, f"list {pattern}", bus.kv_list(ALLOC, pattern))
    await step(seen, "get, missing bucket", bus.kv_get(MISSING, "k"))
    await step(seen, "list, missing bucket", bus.kv_list(MISSING))


async def test_kv_writes_cas_deletes_and_lists(nats_server: Any) -> None:
    seen = await on_both(nats_server, kv_writes)
    assert dict(seen)["create on a deleted key"] == 7


async def watching(bus: Bus, seen: Seen) -> None:
    await bus.kv_put(RES, "Pod.default.a", b"a1")
    await bus.kv_put(RES, "Pod.default.b", b"b1")
    await bus.kv_put(RES, "Service.default.s", b"s1")
    await bus.kv_put(RES, "Pod.default.a", b"a2")
    await bus.kv_delete(RES, "Pod.default.b")
    await bus.kv_put(RES, "Pod.kube.c", b"c1")
    await bus.kv_put(RES, "Pod", b"bare")
    patterns = ("Pod.>", ">", "Pod.*.a", "*.default.*", "Pod")
    watches = {p: bus.watch(RES, p).__aiter__() for p in patterns}
    for pattern, it in watches.items():
        seen.append((f"initial {pattern}", await until_synced(it)))
    changes: dict[str, list[KVEntry | Synced]] = {p: [] for p in patterns}

    async def delivered(key: str, value: bytes | None) -> None:
        """Wait until every watch whose pattern matches ``key`` saw this write. A bucket
        keeps one value per key, so a value superseded before the server delivered it is
        legitimately never seen; waiting makes every intermediate value observable."""
        for pattern, it in watches.items():
            if subject_matches(pattern, key):
                changes[pattern] += await until_write(it, key, value)

    await bus.kv_put(RES, "Pod.default.a", b"a3", last_revision=4)
    await delivered("Pod.default.a", b"a3")
    await bus.kv_delete(RES, "Pod.default.a")
    await delivered("Pod.default.a", None)
    await bus.kv_delete(RES, "Pod.never.a")  # never written: a delete event nonetheless
    await delivered("Pod.never.a", None)
    await bus.kv_put(RES, "Service.default.t", b"t1")
    await delivered("Service.default.t", b"t1")
    await bus.kv_put(RES, "Pod", b"bare2")
    await delivered("Pod", b"bare2")
    await bus.kv_put(RES, "Pod.default.a", b"a4", last_revision=0)
    await delivered("Pod.default.a", b"a4")
    await bus.kv_put(RES, "Pod.default.a", b"end")
    await delivered("Pod.default.a", b"end")
    for pattern in patterns:
        seen.append((f"changes {pattern}", changes[pattern]))
    for it in watches.values():
        await it.aclose()  # type: ignore[attr-defined]
    seen.append(("once", [e async for e in bus.watch(RES, "Pod.>", once=True)]))
    seen.append(("once, empty bucket", [e async for e in bus.watch(schema.BUCKET_POLICY, once=True)]))


async def test_watch_state_synced_then_changes(nats_server: Any) -> None:
    seen = await on_both(nats_server, watching)
    assert [e.key for e in dict(seen)["initial Pod.>"]] == ["Pod.default.a", "Pod.kube.c"]


async def messaging(bus: Bus, seen: Seen) -> None:
    got: dict[str, list[bytes]] = {name: [] for name in ("plain", "wild", "q1", "q2", "other")}

    def into(name: str) -> Callable[[Message], Awaitable[None]]:
        async def handler(msg: Message) -> None:
            got[name].append(msg.data)

        return handler

    await bus.subscribe_raw("p.x", into("plain"))
    await bus.subscribe_raw("p.*", into("wild"))
    await bus.subscribe_raw("p.x", into("q1"), queue="g")
    await bus.subscribe_raw("p.>", into("q2"), queue="g")
    other = await bus.subscribe_raw("q.x", into("other"))
    for i in range(10):
        await bus.publish("p.x", str(i).encode())
    await bus.publish("p.y.z", b"deep")
    await other.unsubscribe()
    await bus.publish("q.x", b"gone")
    await settle(lambda: len(got["plain"]) == 10 and len(got["q1"]) + len(got["q2"]) == 11)
    seen.append(("plain in order", got["plain"]))
    seen.append(("wildcard", got["wild"]))
    seen.append(("queue group: each once", sorted(got["q1"] + got["q2"])))
    seen.append(("unsubscribed", got["other"]))

    typed: list[schema.LBAllocation] = []

    async def on_typed(record: schema.LBAllocation, msg: Message) -> None:
        typed.append(record)

    await bus.subscribe("t.typed", schema.LBAllocation, on_typed)
    await bus.publish("t.typed", b"\xc1 not msgpack")
    await bus.publish("t.typed", schema.LBAllocation(owner="good"))
    await settle(lambda: bool(typed))
    seen.append(("typed, bad payload dropped", typed))

    async def echo(req: schema.LBAllocation, msg: Message) -> None:
        await msg.respond(schema.LBAllocation(owner=req.owner + "!"))

    async def silent(msg: Message) -> None:
        return

    async def three(msg: Message) -> None:
        for i in range(3):
            await msg.respond(f"part {i}".encode())

    def named(name: bytes) -> Callable[[Message], Awaitable[None]]:
        async def answer(msg: Message) -> None:
            await msg.respond(name)

        return answer

    await bus.subscribe("r.echo", schema.LBAllocation, echo, queue="workers")
    await bus.subscribe_raw("r.silent", silent)
    await bus.subscribe_raw("r.three", three)
    await bus.subscribe_raw("r.all", named(b"one"))
    await bus.subscribe_raw("r.all", named(b"two"))
    await step(seen, "request", bus.request("r.echo", schema.LBAllocation(owner="me"),
                                            schema.LBAllocation, timeout=2))
    await step(seen, "request, nobody", bus.request("r.nobody", b"", bytes, timeout=2))
    await step(seen, "request, no answer", bus.request("r.silent", b"", bytes, timeout=0.2))

    async def stream(subject: str, take: int, timeout: float = 2.0) -> list[bytes]:
        out: list[bytes] = []
        async for reply in bus.request_stream(subject, b"", timeout=timeout):
            out.append(reply)
            if len(out) == take:
                break
        return out

    await step(seen, "request_stream", stream("r.three", 3))
    await step(seen, "request_stream, nobody", stream("r.nobody", 1))
    await step(seen, "request_stream, no answer", stream("r.silent", 1, 0.2))
    await step(seen, "request_stream, no further answer", stream("r.three", 4, 0.2))
    await step(seen, "request_many", sorted_many(bus, "r.all", 2.0))
    await step(seen, "request_many, nobody", bus.request_many("r.nobody", timeout=0.2))

    registration = await bus.register_service(
        "parity", version="1.0.0", description="parity", metadata={"k": "v"},
        endpoints={"health": ("parity.health", lambda: b"fine")})
    await step(seen, "service endpoint", bus.request_many("parity.health", timeout=1))
    await registration.stop()
    await step(seen, "service stopped", bus.request_many("parity.health", timeout=0.2))

    seen.append(("max_payload", bus.max_payload))
    await step(seen, "largest payload", bus.publish("big", b"x" * bus.max_payload))


async def sorted_many(bus: Bus, subject: str, timeout: float) -> list[bytes]:
    return sorted(await bus.request_many(subject, timeout=timeout))


async def test_publish_subscribe_queue_groups_and_requests(nats_server: Any) -> None:
    seen = await on_both(nats_server, messaging)
    assert dict(seen)["request_many"] == [b"one", b"two"]


async def nats_errors(bus: Bus, seen: Seen) -> None:
    for label, call in (("put, missing bucket", bus.kv_put(MISSING, "k", b"1")),
                        ("delete, missing bucket", bus.kv_delete(MISSING, "k")),
                        ("payload too large", bus.publish("big", b"x" * (bus.max_payload + 1)))):
        try:
            await call
        except Exception as err:  # noqa: BLE001 - whether it is a BusError is the observation
            seen.append((label, isinstance(err, BusError)))


async def test_failures_are_bus_errors(nats_server: Any) -> None:
    await on_both(nats_server, nats_errors)


async def streams(bus: Bus, seen: Seen) -> None:
    await step(seen, "missing: last seq", bus.stream_last_seq("PARITY"))
    await step(seen, "missing: read", read(bus))
    await step(seen, "missing: last message", last(bus, "ps.a"))
    await bus.ensure_stream("PARITY", ["ps.>"], max_bytes=1 << 20, max_age_s=60)
    await step(seen, "empty: last seq", bus.stream_last_seq("PARITY"))
    await step(seen, "empty: read", read(bus))
    await step(seen, "empty: last message", last(bus, "ps.a"))
    for i in range(7):
        await bus.publish(f"ps.{'ab'[i % 2]}", f"m{i}".encode())
        await asyncio.sleep(0.01)  # start times between two messages are unambiguous
    await bus.publish("other.subject", b"not stored")
    for _ in range(500):
        if await bus.stream_last_seq("PARITY") == 7:
            break
        await asyncio.sleep(0.01)
    await step(seen, "last seq", bus.stream_last_seq("PARITY"))
    everything = [m async for batch in bus.read_stream("PARITY", batch=3) for m in batch]
    seen.append(("read all", [(m.seq, m.subject, m.data) for m in everything]))
    await step(seen, "read ps.b", read(bus, subject="ps.b"))
    await step(seen, "last message on ps.b", last(bus, "ps.b"))
    await step(seen, "last message on ps.c", last(bus, "ps.c"))
    await step(seen, "read 3..5", read(bus, start_seq=3, end_seq=5))
    await step(seen, "read from 6", read(bus, start_seq=6))
    await step(seen, "read from beyond", read(bus, start_seq=9))
    just_before = everything[4].time_ns - 5_000_000
    await step(seen, "read from a time", read(bus, start_time_ns=just_before))
    await step(seen, "read ps.a from a time", read(bus, "ps.a", start_time_ns=just_before))


async def last(bus: Bus, subject: str) -> tuple[int, str, bytes] | None:
    m = await bus.stream_last_message("PARITY", subject)
    return None if m is None else (m.seq, m.subject, m.data)


async def read(bus: Bus, subject: str = ">", **kwargs: Any) -> list[tuple[int, str, bytes]]:
    out: list[tuple[int, str, bytes]] = []
    async for batch in bus.read_stream("PARITY", subject, batch=2, **kwargs):
        assert 0 < len(batch) <= 2
        out += [(m.seq, m.subject, m.data) for m in batch]
    return out


async def test_streams_store_and_read_ranges(nats_server: Any) -> None:
    seen = await on_both(nats_server, streams)
    assert dict(seen)["read 3..5"] == [(3, "ps.a", b"m2"), (4, "ps.b", b"m3"), (5, "ps.a", b"m4")]
    assert dict(seen)["last message on ps.b"] == (6, "ps.b", b"m5")
