"""``ciliary get`` as kubectl shows the same objects: shape, tables, -o wide, jsonpath.

The expected outputs in ``data/kubectl/`` are written as kubectl prints them for the
objects of ``stored.json`` (kubectl's tabwriter: columns padded to their widest cell plus
3, minimum 6; ages at 2026-12-06T10:05:12Z).
"""

from __future__ import annotations

import argparse
import calendar
import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from ciliary import jsonpath, kubeshape
from ciliary.cli import gettable
from ciliary.cli.app import build_parser

DATA = Path(__file__).parent / "data" / "kubectl"
STORED = json.loads((DATA / "stored.json").read_text())
NOW = calendar.timegm(time.strptime("2026-12-06T10:05:12Z", "%Y-%m-%dT%H:%M:%SZ"))


def shaped(group: str) -> list[dict[str, Any]]:
    return [kubeshape.shape(o) for o in STORED[group]]


def by_name(group: str, name: str) -> dict[str, Any]:
    return next(o for o in shaped(group) if o["metadata"]["name"] == name)


def test_service_shows_allocations_in_spec_as_kubectl_get_o_json() -> None:
    assert by_name("services", "edge") == json.loads((DATA / "get-svc-edge.json").read_text())


def test_service_shape_keeps_what_the_user_wrote_and_headless_stays_none() -> None:
    db = by_name("services", "db")
    assert db["spec"]["clusterIP"] == "None" and db["spec"]["clusterIPs"] == ["None"]
    lb = by_name("services", "lb")
    assert lb["spec"]["ports"][0]["nodePort"] == 31443
    assert lb["status"] == {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}
    # a clusterIP named in the manifest wins over the status; other status moves aside
    svc = {"kind": "Service", "spec": {"clusterIP": "10.96.9.9", "ports": [{"port": 1}]},
           "status": {"clusterIP": "10.96.0.1", "problems": ["x"]}}
    before = copy.deepcopy(svc)
    out = kubeshape.shape(svc)
    assert svc == before  # the input is not modified
    assert out["spec"]["clusterIP"] == "10.96.9.9" and out["spec"]["clusterIPs"] == ["10.96.9.9"]
    assert out["status"] == {"loadBalancer": {}, "ciliary": {"problems": ["x"]}}


def test_pod_shape_as_kubectl_get_o_json() -> None:
    assert by_name("pods", "web-1") == json.loads((DATA / "get-pod-web-1.json").read_text())
    pending = by_name("pods", "batch")
    conds = {c["type"]: c["status"] for c in pending["status"]["conditions"]}
    assert pending["status"]["phase"] == "Pending" and set(conds.values()) == {"False"}
    assert "podIP" not in pending["status"]


def test_node_and_namespace_shape() -> None:
    node = by_name("nodes", "node-1")
    assert node["spec"]["podCIDR"] == "10.200.1.0/24"
    assert node["spec"]["podCIDRs"] == ["10.200.1.0/24"]
    ns = kubeshape.shape({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "shop"}
    assert ns["status"] == {"phase": "Active"}


def test_shape_is_total_on_odd_input() -> None:
    for odd in ({"kind": "Service", "spec": "x", "status": 3},
                {"kind": "Pod", "spec": {"containers": ["x"]}, "status": {"conditions": "no"}},
                {"kind": "Node", "status": []}, {"kind": 7}, {}):
        kubeshape.shape(odd)  # never raises


@pytest.mark.parametrize(("group", "namespace", "wide", "expected"), [
    ("services", False, False, "get-svc.txt"),
    ("services", False, True, "get-svc-wide.txt"),
    ("pods", True, False, "get-pods-A.txt"),
    ("nodes", False, True, "get-nodes-wide.txt"),
])
def test_tables_are_kubectls(group: str, namespace: bool, wide: bool, expected: str) -> None:
    objects = shaped(group)
    if group == "pods" and not namespace:
        objects = [o for o in objects if o["metadata"]["namespace"] == "default"]
    kind = objects[0]["kind"]
    got = gettable.render(kind, objects, show_namespace=namespace, wide=wide, now=NOW)
    assert got + "\n" == (DATA / expected).read_text()


def test_pods_wide_in_one_namespace() -> None:
    objects = [o for o in shaped("pods") if o["metadata"]["namespace"] == "default"]
    got = gettable.render("Pod", objects, show_namespace=False, wide=True, now=NOW)
    assert got + "\n" == (DATA / "get-pods-wide.txt").read_text()


def test_human_duration_is_kubectls() -> None:
    cases = {0: "0s", 119: "119s", 120: "2m", 312: "5m12s", 600: "10m", 10799: "179m",
             3 * 3600: "3h", 3 * 3600 + 60: "3h1m", 8 * 3600: "8h", 47 * 3600: "47h",
             48 * 3600: "2d", 50 * 3600: "2d2h", 8 * 86400: "8d", 800 * 86400: "2y70d",
             9 * 365 * 86400: "9y", -5: "<invalid>"}
    assert {s: gettable.human_duration(s) for s in cases} == cases


SVC_LIST = kubeshape.as_list(shaped("services"))


@pytest.mark.parametrize(("template", "data", "expected"), [
    # kubectl get svc -o jsonpath='{.items[*].spec.clusterIP}'
    ("{.items[*].spec.clusterIP}", SVC_LIST, "None 10.96.0.11 10.96.0.12 10.96.0.10"),
    ("{range .items[*]}{.metadata.name}{\"\\t\"}{.spec.ports[*].nodePort}{\"\\n\"}{end}",
     SVC_LIST, "db\t\nedge\t30080 30053\nlb\t31443\nweb\t\n"),
    ("{.items[?(@.spec.type==\"NodePort\")].metadata.name}", SVC_LIST, "edge"),
    ("{.items[0].metadata.name}: {.items[-1].metadata.name}", SVC_LIST, "db: web"),
    ("{.items[1:3].metadata.name}", SVC_LIST, "edge lb"),
    ("{.items[*]['metadata']['name']}", SVC_LIST, "db edge lb web"),
    ("{.spec.ports[?(@.name==\"dns\")].nodePort}", by_name("services", "edge"), "30053"),
    ("{.spec.ports[?(@.port>60)].name}", by_name("services", "edge"), "http"),
    ("{.spec.selector}", by_name("services", "edge"), '{"app":"dns","tier":"edge"}'),
    ("{.spec.ports[0]}", by_name("services", "web"),
     '{"port":80,"protocol":"TCP","targetPort":8080}'),
    ("{.status.podIPs[0].ip}", by_name("pods", "web-1"), "10.200.1.5"),
    ("{.status.conditions[?(@.type==\"Ready\")].status}", by_name("pods", "web-1"), "True"),
    ("{.status.containerStatuses[*].ready}", by_name("pods", "web-2"), "true false"),
    ("{.metadata.labels.app}/{.metadata.missing}", by_name("pods", "web-1"), "web/"),
    ("{..podIP}", kubeshape.as_list(shaped("pods")), "10.200.1.5 10.200.2.9"),
    ("{.metadata.labels.node-role\\.kubernetes\\.io/control-plane}x", by_name("nodes", "node-1"),
     "x"),
    ("{@.kind}", by_name("nodes", "node-1"), "Node"),
    ("{$.spec.podCIDRs[*]}", by_name("nodes", "node-2"), "10.200.2.0/24"),
    ("{.spec.priority} {.spec.enableServiceLinks}", by_name("pods", "web-1"), "0 true"),
])
def test_jsonpath_prints_what_kubectl_prints(template: str, data: Any, expected: str) -> None:
    assert jsonpath.render(template, data) == expected


@pytest.mark.parametrize("template", [
    "{.items[*", "{range .items[*]}{.x}", "{end}", "{.a[?(x)]}", "{.a[1:2:0]}", "{}",
    "{.a[\"unterminated]}", "{'x' y}", "{.a[?(@.b == )]}",
])
def test_jsonpath_errors_name_the_problem(template: str) -> None:
    with pytest.raises(jsonpath.JSONPathError):
        jsonpath.compile_template(template)


def test_get_output_flag_accepts_kubectls_formats() -> None:
    parser = build_parser()
    for value in ("wide", "json", "yaml", "name", "jsonpath={.items[*].metadata.name}"):
        args = parser.parse_args(["get", "pods", "-o", value])
        assert args.output == value
    with pytest.raises(SystemExit):
        parser.parse_args(["get", "pods", "-o", "xml"])
    assert isinstance(parser, argparse.ArgumentParser)
