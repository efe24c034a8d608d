"""ClusterMesh between two real nats-servers, each with its own mesh service process:
connect (the real CLI), sync, disconnect, reconnect, a remote NATS restart, the TTL, and
refused connects."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ciliary import config, schema
from ciliary.bus import Bus
from ciliary.resources.clustermesh import ANNOTATION_GLOBAL, ANNOTATION_SHARED
from ciliary.supervisor import free_port

from .conftest import NatsServer, eventually, run_cli, service_process

TTL = 2.0
WEST_ID, EAST_ID = 2, 3


def fake_instance(data_dir: Path, server: NatsServer, cluster: str, cluster_id: int) -> None:
    """An instance.json the CLI finds (this test process stands in for the supervisor)."""
    config.write_instance(data_dir, config.InstanceState(
        nats_url=server.url, supervisor_pid=os.getpid(), cluster=cluster, cluster_id=cluster_id))


def service(name: str, cluster: str, cluster_id: int, cidr: str, server: NatsServer, log: Path) -> subprocess.Popen[bytes]:
    return service_process("mesh", server.url, log_path=log, instance=f"mesh-{cluster}", env={
        "CILIARY_CLUSTER": cluster, "CILIARY_CLUSTER_ID": str(cluster_id), "CILIARY_CLUSTER_CIDR": cidr,
        "CILIARY_MESH_TTL": str(TTL)})


async def seed_west(bus: Bus) -> None:
    """One payments pod of cluster west, its identity, a global shared Service, a node."""
    await bus.ensure_buckets()
    ident = (WEST_ID << 16) | 300
    await bus.kv_put(schema.BUCKET_IDENTITIES, schema.identity_id_key(ident), schema.IdentityRecord(
        id=ident, labels=["k8s:app=payments", "k8s:io.cilium.k8s.policy.cluster=west"], scope="cluster",
        cluster="west", cluster_id=WEST_ID))
    await bus.kv_put(schema.BUCKET_IPCACHE, schema.ipcache_key("10.2.1.5/32"), schema.IPCacheRecord(
        prefix="10.2.1.5/32", identity=ident, source="pod", cluster="west", cluster_id=WEST_ID,
        node="node-1", namespace="shop", pod="payments-w"))
    await bus.kv_put(schema.BUCKET_IPCACHE, "0.0.0.0_0", schema.IPCacheRecord(
        prefix="0.0.0.0/0", identity=2, source="world", cluster="west", cluster_id=WEST_ID))
    for name, shared in (("payments", "true"), ("ledger", "false")):
        await bus.kv_put(schema.BUCKET_RESOURCES, f"Service.shop.{name}", schema.ResourceRecord(
            kind="Service", api_version="v1", namespace="shop", name=name, uid=name, generation=1,
            created="", manifest={"metadata": {"name": name, "namespace": "shop", "annotations": {
                ANNOTATION_GLOBAL: "true", ANNOTATION_SHARED: shared}}, "spec": {"ports": [{"port": 80}]}}))
        await bus.kv_put(schema.BUCKET_SERVICES, schema.lb_frontend_key(f"10.96.0.{len(name)}", 80, "TCP"),
                         schema.LBFrontend(namespace="shop", name=name, type="ClusterIP",
                                           address=f"10.96.0.{len(name)}", port=80, proto="TCP", service_id=1,
                                           rev_nat_id=1, backends=[schema.LBBackend(id=1, ip="10.2.1.5", port=8080,
                                                                                    proto="TCP", node="node-1")]))
    await bus.kv_put(schema.BUCKET_STATUS, "Node._.node-1", schema.StatusRecord(
        reporter="node/node-1", status={"podCIDR": "10.2.1.0/24",
                                        "addresses": [{"type": "InternalIP", "address": "172.30.2.1"}]}))


async def imported(bus: Bus) -> dict[str, Any]:
    entries = await bus.kv_list(schema.BUCKET_MESH)
    return {key: entry.value for key, entry in entries.items() if entry.value}


async def remote_status(bus: Bus, name: str) -> schema.MeshRemoteStatus | None:
    found = await bus.kv_get_record(schema.BUCKET_MESH, f"status.{name}", schema.MeshRemoteStatus)
    return found[0] if found else None


@pytest.mark.asyncio
async def test_connect_sync_disconnect_reconnect_restart_and_ttl(tmp_path: Path, procs: list) -> None:
    west = NatsServer(port=free_port(), store_dir=tmp_path / "west-nats")
    east = NatsServer(port=free_port(), store_dir=tmp_path / "east-nats")
    west.start()
    east.start()
    try:
        west_dir, east_dir = tmp_path / "west", tmp_path / "east"
        fake_instance(west_dir, west, "west", WEST_ID)
        fake_instance(east_dir, east, "east", EAST_ID)
        wbus = await Bus.connect(west.url, "test-west")
        ebus = await Bus.connect(east.url, "test-east")
        await seed_west(wbus)
        await ebus.ensure_buckets()
        procs.append(service("mesh", "west", WEST_ID, "10.2.0.0/16", west, tmp_path / "west-mesh.log"))
        procs.append(service("mesh", "east", EAST_ID, "10.3.0.0/16", east, tmp_path / "east-mesh.log"))

        done = await asyncio.to_thread(run_cli, "clustermesh", "connect", "--to", str(west_dir), "--timeout", "20",
                                       data_dir=east_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "cluster east <-> west: connected" in done.stdout

        got = await eventually(lambda: imported(ebus), what="west in east's mesh bucket")
        got = await eventually(lambda: _has(ebus, "service.west.shop.payments"), what="west's services")
        keys = set(got)
        assert "ipcache.west.10.2.1.5_32" in keys
        assert f"identity.west.{(WEST_ID << 16) | 300}" in keys and "node.west.node-1" in keys
        assert "service.west.shop.ledger" not in keys  # shared: "false" exports nothing
        assert not any(k.startswith("ipcache.west.0") for k in keys)  # the world entry is not a pod's
        service_rec = schema.decode(got["service.west.shop.payments"], schema.MeshService)
        assert [(b.ip, b.port, b.ready) for b in service_rec.backends] == [("10.2.1.5", 8080, True)]
        # both directions: west follows east too
        assert await eventually(lambda: remote_status(wbus, "east"), what="east followed by west")

        status = json.loads((await asyncio.to_thread(run_cli, "clustermesh", "status", "-o", "json",
                                                     data_dir=east_dir)).stdout)
        (row,) = status["remotes"]
        assert row["name"] == "west" and row["connected"] and row["errors"] == []
        assert (row["nodes"], row["endpoints"], row["identities"], row["services"]) == (1, 1, 1, 1)

        # a backend change in west reaches east
        await wbus.kv_put(schema.BUCKET_SERVICES, schema.lb_frontend_key("10.96.0.8", 80, "TCP"), schema.LBFrontend(
            namespace="shop", name="payments", type="ClusterIP", address="10.96.0.8", port=80, proto="TCP",
            service_id=1, rev_nat_id=1, backends=[schema.LBBackend(id=1, ip="10.2.1.5", port=8080, proto="TCP",
                                                                   state=schema.LB_STATE_NOT_READY)]))

        async def unready() -> bool:
            got = await imported(ebus)
            raw = got.get("service.west.shop.payments")
            return bool(raw) and not schema.decode(raw, schema.MeshService).backends[0].ready
        await eventually(unready, what="west's backend unready in east")

        # the remote's NATS restarts: within the TTL nothing is withdrawn, then it syncs again
        west.stop()
        west.start()
        await eventually(lambda: _connected(ebus, "west"), what="west connected again after its restart")
        assert "service.west.shop.payments" in await imported(ebus)

        # west's NATS gone for longer than the TTL: withdrawn, status says why
        west.stop()
        st = await eventually(lambda: _stale(ebus, "west"), what="west withdrawn after the TTL", timeout=TTL * 4 + 15)
        assert any("TTL" in e or "lost" in e for e in st.errors)
        assert set(await imported(ebus)) == {"status.west"}
        west.start()
        await eventually(lambda: _has(ebus, "service.west.shop.payments"), what="west back")

        # disconnect withdraws at once, both sides; reconnect brings it all back
        done = await asyncio.to_thread(run_cli, "clustermesh", "disconnect", "--from", "west", data_dir=east_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        await eventually(lambda: _empty(ebus), what="east's mesh bucket empty after disconnect")
        await eventually(lambda: _empty(wbus), what="west's mesh bucket empty after disconnect")
        done = await asyncio.to_thread(run_cli, "clustermesh", "connect", "--to", str(west_dir), data_dir=east_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        await eventually(lambda: _has(ebus, "service.west.shop.payments"), what="west after reconnect")
        await wbus.close()
        await ebus.close()
    finally:
        west.stop()
        east.stop()


async def _has(bus: Bus, key: str) -> dict[str, Any] | None:
    got = await imported(bus)
    return got if key in got else None


async def _connected(bus: Bus, name: str) -> bool:
    status = await remote_status(bus, name)
    return bool(status and status.connected)


async def _stale(bus: Bus, name: str) -> schema.MeshRemoteStatus | None:
    status = await remote_status(bus, name)
    return status if status and not status.connected and not (set(await imported(bus)) - {f"status.{name}"}) else None


async def _empty(bus: Bus) -> bool:
    return not await imported(bus)


@pytest.mark.asyncio
async def test_bad_connects_are_refused_naming_both(tmp_path: Path, procs: list) -> None:
    servers = {name: NatsServer(port=free_port(), store_dir=tmp_path / f"{name}-nats") for name in ("a", "b", "c")}
    for server in servers.values():
        server.start()
    try:
        plan = {"a": ("alpha", 5, "10.5.0.0/16"), "b": ("beta", 5, "10.6.0.0/16"), "c": ("gamma", 7, "10.5.128.0/17")}
        for key, (cluster, cid, cidr) in plan.items():
            fake_instance(tmp_path / key, servers[key], cluster, cid)
            procs.append(service("mesh", cluster, cid, cidr, servers[key], tmp_path / f"{key}.log"))
        same_id = await asyncio.to_thread(run_cli, "clustermesh", "connect", "--to", str(tmp_path / "b"),
                                          data_dir=tmp_path / "a")
        assert same_id.returncode == 1
        assert "cluster alpha and cluster beta both have cluster id 5" in same_id.stderr, same_id.stderr
        overlap = await asyncio.to_thread(run_cli, "clustermesh", "connect", "--to", str(tmp_path / "c"),
                                          data_dir=tmp_path / "a")
        assert overlap.returncode == 1
        assert "pod CIDR 10.5.0.0/16 of cluster alpha overlaps pod CIDR 10.5.128.0/17 of cluster gamma" in overlap.stderr
        itself = await asyncio.to_thread(run_cli, "clustermesh", "connect", "--to", str(tmp_path / "a"),
                                         data_dir=tmp_path / "a")
        assert itself.returncode == 1 and "own data dir" in itself.stderr
        for key in plan:  # nothing was written anywhere
            bus = await Bus.connect(servers[key].url, "test")
            assert await bus.kv_list(schema.BUCKET_MESH_REMOTES) == {}
            await bus.close()
        assert all("Traceback" not in r.stderr for r in (same_id, overlap, itself))
    finally:
        for server in servers.values():
            server.stop()
