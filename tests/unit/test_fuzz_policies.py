"""Fuzzed policies (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy):
whatever a stored policy holds, the policy service's normaliser gives a policy or one that
carries its error — it never raises; and what ``apply`` validates, it normalises without
an error."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import example, given
from hypothesis import strategies as st

from ciliary import schema
from ciliary.kv import KVEntry
from ciliary.resources import ManifestError, resource_from_manifest
from ciliary.resources.kinds import KINDS
from services.policy.inputs import PolicyInputs
from services.policy.resolve import ResolveOptions
from services.policy.rules import POLICY_KINDS, normalize
from tests.unit.fuzz_strategies import FUZZ, json_values, shaped, strings
from tests.unit.test_fuzz_manifests import VOCABULARY

POLICY_WORDS = sorted(set(VOCABULARY) | {
    "endpointSelector", "nodeSelector", "ingress", "egress", "ingressDeny", "egressDeny",
    "fromEndpoints", "toEndpoints", "fromEntities", "toEntities", "fromCIDR", "toCIDR",
    "fromCIDRSet", "toCIDRSet", "cidr", "except", "toPorts", "ports", "port", "endPort",
    "protocol", "icmps", "fields", "type", "family", "toFQDNs", "matchName", "matchPattern",
    "matchLabels", "matchExpressions", "key", "operator", "values", "podSelector",
    "namespaceSelector", "ipBlock", "policyTypes", "from", "to", "rules", "dns", "http",
    "specs", "spec", "toServices", "k8sService", "serviceName", "namespace", "enableDefaultDeny",
})
LEAVES = ["In", "NotIn", "Exists", "DoesNotExist", "world", "cluster", "host", "all",
          "Ingress", "Egress", "TCP", "UDP", "SCTP", "ANY", "ICMP", "0.0.0.0/0", "10.0.0.0/8",
          "k8s:app", "any:app", "reserved:host", "*.example.com", "8080", "http"]


def policies() -> st.SearchStrategy[dict[str, Any]]:
    spec = st.one_of(
        st.fixed_dictionaries({}, optional={
            w: st.one_of(shaped(POLICY_WORDS), st.sampled_from(LEAVES),
                         st.lists(shaped(POLICY_WORDS), max_size=3))
            for w in ("endpointSelector", "podSelector", "ingress", "egress", "ingressDeny",
                      "egressDeny", "policyTypes", "nodeSelector")}),
        shaped(POLICY_WORDS),
    )
    return st.builds(
        lambda kind, meta, spec, specs: {
            "apiVersion": KINDS[kind].api_version, "kind": kind, "metadata": meta, "spec": spec,
            **({"specs": specs} if specs is not None else {})},
        st.sampled_from(sorted(POLICY_KINDS)),
        st.one_of(st.fixed_dictionaries({"name": strings}, optional={"namespace": strings}), json_values()),
        spec,
        st.one_of(st.none(), st.lists(spec, max_size=2), json_values()),
    )


@FUZZ
@given(policies())
@example({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": ["x"],
          "spec": {}})  # once an AttributeError reading the name
@example({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": None,
          "spec": {}})  # once an AssertionError: neither endpointSelector nor nodeSelector
@example({"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": None,
          "spec": {}, "specs": True})  # once a TypeError reading the rules
def test_any_stored_policy_normalises_or_carries_its_error(manifest: dict[str, Any]) -> None:
    pol = normalize(manifest, "c1")
    try:
        resource_from_manifest(manifest, source="fuzz")
    except ManifestError:
        return
    assert not pol.error, pol.error  # what apply accepts, the policy service enforces


@FUZZ
@given(st.one_of(policies(), json_values()), st.sampled_from(sorted(POLICY_KINDS)))
def test_the_policy_service_skips_what_it_cannot_read(manifest: Any, kind: str) -> None:
    """As the service reads bucket ``resources``: any record (or bytes) under a policy key."""
    inputs = PolicyInputs(ResolveOptions(cluster_name="c1"))
    try:
        value = schema.encode(schema.ResourceRecord(kind=kind, api_version="cilium.io/v2",
                                                    namespace="default", name="p", uid="u", generation=1, created="",
                                                    manifest=manifest))
    except (msgspec.EncodeError, OverflowError, TypeError):
        value = msgspec.json.encode(str(manifest)[:200])  # not a record at all
    inputs.resources[kind] = {f"{kind}.default.p": KVEntry(schema.BUCKET_RESOURCES, f"{kind}.default.p", 1, value)}
    norm, _, _ = inputs.policies()
    assert len(norm) <= 1
