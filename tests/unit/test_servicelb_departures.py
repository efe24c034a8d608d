"""servicelb: not-ready backends and deleted pods keep their established connections.

A backend that fails readiness, and a pod that was deleted, leave the slots (no new
connections) but stay in the frontend's backend list, so the node executor keeps their
lb4 backend entries and connections already on them are not re-balanced mid-stream.
"""

from __future__ import annotations

from typing import Any

from ciliary import schema
from services.servicelb import departures, model

READY = [{"type": "Ready", "status": "True"}]
NOT_READY = [{"type": "Ready", "status": "False"}]


def svc(name: str = "web", **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    spec.setdefault("selector", {"app": "web"})
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": spec}


def pod(name: str, node: str = "node-1", grace: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "app"}]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}, "uid": f"uid-{name}"}}


def inputs_of(pods: dict[str, tuple[str, list[dict[str, str]]]], *docs: dict[str, Any],
              grace: int | None = None) -> model.Inputs:
    """Inputs with Service ``web`` (unless ``docs`` give Services) and ``pods``: name -> (ip, conditions)."""
    inputs = model.Inputs.from_manifests(list(docs) or [svc()])
    for i, (name, (ip, conditions)) in enumerate(sorted(pods.items())):
        inputs.pods[("default", name)] = pod(name, f"node-{i % 2 + 1}", grace)
        inputs.pod_status[("default", name)] = {"podIP": ip, "phase": "Running", "conditions": conditions}
    return inputs


def states(inputs: model.Inputs) -> dict[str, str]:
    """backend pod -> "slot" or its state (not serving marked with "-"), for the ClusterIP frontend."""
    cfg = model.Config()
    (fe,) = [f for f in model.compute(inputs, model.Allocations.create(cfg), cfg).frontends.values()
             if f.type == "ClusterIP"]
    slots = set(fe.slots) | {i for ids in fe.slots_by_node.values() for i in ids}
    return {b.pod.split("/")[1]: "slot" if b.id in slots else b.state + ("" if b.serving else "-")
            for b in fe.backends}


# ---------------------------------------------------------------- not ready


def test_not_ready_pod_is_a_backend_outside_the_slots() -> None:
    got = states(inputs_of({"web-1": ("10.0.0.1", READY), "web-2": ("10.0.0.2", NOT_READY)}))
    assert got == {"web-1": "slot", "web-2": "not-ready-"}


def test_not_ready_is_never_a_fallback() -> None:
    """Unlike a terminating serving backend, a not-ready one never takes new connections:
    with no ready backend the slots are empty (the datapath drops with reason 158)."""
    assert states(inputs_of({"web-1": ("10.0.0.1", NOT_READY)})) == {"web-1": "not-ready-"}
    local = inputs_of({"web-1": ("10.0.0.1", NOT_READY), "web-2": ("10.0.0.2", READY)},
                      svc(internalTrafficPolicy="Local"))
    cfg = model.Config()
    (fe,) = model.compute(local, model.Allocations.create(cfg), cfg).frontends.values()
    by_pod = {b.pod: b.id for b in fe.backends}
    assert fe.slots_by_node == {"node-2": [by_pod["default/web-2"]]}


def test_manual_slice_endpoint_not_ready_is_kept_not_ready() -> None:
    slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              "metadata": {"name": "ext-1", "namespace": "default",
                           "labels": {"kubernetes.io/service-name": "ext"}},
              "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": ["172.16.0.1"], "conditions": {"ready": False}},
                            {"addresses": ["172.16.0.2"]}]}
    inputs = model.Inputs.from_manifests([svc("ext", selector={}), slice_])
    cfg = model.Config()
    (fe,) = model.compute(inputs, model.Allocations.create(cfg), cfg).frontends.values()
    assert [(b.ip, b.state, b.serving) for b in fe.backends] == [
        ("172.16.0.2", schema.LB_STATE_ACTIVE, True), ("172.16.0.1", schema.LB_STATE_NOT_READY, False)]
    assert fe.slots == [fe.backends[0].id]


# ---------------------------------------------------------------- deleted pods


def test_deleted_pod_stays_terminating_for_its_grace_period() -> None:
    d = departures.Departures()
    both = {"web-1": ("10.0.0.1", READY), "web-2": ("10.0.0.2", READY)}
    assert d.apply(inputs_of(both), now=100.0) is None
    assert states(inputs_of(both)) == {"web-1": "slot", "web-2": "slot"}

    after = inputs_of({"web-1": ("10.0.0.1", READY)})
    assert d.apply(after, now=101.0) == 131.0  # default grace period: 30 s
    assert states(after) == {"web-1": "slot", "web-2": "terminating-"}
    assert after.pod_status[("default", "web-2")]["podIP"] == "10.0.0.2"

    later = inputs_of({"web-1": ("10.0.0.1", READY)})
    assert d.apply(later, now=130.9) == 131.0
    assert ("default", "web-2") in later.pods
    gone = inputs_of({"web-1": ("10.0.0.1", READY)})
    assert d.apply(gone, now=131.0) is None
    assert states(gone) == {"web-1": "slot"}


def test_last_deleted_backend_is_no_fallback() -> None:
    """A deleted pod is going away: even as the only backend it takes no new connection."""
    d = departures.Departures()
    d.apply(inputs_of({"web-1": ("10.0.0.1", READY)}), now=0.0)
    empty = inputs_of({})
    d.apply(empty, now=1.0)
    assert states(empty) == {"web-1": "terminating-"}


def test_grace_period_comes_from_the_pod_and_is_bounded() -> None:
    d = departures.Departures()
    d.apply(inputs_of({"web-1": ("10.0.0.1", READY)}, grace=5), now=0.0)
    assert d.apply(inputs_of({}), now=1.0) == 6.0
    assert departures.grace_seconds(pod("x", grace=100000)) == departures.MAX_GRACE_S
    assert departures.grace_seconds({"spec": {"terminationGracePeriodSeconds": "soon"}}) == departures.DEFAULT_GRACE_S


def test_status_deleted_before_the_pod_keeps_the_last_address() -> None:
    """Deletion removes the pod's record and its status; whichever servicelb sees first,
    the departed pod keeps the address it last had."""
    d = departures.Departures()
    d.apply(inputs_of({"web-1": ("10.0.0.1", READY)}), now=0.0)
    no_status = inputs_of({"web-1": ("10.0.0.1", READY)})
    del no_status.pod_status[("default", "web-1")]
    d.apply(no_status, now=0.5)
    empty = inputs_of({})
    d.apply(empty, now=1.0)
    assert states(empty) == {"web-1": "terminating-"}
    assert empty.pod_status[("default", "web-1")]["podIP"] == "10.0.0.1"


def test_pods_without_address_or_finished_are_forgotten_and_a_new_pod_replaces_a_departed_one() -> None:
    d = departures.Departures()
    start = inputs_of({"web-1": ("10.0.0.1", READY), "web-2": ("", NOT_READY), "web-3": ("10.0.0.3", READY)})
    start.pod_status[("default", "web-3")]["phase"] = "Succeeded"
    d.apply(start, now=0.0)
    empty = inputs_of({})
    assert d.apply(empty, now=1.0) == 31.0
    assert set(d.departed) == {("default", "web-1")}
    again = inputs_of({"web-1": ("10.0.0.9", READY)})  # recreated under the same name
    assert d.apply(again, now=2.0) is None
    cfg = model.Config()
    (fe,) = model.compute(again, model.Allocations.create(cfg), cfg).frontends.values()
    assert [(b.ip, b.state) for b in fe.backends] == [("10.0.0.9", "active")]
    assert fe.slots == [fe.backends[0].id]
