"""Identity service processes against a real nats-server: allocation, replicas, GC, ipcache."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ciliary import config, schema
from ciliary.bus import SYNCED, Bus, KVEntry
from ciliary.resources import loads
from ciliary.store import ResourceStore, kv_key, now_rfc3339
from tests.integration.conftest import REPO, eventually, service_process

CLUSTER = "test-cluster"
CLUSTER_ID = 3


def identity_process(
    nats_url: str, instance: str, *, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """An identity service of this module's cluster under its own instance name."""
    return service_process("identity", nats_url, log_path=log_path, instance=instance,
                           env={"CILIARY_CLUSTER": CLUSTER, "CILIARY_CLUSTER_ID": str(CLUSTER_ID), **(env or {})})


async def connect(url: str) -> Bus:
    bus = await Bus.connect(url, "test")
    await bus.ensure_buckets()
    return bus




class BucketView:
    """A watched copy of one bucket (polling ``kv_list`` would leave one consumer per call)."""

    def __init__(self, bus: Bus, bucket: str) -> None:
        self.bus, self.bucket = bus, bucket
        self.state: dict[str, KVEntry] = {}
        self.synced = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.bus.watch(self.bucket):
            if event is SYNCED:
                self.synced.set()
                continue
            assert isinstance(event, KVEntry)
            if event.deleted:
                self.state.pop(event.key, None)
            else:
                self.state[event.key] = event

    async def ready(self) -> None:
        if not self.synced.is_set():
            await asyncio.wait_for(self.synced.wait(), timeout=10)
            # a watch can report its initial state before every key arrived: merge one listing
            for key, entry in (await self.bus.kv_list(self.bucket)).items():
                held = self.state.get(key)
                if held is None or held.revision < entry.revision:
                    self.state[key] = entry


VIEWS: dict[tuple[int, str], BucketView] = {}


async def view(bus: Bus, bucket: str) -> dict[str, KVEntry]:
    found = VIEWS.get((id(bus), bucket))
    if found is None or found.bus is not bus:
        found = VIEWS[(id(bus), bucket)] = BucketView(bus, bucket)
    await found.ready()
    return dict(found.state)


@pytest.fixture(autouse=True)
async def _close_views() -> Any:
    yield
    for found in VIEWS.values():
        found.task.cancel()
    await asyncio.gather(*(v.task for v in VIEWS.values()), return_exceptions=True)
    VIEWS.clear()


async def snapshot(bus: Bus) -> tuple[dict[int, schema.IdentityRecord], dict[str, schema.IdentityLabelsRecord]]:
    ids: dict[int, schema.IdentityRecord] = {}
    sets: dict[str, schema.IdentityLabelsRecord] = {}
    for key, entry in (await view(bus, schema.BUCKET_IDENTITIES)).items():
        assert entry.value is not None
        if key.startswith(schema.IDENTITY_ID_PREFIX):
            rec = schema.decode(entry.value, schema.IdentityRecord)
            ids[rec.id] = rec
        else:
            sets[key] = schema.decode(entry.value, schema.IdentityLabelsRecord)
    return ids, sets


async def ipcache(bus: Bus) -> dict[str, schema.IPCacheRecord]:
    out = {}
    for key, entry in (await view(bus, schema.BUCKET_IPCACHE)).items():
        try:
            out[key] = schema.decode(entry.value or b"", schema.IPCacheRecord)
        except schema.msgspec.DecodeError:
            out[key] = schema.IPCacheRecord(prefix="<bad>", identity=0, source="bad", cluster="", cluster_id=0)
    return out


def assert_bijective(ids: dict[int, schema.IdentityRecord], sets: dict[str, schema.IdentityLabelsRecord]) -> None:
    """No two label sets share an id; each label set has one id, naming a live id. record."""
    seen: dict[int, list[str]] = {}
    for key, rec in sets.items():
        assert rec.id not in seen, f"id {rec.id} used by {seen[rec.id]} and {rec.labels}"
        seen[rec.id] = rec.labels
        assert rec.id in ids, f"{key} names missing id {rec.id}"
        assert ids[rec.id].labels == rec.labels
    by_labels: dict[tuple[str, ...], int] = {}
    for rec in sets.values():
        assert tuple(rec.labels) not in by_labels
        by_labels[tuple(rec.labels)] = rec.id


def pod_manifest(name: str, labels: dict[str, str], namespace: str = "default", node: str = "node-1") -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
    })


async def apply_pods(bus: Bus, pods: list[tuple[str, dict[str, str]]], namespace: str = "default") -> None:
    text = "\n---\n".join(pod_manifest(n, lab, namespace) for n, lab in pods)
    resources = loads(text, source="test")
    store = ResourceStore(bus)
    for i in range(0, len(resources), 100):
        await store.apply(resources[i : i + 100])


async def set_pod_ip(bus: Bus, name: str, ip: str, namespace: str = "default") -> None:
    await bus.kv_put(schema.BUCKET_STATUS, kv_key("Pod", namespace, name), schema.StatusRecord(
        reporter="node/node-1", status={"phase": "Running", "podIP": ip}, updated=now_rfc3339()))


def workload_labels(i: int, distinct: int) -> dict[str, str]:
    group = i % distinct
    return {"app": f"app-{group % 25}", "tier": f"t{group // 25}", "pod-template-hash": f"{random.getrandbits(32):08x}"}


async def test_shop_identities_and_ipcache(nats_server, tmp_path: Path, procs) -> None:
    bus = await connect(nats_server.url)
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log"))
        await ResourceStore(bus).apply(loads((REPO / "examples/shop/10-workloads.yaml").read_text(), source="shop")
                                       + loads((REPO / "examples/shop/30-policies.yaml").read_text(), source="shop"))
        await set_pod_ip(bus, "frontend", "10.200.1.10")

        async def ready() -> Any:
            ids, sets = await snapshot(bus)
            cache = await ipcache(bus)
            pods = [r for r in sets.values() if any(lab.startswith("k8s:app=") for lab in r.labels)]
            return (ids, sets, cache) if len(pods) == 3 and "10.200.1.10_32" in cache else None

        ids, sets, cache = await eventually(ready, what="shop identities")
        assert_bijective(ids, sets)
        for ident in range(1, 12):
            assert ids[ident].scope == "reserved"
        low, high = CLUSTER_ID << 16, ((CLUSTER_ID + 1) << 16) - 1
        for rec in sets.values():
            if any(lab.startswith("cidr:") for lab in rec.labels):
                assert rec.id & (1 << 24)
            else:
                assert low <= rec.id <= high
                assert f"k8s:io.cilium.k8s.policy.cluster={CLUSTER}" in rec.labels
                assert ids[rec.id].cluster == CLUSTER and ids[rec.id].cluster_id == CLUSTER_ID
        assert cache["0.0.0.0_0"].identity == 2 and cache["0.0.0.0_0"].source == "world"
        cidr = cache["203.0.113.0_24"]
        assert cidr.source == "cidr" and cidr.identity & (1 << 24)
        front = cache["10.200.1.10_32"]
        assert (front.source, front.pod, front.namespace, front.node) == ("pod", "frontend", "default", "node-1")
        assert "k8s:app=frontend" in ids[front.identity].labels

        # bad payloads anywhere are skipped; a bad ipcache value is replaced (identity owns the bucket)
        await bus.kv_put(schema.BUCKET_RESOURCES, "Pod.default.garbage", b"\xc1not msgpack")
        await bus.kv_put(schema.BUCKET_IPCACHE, "10.255.0.1_32", b"\xc1junk")
        await bus.kv_put(schema.BUCKET_STATUS, "Pod.default.checkout", b"\xc1junk")
        # a node's InternalIP becomes remote-node; namespace labels become identity labels
        await bus.kv_put(schema.BUCKET_STATUS, "Node._.node-9", schema.StatusRecord(
            reporter="node/node-9", status={"addresses": [{"type": "InternalIP", "address": "192.168.50.9"}]}))
        await ResourceStore(bus).apply(loads(json.dumps({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-9"}}), source="t")
            + loads(json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": "default", "labels": {"team": "shop"}}}), source="t"))

        async def second() -> Any:
            cache = await ipcache(bus)
            ids, sets = await snapshot(bus)
            front = cache.get("10.200.1.10_32")
            relabelled = front is not None and (
                "k8s:io.cilium.k8s.namespace.labels.team=shop" in ids[front.identity].labels if front.identity in ids else [])
            ok = "192.168.50.9_32" in cache and "10.255.0.1_32" not in cache and relabelled
            return (cache, ids, sets) if ok else None

        cache, ids, sets = await eventually(second, what="node entry, relabelled pods, bad entry gone")
        node = cache["192.168.50.9_32"]
        assert (node.identity, node.source, node.node) == (6, "node", "node-9")
        assert_bijective(ids, sets)
        old = [r for r in sets.values() if r.refs == 0 and r.unused_since > 0]
        assert len(old) == 3  # the identities from before the namespace got its label await GC
        report = await eventually(lambda: _health(bus), what="health report")
        assert report.healthy and report.detail["ipcache"] == len(cache)
        assert report.detail["identities"] == len(ids) and report.detail["endpoints"] == 3
    finally:
        await bus.close()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert "Traceback" not in (tmp_path / "a.log").read_text()


async def _health(bus: Bus) -> Any:
    from ciliary.status import gather_health

    for report in await gather_health(bus, timeout=0.5):
        if report.service == "identity":
            return report
    return None


# ---------------------------------------------------------------- replicas and crashes

DISTINCT = 50


def pod_ip(i: int) -> str:
    return f"10.1.{i // 250}.{i % 250 + 1}"


def expected_labels(labels: dict[str, str]) -> tuple[str, ...]:
    from services.identity.labels import LabelFilter, identity_labels

    return identity_labels(LabelFilter.from_config(), labels, "default", {}, "default", CLUSTER)


async def converged(bus: Bus, pods: dict[str, dict[str, str]]) -> bool:
    """Every pod has its ipcache entry naming the committed identity of its labels."""
    from services.identity.labels import label_set_hash

    ids, sets = await snapshot(bus)
    cache = await ipcache(bus)
    for name, labels in pods.items():
        rec = sets.get(schema.identity_labels_key(label_set_hash(expected_labels(labels))))
        entry = cache.get(schema.ipcache_key(f"{pod_ip(int(name.split('-')[1]))}/32"))
        if rec is None or entry is None or entry.pod != name or entry.identity != rec.id:
            return False
    return True


async def make_pods(bus: Bus, indices: range, pods: dict[str, dict[str, str]]) -> None:
    batch = [(f"p-{i}", workload_labels(i, DISTINCT)) for i in indices]
    await apply_pods(bus, batch)
    for name, labels in batch:
        pods[name] = labels
    await asyncio.gather(*(set_pod_ip(bus, name, pod_ip(int(name.split("-")[1]))) for name, _ in batch))


async def test_two_replicas_allocate_500_pods_without_duplicates(nats_server, tmp_path: Path, procs) -> None:
    bus = await connect(nats_server.url)
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log"))
        procs.append(identity_process(nats_server.url, "identity-b", log_path=tmp_path / "b.log"))
        pods: dict[str, dict[str, str]] = {}
        started = time.monotonic()
        await asyncio.gather(*(make_pods(bus, range(i, i + 50), pods) for i in range(0, 500, 50)))
        await eventually(lambda: converged(bus, pods), timeout=60, what="500 pods converged")
        elapsed = time.monotonic() - started

        async def refs_settled() -> tuple[Any, Any] | None:
            # reference counts may trail the ipcache by a write or two on a busy machine
            ids, sets = await snapshot(bus)
            return (ids, sets) if sorted(r.refs for r in sets.values()) == [10] * DISTINCT else None

        ids, sets = await eventually(refs_settled, timeout=30, what="10 references on each identity")
        assert_bijective(ids, sets)
        assert len(sets) == DISTINCT
        assert len({r.id for r in sets.values()}) == DISTINCT
        print(f"500 pods / {DISTINCT} identities with 2 replicas converged in {elapsed:.2f}s")
        # orphans left by lost races are cleaned up by the losers themselves
        await eventually(lambda: _no_orphans(bus), timeout=10, what="no orphan id keys")
    finally:
        await bus.close()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


async def _no_orphans(bus: Bus) -> bool:
    ids, sets = await snapshot(bus)
    named = {r.id for r in sets.values()}
    return all(rec.scope == "reserved" or ident in named for ident, rec in ids.items())


async def test_replica_killed_mid_way_loses_nothing(nats_server, tmp_path: Path, procs) -> None:
    bus = await connect(nats_server.url)
    try:
        a = identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log")
        b = identity_process(nats_server.url, "identity-b", log_path=tmp_path / "b.log")
        procs += [a, b]
        pods: dict[str, dict[str, str]] = {}
        await asyncio.gather(*(make_pods(bus, range(i, i + 50), pods) for i in range(0, 250, 50)))
        a.send_signal(signal.SIGKILL)  # mid-way: while it is still allocating and writing
        a.wait()
        await asyncio.gather(*(make_pods(bus, range(i, i + 50), pods) for i in range(250, 500, 50)))
        await eventually(lambda: converged(bus, pods), timeout=60, what="converged after SIGKILL")
        ids, sets = await snapshot(bus)
        assert_bijective(ids, sets)
        assert len(sets) == DISTINCT and sum(r.refs for r in sets.values()) == 500
        before = {k: r.id for k, r in sets.items()}
        # the killed replica comes back and changes nothing that was right
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log"))
        await asyncio.sleep(2.0)
        ids, sets = await snapshot(bus)
        assert {k: r.id for k, r in sets.items()} == before
        assert await converged(bus, pods)
    finally:
        await bus.close()


# ---------------------------------------------------------------- GC and reuse


async def test_unused_identity_is_released_after_grace_and_reusable(nats_server, tmp_path: Path, procs) -> None:
    from services.identity.labels import label_set_hash

    bus = await connect(nats_server.url)
    env = {"CILIARY_IDENTITY_GC_GRACE": "1", "CILIARY_IDENTITY_ORPHAN_AGE": "1"}
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log", env=env))
        procs.append(identity_process(nats_server.url, "identity-b", log_path=tmp_path / "b.log", env=env))
        store = ResourceStore(bus)
        labels = {"app": "short-lived"}
        lkey = schema.identity_labels_key(label_set_hash(expected_labels(labels)))

        async def labels_record() -> schema.IdentityLabelsRecord | None:
            found = await bus.kv_get_record(schema.BUCKET_IDENTITIES, lkey, schema.IdentityLabelsRecord)
            return found[0] if found else None

        await apply_pods(bus, [("job-1", labels)])
        first = (await eventually(labels_record, what="identity allocated")).id

        # deleted and re-created within the grace period: the same identity, mark cleared
        await store.delete("Pod", "default", "job-1")
        await eventually(lambda: _marked(labels_record), what="marked unused")
        await apply_pods(bus, [("job-2", labels)])
        rec = await eventually(lambda: _in_use(labels_record), what="mark cleared")
        assert rec.id == first

        # unused for longer than the grace period: both key spaces are released
        await store.delete("Pod", "default", "job-2")
        t0 = time.monotonic()

        async def released() -> bool:
            gone = await bus.kv_get(schema.BUCKET_IDENTITIES, lkey) is None
            return gone and await bus.kv_get(schema.BUCKET_IDENTITIES, schema.identity_id_key(first)) is None

        await eventually(released, timeout=15, what="identity released")
        assert time.monotonic() - t0 >= 1.0
        # the numeric id is free again: a compare-and-set create of it succeeds
        rev = await bus.kv_put(schema.BUCKET_IDENTITIES, schema.identity_id_key(first), schema.IdentityRecord(
            id=first, labels=["k8s:app=reuse"], scope="cluster", cluster=CLUSTER, cluster_id=CLUSTER_ID,
            created=time.time()), last_revision=0)
        assert rev > 0
        # ... and the service treats that hand-written id (no label set names it) as an orphan
        await eventually(lambda: _absent(bus, schema.identity_id_key(first)), timeout=15, what="orphan swept")
        # the label set used again gets an identity again
        await apply_pods(bus, [("job-3", labels)])
        again = await eventually(labels_record, what="re-allocated")
        assert again.refs == 1 and again.unused_since == 0
    finally:
        await bus.close()


async def _marked(get: Callable[[], Awaitable[schema.IdentityLabelsRecord | None]]) -> Any:
    rec = await get()
    return rec if rec is not None and rec.refs == 0 and rec.unused_since > 0 else None


async def _in_use(get: Callable[[], Awaitable[schema.IdentityLabelsRecord | None]]) -> Any:
    rec = await get()
    return rec if rec is not None and rec.refs == 1 and rec.unused_since == 0 else None


async def _absent(bus: Bus, key: str) -> bool:
    return await bus.kv_get(schema.BUCKET_IDENTITIES, key) is None


# ---------------------------------------------------------------- ipcache follows pod IPs


async def test_ipcache_follows_pod_ips_and_moves_atomically(nats_server, tmp_path: Path, procs) -> None:
    bus = await connect(nats_server.url)
    events: list[tuple[str, str | None]] = []

    async def record_events() -> None:
        async for event in bus.watch(schema.BUCKET_IPCACHE, "10.9.>"):
            if isinstance(event, schema.msgspec.Struct) and getattr(event, "key", None):
                value = None if event.value is None else schema.decode(event.value, schema.IPCacheRecord).pod
                events.append((event.key, value))

    watcher = asyncio.create_task(record_events())
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log"))
        procs.append(identity_process(nats_server.url, "identity-b", log_path=tmp_path / "b.log"))
        await apply_pods(bus, [("old", {"app": "old"}), ("new", {"app": "new"})])
        await set_pod_ip(bus, "old", "10.9.0.1")

        async def entry(key: str, pod: str | None) -> Any:
            cache = await ipcache(bus)
            return True if (pod is None and key not in cache) else (cache.get(key) is not None and cache[key].pod == pod)

        await eventually(lambda: entry("10.9.0.1_32", "old"), what="old owns 10.9.0.1")
        # the pod's IP changes: the new prefix appears, the old one goes
        await set_pod_ip(bus, "old", "10.9.0.2")
        await eventually(lambda: entry("10.9.0.2_32", "old"), what="old owns 10.9.0.2")
        await eventually(lambda: entry("10.9.0.1_32", None), what="10.9.0.1 released")
        # another pod is given 10.9.0.2 while the old pod's status still claims it:
        # the later claim wins, with one put replacing the value
        await set_pod_ip(bus, "new", "10.9.0.2")
        await eventually(lambda: entry("10.9.0.2_32", "new"), what="new owns 10.9.0.2")
        await ResourceStore(bus).delete("Pod", "default", "old")
        await asyncio.sleep(0.5)
        assert await entry("10.9.0.2_32", "new")
        moves = [pod for key, pod in events if key == "10.9.0.2_32"]
        assert moves[0] == "old" and moves[-1] == "new" and None not in moves, events
        cache = await ipcache(bus)
        ids, _ = await snapshot(bus)
        assert "k8s:app=new" in ids[cache["10.9.0.2_32"].identity].labels
        # a pod that disappears takes its ipcache entry with it
        await ResourceStore(bus).delete("Pod", "default", "new")
        await eventually(lambda: entry("10.9.0.2_32", None), what="10.9.0.2 released")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await bus.close()


# ---------------------------------------------------------------- the CLI

DRIVER = """
import sys
from ciliary.cli import main
main(sys.argv[1:])
"""


def identity_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CILIARY_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-c", DRIVER, "identity", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=REPO)


async def test_cli_list_get_explain_report(nats_server, tmp_path: Path, procs) -> None:
    data_dir = tmp_path / "inst"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=os.getpid()))
    bus = await connect(nats_server.url)
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log"))
        pods = [(f"web-{i}", {"app": "web", "pod-template-hash": "7d4b9c8f6", "instance": f"web-{i:02d}"})
                for i in range(8)]
        pods.append(("db-0", {"app": "db", "statefulset.kubernetes.io/pod-name": "db-0"}))
        await apply_pods(bus, pods)

        async def allocated() -> bool:
            _, sets = await snapshot(bus)
            return sum(r.refs for r in sets.values()) == 9
        await eventually(allocated, what="9 pods allocated")
        ids, sets = await snapshot(bus)
        db = next(r for r in sets.values() if "k8s:app=db" in r.labels)
    finally:
        await bus.close()

    out = await asyncio.to_thread(identity_cli, "list", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "SCOPE", "REFS", "LABELS"]
    assert lines[1].split()[:4] == ["1", "reserved", "-", "reserved:host"]
    assert any(line.split()[0] == str(db.id) and "k8s:app=db" in line for line in lines)
    listed = json.loads((await asyncio.to_thread(identity_cli, "list", "-o", "json", data_dir=data_dir)).stdout)
    assert {i["id"] for i in listed} >= {1, 2, 6, db.id}
    assert next(i for i in listed if i["id"] == db.id)["refs"] == 1

    got = json.loads((await asyncio.to_thread(identity_cli, "get", str(db.id), "-o", "json", data_dir=data_dir)).stdout)
    assert got["labels"] == db.labels and got["cluster_id"] == CLUSTER_ID
    table = await asyncio.to_thread(identity_cli, "get", str(db.id), data_dir=data_dir)
    assert table.returncode == 0 and "k8s:app=db" in table.stdout
    missing = await asyncio.to_thread(identity_cli, "get", "424242", data_dir=data_dir)
    assert missing.returncode == 1 and "identity 424242 not found" in missing.stderr

    explain = await asyncio.to_thread(identity_cli, "explain", "--pod", "default/db-0", data_dir=data_dir)
    assert explain.returncode == 0, explain.stderr
    row = next(line for line in explain.stdout.splitlines() if "statefulset.kubernetes.io/pod-name" in line)
    assert "EXCLUDED" in row and "pod-name" in row
    assert f"identity {db.id}:" in explain.stdout
    as_json = json.loads((await asyncio.to_thread(
        identity_cli, "explain", "--labels", "app=web,pod-template-hash=x", "-n", "default", "-o", "json",
        data_dir=data_dir)).stdout)
    verdicts = {v["label"]: v for v in as_json["verdicts"]}
    assert verdicts["k8s:pod-template-hash=x"]["kept"] is False
    assert verdicts["k8s:pod-template-hash=x"]["rule"] == "!pod-template-hash"
    assert as_json["identity"] == 0  # that exact set (no instance label) has no pod
    bad = await asyncio.to_thread(identity_cli, "explain", "--pod", "default/nope", data_dir=data_dir)
    assert bad.returncode == 1 and "not found" in bad.stderr
    both = await asyncio.to_thread(identity_cli, "explain", data_dir=data_dir)
    assert both.returncode == 1 and "--pod" in both.stderr

    report = json.loads((await asyncio.to_thread(identity_cli, "report", "-o", "json", data_dir=data_dir)).stdout)
    assert report["pods"] == 9 and report["identities_estimated"] == 9
    flagged = {r["key"] for r in report["labels"] if r["flagged"]}
    assert flagged == {"k8s:instance"}
    text = await asyncio.to_thread(identity_cli, "report", data_dir=data_dir)
    assert text.returncode == 0 and "FLAG" in text.stdout and "advice: exclude k8s:instance" in text.stdout


async def test_survives_nats_restart_and_converges(nats_server, tmp_path: Path, procs) -> None:
    bus = await connect(nats_server.url)
    pods: dict[str, dict[str, str]] = {}
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log"))
        await make_pods(bus, range(0, 20), pods)
        await eventually(lambda: converged(bus, pods), what="first 20 pods")
    finally:
        await bus.close()
    nats_server.stop()
    await asyncio.sleep(1.0)
    nats_server.start()
    bus = await connect(nats_server.url)
    try:
        await make_pods(bus, range(20, 40), pods)
        await ResourceStore(bus).delete("Pod", "default", "p-0")
        await bus.kv_delete(schema.BUCKET_STATUS, kv_key("Pod", "default", "p-0"))
        del pods["p-0"]
        await eventually(lambda: converged(bus, pods), what="converged after NATS restart")
        cache = await ipcache(bus)
        assert schema.ipcache_key(f"{pod_ip(0)}/32") not in cache
        assert procs[0].poll() is None, (tmp_path / "a.log").read_text()
    finally:
        await bus.close()


async def test_configured_label_patterns(nats_server, tmp_path: Path, procs) -> None:
    bus = await connect(nats_server.url)
    try:
        procs.append(identity_process(nats_server.url, "identity-a", log_path=tmp_path / "a.log",
                                      env={"CILIARY_IDENTITY_LABELS": "k8s:!instance$ k8s:("}))
        await apply_pods(bus, [(f"w-{i}", {"app": "web", "instance": f"w-{i}"}) for i in range(5)])

        async def one_identity() -> Any:
            _, sets = await snapshot(bus)
            return sets if sum(r.refs for r in sets.values()) == 5 else None

        sets = await eventually(one_identity, what="5 pods on one identity")
        assert len(sets) == 1 and not any("instance" in lab for lab in next(iter(sets.values())).labels)
        report = await eventually(lambda: _health(bus), what="health")
        assert report.healthy and len(report.detail["label_pattern_errors"]) == 1
    finally:
        await bus.close()
