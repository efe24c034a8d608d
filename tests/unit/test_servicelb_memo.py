"""DecodeMemo and the record cache: a reconcile re-decodes only what changed, and the
result is the same as a compute from freshly decoded inputs."""

from __future__ import annotations

import copy

from services.servicelb import model


def service(name: str, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": port}]}}


def eps(name: str, *ips: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def test_the_same_manifest_object_is_decoded_once() -> None:
    memo = model.DecodeMemo()
    manifest = service("web", 80)
    first = memo.decode("Service", manifest)
    assert memo.decode("Service", manifest) is first
    assert memo.decode("Service", copy.deepcopy(manifest)) is not first  # another object: decoded again


def test_prune_forgets_what_the_last_compute_did_not_see() -> None:
    memo = model.DecodeMemo()
    kept, dropped = service("a", 80), service("b", 81)
    a = memo.decode("Service", kept)
    memo.decode("Service", dropped)
    memo.prune()
    assert memo.decode("Service", kept) is a  # seen since the prune before: still there
    memo.prune()
    memo.prune()
    assert memo.decode("Service", kept) is not a  # not seen in the last round: decoded again


def test_a_decoding_error_is_reported_every_time() -> None:
    inputs = model.Inputs.from_manifests([{**service("bad", 80), "spec": {"ports": [{"port": "x"}]}}])
    cfg = model.Config()
    alloc = model.Allocations.create(cfg)
    for _ in range(2):
        assert any("Service default/bad" in p for p in model.compute(inputs, alloc, cfg).problems)


def test_compute_with_a_reused_memo_equals_a_fresh_compute() -> None:
    cfg = model.Config()
    memo = model.DecodeMemo()
    docs = [service(f"s{i}", 80 + i) for i in range(5)] + [eps(f"s{i}", f"10.1.0.{i + 1}") for i in range(5)]
    steps = [docs, docs[:3] + docs[5:], docs[:5] + [eps("s0", "10.1.0.9", "10.1.0.8")] + docs[6:]]
    alloc_memo, alloc_fresh = model.Allocations.create(cfg), model.Allocations.create(cfg)
    for step in steps:
        with_memo = model.Inputs.from_manifests(step)
        with_memo.memo = memo
        fresh = model.Inputs.from_manifests(copy.deepcopy(step))
        a, b = model.compute(with_memo, alloc_memo, cfg), model.compute(fresh, alloc_fresh, cfg)
        for alloc in (alloc_memo, alloc_fresh):
            for pool in alloc.pools():
                for value in list(pool.pending):
                    pool.persisted(value, 1)
        assert a.frontends == b.frontends and a.statuses == b.statuses and a.problems == b.problems
