"""What the identity service derives per pass, and what it skips: a policy event matters
only through its CIDRs and toFQDNs selectors, only touched pods are derived again, and an
allocation that needs no write is seen without a task."""

from __future__ import annotations

import random
from typing import Any

from ciliary import schema
from ciliary.bus import KVEntry
from services.identity.allocator import IdentityAllocator, MemoryCasStore
from services.identity.inputs import IdentityInputs
from services.identity.labels import label_set_hash
from services.identity.settings import label_filter

KEY = "CiliumNetworkPolicy.default.p"


def cnp(egress: list[dict[str, Any]], selector: str = "web") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": selector}}, "egress": egress}}


def test_policy_events_matter_only_through_cidrs_and_fqdn_selectors() -> None:
    inputs = IdentityInputs(label_filter("")[0], "default")
    inputs.resources = {"CiliumNetworkPolicy": {}}
    revisions = iter(range(1, 100))

    def event(manifest: dict[str, Any] | None) -> bool:
        rev = next(revisions)
        if manifest is None:
            inputs.resources["CiliumNetworkPolicy"].pop(KEY, None)
            return inputs.on_policy("CiliumNetworkPolicy", KVEntry(schema.BUCKET_RESOURCES, KEY, rev, None))
        entry = KVEntry(schema.BUCKET_RESOURCES, KEY, rev, schema.encode(schema.ResourceRecord(
            kind="CiliumNetworkPolicy", api_version="cilium.io/v2", namespace="default", name="p",
            uid="u", generation=rev, created="", manifest=manifest)))
        inputs.resources["CiliumNetworkPolicy"][KEY] = entry
        return inputs.on_policy("CiliumNetworkPolicy", entry)

    assert not event(cnp([{"toEndpoints": [{}]}]))  # no CIDR, no toFQDNs
    assert not event(cnp([{"toEndpoints": [{}]}], selector="db"))
    assert event(cnp([{"toCIDR": ["10.0.0.0/8"]}]))
    assert inputs.compute_cidrs() == {"10.0.0.0/8": 1}
    assert not event(cnp([{"toCIDR": ["10.0.0.0/8"]}], selector="db"))  # same CIDRs
    assert event(cnp([{"toCIDR": ["10.1.0.0/16"]}]))  # as many policies as before, a new revision
    assert inputs.compute_cidrs() == {"10.1.0.0/16": 1}
    assert event(cnp([{"toCIDR": ["10.0.0.0/8"]}]))
    assert event(cnp([{"toCIDR": ["10.0.0.0/8"]}, {"toFQDNs": [{"matchName": "a.example"}]}]))
    assert event(None)
    assert inputs.compute_cidrs() == {}
    assert not event(cnp([]))


async def test_held_answers_without_a_write_only_for_current_usage() -> None:
    store = MemoryCasStore()
    alloc = IdentityAllocator(store, "c", 1)
    labels = ("k8s:app=web", "k8s:io.kubernetes.pod.namespace=default")
    lkey = schema.identity_labels_key(label_set_hash(labels))
    assert alloc.held(lkey, labels, 1) == 0  # not allocated yet
    ident = (await alloc.allocate(labels, refs=1)).identity
    assert alloc.held(lkey, labels, 1) == ident
    assert alloc.held(lkey, labels, 2) == 0  # a different usage needs a write
    assert alloc.held(lkey, ("k8s:app=other",), 1) == 0  # not these labels
    await alloc.allocate(labels, refs=2)
    assert alloc.held(lkey, labels, 2) == ident


def pod_entry(name: str, rev: int, labels: dict[str, str], ns: str = "default") -> KVEntry:
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns,
                                                                "labels": labels},
                "spec": {"containers": [{"name": "c", "image": "x"}]}}
    return KVEntry(schema.BUCKET_RESOURCES, f"Pod.{ns}.{name}", rev, schema.encode(
        schema.ResourceRecord(kind="Pod", api_version="v1", namespace=ns, name=name, uid=name,
                              generation=rev, created="", manifest=manifest)))


def namespace_entry(name: str, rev: int, labels: dict[str, str]) -> KVEntry:
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
    return KVEntry(schema.BUCKET_RESOURCES, f"Namespace._.{name}", rev, schema.encode(
        schema.ResourceRecord(kind="Namespace", api_version="v1", namespace="", name=name,
                              uid=name, generation=rev, created="", manifest=manifest)))


def test_only_touched_pods_are_derived_again_and_the_result_equals_a_fresh_derivation() -> None:
    inputs = IdentityInputs(label_filter("")[0], "default")
    pods = {e.key: e for e in (pod_entry("a", 1, {"app": "a"}), pod_entry("b", 2, {"app": "b"}))}
    namespaces = {"Namespace._.default": namespace_entry("default", 3, {"team": "x"})}
    inputs.resources = {"Pod": pods, "Namespace": namespaces}

    def fresh() -> list[Any]:
        other = IdentityInputs(label_filter("")[0], "default")
        other.resources = inputs.resources
        return sorted(other.compute_pods(), key=lambda p: p.key)

    def labels_of(name: str) -> tuple[str, ...]:
        return next(p.labels for p in inputs.pods if p.name == name)

    assert sorted(inputs.compute_pods(), key=lambda p: p.key) == fresh()
    assert inputs.changed == {"Pod.default.a", "Pod.default.b"}
    pods["Pod.default.a"] = pod_entry("a", 4, {"app": "a2"})
    inputs.compute_pods()
    assert "k8s:app=a" in labels_of("a")  # not touched: not looked at
    assert inputs.changed == set()
    inputs.touch_pod("Pod.default.a")
    assert sorted(inputs.compute_pods(), key=lambda p: p.key) == fresh()
    assert "k8s:app=a2" in labels_of("a") and inputs.changed == {"Pod.default.a"}
    same = inputs.pod("Pod.default.b")
    pods["Pod.default.b"] = pod_entry("b", 6, {"app": "b"})  # a new revision, the same endpoint
    inputs.touch_pod("Pod.default.b")
    inputs.compute_pods()
    assert inputs.changed == set() and inputs.pod("Pod.default.b") is same
    del pods["Pod.default.b"]
    inputs.touch_pod("Pod.default.b")
    assert [p.name for p in inputs.compute_pods()] == ["a"]
    assert inputs.changed == {"Pod.default.b"} and inputs.pod("Pod.default.b") is None
    namespaces["Namespace._.default"] = namespace_entry("default", 5, {"team": "y"})
    inputs.touch_all()
    assert sorted(inputs.compute_pods(), key=lambda p: p.key) == fresh()
    assert "k8s:io.cilium.k8s.namespace.labels.team=y" in labels_of("a")
    assert inputs.changed == {"Pod.default.a"}


def test_label_refs_follow_every_change_as_counting_the_pods_would() -> None:
    """40 seeded histories of pods created, relabelled, deleted and namespaces relabelled:
    after every update, `label_refs` equals counting `pods`, and the label sets reported
    changed are exactly those whose count differs from the previous update's."""
    from collections import Counter

    for seed in range(40):
        rng = random.Random(seed)
        inputs = IdentityInputs(label_filter("")[0], "default")
        pods: dict[str, KVEntry] = {}
        namespaces = {"Namespace._.default": namespace_entry("default", 1, {"team": "x"})}
        inputs.resources = {"Pod": pods, "Namespace": namespaces}
        rev = 1
        before: Counter[tuple[str, ...]] = Counter()
        for _ in range(30):
            rev += 1
            roll = rng.random()
            if roll < 0.1:
                namespaces["Namespace._.default"] = namespace_entry("default", rev, {"team": rng.choice("xyz")})
                inputs.touch_all()
            else:
                name = f"p{rng.randrange(6)}"
                key = f"Pod.default.{name}"
                if roll < 0.3 and key in pods:
                    del pods[key]
                else:
                    pods[key] = pod_entry(name, rev, {"app": rng.choice("abc")})
                inputs.touch_pod(key)
            inputs.update_pods()
            counted = Counter(p.labels for p in inputs.pods)
            assert inputs.label_refs == dict(counted), seed
            assert inputs.endpoints == len(inputs.pods)
            moved = {labels for labels in counted | before if counted[labels] != before[labels]}
            assert inputs.take_label_changes() == moved, seed
            before = counted
