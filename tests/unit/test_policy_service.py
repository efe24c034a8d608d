"""The policy service shell against an in-memory bus: records, status, ordering, trace."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from ciliary import schema
from ciliary.bus import KVEntry
from ciliary.runtime import Context, Settings
from ciliary.testing import FakeBus
from services.policy.records import BucketValues, named_ports_from_pods, plan_writes, puts_among
from services.policy.rules import normalize
from services.policy.service import PolicyService, decode_identity, decode_pod_ip
from services.policy.trace import ipcache_lookup


def resource(bus: FakeBus, manifest: dict[str, Any]) -> str:
    kind = manifest["kind"]
    meta = manifest["metadata"]
    ns = "" if kind == "CiliumClusterwideNetworkPolicy" else meta.get("namespace", "default")
    key = f"{kind}.{ns or '_'}.{meta['name']}"
    bus.put(schema.BUCKET_RESOURCES, key, schema.ResourceRecord(
        kind=kind, api_version=manifest["apiVersion"], namespace=ns, name=meta["name"],
        uid="u", generation=1, created="", manifest=manifest))
    return key


def identity(bus: FakeBus, ident: int, labels: list[str]) -> None:
    bus.put(schema.BUCKET_IDENTITIES, schema.identity_id_key(ident), schema.IdentityRecord(
        id=ident, labels=sorted(labels), scope="cluster", cluster="default", cluster_id=1))


def pod_labels(app: str) -> list[str]:
    return [f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default",
            "k8s:io.cilium.k8s.policy.cluster=default"]


WEB = 65792
FRONT = 65793
POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                     "toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}]}]}],
        "egress": [{"toServices": [{"k8sService": {"serviceName": "db", "namespace": "default"}}]}],
    },
}
POD = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "default"},
    "spec": {"containers": [{"name": "c", "image": "x",
                             "ports": [{"containerPort": 8080, "name": "http"}]}]},
}


async def wait_for(predicate: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(bus: FakeBus) -> AsyncIterator[PolicyService]:
    ctx = Context(service="policy", settings=Settings(nats_url="mem://", instance="policy-t"),
                  bus=bus)
    svc = PolicyService(ctx)
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.TaskGroup() as tg:
            await svc.start(tg)
            try:
                yield svc
            finally:
                for task in tg._tasks:  # type: ignore[attr-defined]
                    task.cancel()


async def test_service_writes_policy_records_and_status() -> None:
    bus = FakeBus()
    key = resource(bus, POLICY)
    resource(bus, POD)
    identity(bus, WEB, pod_labels("web"))
    identity(bus, FRONT, pod_labels("frontend"))
    bus.put(schema.BUCKET_IPCACHE, "10.0.0.5_32", schema.IPCacheRecord(
        prefix="10.0.0.5/32", identity=WEB, source="pod", cluster="default", cluster_id=1,
        namespace="default", pod="web-1"))
    async with running(bus) as svc:
        await wait_for(lambda: schema.policy_key(WEB) in bus.data.get(schema.BUCKET_POLICY, {}))
        await wait_for(lambda: key in bus.data.get(schema.BUCKET_STATUS, {}))
        assert svc.ctx.healthy
        # frontend is selected by nothing: an open record, written all the same
        assert not enforced(bus.data[schema.BUCKET_POLICY][schema.policy_key(FRONT)])
        rec = schema.decode(bus.data[schema.BUCKET_POLICY][schema.policy_key(WEB)][1],
                            schema.PolicyMapRecord)
        assert rec.ingress_enforced and rec.egress_enforced
        assert [(e.peer, e.port, e.proto, e.direction, e.verdict) for e in rec.entries] == [
            (1, 0, 0, "ingress", "allow"),  # allow-localhost
            (FRONT, 8080, 6, "ingress", "allow")]
        assert rec.entries[0].rule_ref == 0
        assert rec.rules == {rec.entries[1].rule_ref:
                             "CiliumNetworkPolicy/default/web spec[0].ingress[0]"}
        assert rec.policies == [key]
        status = schema.decode(bus.data[schema.BUCKET_STATUS][key][1], schema.StatusRecord)
        assert status.status["state"] == "ok"
        assert status.status["selected_identities"] == [WEB]
        assert any("toServices" in w for w in status.status["warnings"])

        # trace over the bus handler
        reply = await bus.request(schema.SUBJECT_POLICY_TRACE, schema.PolicyTraceRequest(
            from_labels=pod_labels("frontend"), to_labels=pod_labels("web"), port=8080,
            proto="TCP"), schema.PolicyTraceReply)
        assert reply.verdict == "allow"
        assert reply.ingress is not None and reply.ingress.rules == [
            "CiliumNetworkPolicy/default/web spec[0].ingress[0]"]

        # a new identity that the policy selects: added; then the policy goes away: deleted
        identity(bus, 65794, pod_labels("web") + ["k8s:version=2"])
        await wait_for(lambda: schema.policy_key(65794) in bus.data[schema.BUCKET_POLICY])

        def web_peers() -> list[int]:
            value = bus.data[schema.BUCKET_POLICY][schema.policy_key(WEB)][1]
            return [e.peer for e in schema.decode(value, schema.PolicyMapRecord).entries]

        # a second frontend identity becomes a peer of web (incrementally), then goes away
        identity(bus, 65795, pod_labels("frontend") + ["k8s:version=2"])
        await wait_for(lambda: web_peers() == [1, FRONT, 65795])
        bus.delete(schema.BUCKET_IDENTITIES, schema.identity_id_key(65795))
        await wait_for(lambda: web_peers() == [1, FRONT])
        bus.log.clear()
        bus.delete(schema.BUCKET_RESOURCES, key)
        # no policy selects web any more: its records become open (allow all), not absent,
        # so a missing record keeps meaning "not resolved yet"
        await wait_for(lambda: not any(map(enforced, bus.data[schema.BUCKET_POLICY].values())))
        await wait_for(lambda: key not in bus.data[schema.BUCKET_STATUS])
        assert sorted(bus.data[schema.BUCKET_POLICY]) == sorted(
            schema.policy_key(i) for i in (WEB, FRONT, 65794))
        assert [op for op, b, _ in bus.log if b == schema.BUCKET_POLICY] == ["put", "put"]
        # an identity that goes takes its record with it
        bus.delete(schema.BUCKET_IDENTITIES, schema.identity_id_key(65794))
        await wait_for(lambda: schema.policy_key(65794) not in bus.data[schema.BUCKET_POLICY])


def enforced(stored: tuple[int, bytes]) -> bool:
    rec = schema.decode(stored[1], schema.PolicyMapRecord)
    return rec.ingress_enforced or rec.egress_enforced or bool(rec.entries)


def web_open_to_all_and_lock_policies(bus: FakeBus) -> None:
    """web takes ingress from every endpoint; pods labelled locked=yes take none."""
    resource(bus, {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                   "metadata": {"name": "web", "namespace": "default"},
                   "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                            "ingress": [{"fromEndpoints": [{}]}]}})
    resource(bus, {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "lock", "namespace": "default"},
                   "spec": {"podSelector": {"matchLabels": {"locked": "yes"}},
                            "policyTypes": ["Ingress"], "ingress": []}})
    identity(bus, WEB, pod_labels("web"))


async def test_records_of_identities_resolved_in_full_are_written_first() -> None:
    """A new identity that a policy selects and that is also a new peer of another
    subject: its own record goes out before the peer update of the other one."""
    bus = FakeBus()
    web_open_to_all_and_lock_policies(bus)
    async with running(bus) as svc:
        await wait_for(lambda: schema.policy_key(WEB) in bus.data.get(schema.BUCKET_POLICY, {}))
        await wait_for(lambda: svc.counters["passes"] >= 1 and not svc.loop.dirty.is_set())
        bus.log.clear()
        locked = 65799  # sorts after WEB: written first only because it was resolved in full
        identity(bus, locked, pod_labels("server") + ["k8s:locked=yes"])
        await wait_for(lambda: sum(1 for op, b, _ in bus.log if b == schema.BUCKET_POLICY) >= 2)
        puts = [key for op, b, key in bus.log if b == schema.BUCKET_POLICY and op == "put"]
        assert puts[:2] == [schema.policy_key(locked), schema.policy_key(WEB)]
        assert svc.ctx.detail["last_pass_ms"] >= 0
        assert set(svc.ctx.detail["last_pass"]) == {"inputs", "resolve", "encode", "write",
                                                     "status"}


async def test_a_failed_first_write_still_completes_the_step_and_is_retried() -> None:
    """The put of a record resolved in full fails once: the engine's step still finishes,
    the peer-only update still reaches `desired`, and the next pass writes both."""
    from ciliary.bus import RevisionMismatch

    bus = FakeBus()
    web_open_to_all_and_lock_policies(bus)
    locked = 65799
    async with running(bus) as svc:
        await wait_for(lambda: schema.policy_key(WEB) in bus.data.get(schema.BUCKET_POLICY, {}))
        real_put = bus.kv_put
        failed: list[str] = []

        async def put_failing_once(bucket: str, key: str, record: Any, **kw: Any) -> int:
            if key == schema.policy_key(locked) and not failed:
                failed.append(key)
                raise RevisionMismatch("injected")
            return await real_put(bucket, key, record, **kw)

        bus.kv_put = put_failing_once  # type: ignore[method-assign]

        def web_peers() -> list[int]:
            value = bus.data[schema.BUCKET_POLICY][schema.policy_key(WEB)][1]
            return [e.peer for e in schema.decode(value, schema.PolicyMapRecord).entries]

        identity(bus, locked, pod_labels("server") + ["k8s:locked=yes"])
        await wait_for(lambda: schema.policy_key(locked) in bus.data[schema.BUCKET_POLICY])
        await wait_for(lambda: locked in web_peers())
        assert failed and svc.counters["conflicts"] >= 1
        assert svc.engine.resolution().identities[WEB].entries == svc.last.identities[WEB].entries


async def test_service_overflow_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CILIARY_POLICY_MAX_ENTRIES", "0")
    bus = FakeBus()
    key = resource(bus, POLICY)
    identity(bus, WEB, pod_labels("web"))
    identity(bus, FRONT, pod_labels("frontend"))
    resource(bus, POD)
    bus.put(schema.BUCKET_IPCACHE, "10.0.0.5_32", schema.IPCacheRecord(
        prefix="10.0.0.5/32", identity=WEB, source="pod", cluster="default", cluster_id=1,
        namespace="default", pod="web-1"))
    async with running(bus) as svc:
        await wait_for(lambda: schema.policy_key(WEB) in bus.data.get(schema.BUCKET_POLICY, {}))
        await wait_for(lambda: key in bus.data.get(schema.BUCKET_STATUS, {}))
        rec = schema.decode(bus.data[schema.BUCKET_POLICY][schema.policy_key(WEB)][1],
                            schema.PolicyMapRecord)
        assert rec.ingress_enforced and rec.egress_enforced and rec.entries == []
        assert "overflow" in rec.error
        status = schema.decode(bus.data[schema.BUCKET_STATUS][key][1], schema.StatusRecord)
        assert status.status["state"] == "error"
        assert svc.counters["overflow"] == 1


def test_plan_writes_puts_before_deletes() -> None:
    plan = plan_writes({"id.1": b"a", "id.2": b"b", "id.3": b"c"},
                       {"id.2": b"b", "id.3": b"C", "id.4": b"d"})
    assert plan.puts == [("id.3", b"C"), ("id.4", b"d")]
    assert plan.deletes == ["id.1"]
    assert not plan_writes({"x": b"1"}, {"x": b"1"})


def test_a_pass_first_puts_only_the_changed_among_the_keys_it_recomputed() -> None:
    held = {"id.1": (4, b"a"), "id.2": (5, b"b")}
    current = BucketValues(held)
    assert dict(current) == {"id.1": b"a", "id.2": b"b"} and current.get("id.9") is None
    desired = {"id.1": b"a", "id.2": b"B", "id.3": b"c", "id.4": b"d"}
    # id.4 changed too, but was not recomputed: it waits for the pass's full plan
    assert puts_among(current, desired, {"id.3", "id.1", "id.2", "id.7"}) == [("id.2", b"B"), ("id.3", b"c")]
    held["id.2"] = (6, b"B")  # the mirror is read through
    assert puts_among(current, desired, {"id.2"}) == []
    assert plan_writes(current, desired).puts == [("id.3", b"c"), ("id.4", b"d")]


def test_named_ports_from_pods() -> None:
    pods = [("default/web-1", POD), ("default/other", POD)]
    assert named_ports_from_pods(pods, {"default/web-1": WEB}) == {WEB: {"http": (8080, 6)}}


def test_lenient_decoders() -> None:
    good = KVEntry("identities", "id.7", 1, msgspec.msgpack.encode(
        {"id": 7, "labels": ["reserved:kube-apiserver"], "future": 1}))
    assert decode_identity(good) == (7, frozenset({"reserved:kube-apiserver"}))
    assert decode_identity(KVEntry("identities", "id.7", 1, b"\xc1")) is None
    assert decode_identity(KVEntry("identities", "labels.x", 1, good.value)) is None
    ip = KVEntry("ipcache", "k", 1, msgspec.msgpack.encode(
        {"identity": 5, "source": "pod", "namespace": "ns", "pod": "p"}))
    assert decode_pod_ip(ip) == ("ns/p", 5)
    assert decode_pod_ip(KVEntry("ipcache", "k", 1, msgspec.msgpack.encode(
        {"identity": 2, "source": "world"}))) is None


def test_identity_changes_are_queued_for_the_next_pass() -> None:
    bus = FakeBus()
    ctx = Context(service="policy", settings=Settings(nats_url="mem://", instance="policy-t"),
                  bus=bus)
    svc = PolicyService(ctx)
    value = schema.encode(schema.IdentityRecord(id=WEB, labels=pod_labels("web"),
                                                scope="cluster", cluster="default", cluster_id=1))
    svc._on_identity(KVEntry(schema.BUCKET_IDENTITIES, schema.identity_id_key(WEB), 1, value))
    assert WEB in svc.identities and WEB not in svc.engine.cache.identities and svc._pending
    svc._on_identity(KVEntry(schema.BUCKET_IDENTITIES, schema.identity_id_key(FRONT), 2,
                             schema.encode(schema.IdentityRecord(
                                 id=FRONT, labels=pod_labels("frontend"), scope="cluster",
                                 cluster="default", cluster_id=1))))
    svc._on_identity(KVEntry(schema.BUCKET_IDENTITIES, schema.identity_id_key(FRONT), 3, None))
    assert FRONT not in svc.identities
    assert svc.dirty.is_set()


async def test_resolve_hands_queued_changes_to_the_engine_in_order() -> None:
    bus = FakeBus()
    ctx = Context(service="policy", settings=Settings(nats_url="mem://", instance="policy-t"),
                  bus=bus)
    svc = PolicyService(ctx)
    svc._pending += [({WEB: frozenset(pod_labels("web"))}, []), ({}, [FRONT]),
                     ({FRONT: frozenset(pod_labels("frontend"))}, []), ({}, [WEB])]
    step = await svc._resolve([])
    assert step.resolution.identities == {} and not svc._pending
    assert FRONT in svc.engine.cache.identities and WEB not in svc.engine.cache.identities


async def test_small_passes_resolve_on_the_loop_big_ones_in_a_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import services.policy.service as service_module

    threaded: list[str] = []
    real_to_thread = asyncio.to_thread

    async def to_thread(fn: Any, *args: Any) -> Any:
        threaded.append(fn.__name__)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr(service_module.asyncio, "to_thread", to_thread)
    svc = PolicyService(Context(service="policy", settings=Settings(
        nats_url="mem://", instance="policy-t"), bus=FakeBus()))
    web = normalize(POLICY)
    many = {65800 + n: frozenset(pod_labels("web") + [f"k8s:n={n}"]) for n in range(40)}
    svc._pending.append((many, []))
    await svc._resolve([web])
    assert threaded == ["begin", "finish"]  # the first pass
    svc._pending.append(({FRONT: frozenset(pod_labels("frontend"))}, []))
    await svc._resolve([web])
    assert len(threaded) == 2 and FRONT in svc.engine.cache.identities  # one identity: on the loop
    svc._pending.append(({}, [FRONT]))
    await svc._resolve([])  # the policy went away: it selected 40 identities
    assert threaded == ["begin", "finish"] * 2
    svc._pending.append(({}, [65800]))
    await svc._resolve([])
    assert len(threaded) == 4


def test_ipcache_lookup_is_longest_prefix_else_world() -> None:
    prefixes = [("0.0.0.0/0", 2), ("203.0.113.0/24", 16777217), ("203.0.113.0/28", 16777218),
                ("10.0.1.10/32", WEB), ("fd00::/64", 16777219)]
    assert ipcache_lookup("203.0.113.7", prefixes) == (16777218, "203.0.113.0/28")
    assert ipcache_lookup("203.0.113.200/32", prefixes) == (16777217, "203.0.113.0/24")
    assert ipcache_lookup("203.0.113.0/25", prefixes) == (16777217, "203.0.113.0/24")
    assert ipcache_lookup("10.0.1.10", prefixes) == (WEB, "10.0.1.10/32")
    assert ipcache_lookup("198.51.100.1", prefixes) == (2, "0.0.0.0/0")
    assert ipcache_lookup("2001:db8::1", prefixes) == (2, "")  # no IPv6 world prefix: world
    with pytest.raises(ValueError):
        ipcache_lookup("not-an-ip", prefixes)


def test_trace_from_a_cidr_resolves_through_the_ipcache_and_rejects_garbage() -> None:
    bus = FakeBus()
    ctx = Context(service="policy", settings=Settings(nats_url="mem://", instance="policy-t"),
                  bus=bus)
    svc = PolicyService(ctx)
    svc.norm = [normalize({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromCIDR": ["203.0.113.0/24"]}]}})]
    svc._on_identity(KVEntry(schema.BUCKET_IDENTITIES, schema.identity_id_key(WEB), 1,
                             schema.encode(schema.IdentityRecord(
                                 id=WEB, labels=pod_labels("web"), scope="cluster",
                                 cluster="default", cluster_id=1))))
    cidr_id = (1 << 24) | 5
    svc._on_ipcache(KVEntry(schema.BUCKET_IPCACHE, "203.0.113.0_24", 1, schema.encode(
        schema.IPCacheRecord(prefix="203.0.113.0/24", identity=cidr_id, source="cidr",
                             cluster="default", cluster_id=1))))
    req = schema.PolicyTraceRequest(from_labels=[], from_cidr="203.0.113.9",
                                    to_labels=pod_labels("web"), port=80, proto="TCP")
    reply = svc.answer_trace(req)
    assert reply.ok and reply.verdict == "allow"
    assert reply.ingress is not None and reply.ingress.rules == [
        "CiliumNetworkPolicy/default/web spec[0].ingress[0]"]
    outside = svc.answer_trace(schema.PolicyTraceRequest(
        from_labels=[], from_cidr="198.51.100.1", to_labels=pod_labels("web"), port=80))
    assert outside.verdict == "deny"
    bad = svc.answer_trace(schema.PolicyTraceRequest(
        from_labels=[], from_cidr="10.0.0.300", to_labels=pod_labels("web"), port=80))
    assert not bad.ok and bad.error == "from_cidr: '10.0.0.300' is not an IP address or CIDR"


def test_only_named_port_changes_of_pods_call_for_a_pass() -> None:
    from services.policy.inputs import PolicyInputs
    from services.policy.resolve import ResolveOptions

    inputs = PolicyInputs(ResolveOptions())
    key = "Pod.default.web-1"
    rev = iter(range(1, 100))

    def event(manifest: dict[str, Any] | None) -> bool:
        if manifest is None:
            return inputs.on_pod(KVEntry(schema.BUCKET_RESOURCES, key, next(rev), None))
        return inputs.on_pod(KVEntry(schema.BUCKET_RESOURCES, key, next(rev), schema.encode(
            schema.ResourceRecord(kind="Pod", api_version="v1", namespace="default",
                                  name="web-1", uid="u", generation=1, created="",
                                  manifest=manifest))))

    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1"},
             "spec": {"containers": [{"name": "c", "image": "x"}]}}
    assert not event(plain)  # no named ports: nothing for the table
    assert event(POD)  # named port http appears
    table = inputs.named_ports([("default/web-1", WEB)])
    assert table == {WEB: {"http": (8080, 6)}}
    relabelled = {**POD, "metadata": {**POD["metadata"], "labels": {"app": "web"}}}
    assert not event(relabelled)  # labels only: the new identity comes through the ipcache
    assert inputs.named_ports([("default/web-1", WEB)]) is table  # not recomputed
    assert inputs.named_ports([("default/web-1", FRONT)]) == {FRONT: {"http": (8080, 6)}}
    other = inputs.named_ports([("default/web-1", FRONT), ("default/gone", WEB)])
    assert other is inputs.named_ports([("default/web-1", FRONT)])  # same table, same object
    moved = {**POD, "spec": {"containers": [{"name": "c", "image": "x",
                                             "ports": [{"containerPort": 9090, "name": "http"}]}]}}
    assert event(moved)
    assert inputs.named_ports([("default/web-1", WEB)]) == {WEB: {"http": (9090, 6)}}
    assert event(None)  # gone with its named port
    assert inputs.named_ports([("default/web-1", WEB)]) == {}
