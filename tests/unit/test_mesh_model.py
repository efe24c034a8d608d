"""ClusterMesh pure parts: what a cluster exports, what it imports (and refuses), remote
backends in the service model with their affinity, remote pods in the ipcache."""

from __future__ import annotations

from typing import Any

import pytest

from ciliary import schema
from ciliary.cli.clustermesh import refusals, status_rows
from ciliary.resources.clustermesh import annotation_problems, global_service
from services.identity.model import desired_ipcache
from services.mesh.exports import export_state
from services.mesh.imports import LocalCluster, RemoteView, imported_state
from services.servicelb import incremental, meshslices, model

WEST = 2
IDENT = (WEST << 16) | 300


def service(name: str, notes: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "annotations": notes or {}},
            "spec": {"clusterIP": "10.96.0.50", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def local_slice(ready: bool) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "payments-east", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "payments"}},
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.3.1.7"], "conditions": {"ready": ready}, "nodeName": "node-1"}]}


def remote_record(ready: bool = True) -> schema.MeshService:
    return schema.MeshService(namespace="shop", name="payments", cluster="west", cluster_id=WEST,
                              backends=[schema.MeshBackend(ip="10.2.1.5", port=8080, port_name="http",
                                                           ready=ready, node="node-1", pod="shop/payments-w")])


def frontend(notes: dict[str, str] | None, local_ready: bool, remote_ready: bool = True) -> schema.LBFrontend:
    docs = [service("payments", notes), local_slice(local_ready), meshslices.mesh_slice(remote_record(remote_ready))]
    cfg = model.Config(derive_slices=False)
    desired = model.compute(model.Inputs.from_manifests(docs), model.Allocations.create(cfg), cfg)
    (fe,) = desired.frontends.values()
    return fe


def slot_ips(fe: schema.LBFrontend) -> list[str]:
    by_id = {b.id: b.ip for b in fe.backends}
    return sorted(by_id[i] for i in fe.slots)


GLOBAL = "service.cilium.io/global"
AFFINITY = "service.cilium.io/affinity"


@pytest.mark.parametrize(("notes", "local_ready", "expected"), [
    ({GLOBAL: "true", AFFINITY: "local"}, True, ["10.3.1.7"]),
    ({GLOBAL: "true", AFFINITY: "local"}, False, ["10.2.1.5"]),
    ({GLOBAL: "true", AFFINITY: "remote"}, True, ["10.2.1.5"]),
    ({GLOBAL: "true"}, True, ["10.2.1.5", "10.3.1.7"]),
    ({GLOBAL: "true", AFFINITY: "none"}, False, ["10.2.1.5"]),
    (None, True, ["10.3.1.7"]),  # not global: remote backends are not used
    (None, False, []),
    ({GLOBAL: "true", AFFINITY: "sideways"}, True, ["10.3.1.7"]),  # bad annotation: not global
])
def test_affinity_orders_local_and_remote_backends(notes: dict[str, str] | None, local_ready: bool,
                                                    expected: list[str]) -> None:
    assert slot_ips(frontend(notes, local_ready)) == expected


def test_remote_backends_keep_their_cluster_and_go_when_unready() -> None:
    fe = frontend({GLOBAL: "true", AFFINITY: "local"}, local_ready=False)
    assert {b.ip: b.cluster for b in fe.backends} == {"10.2.1.5": "west", "10.3.1.7": ""}
    assert {b.ip: b.node for b in fe.backends}["10.2.1.5"] == ""  # never one of this cluster's nodes
    assert slot_ips(frontend({GLOBAL: "true", AFFINITY: "local"}, local_ready=False, remote_ready=False)) == []


def test_incremental_engine_follows_remote_slices_like_compute() -> None:
    cfg = model.Config(derive_slices=False)
    engine = incremental.Engine(model.Allocations.create(cfg), cfg)
    engine.load(model.Inputs.from_manifests([service("payments", {GLOBAL: "true", AFFINITY: "local"}),
                                             local_slice(False)]), 0.0)
    engine.rebuild()
    assert [slot_ips(fe) for fe in engine.frontends.values()] == [[]]
    ref = meshslices.slice_ref("service.west.shop.payments")
    assert ref == ("shop", "mesh.west.payments")
    engine.set_slice(ref, meshslices.mesh_slice(remote_record()))
    engine.update(1.0)
    assert [slot_ips(fe) for fe in engine.frontends.values()] == [["10.2.1.5"]]
    engine.set_slice(("shop", "payments-east"), local_slice(True))
    engine.update(2.0)
    assert [slot_ips(fe) for fe in engine.frontends.values()] == [["10.3.1.7"]]
    engine.set_slice(("shop", "payments-east"), local_slice(False))
    engine.set_slice(ref, None)  # west withdrawn
    engine.update(3.0)
    assert [slot_ips(fe) for fe in engine.frontends.values()] == [[]]
    assert meshslices.slice_ref("service.west.shop") is None


def test_annotations_and_mcs_objects() -> None:
    assert global_service(service("a", {GLOBAL: "true"})) == (True, True, "none", "annotation")
    assert global_service(service("a", {GLOBAL: "true", "service.cilium.io/shared": "false"})).shared is False
    assert global_service(service("a"), exported=True) == (True, True, "none", "ServiceExport")
    assert global_service(service("a"), imported=True) == (True, False, "none", "ServiceImport")
    assert not global_service(service("a")).is_global
    (problem,) = annotation_problems(service("a", {GLOBAL: "yes"}))
    assert problem == "Service shop/a: metadata.annotations[service.cilium.io/global] is 'yes'; use \"true\" or \"false\""


def export(services: list[dict[str, Any]], exported: set[tuple[str, str]] = frozenset(),
           extra_backends: list[schema.LBBackend] = ()) -> dict[str, Any]:
    ident = schema.IdentityRecord(id=IDENT, labels=["k8s:app=payments"], scope="cluster", cluster="west",
                                  cluster_id=WEST)
    other = schema.IdentityRecord(id=IDENT + 1, labels=["k8s:app=idle"], scope="cluster", cluster="west",
                                  cluster_id=WEST)
    cache = {"10.2.1.5_32": schema.IPCacheRecord(prefix="10.2.1.5/32", identity=IDENT, source="pod", cluster="west",
                                                 cluster_id=WEST, namespace="shop", pod="payments-w"),
             "172.30.2.1_32": schema.IPCacheRecord(prefix="172.30.2.1/32", identity=6, source="node",
                                                   cluster="west", cluster_id=WEST)}
    fes = [schema.LBFrontend(namespace="shop", name=s["metadata"]["name"], type="ClusterIP", address="10.96.0.9",
                             port=80, proto="TCP", service_id=1, rev_nat_id=1, port_name="http",
                             backends=[schema.LBBackend(id=1, ip="10.2.1.5", port=8080, proto="TCP"),
                                       *extra_backends])
           for s in services]
    records = [schema.ResourceRecord(kind="Service", api_version="v1", namespace="shop", name=s["metadata"]["name"],
                                     uid="u", generation=1, created="", manifest=s) for s in services]
    nodes = {"Node._.node-1": schema.StatusRecord(reporter="node/node-1", status={
        "podCIDR": "10.2.1.0/24", "addresses": [{"type": "InternalIP", "address": "172.30.2.1"}]})}
    return export_state("west", WEST, {"id.1": ident, "id.2": other}, cache, records, set(exported), fes, nodes)


def test_export_holds_pods_their_identities_shared_services_and_nodes() -> None:
    out = export([service("payments", {GLOBAL: "true"}), service("ledger", {GLOBAL: "true",
                                                                           "service.cilium.io/shared": "false"}),
                  service("plain")])
    assert set(out) == {"ipcache.10.2.1.5_32", f"identity.{IDENT}", "service.shop.payments", "node.node-1"}
    assert out["node.node-1"] == schema.MeshNode(name="node-1", cluster="west", cluster_id=WEST,
                                                 address="172.30.2.1", pod_cidr="10.2.1.0/24")
    assert out["service.shop.payments"].ports == [schema.MeshServicePort(name="http", port=80, proto="TCP")]
    imported = schema.LBBackend(id=2, ip="10.3.1.7", port=8080, proto="TCP", cluster="east")
    again = export([service("payments", {GLOBAL: "true"})], extra_backends=[imported])
    assert [b.ip for b in again["service.shop.payments"].backends] == ["10.2.1.5"]  # never passed on
    mcs = export([service("plain")], exported={("shop", "plain")})
    assert mcs["service.shop.plain"].source == "ServiceExport"


def view(entries: dict[str, Any], heard: float = 100.0, **cfg: Any) -> RemoteView:
    remote = schema.MeshRemote(name=cfg.get("name", "west"), cluster_id=cfg.get("cluster_id", WEST),
                               nats_url="nats://x", pod_cidr=cfg.get("pod_cidr", "10.2.0.0/16"))
    return RemoteView(config=remote, entries=entries, heard_at=heard, reachable=True, synced=True)


EAST = LocalCluster("east", 3, "10.3.0.0/16")


def test_import_prefixes_keys_with_the_cluster_and_checks_each_entry() -> None:
    entries = {"cluster": schema.MeshCluster(name="west", cluster_id=WEST, pod_cidr="10.2.0.0/16"),
               **export([service("payments", {GLOBAL: "true"})])}
    entries["identity.999"] = schema.IdentityRecord(id=(3 << 16) | 5, labels=[], scope="cluster", cluster="west",
                                                    cluster_id=WEST)  # claims a number of east's range
    out = imported_state(EAST, {"west": view(entries)}, now=101.0, ttl=10.0)
    status = out.pop("status.west")
    assert set(out) == {"ipcache.west.10.2.1.5_32", f"identity.west.{IDENT}", "service.west.shop.payments",
                        "node.west.node-1"}
    assert status.connected and (status.nodes, status.endpoints, status.identities, status.services) == (1, 1, 1, 1)
    assert status.errors == [f"identity {(3 << 16) | 5} of west is not in cluster west's range"]


def test_stale_colliding_or_mislabelled_remotes_keep_only_their_status() -> None:
    entries = {"cluster": schema.MeshCluster(name="west", cluster_id=WEST), **export([])}
    stale = imported_state(EAST, {"west": view(entries, heard=100.0)}, now=111.0, ttl=10.0)
    assert list(stale) == ["status.west"] and not stale["status.west"].connected
    assert "nothing heard for 11.0s (TTL 10s)" in stale["status.west"].errors[0]
    same_id = imported_state(EAST, {"west": view(entries, cluster_id=3)}, now=101.0, ttl=10.0)
    assert list(same_id) == ["status.west"]
    assert "same cluster id 3 as this cluster east" in " ".join(same_id["status.west"].errors)
    overlap = imported_state(EAST, {"west": view(entries, pod_cidr="10.3.128.0/17")}, now=101.0, ttl=10.0)
    assert "pod CIDR 10.3.128.0/17 of cluster west overlaps pod CIDR 10.3.0.0/16 of this cluster east" in \
        " ".join(overlap["status.west"].errors)
    renamed = imported_state(EAST, {"south": view(entries, name="south", cluster_id=WEST)}, now=101.0, ttl=10.0)
    assert list(renamed) == ["status.south"]
    assert "is cluster west (id 2), connected as south (id 2)" in renamed["status.south"].errors[0]


def test_connect_refusals_name_both_clusters() -> None:
    east = schema.MeshCluster(name="east", cluster_id=3, pod_cidr="10.3.0.0/16")
    west = schema.MeshCluster(name="west", cluster_id=2, pod_cidr="10.2.0.0/16")
    assert refusals(east, west, {}) == []
    assert refusals(east, schema.MeshCluster(name="east", cluster_id=4), {}) == ["both clusters are named east"]
    other = {"north": schema.MeshRemote(name="north", cluster_id=2, nats_url="", pod_cidr="10.2.128.0/17")}
    assert refusals(east, west, other) == [
        "cluster west has cluster id 2, as connected cluster north has",
        "pod CIDR 10.2.0.0/16 of cluster west overlaps pod CIDR 10.2.128.0/17 of connected cluster north"]
    rows = status_rows({}, {"west": schema.MeshRemoteStatus(name="west", connected=True)})
    assert rows[0]["connected"] is False and rows[0]["errors"] == ["disconnected; withdrawing"]


def test_remote_pods_enter_the_ipcache_below_local_pods() -> None:
    remote = schema.IPCacheRecord(prefix="10.2.1.5/32", identity=IDENT, source="pod", cluster="west",
                                  cluster_id=WEST, pod="payments-w")
    out = desired_ipcache([], {}, {}, {}, "east", 3, [remote])
    assert out["10.2.1.5_32"] == remote
    assert out["0.0.0.0_0"].cluster == "east"


class FakeKernel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def link_mesh(self, remote: str) -> bool:
        self.calls.append(("link", remote))
        return True

    async def unlink_mesh(self, remote: str) -> None:
        self.calls.append(("unlink", remote))

    async def route_remote_node(self, address: str, cidr: str) -> None:
        self.calls.append(("route", address, cidr))

    async def unroute_remote_node(self, address: str, cidr: str) -> None:
        self.calls.append(("unroute", address, cidr))


async def test_mesh_routes_link_route_and_withdraw() -> None:
    from services.node.meshroutes import MeshRoutes, plan

    node = schema.MeshNode(name="node-1", cluster="west", cluster_id=WEST, address="172.30.2.1",
                           pod_cidr="10.2.1.0/24")
    bad = schema.MeshNode(name="node-2", cluster="west", cluster_id=WEST, address="nowhere")
    mine = schema.MeshNode(name="node-1", cluster="east", cluster_id=3, address="172.30.3.1")
    assert plan({"a": node, "b": bad, "c": mine}, "east") == {("west", "172.30.2.1", "10.2.1.0/24")}
    kernel = FakeKernel()
    routes = MeshRoutes(kernel, "east")
    routes.mirror.values["node.west.node-1"] = node
    await routes._pass()
    assert kernel.calls == [("link", "west"), ("route", "172.30.2.1", "10.2.1.0/24")]
    await routes._pass()  # nothing new
    assert len(kernel.calls) == 2
    routes.mirror.values.clear()  # west withdrawn
    await routes._pass()
    assert kernel.calls[2:] == [("unroute", "172.30.2.1", "10.2.1.0/24"), ("unlink", "west")]


def test_service_list_names_clusters_and_preferred_backends() -> None:
    from ciliary.cli.service import backend_lines

    fe = frontend({GLOBAL: "true", AFFINITY: "local"}, local_ready=True)
    fe = schema.LBFrontend(**{**{f: getattr(fe, f) for f in fe.__struct_fields__}, "cluster": "east"})
    assert sorted(backend_lines(fe)) == sorted([
        "1 => 10.3.1.7:8080/TCP (active) [cluster east] (preferred)",
        "2 => 10.2.1.5:8080/TCP (active) [cluster west]",
    ])
    plain = frontend(None, local_ready=True)
    assert backend_lines(plain) == ["1 => 10.3.1.7:8080/TCP (active)"]


def test_flow_filters_select_by_cluster() -> None:
    from ciliary.flowfilter import build_filters, matches

    flow = schema.Flow(source=schema.FlowEndpoint(cluster_name="west", pod_name="checkout"),
                       destination=schema.FlowEndpoint(cluster_name="east", pod_name="payments"))
    either, _ = build_filters([("cluster", "west")])
    src, _ = build_filters([("from-cluster", "east")])
    dst, _ = build_filters([("to-cluster", "east")])
    assert matches(flow, either) and matches(flow, dst)
    assert not matches(flow, src)


def test_remote_credentials_are_read_or_named(tmp_path: Any) -> None:
    from ciliary.bus import BusError
    from services.mesh.remote import remote_connect_options

    plain = schema.MeshRemote(name="west", cluster_id=WEST, nats_url="nats://x")
    assert remote_connect_options(plain) == {}
    bad = tmp_path / "remote.json"
    bad.write_text("{}")
    with pytest.raises(BusError, match=str(bad)):
        remote_connect_options(schema.MeshRemote(name="west", cluster_id=WEST, nats_url="nats://x",
                                                 credentials=str(bad)))


def test_export_memo_reuses_records_of_unchanged_services() -> None:
    from services.mesh.exports import ExportMemo

    svc = schema.ResourceRecord(kind="Service", api_version="v1", namespace="shop", name="payments", uid="u",
                                generation=1, created="", manifest=service("payments", {GLOBAL: "true"}))
    fe = schema.LBFrontend(namespace="shop", name="payments", type="ClusterIP", address="10.96.0.9", port=80,
                           proto="TCP", service_id=1, rev_nat_id=1,
                           backends=[schema.LBBackend(id=1, ip="10.2.1.5", port=8080, proto="TCP")])
    memo = ExportMemo()

    def run(fes: list[schema.LBFrontend], services: list[schema.ResourceRecord]) -> Any:
        return export_state("west", WEST, {}, {}, services, set(), fes, {}, memo).get("service.shop.payments")

    first = run([fe], [svc])
    assert run([fe], [svc]) is first  # same inputs: the same record object
    changed = schema.LBFrontend(**{**{f: getattr(fe, f) for f in fe.__struct_fields__}, "backends": []})
    second = run([changed], [svc])
    assert second is not first and second.backends == []
    assert run([changed], []) is None and memo.services == {}


def test_export_memo_follows_services_turning_global_and_going_away() -> None:
    from services.mesh.exports import ExportMemo

    def svc(name: str, annotations: dict[str, str]) -> schema.ResourceRecord:
        return schema.ResourceRecord(kind="Service", api_version="v1", namespace="shop", name=name, uid="u",
                                     generation=1, created="", manifest=service(name, annotations))

    def fe(name: str) -> schema.LBFrontend:
        return schema.LBFrontend(namespace="shop", name=name, type="ClusterIP", address="10.96.0.9", port=80,
                                 proto="TCP", service_id=1, rev_nat_id=1,
                                 backends=[schema.LBBackend(id=1, ip="10.2.1.5", port=8080, proto="TCP")])
    memo = ExportMemo()
    plain = [svc(f"s{i}", {}) for i in range(50)]
    fes = [fe(s.name) for s in plain]
    assert export_state("west", WEST, {}, {}, plain, set(), fes, {}, memo) == {}
    assert len(memo.shared) == 50 and memo.services == {}
    # one Service annotated global: exported with its backends, the memo now holds its record
    turned = [svc("s7", {GLOBAL: "true"}), *[s for s in plain if s.name != "s7"]]
    out = export_state("west", WEST, {}, {}, turned, set(), fes, {}, memo)
    assert list(out) == ["service.shop.s7"] and [b.ip for b in out["service.shop.s7"].backends] == ["10.2.1.5"]
    # ... and exported as a ServiceExport names it even without the annotation
    out = export_state("west", WEST, {}, {}, plain, {("shop", "s3")}, fes, {}, memo)
    assert list(out) == ["service.shop.s3"] and set(memo.services) == {("shop", "s3")}
    # Services that are gone leave the memo, whatever else changed in the same pass
    fewer = [svc("new", {}), *plain[:10]]
    assert export_state("west", WEST, {}, {}, fewer, set(), fes, {}, memo) == {}
    assert set(memo.shared) == {("shop", s.name) for s in fewer} and memo.services == {}


def test_service_map_keeps_a_connected_clusters_pods_apart() -> None:
    from services.flows.servicemap import build_service_map

    def flow(cluster: str) -> schema.Flow:
        return schema.Flow(
            verdict="FORWARDED", event_type=schema.FlowEventType(type=4),
            source=schema.FlowEndpoint(cluster_name=cluster, namespace="default", pod_name="checkout", identity=7),
            destination=schema.FlowEndpoint(cluster_name="east", namespace="default", pod_name="payments",
                                            identity=8))
    nodes = {n["id"]: n for n in build_service_map([flow("east"), flow("west")], local_cluster="east")["nodes"]}
    assert set(nodes) == {"default/checkout", "west:default/checkout", "default/payments"}
    assert nodes["west:default/checkout"]["cluster"] == "west" and "cluster" not in nodes["default/checkout"]
    assert nodes["west:default/checkout"]["label"] == "checkout (west)"
    assert {n["id"] for n in build_service_map([flow("west")])["nodes"]} == {"default/checkout", "default/payments"}


def test_sysdump_decodes_the_mesh_buckets() -> None:
    from ciliary.sysdump import decode_entry

    status = schema.MeshRemoteStatus(name="west", connected=True, nodes=1)
    assert decode_entry(schema.BUCKET_MESH, "status.west", schema.encode(status)) == (
        "MeshRemoteStatus", {"name": "west", "connected": True, "nodes": 1})
    kind, _ = decode_entry(schema.BUCKET_MESH_EXPORT, "service.shop.payments", schema.encode(remote_record()))
    assert kind == "MeshService"


def test_import_rechecks_only_changed_entries_and_follows_service_imports() -> None:
    record = remote_record()
    entries = {"cluster": schema.MeshCluster(name="west", cluster_id=WEST), "service.shop.payments": record}
    remote = view(entries)
    first = imported_state(EAST, {"west": remote}, now=101.0, ttl=10.0)
    assert first["service.west.shop.payments"] is record  # passed through as heard
    again = imported_state(EAST, {"west": remote}, now=101.0, ttl=10.0)
    assert again["service.west.shop.payments"] is record
    asked = imported_state(EAST, {"west": remote}, now=101.0, ttl=10.0, service_imports={("shop", "payments")})
    assert asked["service.west.shop.payments"].imported is True
    del entries["service.shop.payments"]
    assert "service.west.shop.payments" not in imported_state(EAST, {"west": remote}, now=101.0, ttl=10.0)
    assert "service.shop.payments" not in remote.checked
