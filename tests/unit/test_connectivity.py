"""``ciliary connectivity test`` without an instance: selection, manifests, judging, output,
and the cleanup of its namespace (over ``FakeBus``) after an interruption or a failed deploy."""

from __future__ import annotations

import asyncio
import json

import pytest

from ciliary import connectivity as C
from ciliary import schema
from ciliary.cli import connectivity as cli
from ciliary.resources import KINDS, resource_from_manifest
from ciliary.testing import FakeBus

ENV = C.Environment(nodes=("node-1", "node-2"), node_ips={"node-1": "172.30.1.1", "node-2": "172.30.1.2"},
                    cluster_dns="10.96.0.10")
ADDRESSES = C.Addresses(pods={"client": "10.200.1.5", "echo-same": "10.200.1.6", "echo-other": "10.200.2.7",
                              "guarded": "10.200.2.8"},
                        cluster_ip="10.96.0.20", node_port=30080, node_ip="172.30.1.2", cluster_dns="10.96.0.10")


def scenario(name: str) -> C.Scenario:
    return next(s for s in C.SCENARIOS if s.name == name)


def policy(name: str) -> schema.FlowPolicy:
    return schema.FlowPolicy(name=name, namespace=C.NAMESPACE, kind="CiliumNetworkPolicy")


def flow(verdict: str = "FORWARDED", **fields) -> schema.Flow:
    return schema.Flow(verdict=verdict, time="2026-01-01T00:00:00.000000000Z", **fields)


# ---------------------------------------------------------------- selection


def test_every_test_is_selected_without_a_pattern_in_declaration_order() -> None:
    assert [s.name for s in C.select()] == C.names()
    assert C.names() == ["pod-to-pod/same-node", "pod-to-pod/cross-node", "pod-to-service/cluster-ip",
                         "pod-to-service/node-port", "pod-to-world", "dns/cluster-dns", "policy/allow",
                         "policy/deny"]


@pytest.mark.parametrize(("patterns", "expected"), [
    (["pod-to-pod/*"], ["pod-to-pod/same-node", "pod-to-pod/cross-node"]),
    (["policy/*,dns/*"], ["dns/cluster-dns", "policy/allow", "policy/deny"]),
    (["policy/deny", "pod-to-world"], ["pod-to-world", "policy/deny"]),
    (["*", "!pod-to-*"], ["dns/cluster-dns", "policy/allow", "policy/deny"]),
    (["!policy/*"], ["pod-to-pod/same-node", "pod-to-pod/cross-node", "pod-to-service/cluster-ip",
                     "pod-to-service/node-port", "pod-to-world", "dns/cluster-dns"]),
    (["*node*"], ["pod-to-pod/same-node", "pod-to-pod/cross-node", "pod-to-service/node-port"]),
])
def test_patterns_are_globs(patterns: list[str], expected: list[str]) -> None:
    assert [s.name for s in C.select(patterns)] == expected


def test_a_pattern_matching_nothing_is_an_error_naming_the_tests() -> None:
    with pytest.raises(ValueError, match=r"--test 'pod-to-moon' matches no test; tests: pod-to-pod/same-node"):
        C.select(["pod-to-moon"])


def test_skips_are_decided_from_the_instance() -> None:
    one_node = C.Environment(nodes=("node-1",))
    assert C.skip_reason(scenario("pod-to-pod/cross-node"), one_node) == "needs 2 nodes, the instance has 1"
    assert C.skip_reason(scenario("dns/cluster-dns"), one_node) == "no cluster DNS (no Service kube-system/kube-dns)"
    assert C.skip_reason(scenario("pod-to-pod/same-node"), one_node) == ""
    assert all(C.skip_reason(s, ENV) == "" for s in C.SCENARIOS)


# ---------------------------------------------------------------- manifests


def test_everything_deployed_is_valid_and_lives_in_the_test_namespace() -> None:
    objects = C.manifests(C.SCENARIOS, ENV)
    for obj in objects:
        resource_from_manifest(obj)  # valid for the resource store
        assert obj["metadata"]["labels"][C.PART_OF_LABEL] == C.PART_OF
        if KINDS[obj["kind"]].namespaced:
            assert obj["metadata"]["namespace"] == C.NAMESPACE
    assert objects[0] == C.namespace_manifest()
    kinds = [o["kind"] for o in objects]
    assert kinds.index("CiliumNetworkPolicy") < kinds.index("Pod")  # guarded never runs unguarded
    pods = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Pod"}
    assert pods["client"]["spec"]["nodeName"] == "node-1" and pods["echo-same"]["spec"]["nodeName"] == "node-1"
    assert pods["echo-other"]["spec"]["nodeName"] == "node-2"
    assert pods["world-echo"]["metadata"]["annotations"] == {C.WORLD_ANNOTATION: "true"}
    assert "nodeName" not in pods["world-echo"]["spec"]


def test_policies_select_only_the_test_pods() -> None:
    for name in (C.ALLOW_POLICY, C.DENY_POLICY):
        spec = C.policy_manifest(name)["spec"]
        assert spec["endpointSelector"] == {"matchLabels": {"name": "guarded"}}
        rules = spec.get("ingress") or spec.get("ingressDeny")
        assert rules[0]["fromEndpoints"] == [{"matchLabels": {"name": C.CLIENT}}]
        assert set(spec) == {"endpointSelector", "ingressDeny" if name == C.DENY_POLICY else "ingress"}


def test_only_what_the_selected_tests_need_is_deployed() -> None:
    objects = C.manifests(C.select(["pod-to-pod/same-node"]), ENV)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Namespace", C.NAMESPACE), ("Pod", "client"), ("Pod", "echo-same")]
    objects = C.manifests(C.select(["policy/deny"]), ENV)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Namespace", C.NAMESPACE), ("CiliumNetworkPolicy", C.ALLOW_POLICY),
        ("CiliumNetworkPolicy", C.DENY_POLICY), ("Pod", "client"), ("Pod", "guarded")]


def test_with_one_node_every_pod_lands_on_it() -> None:
    one = C.Environment(nodes=("node-7",))
    pods = [o for o in C.manifests(C.SCENARIOS, one) if o["kind"] == "Pod"]
    assert {p["spec"].get("nodeName") for p in pods} == {"node-7", None}  # None: the world pod


@pytest.mark.parametrize(("name", "argv"), [
    ("pod-to-pod/same-node", ["connect", "10.200.1.6", "8080", "--timeout", "2"]),
    ("pod-to-pod/cross-node", ["connect", "10.200.2.7", "8080", "--timeout", "2"]),
    ("pod-to-service/cluster-ip", ["connect", "10.96.0.20", "8080", "--timeout", "2"]),
    ("pod-to-service/node-port", ["connect", "172.30.1.2", "30080", "--timeout", "2"]),
    ("pod-to-world", ["connect", C.WORLD_ADDRESS, str(C.WORLD_PORT), "--timeout", "2"]),
    ("dns/cluster-dns", ["resolve", "10.96.0.10", C.DNS_NAME, "--port", "53", "--timeout", "2"]),
    ("policy/allow", ["connect", "10.200.2.8", "8080", "--timeout", "2"]),
    ("policy/deny", ["connect", "10.200.2.8", "9090", "--timeout", "2"]),
])
def test_probe_commands(name: str, argv: list[str]) -> None:
    assert C.probe_args(scenario(name).probe, ADDRESSES, timeout=2.0) == argv


def test_an_unknown_address_is_empty() -> None:
    assert C.probe_destination(scenario("pod-to-service/node-port").probe, C.Addresses()) == ("", 0)
    assert C.probe_destination(scenario("pod-to-pod/same-node").probe, C.Addresses()) == ("", 8080)


# ---------------------------------------------------------------- judging


def test_an_answer_from_the_expected_peer_passes() -> None:
    status, reason = C.judge(scenario("pod-to-pod/same-node"), C.Outcome(True, "echo-same 10.200.1.5"), [])
    assert (status, reason) == (C.PASS, "echo-same answered (it saw the client as 10.200.1.5)")
    status, _ = C.judge(scenario("pod-to-service/cluster-ip"), C.Outcome(True, "echo-other 10.200.1.5"), [])
    assert status == C.PASS


def test_an_answer_from_someone_else_fails() -> None:
    assert C.judge(scenario("pod-to-pod/cross-node"), C.Outcome(True, "echo-same 10.200.1.5"), []) == (
        C.FAIL, "answered by echo-same, expected echo-other")


def test_no_answer_fails_naming_the_drops() -> None:
    drops = [flow("DROPPED", drop_reason_desc="POLICY_DENIED", traffic_direction="EGRESS"),
             flow("DROPPED", drop_reason_desc="POLICY_DENIED", traffic_direction="EGRESS")]
    assert C.judge(scenario("pod-to-world"), C.Outcome(False, error="timed out"), drops) == (
        C.FAIL, "no answer (timed out); dropped: POLICY_DENIED at EGRESS")
    assert C.judge(scenario("pod-to-world"), C.Outcome(False, error="timed out"), []) == (
        C.FAIL, "no answer (timed out)")


def test_any_dns_answer_passes() -> None:
    assert C.judge(scenario("dns/cluster-dns"), C.Outcome(True, "NXDOMAIN"), []) == (C.PASS, "DNS answer NXDOMAIN")


def test_policy_allow_needs_the_forwarded_verdict_naming_the_policy() -> None:
    allow = scenario("policy/allow")
    answered = C.Outcome(True, "guarded 10.200.1.5")
    assert C.judge(allow, answered, [flow()])[0] == C.FAIL
    other = flow(ingress_allowed_by=[schema.FlowPolicy(name=C.ALLOW_POLICY, namespace="default")])
    assert C.judge(allow, answered, [other])[0] == C.FAIL  # same name, another namespace
    naming = flow(ingress_allowed_by=[policy(C.ALLOW_POLICY)])
    assert C.judge(allow, answered, [flow(), naming]) == (
        C.PASS, f"guarded answered (it saw the client as 10.200.1.5), allowed by {C.NAMESPACE}/{C.ALLOW_POLICY}")
    assert C.judge(allow, C.Outcome(False, error="timed out"), [naming])[0] == C.FAIL


def test_policy_deny_needs_a_drop_naming_the_policy() -> None:
    deny = scenario("policy/deny")
    silent = C.Outcome(False, error="timed out")
    naming = flow("DROPPED", drop_reason_desc="POLICY_DENY", ingress_denied_by=[policy(C.DENY_POLICY)])
    assert C.judge(deny, silent, [naming]) == (C.PASS, f"dropped, denied by {C.NAMESPACE}/{C.DENY_POLICY}")
    default_deny = flow("DROPPED", drop_reason_desc="POLICY_DENIED", traffic_direction="EGRESS")
    assert C.judge(deny, silent, [default_deny]) == (
        C.FAIL, f"no answer, but no DROPPED flow names {C.NAMESPACE}/{C.DENY_POLICY}; dropped: POLICY_DENIED at EGRESS")
    assert C.judge(deny, silent, [])[1].endswith("; no drop seen")
    assert C.judge(deny, C.Outcome(True, "guarded 10.200.1.5"), [naming])[0] == C.FAIL
    wrong_direction = flow("DROPPED", egress_denied_by=[policy(C.DENY_POLICY)])
    assert C.judge(deny, silent, [wrong_direction])[0] == C.FAIL


def test_proof_flows_put_the_deciding_flows_first_then_keep_time_order() -> None:
    forwarded = [flow(summary=f"f{i}") for i in range(5)]
    drop = flow("DROPPED", summary="drop")
    naming = flow("DROPPED", summary="naming", ingress_denied_by=[policy(C.DENY_POLICY)])
    flows = [*forwarded[:3], drop, *forwarded[3:], naming]
    chosen = C.proof_flows(scenario("policy/deny"), flows, limit=3)
    assert [f.summary for f in chosen] == ["f0", "drop", "naming"]
    assert [f.summary for f in C.proof_flows(scenario("pod-to-world"), forwarded, limit=2)] == ["f0", "f1"]


# ---------------------------------------------------------------- output


RESULTS = [
    C.Result("pod-to-pod/same-node", C.PASS, "echo-same answered", 0.31, "10.200.1.6:8080",
             [flow(source=schema.FlowEndpoint(namespace=C.NAMESPACE, pod_name="client"), node_name="c/node-1",
                   ip=schema.FlowIP(source="10.200.1.5", destination="10.200.1.6"))]),
    C.Result("pod-to-pod/cross-node", C.SKIP, "needs 2 nodes, the instance has 1"),
    C.Result("policy/deny", C.FAIL, "no answer, but no DROPPED flow names it", 2.5, "10.200.2.8:9090"),
]


def test_exit_code_fails_on_any_failure_only() -> None:
    assert C.exit_code(RESULTS) == 1
    assert C.exit_code(RESULTS[:2]) == 0
    assert C.summary(RESULTS) == {C.PASS: 1, C.FAIL: 1, C.SKIP: 1}


def test_table_is_aligned_with_flows_and_a_summary() -> None:
    text = cli.render_results(RESULTS)
    lines = text.splitlines()
    assert lines[0].split() == ["TEST", "RESULT", "TIME", "DETAIL"]
    assert lines[1].startswith("pod-to-pod/same-node    pass     0.31s   echo-same answered")
    assert lines[2].startswith("pod-to-pod/cross-node   skip     -       needs 2 nodes")
    assert lines[3].startswith("policy/deny             fail     2.50s   no answer")
    assert {line.index(cell) for line, cell in zip(lines[1:4], ("pass", "skip", "fail"), strict=True)} == {
        lines[0].index("RESULT")}
    assert "pod-to-pod/same-node (pass):" in text
    assert "\n  Jan  1 00:00:00.000 [c/node-1]: ciliary-test/client" in text
    assert lines[-1] == "1 passed, 1 failed, 1 skipped"


def test_json_has_one_object_per_test() -> None:
    doc = json.loads(json.dumps(cli.results_json(RESULTS, "c1")))
    assert {k: doc[k] for k in ("cluster", "namespace", "ok", "passed", "failed", "skipped")} == {
        "cluster": "c1", "namespace": C.NAMESPACE, "ok": False, "passed": 1, "failed": 1, "skipped": 1}
    assert [t["name"] for t in doc["tests"]] == [r.name for r in RESULTS]
    first = doc["tests"][0]
    assert set(first) == {"name", "status", "reason", "duration_seconds", "destination", "flows"}
    assert first["duration_seconds"] == 0.31 and first["destination"] == "10.200.1.6:8080"
    assert first["flows"][0]["source"]["pod_name"] == "client"  # Hubble's JSON field names


def test_list_prints_the_tests(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_args("--list", "--test", "policy/*")
    assert cli.cmd_connectivity_test(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TEST", "DESCRIPTION"]
    assert [line.split()[0] for line in out[1:]] == ["policy/allow", "policy/deny"]


def cli_args(*argv: str):
    import argparse

    common_parent = argparse.ArgumentParser(add_help=False)
    common_parent.add_argument("--data-dir")
    parser = argparse.ArgumentParser(prog="ciliary")
    cli.add_commands(parser.add_subparsers(dest="command"), common_parent)
    return parser.parse_args(["connectivity", "test", *argv])


# ---------------------------------------------------------------- cleanup over FakeBus


def seeded_bus() -> FakeBus:
    """Two Ready nodes and objects of someone else in ``default``."""
    bus = FakeBus()
    for i, node in enumerate(("node-1", "node-2"), start=1):
        key = f"Node._.{node}"
        bus.put(schema.BUCKET_RESOURCES, key, schema.ResourceRecord(
            kind="Node", api_version="v1", namespace="", name=node, uid=f"u{i}", generation=1, created="",
            manifest={"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))
        bus.put(schema.BUCKET_STATUS, key, schema.StatusRecord(reporter=f"node/{node}", status={
            "conditions": [{"type": "Ready", "status": "True"}],
            "addresses": [{"type": "InternalIP", "address": f"172.30.1.{i}"}]}))
    for kind, name in (("Pod", "web"), ("CiliumNetworkPolicy", "web-policy")):
        bus.put(schema.BUCKET_RESOURCES, f"{kind}.default.{name}", schema.ResourceRecord(
            kind=kind, api_version="v1", namespace="default", name=name, uid=name, generation=1, created="",
            manifest={"kind": kind, "metadata": {"name": name, "namespace": "default"}}))
    return bus


def test_interrupted_run_removes_its_namespace_and_touches_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "POLL", 0.01)
    bus = seeded_bus()
    before = {k: v for k, v in bus.data[schema.BUCKET_RESOURCES].items() if ".default." in k}

    async def scenario_run() -> None:
        run = asyncio.create_task(cli.Run(bus, "c1", C.SCENARIOS, timeout=1).main())
        for _ in range(200):  # until the workloads were written (they never become ready)
            await asyncio.sleep(0.01)
            if f"Pod.{C.NAMESPACE}.client" in bus.data[schema.BUCKET_RESOURCES]:
                break
        assert f"Pod.{C.NAMESPACE}.guarded" in bus.data[schema.BUCKET_RESOURCES]
        run.cancel()  # what Ctrl-C does to asyncio.run's main task
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(scenario_run())
    live = bus.data[schema.BUCKET_RESOURCES]
    assert not [k for k in live if C.NAMESPACE in k], live.keys()
    assert {k: v for k, v in live.items() if ".default." in k} == before
    touched = {key for op, bucket, key in bus.log if bucket == schema.BUCKET_RESOURCES}
    assert touched and all(k.split(".")[1] == C.NAMESPACE or k == f"Namespace._.{C.NAMESPACE}" for k in touched)


def test_a_deploy_that_never_gets_ready_fails_every_test_and_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "POLL", 0.01)
    monkeypatch.setattr(cli, "DEPLOY_TIMEOUT", 0.2)
    bus = seeded_bus()
    results = asyncio.run(cli.Run(bus, "c1", C.select(["pod-to-pod/*", "dns/*"]), timeout=1).main())
    assert [(r.name, r.status) for r in results] == [
        ("pod-to-pod/same-node", C.FAIL), ("pod-to-pod/cross-node", C.FAIL), ("dns/cluster-dns", C.SKIP)]
    assert results[0].reason.startswith("not deployed: no pods ready after 0s (0/3 ready, waiting for client")
    assert not [k for k in bus.data[schema.BUCKET_RESOURCES] if C.NAMESPACE in k]
    assert C.exit_code(results) == 1


def test_nothing_is_deployed_when_every_selected_test_is_skipped() -> None:
    bus = seeded_bus()
    results = asyncio.run(cli.Run(bus, "c1", C.select(["dns/*"]), timeout=1).main())
    assert [(r.status, r.reason) for r in results] == [(C.SKIP, "no cluster DNS (no Service kube-system/kube-dns)")]
    assert not any(op == "put" for op, _, _ in bus.log)
