"""Preflight label hygiene on kubectl-shaped pod lists, and the errors of bad lists."""

from __future__ import annotations

import json
import uuid

import pytest

from ciliary import schema
from ciliary.preflight import labels, pods
from ciliary.resources import ManifestError


def pod(name: str, labels_: dict[str, object], *, namespace: str = "shop", node: str = "worker-1",
        **spec: object) -> dict[str, object]:
    """A pod as ``kubectl get pods -o json`` prints it (the fields preflight reads and some it ignores)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels_,
                     "uid": str(uuid.uuid4()), "resourceVersion": "1",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                                          "uid": str(uuid.uuid4()), "controller": True}]},
        "spec": {"nodeName": node, "serviceAccountName": "default", "dnsPolicy": "ClusterFirst",
                 "containers": [{"name": "c", "image": "nginx:1.25", "ports": [{"containerPort": 80}]}],
                 **spec},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "qosClass": "BestEffort",
                   "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": None}]},
    }


def pod_list(items: list[dict[str, object]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items})


def deployments(apps: int, replicas: int, **extra_labels) -> list[dict[str, object]]:
    """``apps`` Deployments of ``replicas`` pods with their pod-template-hash labels."""
    out = []
    for a in range(apps):
        for r in range(replicas):
            extra = {k: f(a, r) for k, f in extra_labels.items()}
            out.append(pod(f"app{a}-5d8f7c9b{a:02d}-x{r:04d}",
                           {"app": f"app{a}", "pod-template-hash": f"5d8f7c9b{a:02d}", **extra},
                           node=f"worker-{r % 3}"))
    return out


def analyse(text: str, **kw) -> labels.LabelHygiene:
    parsed = pods.parse_pod_list(text, "pods.json")
    return labels.analyse(parsed.pods, parsed.namespace_labels, **kw)


def test_a_clean_list_makes_one_identity_per_app() -> None:
    h = analyse(pod_list(deployments(4, 6)))
    assert (h.pods, h.endpoints, h.identities) == (24, 24, 4)
    assert h.status == labels.OK and not h.flagged and h.reasons == []
    assert h.suggested_patterns == [] and h.identities_suggested == 4
    keys = {row.key for row in h.labels}
    assert "k8s:pod-template-hash" not in keys  # excluded by Cilium's default filter


def test_a_uid_label_explodes_identities_and_the_suggested_filter_removes_it() -> None:
    items = deployments(3, 10, **{"request-id": lambda a, r: str(uuid.uuid4())})
    h = analyse(pod_list(items))
    assert h.identities == 30
    assert [row.key for row in h.flagged] == ["k8s:request-id"]
    assert h.suggested_patterns == [r"k8s:!request\-id$"]
    assert h.identities_suggested == 3
    assert h.status == labels.FAIL
    assert any("k8s:request-id" in r and "30 -> 3" in r for r in h.reasons)


def test_hash_and_timestamp_labels_are_flagged_a_replica_set_hash_is_excluded_by_default() -> None:
    # a rollout label whose values are hashes (one per revision) and a deploy timestamp
    items = deployments(2, 10, **{"rollout": lambda a, r: f"{r % 5:02d}c0ffee{a:02d}",
                                  "deployed-at": lambda a, r: str(1714556400 + r)})
    h = analyse(pod_list(items))
    flagged = {row.key for row in h.flagged}
    assert flagged == {"k8s:rollout", "k8s:deployed-at"}
    assert h.identities == 20 and h.identities_suggested == 2
    assert len(h.suggested_patterns) == 2


def test_more_identities_than_the_cluster_range_fails() -> None:
    facts = [pods.PodFacts("batch", f"job-{i}", "w1", {"app": "job", "shard": str(i % 65_600)}, "default", True)
             for i in range(65_600)]
    h = labels.analyse(facts, {}, cluster_id=1, min_pods=10**6)  # only the count speaks
    assert h.identities == 65_600 > h.ceiling.per_cluster == 65_536
    assert h.status == labels.FAIL
    assert h.reasons == ["65,600 identities exceed the cluster's 65,536-identity range"]
    h.identities, h.ceiling = 65_300, labels.identity_ceiling(0)  # cluster 0 starts above the reserved ids
    labels.judge(h)
    assert h.ceiling.per_cluster == 65_280 and h.status == labels.FAIL


def test_over_half_the_range_warns() -> None:
    facts = [pods.PodFacts("ns", f"p{i}", "", {"app": f"a{i}"}, "default", True) for i in range(40_000)]
    h = labels.analyse(facts, {}, cluster_id=1, min_pods=50_000)  # nothing flagged: only the size speaks
    assert h.status == labels.WARN and "over half" in h.reasons[0]


def test_identity_ceiling_follows_the_cluster_id_layout() -> None:
    assert labels.identity_ceiling(0).per_cluster == 65_536 - schema.IDENTITY_MIN_CLUSTER
    assert labels.identity_ceiling(7).per_cluster == 65_536
    mesh = labels.identity_ceiling(7, clusters=4)
    assert mesh.per_cluster == 65_536 and "262,144" in mesh.note
    too_many = labels.identity_ceiling(7, clusters=300)
    assert too_many.per_cluster == 0 and "at most 255 clusters" in too_many.note
    facts = [pods.PodFacts("ns", "p", "", {"app": "a"}, "default", True)]
    assert labels.analyse(facts, {}, cluster_id=7, clusters=300).status == labels.FAIL


def test_namespace_labels_and_label_filter_count() -> None:
    items = deployments(1, 4)
    items += [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}},
              {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"ports": [{"port": 80}]}}]
    parsed = pods.parse_pod_list(pod_list(items), "pods.json")
    assert parsed.namespace_labels == {"shop": {"team": "a"}}
    assert parsed.skipped == {"Service": 1}
    sets = labels.label_sets(parsed.pods, parsed.namespace_labels, labels.LabelFilter.from_config(), "default")
    assert "k8s:io.cilium.k8s.namespace.labels.team=a" in sets[0]
    # a filter that keeps only app makes the namespace's labels irrelevant
    only_app = labels.analyse(parsed.pods, parsed.namespace_labels, label_patterns=["k8s:app"])
    assert only_app.identities == 1


def test_host_network_and_finished_pods_get_no_identity() -> None:
    items = deployments(1, 2)
    items.append(pod("hostnet", {"app": "agent"}, hostNetwork=True))
    done = pod("done", {"app": "job"})
    done["status"] = {"phase": "Succeeded"}
    items.append(done)
    parsed = pods.parse_pod_list(pod_list(items), "pods.json")
    assert len(parsed.pods) == 4 and len(parsed.endpoints) == 2
    assert parsed.per_node() == {"worker-0": 1, "worker-1": 1}


def test_a_bare_list_and_an_empty_list() -> None:
    parsed = pods.parse_pod_list(json.dumps(deployments(1, 3)), "bare.json")
    assert len(parsed.pods) == 3
    assert pods.parse_pod_list(pod_list([]), "empty.json").pods == []


@pytest.mark.parametrize(("mutate", "item", "field"), [
    (lambda p: p["metadata"]["labels"].update(app=5), 1, "metadata.labels[app]"),
    (lambda p: p["metadata"].pop("name"), 1, "metadata.name"),
    (lambda p: p["spec"].update(hostNetwork="yes"), 1, "spec.hostNetwork"),
    (lambda p: p["metadata"]["labels"].update({"bad key!": "x"}), 1, "metadata.labels"),
])
def test_a_malformed_item_is_named_with_its_field(mutate, item: int, field: str) -> None:
    items = deployments(1, 2)
    mutate(items[item])
    for text in (pod_list(items), json.dumps(items)):  # a List and a bare list number items alike
        with pytest.raises(ManifestError) as err:
            pods.parse_pod_list(text, "pods.json")
        message = str(err.value)
        assert f"item {item}" in message and field in message, message


def test_an_item_that_is_not_an_object_is_named() -> None:
    with pytest.raises(ManifestError) as err:
        pods.parse_pod_list(json.dumps([pod("a", {"app": "a"}), "oops"]), "pods.json")
    assert "item 1" in str(err.value)
