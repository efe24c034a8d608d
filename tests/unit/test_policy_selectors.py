"""Selector matching, label parsing, normalisation details and policy status errors."""

from __future__ import annotations

import pytest

from ciliary.resources import LabelSelector, LabelSelectorRequirement
from services.policy.entities import entity_selectors
from services.policy.resolve import (
    ResolveOptions,
    is_local,
    normalize_all,
    policy_cidrs,
    resolve_policy,
)
from services.policy.rules import RuleRef, default_allow_ref, normalize, rule_id
from services.policy.selectors import (
    IdentityView,
    Requirement,
    Selector,
    SelectorCache,
    cidr_selector,
    from_label_selector,
    labels_selector,
    parse_label,
)

POD = frozenset({"k8s:app=web", "k8s:io.kubernetes.pod.namespace=default",
                 "container:app=sidecar"})


@pytest.mark.parametrize("label,parsed", [
    ("k8s:app=web", ("k8s", "app", "web")),
    ("reserved:host", ("reserved", "host", "")),
    ("k8s:app.kubernetes.io/name=a=b", ("k8s", "app.kubernetes.io/name", "a=b")),
    ("cidr:2001:db8::/32", ("cidr", "2001:db8::/32", "")),
    ("app=web", ("unspec", "app", "web")),
])
def test_parse_label(label: str, parsed: tuple[str, str, str]) -> None:
    assert parse_label(label) == parsed


@pytest.mark.parametrize("req,expected", [
    (Requirement("any", "app", "In", ("web",)), True),
    (Requirement("any", "app", "In", ("sidecar",)), True),  # any source
    (Requirement("k8s", "app", "In", ("sidecar",)), False),  # k8s source only
    (Requirement("container", "app", "In", ("sidecar",)), True),
    (Requirement("k8s", "app", "NotIn", ("db",)), True),
    (Requirement("k8s", "tier", "NotIn", ("db",)), True),  # absent key
    (Requirement("k8s", "tier", "Exists"), False),
    (Requirement("any", "tier", "DoesNotExist"), True),
    (Requirement("reserved", "host", "In", ("",)), False),
])
def test_requirement_sources(req: Requirement, expected: bool) -> None:
    assert req.matches(IdentityView(65792, POD)) is expected


def test_from_label_selector_adds_sources() -> None:
    sel = LabelSelector(match_labels={"app": "web", "k8s:tier": "a", "reserved:host": ""},
                        match_expressions=[LabelSelectorRequirement(key="env", operator="Exists")])
    got = from_label_selector(sel, "any")
    assert {(r.source, r.key) for r in got.requirements} == {
        ("any", "app"), ("k8s", "tier"), ("reserved", "host"), ("any", "env")}
    np = from_label_selector(LabelSelector(match_labels={"team": "a"}), "k8s",
                             key_prefix="io.cilium.k8s.namespace.labels.")
    assert np.requirements == (
        Requirement("k8s", "io.cilium.k8s.namespace.labels.team", "In", ("a",)),)


def test_reserved_identities_carry_their_label() -> None:
    assert "reserved:host" in IdentityView(1, frozenset()).labels
    assert entity_selectors("host", "default")[0].matches(IdentityView(1, frozenset()))
    assert entity_selectors("world", "default")[0].matches(IdentityView(2, frozenset()))
    assert not entity_selectors("world", "default")[0].matches(IdentityView(1, frozenset()))
    assert entity_selectors("bogus", "default") == [Selector("none")]


def test_cidr_selection_uses_most_specific_prefix() -> None:
    own_only = IdentityView((1 << 24) | 5, frozenset({"cidr:10.96.0.0/12", "reserved:world"}))
    enclosing = IdentityView((1 << 24) | 6, frozenset({"cidr:10.96.0.0/12", "cidr:10.0.0.0/8"}))
    sel = cidr_selector("10.0.0.0/8", ["10.96.0.0/12"])
    assert not sel.matches(own_only) and not sel.matches(enclosing)
    assert cidr_selector("10.0.0.0/8").matches(own_only)
    assert cidr_selector("10.96.0.0/16").matches(own_only) is False
    assert cidr_selector("0.0.0.0/0").matches(IdentityView(2, frozenset()))
    assert not cidr_selector("::/0").matches(own_only)
    assert cidr_selector("10.0.0.1").cidr == "10.0.0.1/32"


def test_selector_cache_reports_changes() -> None:
    web = labels_selector([Requirement("any", "app", "In", ("web",))])
    cache = SelectorCache({65792: POD})
    assert cache.add_selector(web) == {65792}
    assert cache.update({65793: frozenset({"k8s:app=db"})}, ()) == set()
    assert cache.update({65793: frozenset({"k8s:app=web"})}, ()) == {web}
    assert cache.update({}, [65792]) == {web}
    assert cache.selections(web) == {65793}
    assert cache.update({}, [4242]) == set()
    cache.add_selector(Selector("all"))
    cache.retain([web])
    assert cache.selectors() == [web]
    cache.remove_selector(web)
    assert cache.selectors() == []


def test_is_local() -> None:
    assert is_local(1, 1) and is_local(4, 1) and not is_local(2, 1) and not is_local(6, 1)
    assert is_local(65792, 1) and is_local(300, 1) and not is_local(131328, 1)
    assert not is_local((1 << 24) | 1, 1)


def test_rule_ids_are_stable_and_nonzero() -> None:
    ref = RuleRef("CiliumNetworkPolicy", "default", "p", 0, "ingress", 0)
    assert rule_id(ref) == rule_id(RuleRef(*ref.__dict__.values()))
    assert rule_id(ref) != 0 and rule_id(ref) < 2**32
    assert rule_id(default_allow_ref("ingress")) == 0
    assert rule_id(ref) != rule_id(RuleRef("CiliumNetworkPolicy", "default", "p", 0,
                                           "ingress", 1))


def test_invalid_manifest_is_an_error_status() -> None:
    bad = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "bad", "namespace": "default"},
           "spec": {"endpointSelector": {}, "ingress": [{"fromEndpoint": [{}]}]}}
    res = resolve_policy([bad], {65792: POD})
    [status] = res.statuses.values()
    assert status.state == "error" and "fromEndpoint" in status.error
    assert res.identities == {}


def test_unknown_kind_and_normalize_type_error() -> None:
    pol = normalize({"kind": "Pod", "metadata": {"name": "x"}})
    assert pol.error.startswith("not a policy kind")
    with pytest.raises(TypeError):
        normalize(42)


def test_policy_cidrs_lists_every_named_prefix() -> None:
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "p", "namespace": "default"},
           "spec": {"podSelector": {}, "egress": [{"to": [
               {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]}}
    assert policy_cidrs(normalize_all([doc], ResolveOptions())) == ["10.0.0.0/8", "10.1.0.0/16"]


def test_resolution_is_deterministic_regardless_of_input_order() -> None:
    docs = [
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": n, "namespace": "default"},
         "spec": {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}}
        for n in ("a", "b", "c")
    ]
    ids = {65792: POD, 65793: frozenset({"k8s:io.kubernetes.pod.namespace=default"})}
    one = resolve_policy(docs, ids).entries
    two = resolve_policy(list(reversed(docs)), dict(reversed(ids.items()))).entries
    assert one == two
    assert all(e.rule.name == "a" for es in one.values() for e in es if e.rule.kind)
