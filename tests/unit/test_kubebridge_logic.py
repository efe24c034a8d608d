"""The kube bridge's pure parts: translation, lease decisions, settings, status write-back."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

from ciliary import schema
from ciliary.resources import loads
from services.kubebridge.kinds import BY_KIND, WATCHED_KINDS
from services.kubebridge.lease import LeaseView, decide, lease_body, micro_time
from services.kubebridge.settings import settings_from_env
from services.kubebridge.statusback import (
    cnp_status,
    enforcing_nodes,
    event_body,
    event_key,
    status_patch,
    with_timestamps,
)
from services.kubebridge.translate import ObjectRef, owned_by_bridge, translate
from tests.k8sdouble import fixtures


def test_the_kinds_followed_with_their_api_paths() -> None:
    from ciliary.resources import KINDS

    followed = {k.kind for k in WATCHED_KINDS}
    assert followed <= set(KINDS)
    assert followed == {"Namespace", "Node", "Pod", "Service", "EndpointSlice", "NetworkPolicy",
                        "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"}
    assert BY_KIND["Pod"].collection == "/api/v1/pods"
    assert BY_KIND["CiliumNetworkPolicy"].object_path("shop", "p", status=True) == (
        "/apis/cilium.io/v2/namespaces/shop/ciliumnetworkpolicies/p/status")
    assert BY_KIND["CiliumClusterwideNetworkPolicy"].object_path("", "c") == (
        "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies/c")


def test_translation_is_what_apply_stores_plus_the_source_mark() -> None:
    pod = fixtures.load("pod")
    item = translate(BY_KIND["Pod"], pod)
    assert item.key == "Pod.shop.web-7c5ddbdf54-x2k9q" and not item.problem
    assert item.data is not None
    record = schema.decode(item.data, schema.ResourceRecord)
    assert (record.uid, record.created, record.generation) == (
        pod["metadata"]["uid"], pod["metadata"]["creationTimestamp"], 1)
    meta = record.manifest["metadata"]
    assert not {"managedFields", "resourceVersion", "uid", "creationTimestamp"} & set(meta)
    assert "status" not in record.manifest and owned_by_bridge(item.data)
    # the same validation as apply: the stored manifest loads as a valid object
    [resource] = loads(schema.to_json(record.manifest).decode())
    assert resource.name == pod["metadata"]["name"]
    # a list item (no kind/apiVersion) and a watch object give the same bytes
    listed = {k: v for k, v in pod.items() if k not in ("kind", "apiVersion")}
    assert translate(BY_KIND["Pod"], listed).data == item.data
    changed_status = copy.deepcopy(pod)
    changed_status["status"]["phase"] = "Failed"
    changed_status["metadata"]["resourceVersion"] = "999"
    assert translate(BY_KIND["Pod"], changed_status).data == item.data


def test_translation_rejects_what_apply_rejects_naming_the_field() -> None:
    cnp = fixtures.load("cnp")
    cnp["spec"]["ingress"][0]["fromEndpoint"] = [{}]
    item = translate(BY_KIND["CiliumNetworkPolicy"], cnp)
    assert item.data is None
    assert item.problem.startswith("CiliumNetworkPolicy shop/web-ingress: ")
    assert "fromEndpoint" in item.problem
    nameless = translate(BY_KIND["Pod"], {"metadata": {"namespace": "x"}, "spec": {}})
    assert nameless.data is None and "metadata.name" in nameless.problem
    assert not owned_by_bridge(b"garbage") and not owned_by_bridge(None)


def view(holder: str, renew: str = "t1", transitions: int = 0) -> LeaseView:
    return LeaseView(holder, 15, renew, transitions, "7")


def test_lease_decisions_follow_client_go() -> None:
    assert decide(None, "a", now=0, observed_at=0) == "create"
    assert decide(view("a"), "a", now=100, observed_at=0) == "renew"
    assert decide(view(""), "a", now=1, observed_at=0) == "acquire"  # released
    assert decide(view("b"), "a", now=14.9, observed_at=0) == "wait"
    assert decide(view("b"), "a", now=15, observed_at=0) == "acquire"  # not renewed for 15 s


def test_lease_bodies_update_over_the_version_read() -> None:
    at = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)
    assert micro_time(at) == "2026-12-06T10:00:00.123456Z"
    created = lease_body("kube-system", "l", "a", 15, now=at)
    assert created["spec"] == {"holderIdentity": "a", "leaseDurationSeconds": 15,
                               "renewTime": "2026-12-06T10:00:00.123456Z",
                               "acquireTime": "2026-12-06T10:00:00.123456Z",
                               "leaseTransitions": 0}
    assert "resourceVersion" not in created["metadata"]
    taken = lease_body("kube-system", "l", "a", 15, previous=view("b", transitions=2),
                       acquire=True, now=at)
    assert taken["metadata"]["resourceVersion"] == "7"
    assert taken["spec"]["leaseTransitions"] == 3 and "acquireTime" in taken["spec"]
    renewed = lease_body("kube-system", "l", "a", 15, previous=view("a", transitions=3), now=at)
    assert renewed["spec"]["leaseTransitions"] == 3 and "acquireTime" not in renewed["spec"]
    released = lease_body("kube-system", "l", "a", 15, previous=view("a"), release=True)
    assert released["spec"]["holderIdentity"] == ""
    assert LeaseView.of(created | {"metadata": {"resourceVersion": "9"}}).record == (
        "a", "2026-12-06T10:00:00.123456Z", 0)


def test_settings_from_env_and_their_problems() -> None:
    s = settings_from_env({}, "c1", "kb-1")
    assert (s.lease_name, s.lease_namespace, s.identity, s.kubeconfig) == (
        "ciliary-kubebridge-c1", "kube-system", "kb-1", "")
    s = settings_from_env({"CILIARY_KUBE_LEASE_DURATION": "4", "CILIARY_KUBE_RENEW_DEADLINE": "3",
                           "CILIARY_KUBE_RETRY_PERIOD": "1", "CILIARY_KUBE_PAGE_SIZE": "50",
                           "CILIARY_KUBECONFIG": " /k "}, "c1", "kb")
    assert (s.lease_duration, s.renew_deadline, s.retry_period, s.page_size, s.kubeconfig) == (
        4, 3, 1, 50, "/k")
    bad = settings_from_env({"CILIARY_KUBE_LEASE_DURATION": "2", "CILIARY_KUBE_RENEW_DEADLINE": "5",
                             "CILIARY_KUBE_PAGE_SIZE": "many"}, "c1", "kb")
    assert (bad.lease_duration, bad.renew_deadline, bad.page_size) == (15, 10, 500)
    assert any("CILIARY_KUBE_PAGE_SIZE" in p for p in bad.problems)
    assert any("renew deadline" in p for p in bad.problems)


def test_cnp_status_shapes_and_patches() -> None:
    ok = {"state": "ok", "error": "", "warnings": ["w1"], "selected_identities": [5, 6]}
    nodes = enforcing_nodes([5, 6, 7], {5: {"node-1"}, 6: {"node-2", "node-1"}})
    assert nodes == {"node-1", "node-2"}
    status = cnp_status(ok, 3, nodes)
    assert status["conditions"][0]["status"] == "True" and "w1" in status["conditions"][0]["message"]
    assert status["nodes"]["node-2"] == {"ok": True, "enforcing": True, "revision": 3}
    failing = cnp_status({"state": "error", "error": "boom"}, 4, {"node-1"})
    assert failing["conditions"][0]["status"] == "False"
    assert failing["nodes"]["node-1"] == {"ok": False, "enforcing": False, "revision": 4,
                                          "error": "boom"}
    rejected = cnp_status(None, 0, set(), "spec.x: unknown field")
    assert rejected["conditions"][0]["message"] == "spec.x: unknown field"
    assert cnp_status(None, 0, set())["conditions"][0]["status"] == "Unknown"
    stamped = with_timestamps(status, "T")
    assert stamped["nodes"]["node-1"]["lastUpdated"] == "T"
    patch = status_patch(status, with_timestamps(cnp_status(ok, 3, {"node-1"}), "T"))
    assert patch["status"]["nodes"]["node-2"] is None  # a node no longer enforcing is removed


def test_events_name_their_object_once_per_version() -> None:
    ref = ObjectRef("CiliumClusterwideNetworkPolicy", "", "c", "uid-1", "42", 1)
    body = event_body(ref, "PolicyRejected", "x" * 5000, now="T", instance="kb-1")
    assert body["metadata"]["namespace"] == "default"
    assert body["involvedObject"] == {"apiVersion": "cilium.io/v2",
                                      "kind": "CiliumClusterwideNetworkPolicy", "name": "c",
                                      "uid": "uid-1", "resourceVersion": "42"}
    assert len(body["message"]) == 1024 and body["type"] == "Warning"
    assert event_key(ref, "PolicyRejected") != event_key(
        ObjectRef("CiliumClusterwideNetworkPolicy", "", "c", "uid-1", "43", 2), "PolicyRejected")


def test_status_says_embedded_or_which_api_server() -> None:
    from ciliary.status import resource_source, resource_source_line

    def report(service: str, instance: str, **detail: object) -> schema.HealthReport:
        return schema.HealthReport(service=service, instance=instance, pid=1, version="v",
                                   started=0.0, healthy=True, detail=dict(detail))

    embedded = [report("identity", "identity"), report("policy", "policy")]
    assert resource_source(embedded) == {"mode": "embedded"}
    assert resource_source_line(resource_source(embedded)) == (
        "resources: embedded (written by ciliary apply)")
    bridged = embedded + [report("kubebridge", "kb-a", apiserver="https://10.0.0.1:6443", leader=False),
                          report("kubebridge", "kb-b", apiserver="https://10.0.0.1:6443", leader=True)]
    source = resource_source(bridged)
    assert source == {"mode": "apiserver", "apiserver": "https://10.0.0.1:6443", "leader": "kb-b",
                      "replicas": 2}
    assert resource_source_line(source) == ("resources: Kubernetes API server "
                                            "https://10.0.0.1:6443 (kube bridge leader kb-b, 2 replicas)")


def test_up_with_a_kubeconfig_runs_the_bridge_before_the_nodes(tmp_path: Path) -> None:
    from ciliary.cli.app import build_parser
    from ciliary.supervisor import Supervisor

    embedded = Supervisor(data_dir=tmp_path, nodes=1)
    embedded._plan_children()
    assert "kubebridge" not in [c.name for c in embedded.children]  # embedded: apply only
    bridged = Supervisor(data_dir=tmp_path, nodes=2, kubeconfig="/etc/k.conf")
    bridged._plan_children()
    names = [c.name for c in bridged.children]
    assert names.index("kubebridge") < names.index("node/node-1")
    child = bridged.children[names.index("kubebridge")]
    assert child.argv[-2:] == ["-m", "services.kubebridge"]
    assert child.env["CILIARY_KUBECONFIG"] == "/etc/k.conf"
    assert child.env["CILIARY_INSTANCE"] == "kubebridge"
    args = build_parser().parse_args(["up", "-d", "--kubeconfig", "k.conf"])
    assert args.kubeconfig == "k.conf"
