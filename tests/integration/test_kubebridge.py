"""The kube bridge as a process, against the API-server double and a real nats-server.

The bridge is started exactly as a Deployment runs it (``python -m services.kubebridge``,
settings from the environment, a kubeconfig pointing at the double); it has no test hooks.
What is asserted is what a user sees: bucket ``resources`` (records as ``apply`` writes
them), the health report, and what the API server received (status, Events, the Lease).
"""

from __future__ import annotations

import asyncio
import copy
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ciliary import schema
from ciliary.bus import Bus
from ciliary.status import gather_health, resource_source
from services.kubebridge.kinds import BY_KIND
from services.kubebridge.translate import translate
from tests.integration.conftest import NatsServer, eventually, service_process, stop_processes
from tests.k8sdouble import fixtures
from tests.k8sdouble.apiserver import ApiServerDouble

LEASE_ENV = {"CILIARY_KUBE_LEASE_DURATION": "2", "CILIARY_KUBE_RENEW_DEADLINE": "1.5",
             "CILIARY_KUBE_RETRY_PERIOD": "0.2", "CILIARY_KUBE_WATCH_TIMEOUT": "30"}


@pytest.fixture
async def double() -> AsyncIterator[ApiServerDouble]:
    server = ApiServerDouble(bookmark_interval=0.5)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    connection = await Bus.connect(nats_server.url, "kubebridge-test")
    await connection.ensure_buckets()
    try:
        yield connection
    finally:
        await connection.close()


def start_bridge(nats: NatsServer, double: ApiServerDouble, tmp_path: Path, instance: str,
                 **env: str) -> Any:
    kubeconfig = double.kubeconfig(tmp_path / "kubeconfig")
    return service_process("kubebridge", nats.url, instance=instance,
                           log_path=tmp_path / f"{instance}.log",
                           env={"CILIARY_KUBECONFIG": str(kubeconfig), **LEASE_ENV, **env})


async def resources(bus: Bus) -> dict[str, schema.ResourceRecord]:
    entries = await bus.kv_list(schema.BUCKET_RESOURCES, ">")
    return {k: schema.decode(e.value, schema.ResourceRecord) for k, e in entries.items()
            if e.value is not None}


async def bridge_health(bus: Bus) -> dict[str, Any]:
    return {r.instance: r for r in await gather_health(bus) if r.service == "kubebridge"}


def expected(obj: dict[str, Any]) -> tuple[str, schema.ResourceRecord]:
    item = translate(BY_KIND[obj["kind"]], obj)
    assert item.data is not None, item.problem
    return item.key, schema.decode(item.data, schema.ResourceRecord)


async def test_initial_sync_changes_status_and_events(
        nats_server: NatsServer, double: ApiServerDouble, bus: Bus, tmp_path: Path,
        procs: list[Any]) -> None:
    for obj in fixtures.all_objects():
        double.put_object(obj)
    # an object the bridge did not write (a node's self-registration) stays untouched
    await bus.kv_put(schema.BUCKET_RESOURCES, "Node._.node-9", schema.ResourceRecord(
        kind="Node", api_version="v1", namespace="", name="node-9", uid="u", generation=1,
        created="", manifest={"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-9"}}))
    procs.append(start_bridge(nats_server, double, tmp_path, "kb-1"))

    stored = await eventually(lambda: _when(resources(bus), lambda r: len(r) == 9), 30,
                              "every fixture in the bucket")
    for obj in double.items("Pod") + double.items("CiliumNetworkPolicy") + double.items("Node"):
        key, record = expected(obj)
        got = stored[key]
        assert (got.uid, got.created, got.manifest) == (record.uid, record.created,
                                                        record.manifest)
        assert "status" not in got.manifest and "managedFields" not in got.manifest["metadata"]
        assert got.manifest["metadata"]["annotations"]["ciliary.io/source"] == "kubernetes"
    health = await eventually(lambda: _when(bridge_health(bus), lambda h: "kb-1" in h
                                            and h["kb-1"].healthy), 20, "healthy bridge")
    detail = health["kb-1"].detail
    assert detail["apiserver"] == double.url and detail["leader"] is True
    assert resource_source(list(health.values()))["apiserver"] == double.url

    # add, update, delete
    pod = fixtures.variant(fixtures.load("pod"), "web-2")
    double.put_object(pod)
    service = copy.deepcopy(double.get_object("Service", "shop", "web"))
    assert service is not None
    service["spec"]["ports"][0]["port"] = 8080
    double.put_object(service)
    double.delete_object("NetworkPolicy", "shop", "web-from-frontend")
    # a key being replaced can be missing from one listing of the bucket: look again then
    await eventually(lambda: _when(resources(bus), lambda r: "Pod.shop.web-2" in r
                                   and "Service.shop.web" in r
                                   and r["Service.shop.web"].manifest["spec"]["ports"][0]["port"] == 8080
                                   and "NetworkPolicy.shop.web-from-frontend" not in r), 20,
                     "add, update and delete applied")
    assert "Node._.node-9" in await resources(bus)

    # a rejected policy: never stored, an Event and a Valid=False condition
    bad = fixtures.variant(fixtures.load("cnp"), "broken")
    bad["spec"]["ingress"][0]["fromEndpoint"] = [{}]
    double.put_object(bad)
    events = await eventually(lambda: _now([e for e in double.items("Event")
                                            if e["involvedObject"]["name"] == "broken"]), 20,
                              "an Event for the rejected policy")
    assert events[0]["reason"] == "PolicyRejected" and "fromEndpoint" in events[0]["message"]
    assert events[0]["involvedObject"]["uid"] == double.get_object(
        "CiliumNetworkPolicy", "shop", "broken")["metadata"]["uid"]
    status = await eventually(lambda: _now((double.get_object("CiliumNetworkPolicy", "shop",
                                                              "broken") or {}).get("status")),
                              20, "status of the rejected policy")
    assert status["conditions"][0]["status"] == "False"
    assert "CiliumNetworkPolicy.shop.broken" not in await resources(bus)

    # the policy service resolved web-ingress; its endpoint runs on node-1: enforcing there
    await bus.kv_put(schema.BUCKET_STATUS, "CiliumNetworkPolicy.shop.web-ingress",
                     schema.StatusRecord(reporter="policy/p", observed_generation=1, status={
                         "state": "ok", "error": "", "warnings": [],
                         "selected_identities": [65800]}))
    await bus.kv_put(schema.BUCKET_IPCACHE, "10.244.1.17_32", schema.IPCacheRecord(
        prefix="10.244.1.17/32", identity=65800, source="pod", cluster="default", cluster_id=1,
        node="node-1", namespace="shop", pod="web-7c5ddbdf54-x2k9q"))
    nodes = await eventually(lambda: _now(((double.get_object(
        "CiliumNetworkPolicy", "shop", "web-ingress") or {}).get("status") or {}).get("nodes")),
        20, "enforcing nodes in the CNP status")
    assert nodes == {"node-1": {"ok": True, "enforcing": True, "revision": 1,
                                "lastUpdated": nodes["node-1"]["lastUpdated"]}}
    await asyncio.to_thread(stop_processes, procs)  # the double answers the lease release
    assert procs[0].returncode == 0, (tmp_path / "kb-1.log").read_text()


async def test_gone_missed_deletions_restarts_drops_and_throttling(
        nats_server: NatsServer, double: ApiServerDouble, bus: Bus, tmp_path: Path,
        procs: list[Any]) -> None:
    pods = [fixtures.variant(fixtures.load("pod"), f"web-{i}") for i in range(1200)]
    for obj in pods:
        double.put_object(obj)
    procs.append(start_bridge(nats_server, double, tmp_path, "kb-1", CILIARY_KUBE_PAGE_SIZE="500"))
    await eventually(lambda: _when(resources(bus), lambda r: len(r) == 1200), 60,
                     "1,200 pods listed in pages")
    lists = [r for r in double.requests if r.path == "/api/v1/pods" and "watch" not in r.query]
    assert [r.query.get("limit") for r in lists] == ["500"] * 3
    assert sum(1 for r in lists if r.query.get("continue")) == 2

    # 410 in the middle of a live stream, with deletions the bridge never saw an event for
    double.objects["pods"].pop(("shop", "web-0"))
    double.objects["pods"].pop(("shop", "web-1"))
    double.compact()
    double.fail_watches()
    await eventually(lambda: _when(resources(bus), lambda r: len(r) == 1198
                                   and "Pod.shop.web-0" not in r), 30,
                     "deletions missed while the stream failed are reconciled")

    # the API server restarts; meanwhile objects change and history is compacted
    port = double.port
    await double.stop()
    double.delete_object("Pod", "shop", "web-2")
    double.put_object(fixtures.variant(fixtures.load("pod"), "late"))
    double.compact()
    await asyncio.sleep(1.0)
    await double.start(port)
    await eventually(lambda: _when(resources(bus), lambda r: "Pod.shop.late" in r
                                   and "Pod.shop.web-2" not in r), 30,
                     "changes made while the API server was down")

    # a dropped connection: the watch resumes from its version (no relist)
    relists_before = sum(1 for r in double.requests if r.path == "/api/v1/pods"
                         and "watch" not in r.query and not r.query.get("continue"))
    await double.drop_watches()
    double.delete_object("Pod", "shop", "web-3")
    await eventually(lambda: _when(resources(bus), lambda r: "Pod.shop.web-3" not in r), 20,
                     "a change after a dropped connection")
    relists_after = sum(1 for r in double.requests if r.path == "/api/v1/pods"
                        and "watch" not in r.query and not r.query.get("continue"))
    assert relists_after == relists_before

    # 429 with Retry-After: the bridge waits and carries on. The 20 answers are spread over
    # the eight reflectors and the lease renewal, which may run out meanwhile (renew deadline
    # 1.5 s); leading again, the bridge writes what changed while it was not leading.
    throttled_from = len(double.requests)
    double.throttle(20, retry_after=1)
    await double.drop_watches()
    double.delete_object("Pod", "shop", "web-4")
    try:
        await eventually(lambda: _when(resources(bus), lambda r: "Pod.shop.web-4" not in r),
                         20 * 1 + 10, "a change after throttling")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{_throttling_report(double, throttled_from, tmp_path)}"
                             ) from None
    answered = double.requests[throttled_from:]
    for i, throttled in enumerate(answered):
        if throttled.status == 429:  # the same path is asked again only after Retry-After
            again = next((r for r in answered[i + 1:] if r.path == throttled.path), None)
            assert again is None or again.at - throttled.at >= 0.95, (
                throttled.path, _throttling_report(double, throttled_from, tmp_path))
    assert sum(1 for r in double.requests if r.status == 429) == 20
    await asyncio.sleep(1.0)  # the health detail's counters are refreshed twice a second
    health = await bridge_health(bus)
    kinds = health["kb-1"].detail["kinds"]
    assert sum(k["throttled"] for k in kinds.values()) >= 1
    assert kinds["Pod"]["gone"] >= 2 and kinds["Pod"]["relists"] >= 2
    assert kinds["Pod"]["bookmarks"] >= 1


async def test_leader_handover_without_double_writes(
        nats_server: NatsServer, double: ApiServerDouble, bus: Bus, tmp_path: Path,
        procs: list[Any]) -> None:
    for obj in fixtures.all_objects():
        double.put_object(obj)
    puts: list[tuple[str, bytes]] = []

    async def record() -> None:
        async for event in bus.watch(schema.BUCKET_RESOURCES, ">"):
            if not isinstance(event, type(None)) and hasattr(event, "key") and event.value:
                puts.append((event.key, event.value))

    recorder = asyncio.create_task(record())
    try:
        a = start_bridge(nats_server, double, tmp_path, "kb-a")
        b = start_bridge(nats_server, double, tmp_path, "kb-b")
        procs += [a, b]
        health = await eventually(lambda: _when(bridge_health(bus), lambda h: len(h) == 2 and all(
            r.healthy for r in h.values()) and sum(r.detail["leader"] for r in h.values()) == 1),
            30, "two healthy bridges, one leader")
        leader = next(name for name, r in health.items() if r.detail["leader"])
        follower = "kb-b" if leader == "kb-a" else "kb-a"
        await eventually(lambda: _when(resources(bus), lambda r: len(r) == 8), 20, "synced")
        double.put_object(fixtures.variant(fixtures.load("pod"), "while-a-leads"))
        await eventually(lambda: _when(resources(bus), lambda r: "Pod.shop.while-a-leads" in r),
                         20, "the leader writes")
        health = await bridge_health(bus)
        assert health[follower].detail["writes"]["puts"] == 0
        assert health[leader].detail["writes"]["puts"] == 9, "\n".join(k for k, _ in puts)

        # the leader stops (releasing the lease); the follower takes over
        (a if leader == "kb-a" else b).send_signal(signal.SIGTERM)
        assert await asyncio.to_thread((a if leader == "kb-a" else b).wait, 10) == 0
        double.put_object(fixtures.variant(fixtures.load("pod"), "during-handover"))
        await eventually(lambda: _when(bridge_health(bus), lambda h: h.get(follower) is not None
                                       and h[follower].detail["leader"]), 20, "handover")
        await eventually(lambda: _when(resources(bus), lambda r: "Pod.shop.during-handover" in r),
                         20, "the new leader writes what changed")
        health = await bridge_health(bus)
        assert health[follower].detail["writes"]["puts"] == 1  # nothing already there rewritten
        lease = double.get_object("Lease", "kube-system", "ciliary-kubebridge-default")
        assert lease is not None and lease["spec"]["holderIdentity"] == follower
        assert lease["spec"]["leaseTransitions"] >= 1
        await asyncio.sleep(0.5)
        counts: dict[tuple[str, bytes], int] = {}
        for item in puts:
            counts[item] = counts.get(item, 0) + 1
        assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
        assert len(puts) == 10
    finally:
        recorder.cancel()


def _throttling_report(double: ApiServerDouble, since: int, tmp_path: Path) -> str:
    """The requests answered since ``since`` (seconds after the first, status, path) and
    the tail of the bridge's log."""
    answered = double.requests[since:]
    start = answered[0].at if answered else 0.0
    lines = [f"{r.at - start:6.2f} {r.status} {r.method} {r.path}" for r in answered]
    log_tail = (tmp_path / "kb-1.log").read_text().splitlines()[-30:]
    return "\n".join(["requests since the throttling (watches when they ended):", *lines,
                      "bridge log:", *log_tail])


async def _when(awaitable: Any, predicate: Any) -> Any:
    value = await awaitable
    return value if predicate(value) else None


async def _now(value: Any) -> Any:
    return value


async def test_a_cluster_without_the_cilium_crds(
        nats_server: NatsServer, double: ApiServerDouble, bus: Bus, tmp_path: Path,
        procs: list[Any]) -> None:
    """The Cilium kinds answer 404: they count as listed and empty, the rest is followed."""
    double.unserved |= {"ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"}
    for obj in fixtures.all_objects():
        if not obj["kind"].startswith("Cilium"):
            double.put_object(obj)
    procs.append(start_bridge(nats_server, double, tmp_path, "kb-1"))
    health = await eventually(lambda: _when(bridge_health(bus), lambda h: "kb-1" in h
                                            and h["kb-1"].healthy), 20, "healthy without CRDs")
    kinds = health["kb-1"].detail["kinds"]
    assert kinds["CiliumNetworkPolicy"]["served"] is False and kinds["Pod"]["served"] is True
    stored = await eventually(lambda: _when(resources(bus), lambda r: len(r) == 6), 20, "synced")
    assert not any(key.startswith("Cilium") for key in stored)
