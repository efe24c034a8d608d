"""The incremental servicelb engine equals the from-scratch model after any change sequence.

A harness drives `incremental.Engine` the way the shell does (whole inputs on the first
pass and on resyncs, per-object changes in between, pending values persisted, unused
values released, passes repeated while the engine has work) and checks after every
batch that:
- `Engine.desired()` equals `model.compute` over the same inputs (departed pods added by
  a `Departures` driven with whole inputs) with a copy of the same allocations:
  frontends, endpoints rows, statuses, generations, problems;
- that compute allocates nothing and leaves nothing unused (the state is its fixpoint);
- the rows the deltas reported, applied one by one, are exactly the desired rows.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from ciliary.resources.discovery import SERVICE_NAME_LABEL
from services.servicelb import allocator, departures, incremental, model
from tests.unit.test_servicelb_golden import SCENARIOS, scenario

# few names, so that changes meet: Services share addresses, slices move between Services,
# pods are selected, deleted and expire, nodes change under NodePort and zoned backends
NAMESPACES = ("default", "default", "default", "other")
SERVICES = ("a", "b", "c")
PODS = ("p0", "p1", "p2")
SLICES = ("s0", "s1")
NODES = ("n0", "n1")
POD_IPS = ("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.1", "")
SLICE_IPS = ("10.2.0.1", "10.2.0.2", "10.1.0.1", "fd00::1")
CLUSTER_IPS = ("10.0.0.1", "10.0.0.3", "10.0.0.6", "10.0.0.9", "10.0.0.9", "bad")
EXTERNAL_IPS = ("203.0.113.1", "203.0.113.2")
# small pools, so requested values collide and pools run out
CONFIG = model.Config(service_cidr="10.0.0.0/29", node_port_range=(30000, 30016), maglev_table_size=251)


def small_alloc(cfg: model.Config) -> model.Allocations:
    alloc = model.Allocations.create(cfg)
    alloc.service_id = allocator.id_pool(alloc.service_id.name, 14)
    alloc.backend_id = allocator.id_pool(alloc.backend_id.name, 9)
    return alloc


# ---------------------------------------------------------------- objects


@st.composite
def service_docs(draw: Any, ns: str, name: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "Headless"]))
    spec: dict[str, Any] = {"type": "ClusterIP" if kind == "Headless" else kind}
    if kind == "Headless":
        spec["clusterIP"] = "None"
    elif draw(st.booleans()):
        spec["clusterIP"] = draw(st.sampled_from(CLUSTER_IPS))
    if kind == "ExternalName":
        spec["externalName"] = "example.com"
    ports = []
    for port_name, port, proto in draw(st.lists(st.sampled_from([("http", 80, "TCP"), ("http", 80, "TCP"),
                                                                ("dns", 53, "UDP"), ("alt", 80, "UDP")]),
                                                min_size=1, max_size=2, unique=True)):
        entry: dict[str, Any] = {"name": port_name, "port": port, "protocol": proto,
                                 "targetPort": draw(st.sampled_from([8080, "http", "web"]))}
        if draw(st.integers(0, 3)) == 0:
            entry["nodePort"] = draw(st.sampled_from([30000, 30001, 30016, 40000]))
        ports.append(entry)
    spec["ports"] = ports
    selector = draw(st.sampled_from([None, {"app": "x"}, {"app": "y"}, {"app": "x", "tier": "t"}]))
    if selector:
        spec["selector"] = selector
    if draw(st.booleans()):
        spec["externalIPs"] = draw(st.lists(st.sampled_from(EXTERNAL_IPS), max_size=2, unique=True))
    if kind == "LoadBalancer" and draw(st.booleans()):
        spec["loadBalancerIP"] = draw(st.sampled_from(EXTERNAL_IPS))
    if kind == "LoadBalancer" and draw(st.integers(0, 3)) == 0:
        spec["allocateLoadBalancerNodePorts"] = False
    if draw(st.booleans()):
        spec["externalTrafficPolicy"] = "Local"
    if draw(st.integers(0, 2)) == 0:
        spec["internalTrafficPolicy"] = "Local"
    if draw(st.integers(0, 3)) == 0:
        spec["publishNotReadyAddresses"] = True
    if draw(st.integers(0, 3)) == 0:
        spec["sessionAffinity"] = "ClientIP"
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    algorithm = draw(st.sampled_from([None, None, "maglev", "bogus"]))
    if algorithm:
        meta["annotations"] = {model.LB_ALGORITHM_ANNOTATION: algorithm}
    if draw(st.integers(0, 9)) == 0:
        spec["ports"] = [{"port": "eighty"}]  # does not decode
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


@st.composite
def slice_docs(draw: Any, ns: str, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if draw(st.integers(0, 5)):
        meta["labels"] = {SERVICE_NAME_LABEL: draw(st.sampled_from(SERVICES))}
    endpoints = []
    for ip in draw(st.lists(st.sampled_from(SLICE_IPS), max_size=3)):
        ep: dict[str, Any] = {"addresses": [ip]}
        conditions = draw(st.fixed_dictionaries({}, optional={
            "ready": st.booleans(), "serving": st.booleans(), "terminating": st.booleans()}))
        if conditions:
            ep["conditions"] = conditions
        node = draw(st.sampled_from((None, *NODES, *NODES)))
        if node:
            ep["nodeName"] = node
        if draw(st.integers(0, 5)) == 0:
            ep["zone"] = "z9"
        if draw(st.booleans()):
            ep["targetRef"] = {"kind": "Pod", "name": draw(st.sampled_from(PODS))}
        endpoints.append(ep)
    ports = draw(st.lists(st.sampled_from([{"name": "http", "port": 8080, "protocol": "TCP"},
                                           {"name": "dns", "port": 5353, "protocol": "UDP"},
                                           {"name": "alt", "port": 9000, "protocol": "UDP"}]),
                          min_size=1, max_size=2, unique_by=lambda p: p["name"]))
    doc = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
           "addressType": draw(st.sampled_from(["IPv4", "IPv4", "IPv4", "IPv6"])), "ports": ports,
           "endpoints": endpoints}
    if draw(st.integers(0, 14)) == 0:
        doc["endpoints"] = [{"addresses": "x"}]  # does not decode
    return doc


@st.composite
def pod_docs(draw: Any, ns: str, name: str) -> dict[str, Any]:
    labels = draw(st.sampled_from([{}, {"app": "x"}, {"app": "x"}, {"app": "y"}, {"app": "x", "tier": "t"}]))
    ports = draw(st.lists(st.sampled_from([{"name": "http", "containerPort": 8080},
                                           {"name": "web", "containerPort": 9090},
                                           {"name": "web", "containerPort": 9091, "protocol": "UDP"}]),
                          max_size=2, unique_by=lambda p: p["containerPort"]))
    spec: dict[str, Any] = {"containers": [{"name": "app", "ports": ports}]}
    node = draw(st.sampled_from((None, *NODES)))
    if node:
        spec["nodeName"] = node
    grace = draw(st.sampled_from((None, 0, 5, 30)))
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    if draw(st.integers(0, 14)) == 0:
        spec["containers"] = [{"name": "app", "ports": [{"containerPort": "x"}]}]  # does not decode
    doc = {"apiVersion": "v1", "kind": "Pod", "spec": spec,
           "metadata": {"name": name, "namespace": ns, "labels": labels,
                        "uid": draw(st.sampled_from(["u1", "u2"]))}}
    if draw(st.integers(0, 3)) == 0:  # a status in the manifest itself
        doc["status"] = {"podIP": draw(st.sampled_from(POD_IPS)), "phase": "Running"}
    return doc


pod_statuses = st.builds(
    lambda ip, phase, ready, node: {
        "podIP": ip, "phase": phase,
        **({"conditions": [{"type": "Ready", "status": ready}]} if ready else {}),
        **({"nodeName": node} if node else {}),
    },
    st.sampled_from(POD_IPS), st.sampled_from(["Running", "Running", "Running", "Pending", "Succeeded",
                                               "Terminating"]),
    st.sampled_from([None, "True", "True", "False"]), st.sampled_from((None, *NODES)))


@st.composite
def node_docs(draw: Any, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if draw(st.booleans()):
        meta["labels"] = {model.ZONE_LABEL: draw(st.sampled_from(["z1", "z2"]))}
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": meta}
    address = draw(st.sampled_from([None, "192.168.0.1", "192.168.0.2", "not-an-ip"]))
    if address:
        doc["status"] = {"addresses": [{"type": "InternalIP", "address": address}]}
    if draw(st.integers(0, 14)) == 0:
        doc["status"] = {"addresses": "x"}  # does not decode
    return doc


node_statuses = st.builds(lambda ip: {"addresses": [{"type": "InternalIP", "address": ip}]},
                          st.sampled_from(["192.168.0.1", "192.168.0.3"]))


ALL = ("service", "service", "service", "slice", "slice", "pod", "pod", "pod_status", "pod_status", "node",
       "node_status")


@st.composite
def changes(draw: Any, kinds: tuple[str, ...] = ALL, services: Any = service_docs) -> tuple[str, Any, Any]:
    """One change: (what, ref or node name, new value or None for a delete)."""
    what = draw(st.sampled_from(kinds))
    ns, delete = draw(st.sampled_from(NAMESPACES)), draw(st.integers(0, 3)) == 0
    if what == "service":
        name = draw(st.sampled_from(SERVICES))
        return what, (ns, name), None if delete else (draw(services(ns, name)), draw(st.integers(1, 3)))
    if what == "slice":
        name = draw(st.sampled_from(SLICES))
        return what, (ns, name), None if delete else draw(slice_docs(ns, name))
    if what in ("pod", "pod_status"):
        ref = (ns, draw(st.sampled_from(PODS)))
        if delete:
            return what, ref, None
        return what, ref, draw(pod_docs(*ref)) if what == "pod" else draw(pod_statuses)
    name = draw(st.sampled_from(NODES))
    if delete:
        return what, name, None
    return what, name, draw(node_docs(name)) if what == "node" else draw(node_statuses)


def batches(change: Any = None, first: list[tuple[str, Any, Any]] | None = None) -> Any:
    """Batches of changes (default: any change), each with the seconds that passed before
    it and whether it is a resync; ``first``: a batch every sequence starts with."""
    batch = st.tuples(st.lists(changes() if change is None else change, min_size=1, max_size=5), st.sampled_from([0.0, 1.0, 10.0, 40.0]),
                      st.integers(0, 9).map(lambda n: n == 0))
    steps = st.lists(batch, min_size=1, max_size=16)
    return steps if first is None else steps.map(lambda rest: [(first, 0.0, False), *rest])


def selecting_service(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080},
                              {"name": "web", "port": 81, "targetPort": "web"}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


# pods come, go (and stay terminating for their grace period), change readiness, labels
# and nodes under Services that select them
POD_SERVICES = [
    ("service", ("default", "a"), (selecting_service("a", selector={"app": "x"}), 1)),
    ("service", ("default", "b"), (selecting_service("b", selector={"app": "x", "tier": "t"}, type="NodePort",
                                                     externalTrafficPolicy="Local"), 1)),
    ("service", ("default", "c"), (selecting_service("c", selector={"app": "y"}, publishNotReadyAddresses=True), 1)),
]


@st.composite
def clashing_service_docs(draw: Any, ns: str, name: str) -> dict[str, Any]:
    """Services that want the same addresses (the cluster IP outside the service CIDR)."""
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                            "externalIPs": draw(st.lists(st.sampled_from(EXTERNAL_IPS), max_size=2, unique=True))}
    if draw(st.booleans()):
        spec["clusterIP"] = "10.0.0.9"
    if draw(st.booleans()):
        spec["type"] = "NodePort"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


# ---------------------------------------------------------------- the harness


class Harness:
    """The engine driven like the shell drives it, and a reference built from scratch."""

    def __init__(self, cfg: model.Config, alloc: model.Allocations) -> None:
        self.cfg = cfg
        self.alloc = alloc
        self.engine = incremental.Engine(alloc, cfg)
        self.services: dict[model.Ref, tuple[dict[str, Any], int]] = {}
        self.slices: dict[model.Ref, dict[str, Any]] = {}
        self.pods: dict[model.Ref, dict[str, Any]] = {}
        self.pod_status: dict[model.Ref, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.node_status: dict[str, dict[str, Any]] = {}
        self.reference_departures = departures.Departures()
        self.rows: dict[str, Any] = {}  # what the deltas wrote
        self.statuses: dict[model.Ref, tuple[int, dict[str, Any]]] = {}
        self.recomputed: list[int] = []

    def inputs(self) -> model.Inputs:
        return model.Inputs(services=dict(self.services), slices=dict(self.slices), pods=dict(self.pods),
                            nodes=dict(self.nodes), pod_status=dict(self.pod_status),
                            node_status=dict(self.node_status))

    def change(self, what: str, key: Any, value: Any) -> None:
        store = {"service": self.services, "slice": self.slices, "pod": self.pods, "pod_status": self.pod_status,
                 "node": self.nodes, "node_status": self.node_status}[what]
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
        engine = self.engine
        if what == "service":
            engine.set_service(key, *(value or (None, 0)))
        else:
            {"slice": engine.set_slice, "pod": engine.set_pod, "pod_status": engine.set_pod_status,
             "node": engine.set_node, "node_status": engine.set_node_status}[what](key, value)

    def settle(self) -> None:
        """Persist what was allocated; release what no Service holds."""
        for pool in self.alloc.pools():
            for value in list(pool.pending):
                pool.persisted(value, 1)
        for pool, values in zip(self.alloc.pools(), self.engine.take_unused(), strict=True):
            for value in values:
                pool.released(value)

    def full(self, now: float) -> None:
        self.engine.load(self.inputs(), now)
        desired = self.engine.rebuild()
        self.settle()
        self.rows = {**desired.frontends, **desired.endpoints}
        self.statuses = {ref: (desired.generations[ref], s) for ref, s in desired.statuses.items() if s}
        self.passes(now)

    def passes(self, now: float) -> None:
        while self.engine.has_work():
            delta = self.engine.update(now)
            self.recomputed.append(delta.recomputed)
            self.settle()
            for key in delta.frontends:
                self._write(key, self.engine.frontends.get(key))
            for key in delta.endpoints:
                self._write(key, self.engine.endpoints.get(key))
            for ref in delta.statuses:
                part = self.engine.parts.get(ref)
                if part is not None and part.svc is not None and part.status:
                    self.statuses[ref] = (part.generation, part.status)
                else:
                    self.statuses.pop(ref, None)

    def _write(self, key: str, row: Any) -> None:
        if row is None:
            self.rows.pop(key, None)
        else:
            self.rows[key] = row

    def check(self, now: float) -> None:
        inputs = self.inputs()
        self.reference_departures.apply(inputs, now)
        alloc = copy.deepcopy(self.alloc)
        want = model.compute(inputs, alloc, self.cfg)
        got = self.engine.desired()
        assert got.frontends == want.frontends
        assert got.endpoints == want.endpoints
        assert got.statuses == want.statuses
        assert got.generations == want.generations
        assert got.problems == want.problems
        assert self.engine.problems() == want.problems
        assert self.engine.frontends == want.frontends and self.engine.endpoints == want.endpoints
        assert self.rows == {**want.frontends, **want.endpoints}
        assert self.statuses == {ref: (want.generations[ref], s) for ref, s in want.statuses.items() if s}
        for pool in alloc.pools():  # the engine's allocations are compute's fixpoint
            assert pool.pending == {}, pool.name
            assert pool.unused() == [], pool.name
        for pool, counts in zip(self.alloc.pools(), self.engine.counts, strict=True):
            assert set(counts) == set(pool.owners), pool.name


def run(steps: list[tuple[list[tuple[str, Any, Any]], float, bool]], cfg: model.Config = CONFIG) -> Harness:
    harness = Harness(cfg, small_alloc(cfg))
    now = 1000.0
    harness.full(now)
    for batch, elapsed, resync in steps:
        now += elapsed
        for what, key, value in batch:
            harness.change(what, key, value)
        if resync:
            harness.full(now)
        else:
            harness.passes(now)
        harness.check(now)
    return harness


# ---------------------------------------------------------------- properties


@seed(13)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_property_incremental_equals_compute_from_scratch(steps: list[Any]) -> None:
    run(steps)


@seed(14)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_property_without_derived_slices(steps: list[Any]) -> None:
    run(steps, model.Config(service_cidr="10.0.0.0/29", derive_slices=False, maglev_table_size=251))


@seed(15)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(changes(("pod", "pod", "pod_status", "pod_status", "pod_status", "node")), first=POD_SERVICES))
def test_property_pods_come_and_go_under_selecting_services(steps: list[Any]) -> None:
    run(steps)


@seed(16)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(changes(("service", "service", "slice", "node"), services=clashing_service_docs)))
def test_property_services_contend_for_addresses(steps: list[Any]) -> None:
    run(steps)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_golden_scenario_built_one_object_at_a_time(path: Path) -> None:
    """Each golden scenario's objects added one by one (statuses last) end where compute ends."""
    cfg, alloc, docs = scenario(path)
    harness = Harness(cfg, alloc)
    harness.full(0.0)
    for doc in docs:
        meta = doc.get("metadata") or {}
        ref = (meta.get("namespace") or "default", meta.get("name") or "")
        kind = doc.get("kind")
        if kind == "Service":
            harness.change("service", ref, (doc, int(meta.get("generation") or 1)))
        elif kind in ("EndpointSlice", "Pod"):
            harness.change("slice" if kind == "EndpointSlice" else "pod", ref, doc)
        elif kind == "Node":
            harness.change("node", ref[1], doc)
        harness.passes(0.0)
        harness.check(0.0)


# ---------------------------------------------------------------- what a change touches


def web(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def eps(service: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-1", "namespace": "default", "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip]} for ip in ips]}


def test_a_slice_change_recomputes_only_its_service() -> None:
    harness = Harness(model.Config(), model.Allocations.create(model.Config()))
    for i in range(50):
        harness.change("service", ("default", f"s{i}"), (web(f"s{i}"), 1))
        harness.change("slice", ("default", f"s{i}-1"), eps(f"s{i}", f"10.1.0.{i + 1}"))
    harness.full(0.0)
    harness.recomputed.clear()
    harness.change("slice", ("default", "s7-1"), eps("s7", "10.1.0.8", "10.1.1.1"))
    harness.passes(1.0)
    harness.check(1.0)
    assert harness.recomputed == [1]
    fe = harness.rows["fe." + harness.statuses[("default", "s7")][1]["clusterIP"].replace(".", "-") + ".80.TCP"]
    assert [b.ip for b in fe.backends] == ["10.1.0.8", "10.1.1.1"]


def test_a_pod_change_recomputes_the_services_selecting_it() -> None:
    cfg = model.Config()
    harness = Harness(cfg, model.Allocations.create(cfg))
    for i in range(20):
        harness.change("service", ("default", f"s{i}"), (web(f"s{i}", selector={"app": f"a{i % 10}"}), 1))
    harness.full(0.0)
    harness.recomputed.clear()
    harness.change("pod", ("default", "p"), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default", "labels": {"app": "a3"}},
        "spec": {"nodeName": "n", "containers": [{"name": "c"}]}})
    harness.passes(1.0)
    assert harness.recomputed == [0]  # no IP yet: no backend, nothing to recompute
    harness.recomputed.clear()
    harness.change("pod_status", ("default", "p"), {"podIP": "10.1.0.1", "phase": "Running"})
    harness.passes(2.0)
    harness.check(2.0)
    assert harness.recomputed == [2]  # s3 and s13
    harness.change("pod", ("default", "p"), None)  # deleted: terminating until its grace ends
    harness.passes(3.0)
    assert harness.engine.next_expiry() == 33.0
    harness.check(3.0)
    harness.passes(33.0)
    harness.engine.dirty_pods.add(("default", "p"))  # the shell's wake-up at the expiry
    harness.passes(33.0)
    harness.check(33.0)
    assert all("10.1.0.1" not in str(row) for row in harness.rows.values())


def test_a_released_value_goes_to_the_service_that_asked_for_it() -> None:
    """b asks for a's cluster IP; once a is gone, b gets it in a pass of its own."""
    cfg = model.Config(service_cidr="10.0.0.0/28")
    harness = Harness(cfg, model.Allocations.create(cfg))
    harness.change("service", ("default", "a"), (web("a", clusterIP="10.0.0.5"), 1))
    harness.full(0.0)
    harness.change("service", ("default", "b"), (web("b", clusterIP="10.0.0.5"), 1))
    harness.passes(1.0)
    assert any("already allocated" in p for p in harness.engine.problems())
    harness.change("service", ("default", "a"), None)
    harness.passes(2.0)
    harness.check(2.0)
    assert harness.statuses[("default", "b")][1]["clusterIP"] == "10.0.0.5"
    assert harness.recomputed[-2:] == [1, 1]  # a's removal, then b's retry after the release


def test_a_clash_moves_the_address_to_the_service_that_sorts_first() -> None:
    cfg = model.Config()
    harness = Harness(cfg, model.Allocations.create(cfg))
    harness.change("service", ("default", "b"), (web("b", externalIPs=["203.0.113.1"]), 1))
    harness.full(0.0)
    assert harness.rows["fe.203-0-113-1.80.TCP"].name == "b"
    harness.change("service", ("default", "a"), (web("a", externalIPs=["203.0.113.1"]), 1))
    harness.passes(1.0)
    harness.check(1.0)
    assert harness.rows["fe.203-0-113-1.80.TCP"].name == "a"
    assert harness.recomputed[-1] == 2
    harness.change("service", ("default", "a"), None)
    harness.passes(2.0)
    harness.check(2.0)
    assert harness.rows["fe.203-0-113-1.80.TCP"].name == "b"


def test_a_node_change_recomputes_node_port_services_only() -> None:
    cfg = model.Config()
    harness = Harness(cfg, model.Allocations.create(cfg))
    for i in range(10):
        harness.change("service", ("default", f"s{i}"), (web(f"s{i}", type="NodePort" if i < 3 else "ClusterIP"), 1))
    harness.full(0.0)
    harness.recomputed.clear()
    harness.change("node", "n1", yaml.safe_load(
        "{apiVersion: v1, kind: Node, metadata: {name: n1}, status: {addresses: [{type: InternalIP, address: 192.168.0.7}]}}"))
    harness.passes(1.0)
    harness.check(1.0)
    assert harness.recomputed == [3]
    assert sum(1 for row in harness.rows.values() if getattr(row, "node", "") == "n1") == 3
    harness.recomputed.clear()
    harness.change("node_status", "n1", {"addresses": [{"type": "InternalIP", "address": "192.168.0.7"}]})
    harness.passes(2.0)
    assert harness.recomputed == [0]  # the same address: nothing to recompute
