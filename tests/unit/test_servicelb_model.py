"""servicelb pure pieces: allocator pools, the model's input handling, settings."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary import schema
from services.servicelb import allocator, model
from services.servicelb.settings import config_from_env


def svc(name: str, ns: str = "default", **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pod(name: str, labels: dict[str, str], node: str = "node-1", **status: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]},
    }
    if status:
        manifest["status"] = status
    return manifest


def persist(alloc: model.Allocations) -> None:
    for pool in alloc.pools():
        for value in list(pool.pending):
            pool.persisted(value, 1)


# ---------------------------------------------------------------- pools


def test_pool_hands_out_lowest_free_dynamic_value_never_twice() -> None:
    pool = allocator.node_port_pool("np")
    assert pool.dynamic_start == 30086
    pool.begin()
    assert [pool.allocate(f"o{i}") for i in range(3)] == [30086, 30087, 30088]
    assert pool.allocate("o1") == 30087  # an owner keeps its value
    assert pool.claim("static", 30000)
    assert not pool.claim("thief", 30086)
    assert pool.owners[30086] == "o0"


def test_a_narrow_node_port_range_hands_out_only_its_ports() -> None:
    pool = allocator.node_port_pool("np", 30000, 30003)
    pool.begin()
    assert [pool.allocate(str(i)) for i in range(5)] == [30003, 30000, 30001, 30002, None]


def test_pool_wraps_into_the_static_band_and_exhausts() -> None:
    pool = allocator.Pool("small", 1, 5, dynamic_start=4)
    pool.begin()
    got = [pool.allocate(str(i)) for i in range(6)]
    assert got == [4, 5, 1, 2, 3, None]
    assert len(set(pool.owners)) == 5


def test_pool_releases_what_a_pass_did_not_use() -> None:
    pool = allocator.id_pool("ids", 100)
    pool.begin()
    pool.allocate("a")
    pool.allocate("b")
    assert pool.unused() == []  # pending values are never released
    for value in list(pool.pending):
        pool.persisted(value, 7)
    pool.begin()
    pool.lookup("b")
    assert pool.unused() == [1]
    pool.released(1)
    assert pool.lookup("a") is None
    assert pool.allocate("c") == 3  # ids rotate: 1 is not reused at once


def test_id_pool_rotates_and_wraps_to_released_ids() -> None:
    pool = allocator.id_pool("ids", 3)
    pool.begin()
    assert [pool.allocate(o) for o in "abc"] == [1, 2, 3]
    pool.released(1)
    assert pool.allocate("d") == 1 and pool.allocate("e") is None
    reloaded = allocator.id_pool("ids", 10)
    reloaded.load({4: ("x", 1), 2: ("y", 1)})
    reloaded.begin()
    assert reloaded.allocate("z") == 5  # after the highest id held, deterministic on restart


def test_pool_owner_moving_to_a_requested_value_releases_the_old_one() -> None:
    pool = allocator.node_port_pool("np")
    pool.load({30086: ("svc:80/TCP", 3)})
    pool.begin()
    assert pool.claim("svc:80/TCP", 30500)
    assert pool.unused() == [30086]
    assert pool.by_owner["svc:80/TCP"] == 30500


def test_pool_load_tolerates_a_duplicate_owner() -> None:
    pool = allocator.id_pool("ids", 10)
    pool.load({1: ("x", 1), 2: ("x", 2)})
    pool.begin()
    assert pool.lookup("x") == 1
    assert pool.unused() == [2]


def test_ip_pool_bands_and_keys() -> None:
    pool = allocator.ip_pool("cip", "10.96.0.0/12")
    assert allocator.ip_text(pool.lo) == "10.96.0.1"
    assert allocator.ip_text(pool.hi) == "10.111.255.254"
    assert allocator.ip_text(pool.dynamic_start) == "10.96.1.1"
    assert pool.key(pool.lo) == "cip.10-96-0-1"
    assert allocator.parse_value(pool, "10-96-0-1") == pool.lo
    assert allocator.parse_value(pool, "garbage") is None
    small = allocator.ip_pool("cip", "10.0.0.0/28")
    assert allocator.ip_text(small.dynamic_start) == "10.0.0.14"  # band of 16 capped at the end
    with pytest.raises(ValueError):
        allocator.ip_pool("cip", "10.0.0.1/24")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e", "f"]), st.booleans()), max_size=40))
def test_property_pool_values_unique(ops: list[tuple[str, bool]]) -> None:
    pool = allocator.Pool("p", 1, 4, dynamic_start=3)
    for owner, release in ops:
        pool.begin()
        if release and owner in pool.by_owner:
            value = pool.by_owner[owner]
            pool.persisted(value, 1)
            pool.released(value)
        else:
            pool.allocate(owner)
        assert len(pool.owners) == len(set(pool.owners.values()))
        assert all(pool.owners[v] == o for o, v in pool.by_owner.items())


# ---------------------------------------------------------------- the model


def test_pod_status_from_the_status_bucket_wins_over_the_manifest() -> None:
    inputs = model.Inputs.from_manifests([
        svc("web", selector={"app": "web"}),
        pod("web-1", {"app": "web"}),  # stored manifests carry no status
        pod("web-2", {"app": "web"}, phase="Running", podIP="10.0.0.2",
            conditions=[{"type": "Ready", "status": "True"}]),
    ])
    inputs.pod_status[("default", "web-1")] = {
        "podIP": "10.0.0.1", "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    inputs.pod_status[("default", "web-2")] = {
        "podIP": "10.0.0.2", "phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}
    cfg = model.Config()
    desired = model.compute(inputs, model.Allocations.create(cfg), cfg)
    (fe,) = desired.frontends.values()
    assert [(b.ip, b.state) for b in fe.backends] == [("10.0.0.1", "active"), ("10.0.0.2", "not-ready")]
    assert fe.slots == [fe.backends[0].id]


def test_running_pod_without_conditions_counts_as_ready() -> None:
    inputs = model.Inputs.from_manifests([svc("web", selector={"app": "web"}), pod("web-1", {"app": "web"})])
    inputs.pod_status[("default", "web-1")] = {"podIP": "10.0.0.1", "phase": "Running"}
    cfg = model.Config()
    (fe,) = model.compute(inputs, model.Allocations.create(cfg), cfg).frontends.values()
    assert fe.slots == [fe.backends[0].id]


def test_node_status_addresses_feed_node_ports() -> None:
    inputs = model.Inputs.from_manifests([
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}},
        svc("np", type="NodePort"),
    ])
    inputs.node_status["node-1"] = {"addresses": [{"type": "InternalIP", "address": "192.168.5.5"}]}
    cfg = model.Config()
    desired = model.compute(inputs, model.Allocations.create(cfg), cfg)
    node_fes = [fe for fe in desired.frontends.values() if fe.type == "NodePort"]
    assert [(fe.address, fe.port, fe.node) for fe in node_fes] == [("192.168.5.5", 30086, "node-1")]


def test_derive_slices_off_uses_only_manual_slices() -> None:
    docs = [
        svc("web", selector={"app": "web"}),
        pod("web-1", {"app": "web"}, phase="Running", podIP="10.0.0.1"),
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": ["10.9.9.9"]}]},
    ]
    cfg = model.Config(derive_slices=False)
    desired = model.compute(model.Inputs.from_manifests(docs), model.Allocations.create(cfg), cfg)
    (fe,) = desired.frontends.values()
    assert [b.ip for b in fe.backends] == ["10.9.9.9"]
    assert desired.endpoints == {}


def test_deleting_a_service_frees_its_values_and_backend_ids_are_shared() -> None:
    cfg = model.Config()
    alloc = model.Allocations.create(cfg)
    docs = [
        svc("a", type="NodePort", selector={"app": "x"}),
        svc("b", selector={"app": "x"}),
        pod("x-1", {"app": "x"}, phase="Running", podIP="10.0.0.1"),
    ]
    first = model.compute(model.Inputs.from_manifests(docs), alloc, cfg)
    ids = {fe.name: fe.backends[0].id for fe in first.frontends.values()}
    assert ids["a"] == ids["b"]  # same ip:port/proto -> same backend id
    persist(alloc)
    model.compute(model.Inputs.from_manifests(docs[1:]), alloc, cfg)
    assert alloc.cluster_ip.unused() == [alloc.cluster_ip.by_owner["default/a"]]
    assert alloc.node_port.unused() == [30086]
    assert len(alloc.service_id.unused()) == 1
    assert alloc.backend_id.unused() == []


def test_explicit_cluster_ip_outside_the_cidr_is_used_but_not_reserved() -> None:
    cfg = model.Config()
    alloc = model.Allocations.create(cfg)
    desired = model.compute(model.Inputs.from_manifests([svc("a", clusterIP="172.30.0.1")]), alloc, cfg)
    assert list(desired.frontends) == ["fe.172-30-0-1.80.TCP"]
    assert alloc.cluster_ip.owners == {}


def test_requested_values_are_claimed_before_dynamic_allocation() -> None:
    # "a" sorts first and would take 10.0.0.14 dynamically -- but "b" asks for it
    cfg = model.Config(service_cidr="10.0.0.0/28")
    alloc = model.Allocations.create(cfg)
    docs = [svc("a"), svc("b", clusterIP="10.0.0.14")]
    desired = model.compute(model.Inputs.from_manifests(docs), alloc, cfg)
    assert desired.statuses[("default", "b")]["clusterIP"] == "10.0.0.14"
    assert desired.statuses[("default", "a")]["clusterIP"] == "10.0.0.1"
    assert desired.problems == []


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"])),
                unique_by=lambda t: t[0], max_size=12))
def test_property_ids_and_addresses_are_unique(services: list[tuple[int, str]]) -> None:
    docs = [svc(f"s{i}", type=t, ports=[{"port": 80}, {"port": 53, "protocol": "UDP"}],
                **({"loadBalancerIP": f"203.0.113.{i}"} if t == "LoadBalancer" else {}))
            for i, t in services]
    docs.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"},
                 "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}})
    cfg = model.Config()
    desired = model.compute(model.Inputs.from_manifests(docs), model.Allocations.create(cfg), cfg)
    ips = [s["clusterIP"] for s in desired.statuses.values()]
    assert len(ips) == len(set(ips)) == len(services)
    service_ids = [fe.service_id for fe in desired.frontends.values()]
    assert len(service_ids) == len(set(service_ids))
    for key, fe in desired.frontends.items():
        assert key == schema.lb_frontend_key(fe.address, fe.port, fe.proto)
        assert fe.rev_nat_id == fe.service_id and 0 < fe.service_id <= 0xFFFF
    assert desired.problems == []


# ---------------------------------------------------------------- settings


def test_config_from_env_defaults_and_bad_values() -> None:
    cfg = config_from_env("c1", 7, {})
    assert (cfg.cluster, cfg.cluster_id, cfg.service_cidr, cfg.maglev_table_size, cfg.derive_slices) == (
        "c1", 7, "10.96.0.0/12", 16381, True)
    cfg = config_from_env("c", 1, {
        "CILIARY_SERVICE_CIDR": "10.200.0.0/16", "CILIARY_MAGLEV_TABLE_SIZE": "1021",
        "CILIARY_SERVICELB_DERIVE_SLICES": "false", "CILIARY_NODE_PORT_RANGE": "31000-31999"})
    assert (cfg.service_cidr, cfg.maglev_table_size, cfg.derive_slices, cfg.node_port_range) == (
        "10.200.0.0/16", 1021, False, (31000, 31999))
    cfg = config_from_env("c", 1, {
        "CILIARY_SERVICE_CIDR": "nope", "CILIARY_MAGLEV_TABLE_SIZE": "1000",
        "CILIARY_NODE_PORT_RANGE": "9-1"})
    assert (cfg.service_cidr, cfg.maglev_table_size, cfg.node_port_range) == (
        "10.96.0.0/12", 16381, (30000, 32767))
