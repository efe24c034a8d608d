"""LabelSelector semantics, the kind registry and resource keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliary.resources import (
    KINDS,
    LabelSelector,
    LabelSelectorRequirement,
    ResourceKey,
    UnknownKindError,
    make_key,
    parse_key,
    resolve_kind,
    validate,
)
from ciliary.resources import model as m
from ciliary.resources.selector import split_source, strip_source


def req(key: str, op: str, *values: str) -> LabelSelectorRequirement:
    return LabelSelectorRequirement(key=key, operator=op, values=list(values))  # type: ignore[arg-type]


LABELS = {"app": "web", "tier": "frontend", "env": "prod"}

SELECTOR_CASES = [
    ("empty-selects-all", LabelSelector(), LABELS, True),
    ("empty-selects-unlabelled", LabelSelector(), {}, True),
    ("match-labels-subset", LabelSelector(match_labels={"app": "web"}), LABELS, True),
    ("match-labels-all", LabelSelector(match_labels=dict(LABELS)), LABELS, True),
    ("match-labels-wrong-value", LabelSelector(match_labels={"app": "db"}), LABELS, False),
    ("match-labels-missing-key", LabelSelector(match_labels={"team": "a"}), LABELS, False),
    ("in-hit", LabelSelector(match_expressions=[req("env", "In", "prod", "staging")]),
     LABELS, True),
    ("in-miss", LabelSelector(match_expressions=[req("env", "In", "dev")]), LABELS, False),
    ("in-absent-key", LabelSelector(match_expressions=[req("team", "In", "a")]), LABELS, False),
    ("notin-hit", LabelSelector(match_expressions=[req("env", "NotIn", "dev")]), LABELS, True),
    ("notin-miss", LabelSelector(match_expressions=[req("env", "NotIn", "prod")]),
     LABELS, False),
    ("notin-absent-key-matches", LabelSelector(match_expressions=[req("team", "NotIn", "a")]),
     LABELS, True),
    ("exists", LabelSelector(match_expressions=[req("tier", "Exists")]), LABELS, True),
    ("exists-absent", LabelSelector(match_expressions=[req("team", "Exists")]), LABELS, False),
    ("does-not-exist", LabelSelector(match_expressions=[req("team", "DoesNotExist")]),
     LABELS, True),
    ("does-not-exist-present", LabelSelector(match_expressions=[req("app", "DoesNotExist")]),
     LABELS, False),
    ("labels-and-expressions-all-hold",
     LabelSelector(match_labels={"app": "web"},
                   match_expressions=[req("env", "In", "prod"), req("team", "DoesNotExist")]),
     LABELS, True),
    ("labels-and-expressions-one-fails",
     LabelSelector(match_labels={"app": "web"}, match_expressions=[req("env", "In", "dev")]),
     LABELS, False),
    ("empty-value-label", LabelSelector(match_labels={"canary": ""}), {"canary": ""}, True),
]


@pytest.mark.parametrize(
    "selector, labels, expected", [c[1:] for c in SELECTOR_CASES], ids=[c[0] for c in SELECTOR_CASES]
)
def test_label_selector_matches(selector, labels, expected):
    assert selector.matches(labels) is expected


def test_selector_source_prefix_helpers():
    assert strip_source("k8s:app") == "app"
    assert strip_source("any:app") == "app"
    assert strip_source("reserved:host") == "reserved:host"
    assert strip_source("app") == "app"
    assert split_source("k8s:io.kubernetes.pod.namespace") == ("k8s", "io.kubernetes.pod.namespace")
    assert split_source("app") == ("", "app")


@pytest.mark.parametrize(
    "word, kind",
    [
        ("pods", "Pod"), ("pod", "Pod"), ("po", "Pod"), ("Pod", "Pod"), ("PODS", "Pod"),
        ("svc", "Service"), ("services", "Service"), ("endpointslices", "EndpointSlice"),
        ("endpointslice", "EndpointSlice"), ("ns", "Namespace"), ("namespaces", "Namespace"),
        ("no", "Node"), ("nodes", "Node"), ("netpol", "NetworkPolicy"),
        ("networkpolicies", "NetworkPolicy"),
        ("networkpolicies.networking.k8s.io", "NetworkPolicy"),
        ("cnp", "CiliumNetworkPolicy"), ("ciliumnetworkpolicies", "CiliumNetworkPolicy"),
        ("ccnp", "CiliumClusterwideNetworkPolicy"),
        ("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy"),
        ("CiliumClusterwideNetworkPolicy", "CiliumClusterwideNetworkPolicy"),
    ],
)
def test_resolve_kind(word, kind):
    assert resolve_kind(word) == kind


@pytest.mark.parametrize("word", ["deployments", "cnps", "pods.cilium.io", ""])
def test_resolve_kind_unknown_lists_valid_kinds(word):
    with pytest.raises(UnknownKindError) as info:
        resolve_kind(word)
    message = str(info.value)
    for kind in KINDS:
        assert kind in message
    assert "svc" in message and "ccnp" in message


def test_kind_registry_scope_and_models():
    cluster_scoped = {k for k, info in KINDS.items() if not info.namespaced}
    assert cluster_scoped == {"Namespace", "Node", "CiliumClusterwideNetworkPolicy"}
    for kind, info in KINDS.items():
        assert info.kind == kind
        assert info.model.__name__ == kind
        assert info.model.__struct_config__.tag == kind


def test_keys_round_trip():
    assert make_key("Pod", "default", "web") == "Pod/default/web"
    assert make_key("Node", "", "node-1") == "Node/_/node-1"
    assert parse_key("Node/_/node-1") == ResourceKey("Node", "", "node-1")
    assert parse_key("CiliumNetworkPolicy/shop/x") == ("CiliumNetworkPolicy", "shop", "x")
    for key in ["Pod/default/web", "CiliumClusterwideNetworkPolicy/_/c", "Service/a.b/s"]:
        assert make_key(*parse_key(key)) == key


@pytest.mark.parametrize(
    "key", ["Pod/default", "Pod//web", "Widget/default/x", "Pod/_/web", "Node/default/n",
            "Pod/a/b/c"]
)
def test_parse_key_rejects_malformed(key):
    with pytest.raises(ValueError):
        parse_key(key)


def test_validate_is_usable_on_constructed_objects():
    pod = m.Pod(metadata=m.ObjectMeta(name="p"),
                spec=m.PodSpec(containers=[m.Container(name="c", image="i")]))
    assert validate(pod) == []
    bad = m.Service(metadata=m.ObjectMeta(name="s"),
                    spec=m.ServiceSpec(ports=[m.ServicePort(port=80, node_port=30001)]))
    assert [e.field for e in validate(bad)] == ["spec.ports[0].nodePort"]


_label_keys = st.sampled_from(["app", "tier", "env", "team", "k8s.io/zone"])
_label_values = st.sampled_from(["", "a", "b", "web", "db"])
_label_sets = st.dictionaries(_label_keys, _label_values, max_size=5)


@given(labels=_label_sets, data=st.data())
def test_selector_built_from_a_subset_of_labels_matches_them(labels, data):
    subset_keys = data.draw(st.lists(st.sampled_from(sorted(labels)), unique=True)
                            if labels else st.just([]))
    selector = LabelSelector(match_labels={k: labels[k] for k in subset_keys})
    assert selector.matches(labels)


@given(labels=_label_sets, key=_label_keys, values=st.lists(_label_values, min_size=1))
def test_in_and_notin_are_complements(labels, key, values):
    positive = LabelSelector(match_expressions=[req(key, "In", *values)])
    negative = LabelSelector(match_expressions=[req(key, "NotIn", *values)])
    assert positive.matches(labels) != negative.matches(labels)


@given(labels=_label_sets, key=_label_keys)
def test_exists_and_does_not_exist_are_complements(labels, key):
    exists = LabelSelector(match_expressions=[req(key, "Exists")])
    absent = LabelSelector(match_expressions=[req(key, "DoesNotExist")])
    assert exists.matches(labels) != absent.matches(labels)
    assert exists.matches(labels) == (key in labels)
