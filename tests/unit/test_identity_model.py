"""Desired identities and ipcache from stored objects; the label hygiene report."""

from __future__ import annotations

from collections import Counter

from ciliary import schema
from services.identity.labels import LabelFilter
from services.identity.model import (
    desired_ipcache,
    host_prefix,
    node_addresses,
    normalize_cidr,
    pod_info,
    policy_cidrs,
)
from services.identity.report import cardinality_report, looks_generated

FLT = LabelFilter.from_config()


def pod(name: str, labels: dict[str, str], **extra: object) -> dict[str, object]:
    manifest: dict[str, object] = {"apiVersion": "v1", "kind": "Pod",
                                   "metadata": {"name": name, "namespace": "default", "labels": labels},
                                   "spec": {"nodeName": "node-1", "containers": []}}
    manifest.update(extra)
    return manifest


def info(name: str, labels: dict[str, str], *, status: dict[str, object] | None = None,
         status_rev: int = 0, revision: int = 1, manifest_status: dict[str, object] | None = None,
         **extra: object):
    if manifest_status is not None:
        extra["status"] = manifest_status
    return pod_info(FLT, "c1", f"Pod.default.{name}", pod(name, labels, **extra), revision, {}, status, status_rev)


def test_pod_info_sources_of_ip_and_non_endpoints() -> None:
    assert info("a", {"app": "a"}).ip == ""
    assert info("a", {"app": "a"}, status={"podIP": "10.0.0.1"}, status_rev=7).ip == "10.0.0.1/32"
    own = info("a", {"app": "a"}, status={"podIP": "10.0.0.9"}).claim
    assert own[0] == 1  # status bucket claims rank above manifest claims
    manifest_ip = info("a", {"app": "a"}, status={"phase": "Running"},
                       manifest_status={"podIP": "10.0.0.2"})
    assert manifest_ip is not None and manifest_ip.ip == "10.0.0.2/32" and manifest_ip.claim[0] == 0
    host = info("h", {"app": "h"}, spec={"hostNetwork": True, "nodeName": "node-1"})
    assert host is None
    assert info("done", {"app": "d"}, status={"phase": "Succeeded", "podIP": "10.0.0.3"}) is None
    sa = pod_info(FLT, "c1", "Pod.default.s", pod("s", {}, spec={"serviceAccountName": "api"}), 1, {}, None, 0)
    assert sa is not None and "k8s:io.cilium.k8s.policy.serviceaccount=api" in sa.labels
    assert host_prefix("not-an-ip") == "" and host_prefix("fd00::1") == "fd00::1/128"


def test_pods_that_differ_only_in_a_filtered_label_share_a_label_set() -> None:
    pods = [info(f"w{i}", {"app": "web", "pod-template-hash": f"h{i}"}) for i in range(3)]
    pods.append(info("db", {"app": "db"}))
    refs = Counter(p.labels for p in pods if p is not None)
    assert sorted(refs.values()) == [1, 3]


def test_policy_cidrs_from_every_kind() -> None:
    cnp = {"spec": {"endpointSelector": {}, "egress": [
        {"toCIDR": ["1.1.1.1/32", "8.8.8.8"]},
        {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.96.0.0/12"]}, {"cidrGroupRef": "g"}]}],
        "ingressDeny": [{"fromCIDR": ["192.168.1.7/24"]}]},
        "specs": [{"endpointSelector": {}, "ingress": [{"fromCIDRSet": [{"cidr": "0.0.0.0/0"}]}],
                   "egressDeny": [{"toCIDR": ["172.16.0.0/12"]}]}]}
    assert policy_cidrs("CiliumNetworkPolicy", cnp) == {
        "1.1.1.1/32", "8.8.8.8/32", "10.0.0.0/8", "10.96.0.0/12", "192.168.1.0/24", "172.16.0.0/12"}
    assert policy_cidrs("CiliumClusterwideNetworkPolicy", cnp) == policy_cidrs("CiliumNetworkPolicy", cnp)
    netpol = {"spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24",
                                                                             "except": ["203.0.113.8/29"]}}]}],
                       "egress": [{"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "198.51.100.0/24"}}]}]}}
    assert policy_cidrs("NetworkPolicy", netpol) == {"203.0.113.0/24", "203.0.113.8/29", "198.51.100.0/24"}
    assert policy_cidrs("NetworkPolicy", {"spec": {"ingress": "garbage"}}) == set()
    assert normalize_cidr("bogus") == ""


def test_node_addresses() -> None:
    manifest = {"status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"},
                                         {"type": "Hostname", "address": "n1"},
                                         {"type": "ExternalIP", "address": "198.51.100.1"}]}}
    assert node_addresses(manifest, None) == ["192.168.0.10/32", "198.51.100.1/32"]
    assert node_addresses(manifest, {"addresses": [{"type": "InternalIP", "address": "192.168.0.11"}]}) == [
        "192.168.0.11/32"]


def test_desired_ipcache_priorities_and_latest_claim() -> None:
    old = info("old", {"app": "old"}, status={"podIP": "10.0.0.5"}, status_rev=10)
    new = info("new", {"app": "new"}, status={"podIP": "10.0.0.5"}, status_rev=12)
    other = info("other", {"app": "old"}, status={"podIP": "10.0.0.6"}, status_rev=3)
    pods = [p for p in (old, new, other) if p is not None]
    ids = {pods[0].labels: 70001, pods[1].labels: 70002}
    cache = desired_ipcache(pods, ids, {"node-2": ["192.168.0.2/32", "10.0.0.6/32"]},
                            {"203.0.113.0/24": (1 << 24) | 1, "10.0.0.5/32": (1 << 24) | 2}, "c1", 1)
    assert cache["10.0.0.5_32"].pod == "new" and cache["10.0.0.5_32"].identity == 70002
    assert cache["10.0.0.6_32"].source == "node"  # node beats pod
    assert cache["192.168.0.2_32"] == schema.IPCacheRecord(
        prefix="192.168.0.2/32", identity=6, source="node", cluster="c1", cluster_id=1, node="node-2")
    assert cache["203.0.113.0_24"].source == "cidr"
    assert cache["0.0.0.0_0"].identity == 2 and cache["0.0.0.0_0"].source == "world"
    # a pod whose identity is not allocated yet gets no entry
    assert "10.0.0.6_32" in cache and desired_ipcache(pods[2:], {}, {}, {}, "c1", 1).keys() == {"0.0.0.0_0"}


def test_ipcache_keys_are_valid_kv_keys() -> None:
    import re

    for prefix in ("10.0.0.5/32", "0.0.0.0/0", "fd00::1/128"):
        key = schema.ipcache_key(prefix)
        assert re.fullmatch(r"[-/_=.a-zA-Z0-9]+", key) and "/" not in key
        assert schema.ipcache_prefix(key) == prefix


def test_report_flags_nearly_unique_labels() -> None:
    pods = []
    for i in range(40):
        labels = {"app": f"app{i % 4}", "instance": f"web-{i:03d}"}
        if i % 2:
            labels["run-id"] = f"{i * 7919:08x}"
        p = info(f"p{i}", labels)
        assert p is not None
        pods.append(p.labels)
    reply = cardinality_report(pods, cluster="c1", cluster_id=1, allocated=40, limit=65536, top=10)
    assert reply.pods == 40 and reply.identities_estimated == 40
    by_key = {r.key: r for r in reply.labels}
    assert by_key["k8s:instance"].flagged and by_key["k8s:instance"].identities_without == 22
    assert by_key["k8s:run-id"].flagged  # generated-looking hash values
    assert not by_key["k8s:app"].flagged and by_key["k8s:app"].values == 4
    assert reply.labels[0].flagged
    assert any("k8s:instance" in line for line in reply.advice)
    assert "excluding all 2 flagged labels: 40 -> 4 identities" in reply.advice
    assert looks_generated("3f2a9c1b") and looks_generated("web-7d4b9c8f6-x2x9z")
    assert not looks_generated("frontend")
