"""Identity-relevant label filtering, as Cilium's labelsfilter defaults decide it."""

from __future__ import annotations

import pytest

from services.identity.labels import (
    DEFAULT_PATTERNS,
    Label,
    LabelFilter,
    LabelPattern,
    PatternError,
    cidr_labels,
    explain,
    identity_labels,
    label_set_hash,
)

CLUSTER = "c1"

# (pod labels, labels expected kept, labels expected excluded); namespace "shop" with
# label team=a, service account "default" and cluster "c1" are added to every set.
TABLE: list[tuple[dict[str, str], set[str], set[str]]] = [
    ({"app": "web"}, {"app"}, set()),
    ({"app": "web", "pod-template-hash": "5d8f7c9b6"}, {"app"}, {"pod-template-hash"}),
    ({"app": "db", "controller-revision-hash": "db-7c9"}, {"app"}, {"controller-revision-hash"}),
    ({"app": "ds", "pod-template-generation": "3"}, {"app"}, {"pod-template-generation"}),
    ({"app": "db", "statefulset.kubernetes.io/pod-name": "db-0", "apps.kubernetes.io/pod-index": "0"},
     {"app"}, {"statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index"}),
    ({"job-name": "backup", "batch.kubernetes.io/job-completion-index": "4",
      "batch.kubernetes.io/controller-uid": "1f2e", "controller-uid": "1f2e"},
     {"job-name"},  # Cilium keeps job-name by default; its docs show how to exclude it
     {"batch.kubernetes.io/job-completion-index", "batch.kubernetes.io/controller-uid", "controller-uid"}),
    ({"batch.kubernetes.io/job-name": "backup"}, {"batch.kubernetes.io/job-name"}, set()),
    ({"app": "x", "kubernetes.io/hostname": "n1"}, {"app"}, {"kubernetes.io/hostname"}),
    ({"app.kubernetes.io/name": "shop", "app.kubernetes.io/instance": "shop-1"},
     {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, set()),
    ({"beta.kubernetes.io/arch": "amd64", "failure-domain.beta.kubernetes.io/zone": "a"},
     set(), {"beta.kubernetes.io/arch", "failure-domain.beta.kubernetes.io/zone"}),
    ({"k8s.io/owner": "me", "sigs.k8s.io/tool": "kind"}, {"sigs.k8s.io/tool"}, {"k8s.io/owner"}),
    ({"topology.kubernetes.io/zone": "z1", "node.kubernetes.io/pool": "p"},
     {"topology.kubernetes.io/zone", "node.kubernetes.io/pool"}, set()),  # not a kubernetes.io prefix
    ({"io.kubernetes.pod.name": "web-1", "io.kubernetes.container.hash": "cf58"},
     set(), {"io.kubernetes.pod.name", "io.kubernetes.container.hash"}),
    ({"annotation.kubectl.kubernetes.io": "x", "annotation.hello": "w"},
     set(), {"annotation.kubectl.kubernetes.io", "annotation.hello"}),
    ({"etcd_node": "etcd-6snk", "app": "etcd"}, {"app"}, {"etcd_node"}),
    ({"io.cilium.k8s.policy.serviceaccount": "admin", "io.cilium.k8s.namespace.labels.team": "b"},
     set(), {"io.cilium.k8s.policy.serviceaccount", "io.cilium.k8s.namespace.labels.team"}),
    ({"io.kubernetes.pod.namespace": "kube-system", "tier": "api"}, {"tier"}, {"io.kubernetes.pod.namespace"}),
    ({"version": "v2", "ioXkubernetes": "foo"}, {"version", "ioXkubernetes"}, set()),
]


@pytest.mark.parametrize(("pod_labels", "kept", "excluded"), TABLE)
def test_default_filter_table(pod_labels: dict[str, str], kept: set[str], excluded: set[str]) -> None:
    flt = LabelFilter.from_config()
    verdicts = [v for v in explain(flt, pod_labels, "shop", {"team": "a"}, "default", CLUSTER) if v.origin == "pod"]
    assert {v.label.key for v in verdicts if v.kept} == kept
    assert {v.label.key for v in verdicts if not v.kept} == excluded
    result = identity_labels(flt, pod_labels, "shop", {"team": "a"}, "default", CLUSTER)
    # the injected labels are always there, with ciliary's values (never the pod's own)
    assert "k8s:io.kubernetes.pod.namespace=shop" in result
    assert "k8s:io.cilium.k8s.namespace.labels.team=a" in result
    assert "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop" in result
    assert "k8s:io.cilium.k8s.policy.serviceaccount=default" in result
    assert f"k8s:io.cilium.k8s.policy.cluster={CLUSTER}" in result
    assert result == tuple(sorted(result))
    assert len(TABLE) >= 15


def test_defaults_match_cilium() -> None:
    assert DEFAULT_PATTERNS[0] == "reserved:.*"
    exclusions = {p for p in DEFAULT_PATTERNS if p.startswith("!")}
    assert r"!pod-template-hash" in exclusions and r"!controller-uid" in exclusions
    assert r"!.*beta\.kubernetes\.io" in exclusions


def test_pattern_matching_is_anchored_and_by_source() -> None:
    p = LabelPattern.parse(r"k8s:!foo")
    assert p.ignore and p.source == "k8s"
    assert p.match_length(Label("k8s", "foo.bar")) == 3
    assert p.match_length(Label("k8s", "x.foo")) == -1  # anchored at the start of the key
    assert p.match_length(Label("container", "foo")) == -1  # other source
    assert LabelPattern.parse("any:foo").source == ""
    with pytest.raises(PatternError):
        LabelPattern.parse("k8s:!")
    with pytest.raises(PatternError):
        LabelPattern.parse("k8s:(")


def test_user_exclusion_and_inclusion() -> None:
    flt = LabelFilter.from_string(r"k8s:!job-name k8s:!version$")
    assert not flt.keeps(Label("k8s", "job-name", "x"))
    assert not flt.keeps(Label("k8s", "version", "1"))
    assert flt.keeps(Label("k8s", "versioned", "1"))
    assert flt.keeps(Label("k8s", "app", "x"))  # no inclusion pattern: everything else stays

    flt = LabelFilter.from_string("k8s:app k8s:name")  # Cilium's doc example: inclusion mode
    assert flt.whitelist
    assert flt.keeps(Label("k8s", "app-production", "x"))  # prefix semantics
    assert flt.keeps(Label("k8s", "name-defined", "x"))
    assert not flt.keeps(Label("k8s", "team", "x"))
    assert not flt.keeps(Label("container", "app", "x"))  # the pattern is for source k8s only
    # the default inclusions still apply in inclusion mode
    assert flt.keeps(Label("k8s", "io.kubernetes.pod.namespace", "x"))
    assert flt.keeps(Label("k8s", "io.cilium.k8s.namespace.labels.team", "x"))
    assert flt.keeps(Label("reserved", "host"))
    kept, rule, reason = flt.decide(Label("k8s", "team", "x"))
    assert not kept and rule == "" and "none matches" in reason


def test_longest_inclusion_beats_shorter_exclusion() -> None:
    flt = LabelFilter.from_string(r"k8s:!foo k8s:foo\.bar")
    assert flt.keeps(Label("k8s", "foo.bar", "1"))
    assert not flt.keeps(Label("k8s", "foo.baz", "1"))
    kept, rule, reason = flt.decide(Label("k8s", "foo.bar", "1"))
    assert kept and rule == r"k8s:foo\.bar" and "outranks" in reason


def test_explain_output() -> None:
    flt = LabelFilter.from_config()
    verdicts = explain(flt, {"app": "web", "pod-template-hash": "abc", "io.cilium.k8s.policy.cluster": "evil"},
                       "shop", {}, "api", CLUSTER)
    by_label = {str(v.label): v for v in verdicts}
    assert by_label["k8s:app=web"].kept and by_label["k8s:app=web"].rule == ""
    assert "identity-relevant by default" in by_label["k8s:app=web"].reason
    hash_verdict = by_label["k8s:pod-template-hash=abc"]
    assert not hash_verdict.kept and hash_verdict.rule == "!pod-template-hash"
    assert hash_verdict.reason == "excluded by default pattern"
    spoof = by_label["k8s:io.cilium.k8s.policy.cluster=evil"]
    assert not spoof.kept and spoof.origin == "pod" and spoof.rule == "sanitize"
    injected = by_label[f"k8s:io.cilium.k8s.policy.cluster={CLUSTER}"]
    assert injected.kept and injected.origin == "injected"
    assert by_label["k8s:io.cilium.k8s.policy.serviceaccount=api"].kept
    ns = by_label["k8s:io.kubernetes.pod.namespace=shop"]
    assert ns.kept and "outranks" in ns.reason  # include (27 chars) beats !io.kubernetes (13)
    assert by_label["k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop"].origin == "namespace"
    # explain and identity_labels agree
    assert sorted(str(v.label) for v in verdicts if v.kept) == list(
        identity_labels(flt, {"app": "web", "pod-template-hash": "abc", "io.cilium.k8s.policy.cluster": "evil"},
                        "shop", {}, "api", CLUSTER))


def test_excluded_labels_do_not_change_the_identity() -> None:
    flt = LabelFilter.from_config()
    one = identity_labels(flt, {"app": "web", "pod-template-hash": "aaa"}, "shop", {}, "default", CLUSTER)
    two = identity_labels(flt, {"app": "web", "pod-template-hash": "bbb"}, "shop", {}, "default", CLUSTER)
    other_ns = identity_labels(flt, {"app": "web"}, "other", {}, "default", CLUSTER)
    assert one == two and label_set_hash(one) == label_set_hash(two)
    assert one != other_ns


def test_label_strings_and_cidr_labels() -> None:
    assert str(Label("k8s", "app", "web")) == "k8s:app=web"
    assert str(Label("reserved", "host")) == "reserved:host"
    assert Label.parse("k8s:app=web") == Label("k8s", "app", "web")
    assert Label.parse("app.kubernetes.io/name=x") == Label("k8s", "app.kubernetes.io/name", "x")
    assert cidr_labels("10.0.0.0/8") == ("cidr:10.0.0.0/8", "reserved:world")
    assert label_set_hash(["b", "a"]) == label_set_hash(["a", "b"])
