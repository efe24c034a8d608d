"""Valid manifests: every kind decodes, round-trips and keeps its Kubernetes/Cilium meaning."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import msgspec
import pytest
import yaml

from ciliary.resources import (
    KINDS,
    Resource,
    decode,
    load_manifests,
    loads,
    resource_from_manifest,
    to_manifest,
)
from ciliary.resources import model as m

DATA = Path(__file__).parent / "data" / "manifests"


def _load(name: str) -> list[Resource]:
    return load_manifests([str(DATA / name)])


def test_every_kind_loads_in_order():
    resources = _load("shop.yaml")
    assert [r.key for r in resources] == [
        "Namespace/_/shop",
        "Node/_/node-1",
        "Pod/shop/payments-0",
        "Service/shop/payments",
        "EndpointSlice/shop/payments-abc12",
        "NetworkPolicy/shop/payments-from-checkout",
        "CiliumNetworkPolicy/shop/payments-egress",
        "CiliumClusterwideNetworkPolicy/_/host-ssh",
        "ServiceExport/shop/payments",
        "ServiceImport/shop/payments",
    ]
    assert sorted({r.kind for r in resources}) == sorted(KINDS)
    for r in resources:
        assert r.api_version == KINDS[r.kind].api_version
        assert isinstance(decode(r), KINDS[r.kind].model)


def test_every_kind_round_trips_through_to_manifest_and_json():
    for resource in _load("shop.yaml"):
        typed = decode(resource)
        manifest = to_manifest(typed)
        assert manifest["apiVersion"] == resource.api_version
        assert manifest["kind"] == resource.kind
        assert decode(resource.kind, manifest, validate=True) == typed
        wire = msgspec.json.encode(resource)
        assert msgspec.json.decode(wire, type=Resource) == resource
        assert decode(msgspec.json.decode(wire, type=Resource)) == typed


def test_manifest_is_kept_as_written_with_namespace_defaulted():
    text = (DATA / "shop.yaml").read_text()
    raw = [d for d in yaml.safe_load_all(text) if d]
    resources = loads(text)
    for doc, resource in zip(raw, resources, strict=True):
        assert resource.manifest == doc  # every shop.yaml object names its namespace
    (pod,) = loads("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
                   "spec: {containers: [{name: c, image: i}]}\n")
    assert pod.namespace == "default"
    assert pod.manifest["metadata"] == {"name": "p", "namespace": "default"}


def test_cluster_scoped_objects_have_no_namespace():
    (node,) = loads("apiVersion: v1\nkind: Node\nmetadata: {name: n1, namespace: shop}\n")
    assert node.namespace == ""
    assert node.key == "Node/_/n1"
    assert "namespace" not in node.manifest["metadata"]


def test_input_objects_are_not_mutated():
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"ports": [{"port": 80}]}}
    before = copy.deepcopy(obj)
    resource = resource_from_manifest(obj)
    assert obj == before
    assert resource.manifest["metadata"]["namespace"] == "default"


def test_pod_fields_and_defaults():
    pod = decode(_load("shop.yaml")[2])
    assert isinstance(pod, m.Pod)
    assert pod.metadata.labels == {"app": "payments", "app.kubernetes.io/version": "1.4"}
    assert pod.spec.node_name == "node-1"
    server, sidecar = pod.spec.containers
    assert server.command == ["python", "-m", "http.server"]
    assert server.env == [m.EnvVar(name="PORT", value="8080")]
    assert server.ports == [m.ContainerPort(container_port=8080, name="http", protocol="TCP")]
    assert server.readiness_probe is not None
    assert server.readiness_probe.tcp_socket == m.TCPSocketAction(port="http")
    assert server.readiness_probe.period_seconds == 2
    assert sidecar.readiness_probe is not None and sidecar.readiness_probe.exec is not None
    assert pod.status is not None and pod.status.pod_ip == "10.244.1.7"
    assert pod.status.is_ready()
    bare = decode("Pod", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                          "spec": {"containers": [{"name": "c", "image": "i"}]}})
    assert bare.spec.service_account_name == "default"
    assert bare.spec.restart_policy == "Always"
    assert bare.spec.termination_grace_period_seconds == 30
    assert bare.status is None


def test_service_fields_and_defaults():
    svc = decode(_load("shop.yaml")[3])
    assert isinstance(svc, m.Service)
    http, metrics = svc.spec.ports
    assert (http.port, http.target_port, http.node_port, http.app_protocol) == (
        80, "http", 30080, "http")
    assert metrics.effective_target_port() == 9090
    assert svc.spec.affinity_timeout() == 600
    assert svc.spec.external_traffic_policy == "Local"
    assert svc.spec.cluster_ip == "10.96.0.42"
    assert svc.status is not None and svc.status.load_balancer.ingress[0].ip == "203.0.113.10"
    (plain,) = loads("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
                     "spec: {ports: [{port: 80}], sessionAffinity: ClientIP}\n")
    spec = decode(plain).spec
    assert spec.type == "ClusterIP"
    assert spec.ports[0].protocol == "TCP"
    assert spec.ports[0].effective_target_port() == 80
    assert spec.affinity_timeout() == 10800
    assert spec.internal_traffic_policy == "Cluster"


def test_endpoint_slice_and_node():
    resources = _load("shop.yaml")
    eps = decode(resources[4])
    assert isinstance(eps, m.EndpointSlice)
    assert eps.service_name == "payments"
    (endpoint,) = eps.endpoints
    assert endpoint.target_ref == m.ObjectReference(
        kind="Pod", namespace="shop", name="payments-0",
        uid="6b1f1f0e-2f7c-4d5e-9d1a-1f2e3d4c5b6a")
    assert (endpoint.is_ready(), endpoint.is_serving(), endpoint.is_terminating()) == (
        True, True, False)
    assert [p.port for p in eps.ports] == [8080, 9090]
    unknown = m.Endpoint(addresses=["10.0.0.1"])
    assert (unknown.is_ready(), unknown.is_serving(), unknown.is_terminating()) == (
        True, True, False)
    draining = m.Endpoint(addresses=["10.0.0.1"],
                          conditions=m.EndpointConditions(ready=False, terminating=True))
    assert (draining.is_ready(), draining.is_serving()) == (False, False)
    node = decode(resources[1])
    assert node.spec.cidrs() == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert node.status.address() == "192.168.56.11"


def test_cilium_documentation_examples_decode():
    resources = _load("cilium-examples.yaml")
    l34 = decode(resources[0])
    assert isinstance(l34, m.CiliumNetworkPolicy)
    (rule,) = l34.rules
    allow, entities = rule.ingress
    assert allow.from_endpoints[0].match_labels == {"role": "frontend"}
    assert [(p.port, p.end_port, p.protocol) for p in allow.to_ports[0].ports] == [
        ("80", 0, "TCP"), ("8000", 8080, "TCP")]
    assert entities.from_entities == ["world", "remote-node"]
    assert [(f.type, f.family) for f in entities.icmps[0].fields] == [
        (8, "IPv4"), ("EchoRequest", "IPv6")]
    assert rule.ingress_deny[0].from_entities == ["world"]
    assert rule.ingress_deny[0].to_ports[0].ports[0].port == "22"
    cidr_set = rule.egress[0].to_cidr_set[0]
    assert (cidr_set.cidr, cidr_set.except_) == ("10.0.0.0/8", ["10.96.0.0/12"])
    assert rule.egress[0].to_ports[0].ports[0].protocol == "ANY"
    assert rule.egress[1].to_cidr == ["192.0.2.1", "198.51.100.0/24"]
    assert rule.egress[2].to_entities == ["kube-apiserver"]
    assert rule.egress[3].to_services[0].k8s_service == m.K8sServiceNamespace(
        service_name="legacy-db", namespace="default")
    assert rule.egress_deny[0].to_endpoints[0].match_expressions[0].operator == "NotIn"
    assert rule.default_deny() == (True, False)

    fqdn = decode(resources[1]).rules[0]
    assert [(s.match_name, s.match_pattern) for s in fqdn.egress[0].to_fqdns] == [
        ("api.github.com", ""), ("", "*.cilium.io")]
    dns_rule = fqdn.egress[1].to_ports[0]
    assert dns_rule.rules is not None and dns_rule.rules.dns[0].match_pattern == "*"
    assert fqdn.egress[1].to_endpoints[0].match_labels["k8s:k8s-app"] == "kube-dns"
    assert fqdn.default_deny() == (False, True)

    http = decode(resources[2]).rules[0].ingress[0].to_ports[0].rules
    assert http is not None
    assert [(h.method, h.path) for h in http.http] == [
        ("POST", "/v1/request-landing"), ("GET", "/v1/.*")]

    multi = decode(resources[3])
    assert multi.spec is None and len(multi.rules) == 2
    assert multi.rules[0].ingress[0].to_ports[0].ports[0].port == "http"
    assert multi.rules[1].endpoint_selector == m.LabelSelector()

    host = decode(resources[4])
    assert isinstance(host, m.CiliumClusterwideNetworkPolicy)
    assert host.rules[0].node_selector == m.LabelSelector(match_labels={"node-access": "ssh"})
    assert host.rules[0].endpoint_selector is None


def test_cilium_port_numbers_are_normalised_to_strings():
    resources = _load("shop.yaml")
    cnp = decode(resources[6])
    assert cnp.rules[0].egress[0].to_ports[0].ports[0].port == "443"
    assert resources[6].manifest["spec"]["egress"][0]["toPorts"][0]["ports"][0]["port"] == 443
    (named,) = loads(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: n}\n"
        "spec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n"
        "    - ports: [{port: HTTP}, {port: '0'}]\n"
    )
    ports = decode(named).rules[0].ingress[0].to_ports[0].ports
    assert [(p.port, p.is_named()) for p in ports] == [("http", True), ("0", False)]


def test_kubernetes_documentation_network_policies_decode():
    resources = _load("k8s-netpol-docs.yaml")
    assert [r.name for r in resources] == [
        "test-network-policy", "default-deny-ingress", "allow-all-ingress", "default-deny-all",
        "multi-port-egress"]
    full = decode(resources[0]).spec
    block, ns_peer, pod_peer = full.ingress[0].from_
    assert block.ip_block == m.IPBlock(cidr="172.17.0.0/16", except_=["172.17.1.0/24"])
    assert ns_peer.namespace_selector == m.LabelSelector(match_labels={"project": "myproject"})
    assert ns_peer.pod_selector is None
    assert pod_peer.pod_selector == m.LabelSelector(match_labels={"role": "frontend"})
    assert full.ingress[0].ports == [m.NetworkPolicyPort(protocol="TCP", port=6379)]
    assert full.effective_policy_types() == ["Ingress", "Egress"]
    deny = decode(resources[1]).spec
    assert deny.pod_selector.is_empty() and deny.ingress == []
    allow_all = decode(resources[2]).spec
    assert allow_all.ingress == [m.NetworkPolicyIngressRule()]
    ranged = decode(resources[4]).spec.egress[0].ports[0]
    assert (ranged.port, ranged.end_port, ranged.protocol) == (32000, 32768, "TCP")
    implicit = decode("NetworkPolicy", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "x"},
        "spec": {"podSelector": {}, "egress": [{}]}})
    assert implicit.spec.effective_policy_types() == ["Ingress", "Egress"]


def test_list_documents_are_expanded():
    resources = _load("list.yaml")
    assert [r.key for r in resources] == ["Pod/default/a", "Pod/other/b", "Service/default/web"]
    assert resources[2].manifest["apiVersion"] == "v1"
    assert resources[2].manifest["kind"] == "Service"


def test_json_file_input():
    resources = _load("objects.json")
    assert [r.key for r in resources] == [
        "Service/json/api", "CiliumNetworkPolicy/json/api-ingress"]
    assert decode(resources[0]).spec.ports[0].target_port == 8443


def test_directory_input_reads_manifest_files_sorted():
    resources = load_manifests([str(DATA / "dir")])
    assert [r.key for r in resources] == ["Namespace/_/dir-ns", "Pod/dir-ns/web", "Node/_/node-2"]


def test_stdin_input_yaml_and_json():
    text = (DATA / "dir" / "20-pod.yml").read_text()
    (pod,) = load_manifests(["-"], stdin=io.StringIO(text))
    assert pod.key == "Pod/dir-ns/web"
    doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "from-json"}}
    (ns,) = load_manifests(["-"], stdin=io.StringIO(json.dumps(doc, indent="\t")))
    assert ns.key == "Namespace/_/from-json"


def test_stdin_problems_are_reported_as_stdin():
    from ciliary.resources import ManifestError

    with pytest.raises(ManifestError) as info:
        load_manifests(["-"], stdin=io.StringIO("---\n---\napiVersion: v1\nkind: Namespace\n"))
    (problem,) = info.value.problems
    # The leading "---" opens document 0 (empty); the second opens document 1.
    assert str(problem) == "<stdin>: document 1: Namespace <unnamed>: metadata.name: " \
        "name is required"


def test_mixed_paths_and_empty_documents():
    stdin = io.StringIO("---\n# nothing here\n---\n")
    resources = load_manifests([str(DATA / "dir"), "-", str(DATA / "list.yaml")], stdin=stdin)
    assert len(resources) == 6


def test_null_values_mean_unset():
    (pod,) = loads("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n"
                   "  creationTimestamp: null\nspec:\n  containers:\n  - name: c\n    image: i\n"
                   "    ports:\n")
    typed = decode(pod)
    assert typed.metadata.labels == {} and typed.spec.containers[0].ports == []


def test_timestamps_stay_strings():
    (ns,) = loads("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: n\n"
                  "  creationTimestamp: 2024-05-01T10:00:00Z\n")
    assert ns.manifest["metadata"]["creationTimestamp"] == "2024-05-01T10:00:00Z"
    assert decode(ns).metadata.creation_timestamp == "2024-05-01T10:00:00Z"


def test_decode_rejects_bad_stored_manifest():
    from ciliary.resources import ManifestError

    with pytest.raises(ManifestError) as info:
        decode("Service", {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"name": "s", "namespace": "x"},
                           "spec": {"ports": [{"port": "eighty"}]}})
    (problem,) = info.value.problems
    assert (problem.kind, problem.namespace, problem.name, problem.field) == (
        "Service", "x", "s", "spec.ports[0].port")
    with pytest.raises(ManifestError):
        decode("Service", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                           "spec": {"ports": [{"port": 0}]}}, validate=True)


def test_null_in_string_maps_means_empty_string():
    (svc,) = loads("apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  labels:\n    a:\n"
                   "spec:\n  selector:\n    canary:\n  ports: [{port: 80}]\n")
    typed = decode(svc)
    assert typed.metadata.labels == {"a": ""}
    assert typed.spec.selector == {"canary": ""}
    (np,) = loads("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\n"
                  "spec:\n  podSelector:\n    matchLabels:\n      role:\n")
    selector = decode(np).spec.pod_selector
    assert selector.match_labels == {"role": ""}
    assert not selector.matches({"role": "db"})
