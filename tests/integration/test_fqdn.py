"""toFQDNs end to end over a real nats-server: DNS responses on ``fqdn.dns.<cluster>.<node>``
-> identity service (FQDN-labelled CIDR identities, ipcache) -> policy service (allow entry),
and back out again when the answer expires."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from ciliary import schema
from ciliary.bus import Bus
from ciliary.dnswire import a_record, build_response
from ciliary.resources import loads
from ciliary.store import ResourceStore, kv_key, now_rfc3339
from tests.integration.conftest import eventually, service_process

CLUSTER = "fqdn-test"
GATEWAY = "api.payment-gateway.example"
GATEWAY_IP = "203.0.113.10"
STRANGER_IP = "203.0.113.99"
CHECKOUT_IP = "10.200.1.20"

MANIFESTS = [
    {"apiVersion": "v1", "kind": "Pod",
     "metadata": {"name": "checkout", "namespace": "default", "labels": {"app": "checkout"}},
     "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}},
    {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
     "metadata": {"name": "payments", "namespace": "default"},
     "spec": {"endpointSelector": {"matchLabels": {"app": "checkout"}},
              "egress": [{"toFQDNs": [{"matchName": GATEWAY}],
                          "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}},
]


def start(name: str, url: str, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return service_process(name, url, log_path=log, instance=f"{name}-fqdn",
                           env={"CILIARY_CLUSTER": CLUSTER, "CILIARY_CLUSTER_ID": "5", **env})


def dns_batch(name: str, answers: list[tuple[str, int]], seq: int) -> schema.RawEventBatch:
    payload = build_response(name, 1, [(1, ttl, a_record(ip)) for ip, ttl in answers])
    event = schema.RawFlowEvent(ts_ns=1, saddr="10.200.1.53", daddr=CHECKOUT_IP, sport=53,
                                dport=41000, proto=17, direction=1, verdict=1, type=1,
                                payload=payload[:128])
    return schema.RawEventBatch(cluster=CLUSTER, node="node-1", events=[event], seq=seq)


async def kv_state(bus: Bus) -> tuple[dict[str, Any], dict[int, list[str]], dict[int, Any]]:
    ipcache = {k: schema.decode(e.value or b"", schema.IPCacheRecord)
               for k, e in (await bus.kv_list(schema.BUCKET_IPCACHE)).items()}
    ids: dict[int, list[str]] = {}
    for key, entry in (await bus.kv_list(schema.BUCKET_IDENTITIES)).items():
        if key.startswith(schema.IDENTITY_ID_PREFIX):
            rec = schema.decode(entry.value or b"", schema.IdentityRecord)
            ids[rec.id] = list(rec.labels)
    policy = {}
    for entry in (await bus.kv_list(schema.BUCKET_POLICY)).values():
        rec = schema.decode(entry.value or b"", schema.PolicyMapRecord)
        policy[rec.identity] = rec
    return ipcache, ids, policy


async def test_dns_answer_allows_then_expires(nats_server, tmp_path: Path, procs) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    try:
        await bus.ensure_buckets()
        env = {"CILIARY_FQDN_MIN_TTL": "3", "CILIARY_IDENTITY_GC_GRACE": "0.5"}
        procs.append(start("identity", nats_server.url, tmp_path / "identity.log", env))
        procs.append(start("policy", nats_server.url, tmp_path / "policy.log", {}))
        await ResourceStore(bus).apply(loads("\n---\n".join(json.dumps(m) for m in MANIFESTS),
                                             source="test"))
        await bus.kv_put(schema.BUCKET_STATUS, kv_key("Pod", "default", "checkout"),
                         schema.StatusRecord(reporter="node/node-1", updated=now_rfc3339(),
                                             status={"phase": "Running", "podIP": CHECKOUT_IP}))

        async def checkout_policy() -> Any:
            ipcache, _ids, policy = await kv_state(bus)
            pod = ipcache.get(schema.ipcache_key(f"{CHECKOUT_IP}/32"))
            rec = policy.get(pod.identity) if pod else None
            return (pod.identity, rec) if rec is not None and rec.egress_enforced else None

        checkout, rec = await eventually(checkout_policy, what="checkout policy record")
        assert [e for e in rec.entries if e.direction == "egress"] == []  # nothing learned yet

        # an answer for a name no selector matches teaches nothing; the selected one does
        await bus.publish(schema.SUBJECT_FQDN_DNS.format(cluster=CLUSTER, node="node-1"),
                          dns_batch("elsewhere.example", [(STRANGER_IP, 60)], 1))
        sent = time.monotonic()
        await bus.publish(schema.SUBJECT_FQDN_DNS.format(cluster=CLUSTER, node="node-1"),
                          dns_batch(GATEWAY, [(GATEWAY_IP, 1)], 2))

        async def learned() -> Any:
            ipcache, ids, policy = await kv_state(bus)
            entry = ipcache.get(schema.ipcache_key(f"{GATEWAY_IP}/32"))
            if entry is None:
                return None
            allows = [e for e in policy.get(checkout, rec).entries
                      if e.direction == "egress" and e.peer == entry.identity]
            return (entry, ids, allows, time.monotonic() - sent) if allows else None

        entry, ids, allows, delay = await eventually(learned, what="fqdn identity and allow entry")
        assert entry.source == "cidr" and entry.identity & (1 << 24)
        assert sorted(ids[entry.identity]) == [f"cidr:{GATEWAY_IP}/32", f"fqdn:{GATEWAY}",
                                                "reserved:world"]
        assert [(a.port, a.proto, a.verdict) for a in allows] == [(443, 6, "allow")]
        ipcache, _, _ = await kv_state(bus)
        assert schema.ipcache_key(f"{STRANGER_IP}/32") not in ipcache
        print(f"DNS response -> policy entry in bucket: {delay * 1000:.0f} ms")

        # min TTL 3 s (the record said 1 s): the address stays about 3 s, then leaves
        async def expired() -> Any:
            ipcache, ids, policy = await kv_state(bus)
            gone = schema.ipcache_key(f"{GATEWAY_IP}/32") not in ipcache
            peers = {e.peer for e in policy.get(checkout, rec).entries}
            return gone and entry.identity not in peers and entry.identity not in ids
        await eventually(expired, timeout=20, what="expiry of the learned address")
        assert time.monotonic() - sent >= 2.9
    finally:
        await bus.close()
