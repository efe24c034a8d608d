"""What the identity service takes from policies and allocations: a policy event matters
only through its CIDRs and toFQDNs selectors; an allocation that needs no write is seen
without a task."""

from __future__ import annotations

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
