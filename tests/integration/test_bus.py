"""The bus against a real nats-server: KV CAS, level-triggered watch, reconnects."""

from __future__ import annotations

import asyncio

import pytest

from ciliary import schema
from ciliary.bus import SYNCED, Bus, BusError, KVEntry, PutManyError, RevisionMismatch


async def _collect_until_synced(it) -> dict[str, bytes]:
    state: dict[str, bytes] = {}
    async for event in it:
        if event is SYNCED:
            return state
        assert isinstance(event, KVEntry)
        if event.deleted:
            state.pop(event.key, None)
        else:
            state[event.key] = event.value
    raise AssertionError("watch ended before SYNCED")


async def test_compare_and_set(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        rev = await bus.kv_put(schema.BUCKET_ALLOCATIONS, "a", b"1", last_revision=0)
        with pytest.raises(RevisionMismatch):
            await bus.kv_put(schema.BUCKET_ALLOCATIONS, "a", b"2", last_revision=0)
        rev2 = await bus.kv_put(schema.BUCKET_ALLOCATIONS, "a", b"2", last_revision=rev)
        assert rev2 > rev
        with pytest.raises(RevisionMismatch):
            await bus.kv_put(schema.BUCKET_ALLOCATIONS, "a", b"3", last_revision=rev)
        # a deleted key can be created again with create semantics
        await bus.kv_delete(schema.BUCKET_ALLOCATIONS, "a")
        assert await bus.kv_get(schema.BUCKET_ALLOCATIONS, "a") is None
        await bus.kv_put(schema.BUCKET_ALLOCATIONS, "a", b"4", last_revision=0)
        got = await bus.kv_get(schema.BUCKET_ALLOCATIONS, "a")
        assert got is not None and got.value == b"4"
    finally:
        await bus.close()


async def test_watch_yields_state_then_changes(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        for i in range(5):
            await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"k.{i}", str(i).encode())
        await bus.kv_delete(schema.BUCKET_ALLOCATIONS, "k.3")
        it = bus.watch(schema.BUCKET_ALLOCATIONS, "k.>").__aiter__()
        initial = await asyncio.wait_for(_collect_until_synced(it), 5)
        assert initial == {"k.0": b"0", "k.1": b"1", "k.2": b"2", "k.4": b"4"}
        await bus.kv_put(schema.BUCKET_ALLOCATIONS, "k.9", b"9")
        event = await asyncio.wait_for(it.__anext__(), 5)
        assert isinstance(event, KVEntry) and event.key == "k.9" and event.value == b"9"
        await bus.kv_delete(schema.BUCKET_ALLOCATIONS, "k.0")
        event = await asyncio.wait_for(it.__anext__(), 5)
        assert isinstance(event, KVEntry) and event.key == "k.0" and event.deleted
        await it.aclose()
    finally:
        await bus.close()


async def test_watch_empty_bucket_is_synced_at_once(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        assert await bus.kv_list(schema.BUCKET_POLICY) == {}
    finally:
        await bus.close()


async def test_watch_survives_server_restart(nats_server) -> None:
    """Keys written and deleted while the server was away show up after the re-sync."""
    bus = await Bus.connect(nats_server.url, "test")
    writer = None
    try:
        await bus.ensure_buckets()
        await bus.kv_put(schema.BUCKET_ALLOCATIONS, "w.keep", b"1")
        await bus.kv_put(schema.BUCKET_ALLOCATIONS, "w.gone", b"1")
        it = bus.watch(schema.BUCKET_ALLOCATIONS, "w.>").__aiter__()
        state = await asyncio.wait_for(_collect_until_synced(it), 5)
        assert set(state) == {"w.keep", "w.gone"}

        nats_server.stop()
        await asyncio.sleep(0.3)
        nats_server.start()
        writer = await Bus.connect(nats_server.url, "writer")
        await writer.kv_delete(schema.BUCKET_ALLOCATIONS, "w.gone")
        await writer.kv_put(schema.BUCKET_ALLOCATIONS, "w.new", b"2")

        async def converge() -> None:
            async for event in it:
                if event is SYNCED:
                    if state == {"w.keep": b"1", "w.new": b"2"}:
                        return
                    continue
                if event.deleted:
                    state.pop(event.key, None)
                else:
                    state[event.key] = event.value
                if state == {"w.keep": b"1", "w.new": b"2"}:
                    return

        await asyncio.wait_for(converge(), 20)
        await it.aclose()
    finally:
        if writer:
            await writer.close()
        await bus.close()


async def test_request_many_and_bad_payloads(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        got: list[schema.HealthReport] = []

        async def handler(report: schema.HealthReport, msg) -> None:
            got.append(report)

        await bus.subscribe("t.health", schema.HealthReport, handler)
        await bus.publish("t.health", b"\xc1 not msgpack")  # dropped, handler survives
        good = schema.HealthReport(service="x", instance="x", pid=1, version="0", started=0.0, healthy=True)
        await bus.publish("t.health", good)
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == [good]
    finally:
        await bus.close()


async def test_trace_context_travels_in_headers(nats_server) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from ciliary import telemetry

    tracer = TracerProvider().get_tracer("test")  # a recording tracer, not the process's
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        seen: list[dict] = []
        handled_in: list[str] = []

        async def on_msg(msg) -> None:
            seen.append(dict(msg.headers or {}))
            handled_in.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))

        await bus.subscribe_raw("t.trace", on_msg)
        with tracer.start_as_current_span("apply") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            await bus.publish("t.trace", b"x")
            await bus.kv_put(schema.BUCKET_ALLOCATIONS, "traced", b"1")
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert trace_id in seen[0]["traceparent"]
        assert handled_in == [trace_id]  # the handler ran under the sender's trace context
        entries = await bus.kv_list(schema.BUCKET_ALLOCATIONS, "traced")
        assert trace_id in entries["traced"].headers["traceparent"]
        ctx = telemetry.extract_context(entries["traced"].headers)
        assert format(trace.get_current_span(ctx).get_span_context().trace_id, "032x") == trace_id
    finally:
        await bus.close()


async def test_watch_retries_when_the_server_does_not_answer_consumer_info(nats_server, monkeypatch) -> None:
    """A busy server (e.g. right after a slow-consumer disconnect) may time out the
    consumer-info request; the watch re-subscribes instead of ending its service."""
    from nats.js.client import JetStreamContext

    real = JetStreamContext.PushSubscription.consumer_info
    failures = {"left": 2}

    async def flaky(self):  # noqa: ANN001
        if failures["left"]:
            failures["left"] -= 1
            raise TimeoutError("consumer info timed out")
        return await real(self)

    monkeypatch.setattr(JetStreamContext.PushSubscription, "consumer_info", flaky)
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        await bus.kv_put(schema.BUCKET_ALLOCATIONS, "r.1", b"1")
        it = bus.watch(schema.BUCKET_ALLOCATIONS, "r.>").__aiter__()
        assert await asyncio.wait_for(_collect_until_synced(it), 10) == {"r.1": b"1"}
        assert failures["left"] == 0
        await it.aclose()
        failures["left"] = 1
        with pytest.raises(BusError):  # a one-shot read reports it instead
            await bus.kv_list(schema.BUCKET_ALLOCATIONS, "r.>")
    finally:
        await bus.close()


async def test_kv_put_many_pipelines_compare_and_set_writes(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        bucket = schema.BUCKET_ALLOCATIONS
        done: list[int] = []
        items = [(f"m.{i}", str(i).encode(), 0) for i in range(1000)]
        revisions = await bus.kv_put_many(bucket, items, concurrency=64, progress=done.append)
        assert sorted(revisions) == sorted(key for key, _, _ in items)
        assert done == list(range(1, 1001))
        stored = await bus.kv_list(bucket, "m.>")
        assert {k: (e.revision, e.value) for k, e in stored.items()} == {
            key: (revisions[key], value) for key, value, _ in items}
        # updates against the revisions read; a stale one stops the batch and names its key
        await bus.kv_put(bucket, "m.500", b"theirs", last_revision=revisions["m.500"])
        updates = [(key, b"new", revisions[key]) for key, _, _ in items]
        with pytest.raises(PutManyError) as caught:
            await bus.kv_put_many(bucket, updates, concurrency=8)
        err = caught.value
        assert err.key == "m.500" and list(err.failed) == ["m.500"]
        assert isinstance(err.__cause__, RevisionMismatch) and "m.500" in str(err)
        assert "m.500" not in err.written and len(err.written) < 1000
        after = await bus.kv_list(bucket, "m.>")
        assert {k for k, e in after.items() if e.value == b"new"} == set(err.written)
        assert after["m.500"].value == b"theirs"
        assert all(after[k].revision == rev for k, rev in err.written.items())
        # unconditional writes (None) and creations over deleted keys
        await bus.kv_delete(bucket, "m.1")
        again = await bus.kv_put_many(bucket, [("m.1", b"back", 0), ("m.2", b"any", None)])
        assert set(again) == {"m.1", "m.2"}
        assert (await bus.kv_get(bucket, "m.1")).value == b"back"
        assert await bus.kv_put_many(bucket, []) == {}
        # creations over many delete markers; failures that are not compare-and-set
        for key, _, _ in items:
            await bus.kv_delete(bucket, key)
        again = await bus.kv_put_many(bucket, items, concurrency=32)
        assert {k: e.value for k, e in (await bus.kv_list(bucket, "m.>")).items()} == {
            key: value for key, value, _ in items}
        assert all(again[k] > revisions[k] for k in revisions)
        with pytest.raises(PutManyError) as caught:
            await bus.kv_put_many("no-such-bucket", [("a", b"1", None), ("b", b"2", 0)])
        assert caught.value.key == "a" and not caught.value.written
        assert not isinstance(caught.value.__cause__, RevisionMismatch)
        huge = b"x" * (bus.max_payload + 1)
        with pytest.raises(PutManyError) as caught:
            await bus.kv_put_many(bucket, [("big.1", b"1", None), ("big.2", huge, None), ("big.3", b"3", None)],
                                  concurrency=1)
        assert caught.value.key == "big.2" and set(caught.value.written) == {"big.1"}
        assert await bus.kv_get(bucket, "big.3") is None, "nothing is started after a failure"
    finally:
        await bus.close()


@pytest.fixture
async def writer_and_reader(nats_server):  # type: ignore[no-untyped-def]
    """Two connections to one server, the buckets created: one writes, one lists."""
    writer = await Bus.connect(nats_server.url, "writer")
    reader = await Bus.connect(nats_server.url, "reader")
    try:
        await writer.ensure_buckets()
        yield writer, reader
    finally:
        await writer.close()
        await reader.close()


async def test_a_listing_holds_every_key_while_keys_are_replaced(writer_and_reader) -> None:
    """A key replaced while ``kv_list`` reads loses the message the listing was about to
    get; the listing waits for its new value instead of ending without the key."""
    writer, reader = writer_and_reader
    bucket = schema.BUCKET_ALLOCATIONS
    keys = [f"k.{i:04d}" for i in range(300)]
    await writer.kv_put_many(bucket, [(k, b"v0", None) for k in keys])
    stop = asyncio.Event()

    async def churn() -> int:
        n = 0
        while not stop.is_set():
            await writer.kv_put(bucket, keys[(n * 7919) % len(keys)], f"v{n}".encode())
            n += 1
        return n

    # listings with nothing to list end too, in an empty bucket and beside live keys
    assert await reader.kv_list(schema.BUCKET_MESH) == {}
    assert await reader.kv_list(bucket, "none.>") == {}
    writes = asyncio.ensure_future(churn())
    short = []
    for _ in range(200):
        listed = await reader.kv_list(bucket, "k.>")
        if len(listed) != len(keys):
            short.append(sorted(set(keys) - set(listed)))
    stop.set()
    replaced = await writes
    assert replaced > 200, replaced  # the listings really ran beside the writes
    assert not short, f"{len(short)} of 200 listings lacked keys, e.g. {short[:3]}"


async def test_a_listing_whose_consumer_stops_reads_the_bucket_again(writer_and_reader, monkeypatch) -> None:
    """A one-shot listing never waits forever: when its consumer stops sending before the
    listing is complete, it reads the bucket again with a new consumer, and a key it had
    already handed out that was deleted meanwhile is not in the result."""
    import ciliary.bus as busmod

    monkeypatch.setattr(busmod, "LISTING_STALL", 0.3)
    writer, reader = writer_and_reader
    bucket = schema.BUCKET_ALLOCATIONS
    keys = [f"s.{i:03d}" for i in range(20)]
    await writer.kv_put_many(bucket, [(k, b"v", None) for k in keys])
    subscribe = reader.js.subscribe
    calls = 0

    async def first_consumer_stops_after_five(*args, cb, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            passed = 0

            async def five_then_nothing(msg):  # type: ignore[no-untyped-def]
                nonlocal passed
                passed += 1
                if passed <= 5:
                    await cb(msg)
            return await subscribe(*args, cb=five_then_nothing, **kwargs)
        await writer.kv_delete(bucket, "s.000")  # handed out by the first read, gone now
        return await subscribe(*args, cb=cb, **kwargs)

    monkeypatch.setattr(reader.js, "subscribe", first_consumer_stops_after_five)
    listed = await asyncio.wait_for(reader.kv_list(bucket, "s.>"), 10)
    assert calls == 2
    assert sorted(listed) == keys[1:]

    async def never_sends(*args, cb, **kwargs):  # type: ignore[no-untyped-def]
        async def drop(msg):  # type: ignore[no-untyped-def]
            return None
        return await subscribe(*args, cb=drop, **kwargs)

    monkeypatch.setattr(reader.js, "subscribe", never_sends)
    with pytest.raises(BusError, match="sent nothing"):
        await asyncio.wait_for(reader.kv_list(bucket, "s.>"), 10)
