"""Malformed manifests: each yields structured problems naming file, document, object and field."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from ciliary.resources import ManifestError, Problem, load_manifests, loads

NAMESPACE: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "containers": [
            {"name": "main", "image": "busybox", "ports": [{"name": "http", "containerPort": 80}]}
        ]
    },
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "payments", "namespace": "default"},
    "spec": {"selector": {"app": "payments"}, "ports": [{"name": "http", "port": 80}]},
}
SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {"name": "payments-1", "labels": {"kubernetes.io/service-name": "payments"}},
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["10.0.0.1"]}],
    "ports": [{"name": "http", "port": 8080}],
}
NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-1"},
    "spec": {"podCIDR": "10.244.1.0/24"},
}
NETPOL: dict[str, Any] = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "db", "namespace": "shop"},
    "spec": {
        "podSelector": {"matchLabels": {"role": "db"}},
        "ingress": [
            {
                "from": [{"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}}],
                "ports": [{"protocol": "TCP", "port": 6379}],
            }
        ],
        "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": 32000, "endPort": 32768}]}],
    },
}
CNP: dict[str, Any] = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "backend", "namespace": "shop"},
    "spec": {
        "endpointSelector": {"matchLabels": {"role": "backend"}},
        "ingress": [
            {
                "fromEndpoints": [{"matchLabels": {"role": "frontend"}}],
                "fromEntities": ["world"],
                "toPorts": [
                    {
                        "ports": [{"port": "80", "protocol": "TCP"}],
                        "rules": {"http": [{"method": "GET", "path": "/"}]},
                    }
                ],
            }
        ],
        "egress": [
            {
                "toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}],
                "toPorts": [{"ports": [{"port": "5432", "endPort": 5440, "protocol": "TCP"}]}],
            },
            {"toFQDNs": [{"matchName": "api.github.com"}]},
            {"icmps": [{"fields": [{"type": 8}]}]},
        ],
    },
}

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def patch(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with `path` (``a.b[0].c``) set to `value` (``DELETE`` removes it)."""
    obj = copy.deepcopy(base)
    parts = [int(m[2]) if m[2] else m[1] for m in _PATH_PART.finditer(path)]
    target: Any = obj
    for part in parts[:-1]:
        target = target[part]
    if value is DELETE:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return obj


DELETE = object()


def case(case_id, doc, field, message, *, kind, ns, name, document=1, item=None):
    """A bad object placed after one valid Namespace (so it is document 1 by default)."""
    return pytest.param(doc, field, message, kind, ns, name, document, item, id=case_id)


CASES = [
    case("service-port-too-big", patch(SERVICE, "spec.ports[0].port", 70000),
         "spec.ports[0].port", "must be between 1 and 65535, got 70000",
         kind="Service", ns="default", name="payments"),
    case("service-port-zero", patch(SERVICE, "spec.ports[0].port", 0),
         "spec.ports[0].port", "must be between 1 and 65535, got 0",
         kind="Service", ns="default", name="payments"),
    case("service-port-wrong-type", patch(SERVICE, "spec.ports[0].port", "abc"),
         "spec.ports[0].port", "expected int, got str 'abc'",
         kind="Service", ns="default", name="payments"),
    case("container-port-wrong-type",
         patch(POD, "spec.containers[0].ports[0].containerPort", "80"),
         "spec.containers[0].ports[0].containerPort", "expected int, got str '80'",
         kind="Pod", ns="shop", name="web"),
    case("unknown-kind", {"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}},
         "kind", "unknown kind 'Widget'", kind="Widget", ns="", name="w"),
    case("missing-kind", {"apiVersion": "v1", "metadata": {"name": "w"}},
         "kind", "kind is required", kind="", ns="", name="w"),
    case("wrong-api-version", patch(NETPOL, "apiVersion", "extensions/v1beta1"),
         "apiVersion", "NetworkPolicy requires apiVersion 'networking.k8s.io/v1'",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("missing-api-version", patch(POD, "apiVersion", DELETE),
         "apiVersion", "apiVersion is required", kind="Pod", ns="shop", name="web"),
    case("missing-name", patch(POD, "metadata.name", DELETE),
         "metadata.name", "name is required", kind="Pod", ns="shop", name=""),
    case("invalid-pod-name", patch(POD, "metadata.name", "Web_1"),
         "metadata.name", "RFC 1123 subdomain", kind="Pod", ns="shop", name="Web_1"),
    case("service-name-not-dns1035", patch(SERVICE, "metadata.name", "1payments"),
         "metadata.name", "DNS-1035 label", kind="Service", ns="default", name="1payments"),
    case("invalid-namespace", patch(POD, "metadata.namespace", "Shop"),
         "metadata.namespace", "RFC 1123 label", kind="Pod", ns="Shop", name="web"),
    case("bad-label-key", patch(POD, "metadata.labels", {"example.com/bad key": "x"}),
         "metadata.labels[example.com/bad key]", "name part must consist of",
         kind="Pod", ns="shop", name="web"),
    case("label-value-too-long", patch(POD, "metadata.labels", {"app": "x" * 64}),
         "metadata.labels[app]", "must be no more than 63 characters",
         kind="Pod", ns="shop", name="web"),
    case("label-value-not-string", patch(POD, "metadata.labels", {"app": "w", "version": 2}),
         "metadata.labels[version]", "expected str, got int 2",
         kind="Pod", ns="shop", name="web"),
    case("metadata-not-mapping", patch(POD, "metadata", "web"),
         "metadata", "expected object, got str 'web'", kind="Pod", ns="default", name=""),
    case("selector-bad-operator",
         patch(NETPOL, "spec.podSelector",
               {"matchExpressions": [{"key": "role", "operator": "Contains", "values": ["db"]}]}),
         "spec.podSelector.matchExpressions[0].operator",
         "unsupported value 'Contains'; must be one of: DoesNotExist, Exists, In, NotIn",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("selector-in-without-values",
         patch(NETPOL, "spec.podSelector",
               {"matchExpressions": [{"key": "role", "operator": "In"}]}),
         "spec.podSelector.matchExpressions[0].values", "must be specified when operator is In",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("selector-exists-with-values",
         patch(NETPOL, "spec.podSelector",
               {"matchExpressions": [{"key": "role", "operator": "Exists", "values": ["db"]}]}),
         "spec.podSelector.matchExpressions[0].values",
         "may not be specified when operator is Exists",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-missing-pod-selector", patch(NETPOL, "spec.podSelector", DELETE),
         "spec.podSelector", "required field is missing",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-bad-named-port", patch(NETPOL, "spec.ingress[0].ports[0].port", "redis_port"),
         "spec.ingress[0].ports[0].port", "invalid port name 'redis_port'",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-port-too-big", patch(NETPOL, "spec.ingress[0].ports[0].port", 70000),
         "spec.ingress[0].ports[0].port", "must be between 1 and 65535, got 70000",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-end-port-below-port", patch(NETPOL, "spec.egress[0].ports[0].endPort", 31000),
         "spec.egress[0].ports[0].endPort", "must be greater than or equal to port 32000",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-end-port-named-port", patch(NETPOL, "spec.egress[0].ports[0].port", "http"),
         "spec.egress[0].ports[0].endPort", "may not be specified when port is a named port",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-bad-protocol", patch(NETPOL, "spec.ingress[0].ports[0].protocol", "ICMP"),
         "spec.ingress[0].ports[0].protocol", "unsupported value 'ICMP'; must be one of: SCTP, TCP, UDP",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-bad-cidr", patch(NETPOL, "spec.ingress[0].from[0].ipBlock.cidr", "172.17.0.0/33"),
         "spec.ingress[0].from[0].ipBlock.cidr", "must be a valid CIDR",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-garbage-cidr", patch(NETPOL, "spec.ingress[0].from[0].ipBlock.cidr", "banana"),
         "spec.ingress[0].from[0].ipBlock.cidr", "must be a valid CIDR",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-except-outside-cidr",
         patch(NETPOL, "spec.ingress[0].from[0].ipBlock.except", ["10.1.0.0/24"]),
         "spec.ingress[0].from[0].ipBlock.except[0]", "10.1.0.0/24 is not within 172.17.0.0/16",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("netpol-unknown-field", patch(NETPOL, "spec.ingress[0].sources", []),
         "spec.ingress[0].sources", "unknown field",
         kind="NetworkPolicy", ns="shop", name="db"),
    case("cnp-unknown-field", patch(CNP, "spec.ingress[0].fromEndpoint", []),
         "spec.ingress[0].fromEndpoint", "unknown field",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-unknown-entity", patch(CNP, "spec.ingress[0].fromEntities", ["internet"]),
         "spec.ingress[0].fromEntities[0]", "unknown entity 'internet'",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-rule-without-selector", patch(CNP, "spec.endpointSelector", DELETE),
         "spec", "rule must have one of endpointSelector or nodeSelector",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-without-spec", patch(CNP, "spec", DELETE),
         "spec", "a policy needs spec or specs",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-node-selector-namespaced",
         patch(CNP, "spec.nodeSelector", {"matchLabels": {"ssh": "yes"}}),
         "spec.nodeSelector", "may not be combined with endpointSelector",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-node-selector-only-clusterwide",
         patch(patch(patch(CNP, "spec.endpointSelector", DELETE), "spec.nodeSelector", {}),
               "spec.ingress[0].toPorts[0].rules", DELETE),
         "spec.nodeSelector", "only allowed in CiliumClusterwideNetworkPolicy",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-port-too-big", patch(CNP, "spec.egress[0].toPorts[0].ports[0].port", 70000),
         "spec.egress[0].toPorts[0].ports[0].port", "must be between 0 and 65535, got 70000",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-bad-port-name",
         patch(CNP, "spec.egress[0].toPorts[0].ports[0].port", "postgres_db"),
         "spec.egress[0].toPorts[0].ports[0].port", "invalid port name 'postgres_db'",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-end-port-named-port",
         patch(CNP, "spec.egress[0].toPorts[0].ports[0].port", "postgres"),
         "spec.egress[0].toPorts[0].ports[0].endPort", "may only be used with a numeric port",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-end-port-below-port",
         patch(CNP, "spec.egress[0].toPorts[0].ports[0].endPort", 5000),
         "spec.egress[0].toPorts[0].ports[0].endPort", "must be greater than or equal to port",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-lowercase-protocol",
         patch(CNP, "spec.egress[0].toPorts[0].ports[0].protocol", "tcp"),
         "spec.egress[0].toPorts[0].ports[0].protocol",
         "unsupported value 'tcp'; must be one of: ANY, SCTP, TCP, UDP",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-except-outside-cidr",
         patch(CNP, "spec.egress[0].toCIDRSet[0].except", ["192.168.0.0/16"]),
         "spec.egress[0].toCIDRSet[0].except[0]", "is not within 10.0.0.0/8",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-bad-fqdn", patch(CNP, "spec.egress[1].toFQDNs[0].matchName", "api github.com"),
         "spec.egress[1].toFQDNs[0].matchName", "invalid DNS name",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-http-rule-needs-tcp",
         patch(CNP, "spec.ingress[0].toPorts[0].ports[0].protocol", "ANY"),
         "spec.ingress[0].toPorts[0].ports[0].protocol", "L7 rules can only apply to TCP",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-dns-rule-on-ingress",
         patch(CNP, "spec.ingress[0].toPorts[0].rules", {"dns": [{"matchPattern": "*"}]}),
         "spec.ingress[0].toPorts[0].rules.dns", "DNS rules are not allowed on ingress",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-bad-selector-key",
         patch(CNP, "spec.endpointSelector.matchLabels", {"k8s:bad key": "x"}),
         "spec.endpointSelector.matchLabels[k8s:bad key]", "invalid key",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("cnp-unknown-icmp-type", patch(CNP, "spec.egress[2].icmps[0].fields[0].type", "Ping"),
         "spec.egress[2].icmps[0].fields[0].type", "unknown IPv4 ICMP type 'Ping'",
         kind="CiliumNetworkPolicy", ns="shop", name="backend"),
    case("ccnp-namespace-ignored-but-rule-checked",
         patch(patch(CNP, "kind", "CiliumClusterwideNetworkPolicy"), "spec.ingress[0].toPorts",
               [{"ports": [{"port": "80", "endPort": 90, "protocol": "TCP"}],
                 "rules": {"http": [{}], "kafka": [{"topic": "x"}]}}]),
         "spec.ingress[0].toPorts[0].rules", "multiple L7 protocols in one port rule",
         kind="CiliumClusterwideNetworkPolicy", ns="", name="backend"),
    case("pod-no-containers", patch(POD, "spec.containers", []),
         "spec.containers", "must have at least one container", kind="Pod", ns="shop", name="web"),
    case("pod-duplicate-container-names",
         patch(POD, "spec.containers", [{"name": "main", "image": "a"},
                                        {"name": "main", "image": "b"}]),
         "spec.containers[1].name", "duplicate container name 'main'",
         kind="Pod", ns="shop", name="web"),
    case("pod-bad-restart-policy", patch(POD, "spec.restartPolicy", "Sometimes"),
         "spec.restartPolicy", "must be one of: Always, Never, OnFailure",
         kind="Pod", ns="shop", name="web"),
    case("pod-probe-bad-port",
         patch(POD, "spec.containers[0].readinessProbe", {"tcpSocket": {"port": 0}}),
         "spec.containers[0].readinessProbe.tcpSocket.port", "must be between 1 and 65535",
         kind="Pod", ns="shop", name="web"),
    case("service-node-port-out-of-range",
         patch(patch(SERVICE, "spec.type", "NodePort"), "spec.ports[0].nodePort", 8080),
         "spec.ports[0].nodePort", "must be between 30000 and 32767, got 8080",
         kind="Service", ns="default", name="payments"),
    case("service-duplicate-port-names",
         patch(SERVICE, "spec.ports", [{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
         "spec.ports[1].name", "duplicate port name 'http'",
         kind="Service", ns="default", name="payments"),
    case("service-unnamed-port-among-many",
         patch(SERVICE, "spec.ports", [{"name": "http", "port": 80}, {"port": 81}]),
         "spec.ports[1].name", "name is required when a Service has more than one port",
         kind="Service", ns="default", name="payments"),
    case("service-bad-cluster-ip", patch(SERVICE, "spec.clusterIP", "10.96.0.300"),
         "spec.clusterIP", "must be a valid IP address", kind="Service", ns="default",
         name="payments"),
    case("service-bad-target-port-name", patch(SERVICE, "spec.ports[0].targetPort", "-http"),
         "spec.ports[0].targetPort", "invalid port name '-http'",
         kind="Service", ns="default", name="payments"),
    case("service-bad-type", patch(SERVICE, "spec.type", "Internal"),
         "spec.type", "unsupported value 'Internal'", kind="Service", ns="default",
         name="payments"),
    case("slice-address-family", patch(SLICE, "endpoints[0].addresses", ["fd00::1"]),
         "endpoints[0].addresses[0]", "must be an IPv4 address, got 'fd00::1'",
         kind="EndpointSlice", ns="default", name="payments-1"),
    case("slice-missing-address-type", patch(SLICE, "addressType", DELETE),
         "addressType", "required field is missing",
         kind="EndpointSlice", ns="default", name="payments-1"),
    case("node-bad-pod-cidr", patch(NODE, "spec.podCIDR", "10.244.1.0"),
         "spec.podCIDR", "must be a valid CIDR", kind="Node", ns="", name="node-1"),
    case("document-not-a-mapping", ["just", "a", "list"],
         "", "expected a mapping (a Kubernetes object), got list", kind="", ns="", name=""),
]


def _write(tmp_path, docs: list[Any], filename: str = "bad.yaml") -> str:
    path = tmp_path / filename
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def _problems(paths: list[str]) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        load_manifests(paths)
    return info.value.problems


@pytest.mark.parametrize("doc, field, message, kind, ns, name, document, item", CASES)
def test_malformed_object_is_reported_precisely(
    tmp_path, doc, field, message, kind, ns, name, document, item
):
    path = _write(tmp_path, [NAMESPACE, doc])
    problems = _problems([path])
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem.source, problem.document, problem.item) == (path, document, item)
    assert (problem.kind, problem.namespace, problem.name) == (kind, ns, name)
    assert problem.field == field
    assert message in problem.message
    ref = f"{ns}/{name or '<unnamed>'}" if ns else name
    label = f"{kind or '<no kind>'} {ref}" if kind or name else ""
    prefix = f"{path}: document {document}: "
    if label:
        prefix += f"{label}: "
    if field:
        prefix += f"{field}: "
    assert str(problem).startswith(prefix), str(problem)
    assert str(problem).endswith(problem.message)


def test_str_matches_documented_format(tmp_path):
    path = _write(tmp_path, [NAMESPACE, NAMESPACE | {"metadata": {"name": "b"}}, POD,
                             patch(SERVICE, "spec.ports[0].port", 70000)], "shop.yaml")
    (problem,) = _problems([path])
    assert str(problem) == (
        f"{path}: document 3: Service default/payments: spec.ports[0].port: "
        "must be between 1 and 65535, got 70000"
    )


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ok\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {app: web\n"
    )
    (problem,) = _problems([str(path)])
    assert problem.field == ""
    assert problem.document == 1
    assert problem.line is not None and problem.line >= 10
    assert str(problem).startswith(f"{path}: document 1: line {problem.line}, column ")
    assert "Traceback" not in str(problem)


def test_yaml_error_in_middle_of_line(tmp_path):
    path = tmp_path / "colon.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a: b\n")
    (problem,) = _problems([str(path)])
    assert (problem.document, problem.line, problem.column) == (0, 4, 10)
    assert "mapping values are not allowed" in problem.message


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  name: b\n")
    (problem,) = _problems([str(path)])
    assert problem.line == 5
    assert "duplicate key 'name'" in problem.message


def test_invalid_json_is_located(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"apiVersion": "v1",\n "kind": "Namespace",\n "metadata": {"name": }}\n')
    (problem,) = _problems([str(path)])
    assert (problem.source, problem.document, problem.line) == (str(path), 0, 3)
    assert problem.message.startswith("invalid JSON")


def test_one_valid_and_one_invalid_object_returns_nothing(tmp_path):
    path = _write(tmp_path, [POD, patch(SERVICE, "spec.ports[0].port", 0)])
    with pytest.raises(ManifestError) as info:
        load_manifests([path])
    assert [p.kind for p in info.value.problems] == ["Service"]


def test_all_problems_across_files_are_reported(tmp_path):
    first = _write(tmp_path, [patch(POD, "spec.containers", [])], "a.yaml")
    second = _write(
        tmp_path,
        [NAMESPACE, patch(patch(SERVICE, "spec.ports[0].port", 0), "metadata.name", "Bad")],
        "b.yaml",
    )
    problems = _problems([first, second])
    assert [(p.source, p.document, p.field) for p in problems] == [
        (first, 0, "spec.containers"),
        (second, 1, "metadata.name"),
        (second, 1, "spec.ports[0].port"),
    ]
    assert str(ManifestError(problems)).splitlines() == [str(p) for p in problems]


def test_list_item_problem_names_item_index(tmp_path):
    bad_list = {"apiVersion": "v1", "kind": "List",
                "items": [POD, patch(POD, "metadata.name", "Bad")]}
    path = _write(tmp_path, [bad_list])
    (problem,) = _problems([path])
    assert (problem.document, problem.item, problem.field) == (0, 1, "metadata.name")
    assert str(problem).startswith(f"{path}: document 0: item 1: Pod shop/Bad: metadata.name: ")


def test_duplicate_objects_are_rejected(tmp_path):
    path = _write(tmp_path, [POD, NAMESPACE, POD])
    (problem,) = _problems([path])
    assert problem.document == 2
    assert problem.message == f"duplicate object: also defined in {path} document 0"


def test_missing_file_is_a_problem(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    (problem,) = _problems([missing])
    assert problem.source == missing
    assert "cannot read" in problem.message


def test_a_path_with_a_nul_byte_is_a_problem_naming_it(tmp_path):
    (problem,) = _problems([str(tmp_path / "a\x00b.yaml")])
    assert problem.source.endswith("a\\x00b.yaml")
    assert problem.message == "cannot read: the path contains a NUL byte"


def test_multiple_problems_in_one_object_are_all_reported(tmp_path):
    doc = patch(patch(SERVICE, "spec.ports", [{"name": "http", "port": 0},
                                              {"name": "http", "port": 70000}]),
                "metadata.labels", {"bad key": "v"})
    path = _write(tmp_path, [doc])
    fields = [p.field for p in _problems([path])]
    assert fields == ["metadata.labels[bad key]", "spec.ports[0].port", "spec.ports[1].name",
                      "spec.ports[1].port"]


def test_loads_reports_source_name():
    with pytest.raises(ManifestError) as info:
        loads("apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n", source="inline")
    assert str(info.value) == (
        "inline: document 0: Gadget g: kind: unknown kind 'Gadget'; supported kinds: "
        "Namespace, Node, Pod, Service, EndpointSlice, NetworkPolicy, CiliumNetworkPolicy, "
        "CiliumClusterwideNetworkPolicy, ServiceExport, ServiceImport"
    )
