"""The identity service's pure helpers: the KV mirror behind ``BusCasStore`` and settings."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciliary import schema
from ciliary.bus import BusError, KVEntry
from ciliary.runtime import Context, Settings
from ciliary.testing import FakeBus
from services.identity.allocator import Conflict
from services.identity.service import (
    BusCasStore,
    IdentityConfig,
    IdentityService,
    decode_identity,
    decode_ipcache,
    label_filter,
)


def ipc(prefix: str, ident: int) -> bytes:
    return schema.encode(schema.IPCacheRecord(prefix=prefix, identity=ident, source="pod", cluster="c", cluster_id=1))


def test_mirror_ignores_stale_events_and_bad_payloads() -> None:
    store = BusCasStore(FakeBus(), schema.BUCKET_IPCACHE, decode_ipcache)
    store.observe(KVEntry("ipcache", "10.0.0.1_32", 5, ipc("10.0.0.1/32", 300)))
    store.observe(KVEntry("ipcache", "10.0.0.1_32", 3, ipc("10.0.0.1/32", 299)))  # older: ignored
    assert store.peek("10.0.0.1_32")[0].identity == 300  # type: ignore[index]
    store.observe(KVEntry("ipcache", "10.0.0.1_32", 4, None))  # delete older than what we hold
    assert store.peek("10.0.0.1_32") is not None
    store.observe(KVEntry("ipcache", "10.0.0.1_32", 0, None))  # resync delete: always applies
    assert store.peek("10.0.0.1_32") is None
    store.observe(KVEntry("ipcache", "bad", 7, b"\xc1"))
    assert store.peek("bad") is None and store.exists("bad") and "bad" in store.keys("")
    store.observe(KVEntry("ipcache", "bad", 8, None))
    assert not store.exists("bad")


async def test_writes_update_the_mirror_and_map_conflicts() -> None:
    bus = FakeBus()
    store = BusCasStore(bus, schema.BUCKET_IPCACHE, decode_ipcache)
    record = schema.IPCacheRecord(prefix="10.0.0.2/32", identity=7, source="pod", cluster="c", cluster_id=1)
    rev = await store.create("10.0.0.2_32", record)
    assert store.peek("10.0.0.2_32") == (record, rev)
    with pytest.raises(Conflict):
        await store.create("10.0.0.2_32", record)
    # a conflict re-reads the key: a view that missed a write heals
    bus.put(schema.BUCKET_IPCACHE, "10.0.0.2_32", ipc("10.0.0.2/32", 8), revision=99)
    with pytest.raises(Conflict):
        await store.update("10.0.0.2_32", record, rev)
    assert store.peek("10.0.0.2_32")[0].identity == 8 and store.peek("10.0.0.2_32")[1] == 99  # type: ignore[index]
    rev = 99
    store.entries["10.0.0.2_32"] = (record, rev)
    await store.delete("10.0.0.2_32", rev)
    assert store.peek("10.0.0.2_32") is None
    # a late watch event for the deleted revision does not resurrect it
    store.observe(KVEntry("ipcache", "10.0.0.2_32", rev, schema.encode(record)))
    assert store.peek("10.0.0.2_32") is None
    store.observe(KVEntry("ipcache", "10.0.0.2_32", rev + 1, None))  # our delete arrives
    assert store.tombstones == {}


def test_decoders_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = schema.IdentityRecord(id=300, labels=["k8s:a=b"], scope="cluster", cluster="c", cluster_id=0)
    assert decode_identity("id.300", schema.encode(rec)) == rec
    with pytest.raises(ValueError):
        decode_identity("other.1", schema.encode(rec))
    monkeypatch.setenv("CILIARY_IDENTITY_GC_GRACE", "1")
    monkeypatch.setenv("CILIARY_IDENTITY_LABELS", "k8s:!job-name")
    config = IdentityConfig.from_env()
    assert config.gc_grace == 1.0 and config.gc_interval == 0.25 and config.labels == "k8s:!job-name"
    assert IdentityConfig().gc_grace == 900 and IdentityConfig().gc_interval == 30.0
    flt, errors = label_filter("k8s:!job-name k8s:( k8s:!")
    assert len(errors) == 2 and [p.text for p in flt.patterns if not p.default] == ["k8s:!job-name"]


async def test_audit_adds_keys_the_watch_missed() -> None:
    bus = FakeBus()
    store = BusCasStore(bus, schema.BUCKET_IPCACHE, decode_ipcache)
    bus.put(schema.BUCKET_IPCACHE, "10.0.0.3_32", ipc("10.0.0.3/32", 5), revision=4)
    bus.put(schema.BUCKET_IPCACHE, "10.0.0.4_32", ipc("10.0.0.4/32", 6), revision=5)
    store.observe(KVEntry("ipcache", "10.0.0.4_32", 5, ipc("10.0.0.4/32", 6)))
    assert await store.audit() == 1
    assert store.peek("10.0.0.3_32")[0].identity == 5  # type: ignore[index]
    assert await store.audit() == 0


async def test_the_echo_of_an_own_write_is_no_news() -> None:
    bus = FakeBus()
    store = BusCasStore(bus, schema.BUCKET_IPCACHE, decode_ipcache)
    record = schema.IPCacheRecord(prefix="10.0.0.4/32", identity=9, source="pod", cluster="c", cluster_id=1)
    rev = await store.create("10.0.0.4_32", record)
    # the watch delivers this replica's own write: nothing new, no pass needed
    assert store.observe(KVEntry("ipcache", "10.0.0.4_32", rev, schema.encode(record))) is False
    # another replica's newer write is news
    newer = bus.put(schema.BUCKET_IPCACHE, "10.0.0.4_32", ipc("10.0.0.4/32", 10))
    assert store.observe(KVEntry("ipcache", "10.0.0.4_32", newer, ipc("10.0.0.4/32", 10))) is True
    await store.delete("10.0.0.4_32", newer)
    assert store.observe(KVEntry("ipcache", "10.0.0.4_32", newer + 1, None)) is False  # our delete's echo
    assert store.observe(KVEntry("ipcache", "10.0.0.5_32", 1, ipc("10.0.0.5/32", 11))) is True
    assert store.observe(KVEntry("ipcache", "10.0.0.5_32", 2, None)) is True  # someone else's delete
    assert store.observe(KVEntry("ipcache", "bad", 3, b"\xc1")) is True


def _resource(bus: FakeBus, manifest: dict[str, object]) -> str:
    meta = manifest["metadata"]
    assert isinstance(meta, dict)
    key = f"{manifest['kind']}.{meta.get('namespace', 'default')}.{meta['name']}"
    bus.put(schema.BUCKET_RESOURCES, key, schema.ResourceRecord(
        kind=str(manifest["kind"]), api_version="v1", namespace=str(meta.get("namespace", "default")),
        name=str(meta["name"]), uid="u", generation=1, created="", manifest=manifest))
    return key


def _pod(bus: FakeBus, name: str, app: str, ip: str) -> str:
    key = _resource(bus, {"apiVersion": "v1", "kind": "Pod", "spec": {"nodeName": "n1"},
                          "metadata": {"name": name, "namespace": "default", "labels": {"app": app}}})
    bus.put(schema.BUCKET_STATUS, key, schema.StatusRecord(reporter="node/n1", status={"podIP": ip}))
    return key


def _ipcache_identity(bus: FakeBus, key: str) -> int:
    held = bus.data.get(schema.BUCKET_IPCACHE, {}).get(key)
    return schema.decode(held[1], schema.IPCacheRecord).identity if held else 0


async def until(predicate: Any) -> None:
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_passes_after_the_first_touch_only_what_changed_and_still_heal() -> None:
    """A relabel rewrites only its pod's ipcache key; a foreign write to a key is undone by
    the next pass; a deleted pod's key goes; the counts in the health detail follow."""
    bus = FakeBus()
    for n in range(20):
        _pod(bus, f"p{n}", f"a{n}", f"10.0.0.{n + 1}")
    ctx = Context(service="identity", settings=Settings(nats_url="mem://", instance="identity-t"), bus=bus)
    svc = IdentityService(ctx, IdentityConfig())

    async with asyncio.TaskGroup() as tg:
        await svc.start(tg)
        try:
            await until(lambda: all(_ipcache_identity(bus, f"10.0.0.{n + 1}_32") for n in range(20)))
            before = {n: _ipcache_identity(bus, f"10.0.0.{n + 1}_32") for n in range(20)}
            bus.log.clear()
            _pod(bus, "p3", "moved", "10.0.0.4")
            await until(lambda: _ipcache_identity(bus, "10.0.0.4_32") not in (0, before[3]))
            await asyncio.sleep(0.2)  # the passes that follow the relabel (its echoes)
            ipcache_writes = [key for op, bucket, key in bus.log if bucket == schema.BUCKET_IPCACHE]
            assert ipcache_writes == ["10.0.0.4_32"]
            # another writer's value for a key this service owns: put back
            bus.put(schema.BUCKET_IPCACHE, "10.0.0.7_32", schema.IPCacheRecord(
                prefix="10.0.0.7/32", identity=999, source="pod", cluster="default", cluster_id=0))
            await until(lambda: _ipcache_identity(bus, "10.0.0.7_32") == before[6])
            bus.delete(schema.BUCKET_RESOURCES, "Pod.default.p9")
            await until(lambda: "10.0.0.10_32" not in bus.data[schema.BUCKET_IPCACHE])
            await until(lambda: ctx.detail.get("endpoints") == 19)
            assert ctx.detail["label_sets"] == 21 and ctx.detail["identities"] >= 21
        finally:
            for task in tg._tasks:  # type: ignore[attr-defined]
                task.cancel()


async def test_a_pass_that_raised_is_followed_by_a_full_one() -> None:
    """A relabel whose release of the old label set fails on the bus: the pass raises, and
    the next pass (a full one) still releases the label set nobody uses any more."""
    bus = FakeBus()
    _pod(bus, "p0", "before", "10.0.0.1")
    ctx = Context(service="identity", settings=Settings(nats_url="mem://", instance="identity-t"), bus=bus)
    svc = IdentityService(ctx, IdentityConfig())
    release = svc.allocator.release
    calls = 0

    async def flaky_release(lkey: str, grace: float) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BusError("the bus hiccuped")
        return await release(lkey, grace)

    svc.allocator.release = flaky_release  # type: ignore[method-assign]

    def old_set() -> Any:
        for key, (_, value) in bus.data.get(schema.BUCKET_IDENTITIES, {}).items():
            if key.startswith(schema.IDENTITY_LABELS_PREFIX):
                record = schema.decode(value, schema.IdentityLabelsRecord)
                if "k8s:app=before" in record.labels:
                    return record
        return None

    async with asyncio.TaskGroup() as tg:
        await svc.start(tg)
        try:
            for _ in range(300):
                if old_set() is not None and _ipcache_identity(bus, "10.0.0.1_32"):
                    break
                await asyncio.sleep(0.01)
            _pod(bus, "p0", "after", "10.0.0.1")
            for _ in range(500):
                record = old_set()
                if record is not None and record.refs == 0 and record.unused_since:
                    break
                await asyncio.sleep(0.01)
            assert calls >= 2, "the release was not tried again"
            assert old_set().refs == 0 and old_set().unused_since
        finally:
            for task in tg._tasks:  # type: ignore[attr-defined]
                task.cancel()


async def test_a_label_set_another_writer_removed_is_allocated_again() -> None:
    """Incremental passes allocate only the label sets whose pod count changed, and those
    whose labels. key another writer changed: a label set in use that someone deletes is
    allocated again, and its pod's ipcache entry names the identity it now has."""
    bus = FakeBus()
    for n in range(5):
        _pod(bus, f"p{n}", f"a{n}", f"10.0.0.{n + 1}")
    ctx = Context(service="identity", settings=Settings(nats_url="mem://", instance="identity-t"), bus=bus)
    svc = IdentityService(ctx, IdentityConfig())

    def label_key_of(app: str) -> tuple[str, Any] | None:
        for key, (_, value) in bus.data.get(schema.BUCKET_IDENTITIES, {}).items():
            if key.startswith(schema.IDENTITY_LABELS_PREFIX):
                record = schema.decode(value, schema.IdentityLabelsRecord)
                if f"k8s:app={app}" in record.labels:
                    return key, record
        return None

    async with asyncio.TaskGroup() as tg:
        await svc.start(tg)
        try:
            await until(lambda: all(_ipcache_identity(bus, f"10.0.0.{n + 1}_32") for n in range(5)))
            await asyncio.sleep(0.1)
            full_passes = svc.passes
            found = label_key_of("a2")
            assert found is not None
            bus.delete(schema.BUCKET_IDENTITIES, found[0])
            await until(lambda: label_key_of("a2") is not None)
            again = label_key_of("a2")
            assert again is not None
            await until(lambda: _ipcache_identity(bus, "10.0.0.3_32") == again[1].id)
            assert svc.passes > full_passes
        finally:
            for task in tg._tasks:  # type: ignore[attr-defined]
                task.cancel()
