"""Identity numbering and allocation over an in-memory compare-and-set store."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ciliary import schema
from ciliary.schema import IDENTITY_LOCAL_FLAG as LOCAL_IDENTITY_FLAG
from ciliary.schema import RESERVED_IDENTITIES as RESERVED
from ciliary.schema import describe_identity as describe
from ciliary.schema import identity_cluster_id as cluster_of
from ciliary.schema import identity_cluster_range as cluster_range
from ciliary.schema import is_local_identity as is_local
from services.identity.allocator import (
    SCOPE_CIDR,
    AllocationError,
    IdentityAllocator,
    MemoryCasStore,
    reserved_labels,
)
from services.identity.labels import cidr_labels, label_set_hash


def lkey(labels: list[str] | tuple[str, ...]) -> str:
    return schema.identity_labels_key(label_set_hash(labels))


def test_reserved_numbering_matches_cilium() -> None:
    assert RESERVED == {
        1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node",
        7: "kube-apiserver", 8: "ingress", 9: "world-ipv4", 10: "world-ipv6", 11: "encrypted-overlay",
    }
    assert reserved_labels(7) == ["reserved:kube-apiserver", "reserved:remote-node"]
    assert reserved_labels(2) == ["reserved:world"]
    assert describe(6) == "reserved:remote-node"


def test_cluster_id_bit_layout() -> None:
    assert cluster_range(0) == (256, 65535)  # below 256 is reserved
    assert cluster_range(1) == (65536, 131071)
    assert cluster_range(255) == (255 << 16, (256 << 16) - 1)
    for cid in (0, 1, 7, 255):
        low, high = cluster_range(cid)
        assert cluster_of(low) == cid and cluster_of(high) == cid
        assert high < LOCAL_IDENTITY_FLAG
    assert cluster_of((5 << 16) | 300) == 5
    with pytest.raises(ValueError):
        cluster_range(256)


async def test_allocations_land_in_the_cluster_range() -> None:
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "east", 5, rng=random.Random(1))
    await alloc.ensure_reserved()
    got = {}
    for i in range(50):
        labels = [f"k8s:app=a{i}"]
        got[i] = (await alloc.allocate(labels)).identity
        assert (await alloc.allocate(labels)).identity == got[i]  # stable
    assert len(set(got.values())) == 50
    for ident in got.values():
        assert cluster_of(ident) == 5 and not is_local(ident)
        rec = store.data[schema.identity_id_key(ident)][0]
        assert (rec.cluster, rec.cluster_id, rec.scope) == ("east", 5, "cluster")
    for ident in RESERVED:
        assert store.data[schema.identity_id_key(ident)][0].scope == "reserved"


async def test_cidr_identities_are_local() -> None:
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "east", 5)
    ident = (await alloc.allocate(cidr_labels("10.0.0.0/8"), refs=1, scope=SCOPE_CIDR)).identity
    assert ident & LOCAL_IDENTITY_FLAG and is_local(ident) and cluster_of(ident) == 0
    assert describe(ident).startswith("local ")
    rec = store.data[schema.identity_id_key(ident)][0]
    assert rec.scope == "cidr" and rec.labels == ["cidr:10.0.0.0/8", "reserved:world"]


async def test_range_exhaustion_is_an_error() -> None:
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "c", 1)
    low, high = cluster_range(1)
    for ident in range(low, high + 1):
        store.data[schema.identity_id_key(ident)] = (object(), 1)
    with pytest.raises(AllocationError):
        await alloc.allocate(["k8s:app=x"])


async def test_release_is_two_phase_and_reuse_wins() -> None:
    clock = itertools.count(100)
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "c", 1, clock=lambda: float(next(clock)))
    labels = ["k8s:app=x"]
    ident = (await alloc.allocate(labels, refs=3)).identity
    assert store.data[lkey(labels)][0].refs == 3
    # phase 1: mark
    assert not await alloc.release(lkey(labels), grace=1000)
    marked = store.data[lkey(labels)][0]
    assert marked.refs == 0 and marked.unused_since > 0
    # not yet past the grace period
    assert not await alloc.release(lkey(labels), grace=1000)
    # re-use clears the mark; the identity stays
    assert (await alloc.allocate(labels, refs=1)).identity == ident
    assert store.data[lkey(labels)][0].unused_since == 0
    assert not await alloc.release(lkey(labels), grace=0)  # marks again (it was in use)
    assert await alloc.release(lkey(labels), grace=0)  # now deletes
    assert lkey(labels) not in store.data and schema.identity_id_key(ident) not in store.data
    # the label set gets an identity again
    assert (await alloc.allocate(labels)).identity > 0


async def test_concurrent_release_and_reuse() -> None:
    """A release that read the record before a re-use must not delete it."""
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "c", 1, clock=lambda: 50.0)
    labels = ["k8s:app=x"]
    await alloc.allocate(labels, refs=0)  # allocated unused: marked at once
    record, revision = store.data[lkey(labels)]
    assert record.unused_since == 50.0
    await alloc.allocate(labels, refs=2)  # re-use bumps the revision
    with pytest.raises(Exception):  # noqa: B017 - the Conflict the release would hit
        await store.delete(lkey(labels), revision)
    assert store.data[lkey(labels)][0].refs == 2


async def test_sweep_orphans() -> None:
    now = [1000.0]
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "c", 1, clock=lambda: now[0])
    await alloc.ensure_reserved()
    kept = (await alloc.allocate(["k8s:app=kept"])).identity
    orphan = schema.IdentityRecord(id=70000, labels=["k8s:app=lost"], scope="cluster", cluster="c",
                                   cluster_id=1, created=990.0)
    await store.create(schema.identity_id_key(70000), orphan)
    assert await alloc.sweep_orphans(min_age=60) == 0  # too young: may be mid-allocation
    now[0] = 2000.0
    assert await alloc.sweep_orphans(min_age=60) == 1
    assert schema.identity_id_key(70000) not in store.data
    assert schema.identity_id_key(kept) in store.data and schema.identity_id_key(1) in store.data


# ---------------------------------------------------------------- property: two allocators

ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("actor")
LABEL_SETS = [[f"k8s:app=a{i}"] for i in range(4)]


class Interleaver:
    """Every store operation waits here; the test (hypothesis) picks who goes next."""

    def __init__(self, choose: Callable[[list[str]], str]) -> None:
        self.choose = choose
        self.waiting: dict[str, asyncio.Future[None]] = {}

    async def gate(self, op: str, key: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[ACTOR.get()] = fut
        await fut

    async def run(self, actors: dict[str, Callable[[], Awaitable[None]]]) -> None:
        async def start(name: str, fn: Callable[[], Awaitable[None]]) -> None:
            ACTOR.set(name)
            await fn()

        tasks = {name: asyncio.create_task(start(name, fn)) for name, fn in actors.items()}
        while True:
            for _ in range(100):  # let everyone run until blocked at the gate or done
                await asyncio.sleep(0)
                if all(tasks[n].done() or n in self.waiting for n in tasks):
                    break
            if all(t.done() for t in tasks.values()):
                break
            ready = sorted(self.waiting)
            assert ready, "deadlock"
            pick = self.choose(ready)
            self.waiting.pop(pick).set_result(None)
        for task in tasks.values():
            task.result()  # re-raise failures


def check_committed(store: MemoryCasStore) -> None:
    """At every instant: label set -> id is injective, and each names a live id. key."""
    owners: dict[int, list[str]] = {}
    for key, (rec, _) in list(store.data.items()):
        if not key.startswith(schema.IDENTITY_LABELS_PREFIX):
            continue
        assert rec.id not in owners, f"id {rec.id} held by {owners[rec.id]} and {rec.labels}"
        owners[rec.id] = rec.labels
        id_rec = store.data.get(schema.identity_id_key(rec.id))
        assert id_rec is not None and id_rec[0].labels == rec.labels


class NarrowRandom(random.Random):
    """Picks ids among the first six of a range, so two allocators often collide."""

    def randint(self, a: int, b: int) -> int:
        return a + self.randrange(6)


op_strategy = st.lists(st.tuples(st.sampled_from(["allocate", "release"]), st.integers(0, len(LABEL_SETS) - 1)),
                       min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), ops_a=op_strategy, ops_b=op_strategy, seed=st.integers(0, 2**16))
def test_two_allocators_never_duplicate(data: st.DataObject, ops_a: list[tuple[str, int]],
                                        ops_b: list[tuple[str, int]], seed: int) -> None:
    interleaver = Interleaver(lambda ready: data.draw(st.sampled_from(ready)))
    store = MemoryCasStore(before_op=interleaver.gate)
    store.after_write = lambda: check_committed(store)
    clock = itertools.count(1)

    def actor(ops: list[tuple[str, int]], rng_seed: int) -> Callable[[], Awaitable[None]]:
        alloc = IdentityAllocator(store, "c", 0, rng=NarrowRandom(rng_seed), clock=lambda: float(next(clock)))

        async def run() -> None:
            for op, index in ops:
                labels = LABEL_SETS[index]
                if op == "allocate":
                    ident = (await alloc.allocate(labels)).identity
                    # at the moment allocate returns, the store maps the set to that id
                    assert store.data[lkey(labels)][0].id == ident
                else:
                    await alloc.release(lkey(labels), grace=0)
        return run

    asyncio.run(interleaver.run({"a": actor(ops_a, seed), "b": actor(ops_b, seed + 1)}))

    store.before_op = None
    check_committed(store)
    # quiescent: every id key is named by exactly one label set (no orphan, no duplicate)
    named = {rec.id for key, (rec, _) in store.data.items() if key.startswith(schema.IDENTITY_LABELS_PREFIX)}
    live = {rec.id: rec for key, (rec, _) in store.data.items()
            if key.startswith(schema.IDENTITY_ID_PREFIX) and rec.scope != "reserved"}
    assert set(live) == named
    by_labels: dict[tuple[str, ...], int] = {}
    for rec in live.values():
        assert tuple(rec.labels) not in by_labels, f"{rec.labels} has two ids"
        by_labels[tuple(rec.labels)] = rec.id
