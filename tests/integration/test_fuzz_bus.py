"""A hostile bus: every control-plane service runs against a real nats-server while a seeded
corpus of bad payloads (arbitrary bytes, msgpack of any shape, records of the right shape
with wrong values) lands on every bucket and subject it consumes. No service crashes or
logs a traceback, every one stays healthy and still answers, and a valid object applied
afterwards is still processed."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import msgspec

from ciliary import schema
from ciliary.bus import Bus
from ciliary.events import subjects as events
from ciliary.resources import resource_from_manifest
from ciliary.status import gather_health
from ciliary.store import ResourceStore, kv_key, now_rfc3339
from ciliary.supervisor import create_builtin_namespaces
from tests.integration.conftest import (
    FLOWS_SETTINGS,
    ensure_buckets,
    eventually,
    service_process,
    stop_processes,
)

SERVICES = ("identity", "servicelb", "policy", "flows", "mesh")
PER_ENTRY_POINT = 150  # payloads on each bucket key family and each subject
SEED = 20
CLUSTER = "default"

HOSTILE = ["", " ", ".", "*", ">", "\x00", "é", "🙂", "a" * 500, "-1", "10.0.0.1", "::1",
           "999.1.1.1/99", "k8s:app", "reserved:world", "TCP", "ANY", "id.", "fe.", "Pod"]
RECORD_FIELDS: dict[str, list[str]] = {
    "resource": ["kind", "api_version", "namespace", "name", "uid", "generation", "created", "manifest"],
    "status": ["reporter", "observed_generation", "status", "updated"],
    "identity": ["id", "labels", "scope", "cluster"],
    "ipcache": ["identity", "owner", "node", "cluster", "encrypt_key"],
    "other": ["events", "cluster", "node", "seq", "lost", "ip", "labels", "since", "filters",
              "whitelist", "blacklist", "number", "source", "destination", "port", "protocol"],
}


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 4 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 65536, rng.randrange(-10**6, 10**6)])
    if choice == 3:
        return rng.choice(HOSTILE)
    if choice == 4:
        return rng.random() * rng.choice([1, 1e300, -1e-300])
    if choice in (5, 6):
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = RECORD_FIELDS[rng.choice(list(RECORD_FIELDS))] + HOSTILE
    return {rng.choice(keys): hostile_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def hostile_payload(rng: random.Random, fields: list[str]) -> bytes:
    """Arbitrary bytes, msgpack of anything, or a mapping with the record's field names."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        return msgspec.msgpack.encode(hostile_value(rng))
    record = {f: hostile_value(rng) for f in fields if rng.random() < 0.8}
    if kind == 3 and "manifest" in fields:  # a plausible object with a hostile spec
        record.update(kind=rng.choice(["Pod", "Service", "Namespace", "Node", "CiliumNetworkPolicy",
                                       "NetworkPolicy", "EndpointSlice", "ServiceExport"]),
                      namespace="default", name=f"f{rng.randrange(10**6)}",
                      manifest={"metadata": hostile_value(rng), "spec": hostile_value(rng),
                                "status": hostile_value(rng)})
    return msgspec.msgpack.encode(record)


# (bucket, key prefixes, record fields): what the services read
BUCKETS: list[tuple[str, list[str], list[str]]] = [
    (schema.BUCKET_RESOURCES, ["Pod.default.", "Namespace._.", "Node._.", "Service.default.",
                               "EndpointSlice.default.", "CiliumNetworkPolicy.default.",
                               "CiliumClusterwideNetworkPolicy._.", "NetworkPolicy.default.",
                               "ServiceExport.default.", "ServiceImport.default."], RECORD_FIELDS["resource"]),
    (schema.BUCKET_STATUS, ["Pod.default.", "Node._.", "Service.default."], RECORD_FIELDS["status"]),
    (schema.BUCKET_IDENTITIES, ["id.", "labels."], RECORD_FIELDS["identity"]),
    (schema.BUCKET_IPCACHE, ["10.0.9.", "fd00::"], RECORD_FIELDS["ipcache"]),
    (schema.BUCKET_SERVICES, ["fe.", "eps."], RECORD_FIELDS["other"]),
    (schema.BUCKET_POLICY, ["id."], RECORD_FIELDS["other"]),
    (schema.BUCKET_ALLOCATIONS, ["clusterip.", "nodeport."], RECORD_FIELDS["other"]),
    (schema.BUCKET_MESH_REMOTES, ["remote."], RECORD_FIELDS["other"]),
    (schema.BUCKET_MESH, ["status.", "node.", "service."], RECORD_FIELDS["other"]),
]
SUBJECTS = [
    schema.SUBJECT_IDENTITY_EXPLAIN, schema.SUBJECT_IDENTITY_REPORT, schema.SUBJECT_POLICY_TRACE,
    schema.SUBJECT_FQDN_DNS.format(cluster=CLUSTER, node="node-1"),
    schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1"),
    schema.SUBJECT_FLOWS_QUERY, schema.SUBJECT_FLOWS_METRICS, schema.SUBJECT_HEALTH_ALL,
    events.SUBJECT_INTEREST,
]


async def storm(bus: Bus, rng: random.Random) -> int:
    sent = 0
    inbox = "_INBOX.fuzz.replies"
    for bucket, prefixes, fields in BUCKETS:
        items = [(f"{rng.choice(prefixes)}f{i}", hostile_payload(rng, fields), None)
                 for i in range(PER_ENTRY_POINT)]
        sent += len(await bus.kv_put_many(bucket, items))
    for subject in SUBJECTS:
        for _ in range(PER_ENTRY_POINT):
            await bus.publish(subject, hostile_payload(rng, RECORD_FIELDS["other"]), reply=inbox)
            sent += 1
    return sent


async def test_no_service_falls_over_on_a_hostile_bus(nats_server, tmp_path: Path) -> None:
    await ensure_buckets(nats_server.url)
    procs = [service_process(name, nats_server.url, log_path=tmp_path / f"{name}.log",
                             env={"CILIARY_FLOWS_METRICS_PORT": "0"}, unset=FLOWS_SETTINGS)
             for name in SERVICES]
    bus = await Bus.connect(nats_server.url, "fuzz")
    try:
        await create_builtin_namespaces(bus)

        async def all_healthy() -> bool:
            reports = await gather_health(bus, timeout=0.5)
            return {r.service for r in reports if r.healthy} >= set(SERVICES)

        await eventually(all_healthy, what="every service healthy before the storm")
        sent = await storm(bus, random.Random(SEED))
        assert sent >= PER_ENTRY_POINT * (len(BUCKETS) + len(SUBJECTS))
        print(f"hostile payloads sent: {sent} ({PER_ENTRY_POINT} per entry point, "
              f"{len(BUCKETS)} buckets, {len(SUBJECTS)} subjects)")

        # still up, healthy and answering
        await eventually(all_healthy, what="every service healthy after the storm")
        for name, proc in zip(SERVICES, procs, strict=True):
            assert proc.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
        trace = await bus.request(schema.SUBJECT_POLICY_TRACE, schema.PolicyTraceRequest(
            from_labels=["k8s:app=a"], to_labels=["k8s:app=b"], port=80), schema.PolicyTraceReply,
            timeout=10)
        assert trace is not None

        # a valid object is still processed: a pod with an address gets an identity
        await ResourceStore(bus).apply([resource_from_manifest(
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "after", "namespace": "default", "labels": {"app": "after"}},
             "spec": {"containers": [{"name": "c", "image": "x"}]}}, source="test")])
        await bus.kv_put(schema.BUCKET_STATUS, kv_key("Pod", "default", "after"), schema.StatusRecord(
            reporter="node/node-1", updated=now_rfc3339(),
            status={"phase": "Running", "podIP": "10.0.77.7", "podIPs": [{"ip": "10.0.77.7"}],
                    "hostIP": "10.0.0.1"}))

        async def identified() -> bool:
            found = await bus.kv_get(schema.BUCKET_IPCACHE, schema.ipcache_key("10.0.77.7/32"))
            return found is not None and found.value is not None

        await eventually(identified, what="identity for the pod applied after the storm")
    finally:
        await bus.close()
        await asyncio.to_thread(stop_processes, procs)
    for name, proc in zip(SERVICES, procs, strict=True):
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in log, f"{name}:\n{log[log.index('Traceback') - 500:][:4000]}"
        assert "WARNING" in log, f"{name} logged no rejection: the storm did not reach it"
        assert proc.returncode == 0, f"{name} exited {proc.returncode}"
