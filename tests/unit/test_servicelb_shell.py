"""The servicelb shell against a fake bus: write ordering, CAS races, restart, bad input."""

from __future__ import annotations

import yaml

from ciliary import schema
from ciliary.bus import KVEntry
from ciliary.runtime import Context, Settings
from ciliary.testing import FakeBus
from services.servicelb import model
from services.servicelb.service import ServiceLB


def resource_entries(text: str) -> dict[str, dict[str, KVEntry]]:
    state: dict[str, dict[str, KVEntry]] = {k: {} for k in ("Service", "EndpointSlice", "Pod", "Node")}
    for i, doc in enumerate(d for d in yaml.safe_load_all(text) if d):
        meta = doc["metadata"]
        ns = meta.get("namespace", "default") if doc["kind"] != "Node" else ""
        record = schema.ResourceRecord(kind=doc["kind"], api_version=doc["apiVersion"], namespace=ns,
                                       name=meta["name"], uid=f"u{i}", generation=1, created="t",
                                       manifest=doc)
        key = f"{doc['kind']}.{ns or '_'}.{meta['name']}"
        state[doc["kind"]][key] = KVEntry(schema.BUCKET_RESOURCES, key, i + 1, schema.encode(record))
    return state


def slice_yaml(*ips: str) -> str:
    endpoints = "".join(f"\n- addresses: [{ip}]" for ip in ips)
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Node
metadata: {{name: node-1}}
status: {{addresses: [{{type: InternalIP, address: 192.168.1.1}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:{endpoints}
"""


def make_lb(bus: FakeBus) -> ServiceLB:
    ctx = Context(service="servicelb", settings=Settings(nats_url="nats://fake"), bus=bus)
    return ServiceLB(ctx, model.Config())


def positions(ops: list[tuple[str, str, str]], op: str, bucket: str) -> list[int]:
    return [i for i, o in enumerate(ops) if o[0] == op and o[1] == bucket]


async def test_writes_are_ordered_allocate_add_remove_release() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1", "10.0.0.2"))
    await lb.load()
    await lb.reconcile()
    creates = positions(bus.ops, "put", schema.BUCKET_ALLOCATIONS)
    rows = positions(bus.ops, "put", schema.BUCKET_SERVICES)
    assert creates and rows and max(creates) < min(rows)

    # a backend is replaced: new rows first, the old backend id is released last
    bus.ops.clear()
    lb.resources = resource_entries(slice_yaml("10.0.0.2", "10.0.0.3"))
    await lb.reconcile()
    kinds = [(op, bucket) for op, bucket, _ in bus.ops]
    assert kinds == [
        ("put", schema.BUCKET_ALLOCATIONS),  # backend id for 10.0.0.3
        ("put", schema.BUCKET_SERVICES), ("put", schema.BUCKET_SERVICES),  # ClusterIP + NodePort rows
        ("delete", schema.BUCKET_ALLOCATIONS),  # backend id of 10.0.0.1
    ]
    assert bus.ops[-1][2] == f"{schema.ALLOC_LB_BACKEND_ID}.1"

    # the Service goes away: rows deleted before its values are released
    bus.ops.clear()
    lb.resources = {k: {} for k in lb.resources}
    await lb.reconcile()
    deletes_rows = positions(bus.ops, "delete", schema.BUCKET_SERVICES)
    releases = positions(bus.ops, "delete", schema.BUCKET_ALLOCATIONS)
    assert len(deletes_rows) == 2 and len(releases) == 6  # clusterIP, nodePort, 2 service ids, 2 backend ids
    assert max(deletes_rows) < min(releases)
    assert ("delete", schema.BUCKET_STATUS, "Service.default.web") in bus.ops
    assert bus.kv[schema.BUCKET_ALLOCATIONS] == {} and bus.kv[schema.BUCKET_SERVICES] == {}


async def test_restart_writes_nothing_and_keeps_ids() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    await lb.reconcile()
    before = {b: dict(v) for b, v in bus.kv.items()}
    bus.ops.clear()
    again = make_lb(bus)
    again.resources = resource_entries(slice_yaml("10.0.0.1"))
    await again.load()
    await again.reconcile()
    assert bus.ops == [] and bus.kv == before


async def test_lost_allocation_race_rereads_and_never_shares_a_value() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    # another writer took the first dynamic cluster IP and node port after we loaded
    await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_CLUSTER_IP}.10-96-1-1",
                     schema.LBAllocation(owner="other/svc"), last_revision=0)
    await bus.kv_put(schema.BUCKET_ALLOCATIONS, f"{schema.ALLOC_LB_NODE_PORT}.30086",
                     schema.LBAllocation(owner="other/svc:1/TCP"), last_revision=0)
    await lb.reconcile()
    status = schema.decode(bus.kv[schema.BUCKET_STATUS]["Service.default.web"][1], schema.StatusRecord).status
    assert status["clusterIP"] == "10.96.1.2" and status["nodePorts"][0]["nodePort"] == 30087
    owners = [schema.decode(v, schema.LBAllocation).owner for _, v in bus.kv[schema.BUCKET_ALLOCATIONS].values()]
    assert len(owners) == len(set(owners))


async def test_garbage_inputs_are_skipped_and_a_broken_service_keeps_its_values() -> None:
    bus = FakeBus()
    lb = make_lb(bus)
    lb.resources = resource_entries(slice_yaml("10.0.0.1"))
    await lb.load()
    await lb.reconcile()
    cip = dict(bus.kv[schema.BUCKET_ALLOCATIONS])
    # the Service becomes undecodable, and garbage appears next to it
    broken = yaml.safe_load(slice_yaml("10.0.0.1").split("---")[0])
    broken["spec"]["ports"] = [{"port": "eighty"}]
    lb.resources["Service"]["Service.default.web"] = KVEntry(
        schema.BUCKET_RESOURCES, "Service.default.web", 99, schema.encode(schema.ResourceRecord(
            kind="Service", api_version="v1", namespace="default", name="web", uid="u", generation=2,
            created="t", manifest=broken)))
    lb.resources["Service"]["Service.default.junk"] = KVEntry(schema.BUCKET_RESOURCES, "Service.default.junk", 100, b"\xc1")
    await lb.reconcile()
    kept = {k for k in bus.kv[schema.BUCKET_ALLOCATIONS]
            if k.startswith((schema.ALLOC_LB_CLUSTER_IP, schema.ALLOC_LB_NODE_PORT))}
    assert kept == {k for k in cip if k.startswith((schema.ALLOC_LB_CLUSTER_IP, schema.ALLOC_LB_NODE_PORT))}
    assert lb.ctx.detail["problems"] == 1
    assert any("undecodable" in p for p in lb.logged)

