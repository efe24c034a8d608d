"""End-to-end: ICMP policy by type on the real BPF datapath.

A CiliumNetworkPolicy with ``icmps`` is resolved by the policy core, turned into map
entries exactly as the node executor does (``policy_map_entries``), and enforced on
pod-c of the ``cluster`` fixture (node-1: pod-a, pod-b; node-2: pod-c): the datapath looks
ICMP up with its type as the port, so echo requests pass, a timestamp request is dropped
with POLICY_DENIED (133), and the flow events carry the ICMP type and code.
"""

from __future__ import annotations

import pytest

from services.node import layouts as L
from services.node import maps as M
from services.node.translate import policy_map_entries
from services.policy.records import identity_record
from services.policy.resolve import ResolveOptions, resolve_policy
from services.policy.rules import rule_id

from .podnet import icmp_ping, icmp_request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ICMP_TIMESTAMP = 13
ICMP_TIMESTAMP_REPLY = 14

POLICY = {
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "ping-only", "namespace": "default"},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "c"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}],
                     "icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]}],
    },
}


def pod_labels(app: str) -> frozenset[str]:
    return frozenset({f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default",
                      "k8s:io.cilium.k8s.policy.cluster=default"})


def icmp_timestamp(netns: str, ip: str, timeout: float = 1.0) -> bool:
    """One ICMP timestamp request (type 13) from ``netns``; True when the reply arrives."""
    return icmp_request(netns, ip, ICMP_TIMESTAMP, ICMP_TIMESTAMP_REPLY, timeout, extra=bytes(12))


def test_icmps_rule_allows_echo_by_type_and_drops_other_types(cluster):
    a, c = cluster.pods["pod-a"], cluster.pods["pod-c"]
    dp1, dp2 = cluster.datapaths["node-1"], cluster.datapaths["node-2"]
    # without policy both ICMP types are answered (the kernel replies to timestamps)
    assert icmp_ping(a.netns, c.ip)
    assert icmp_timestamp(a.netns, c.ip)

    res = resolve_policy([POLICY], {1001: pod_labels("a"), 1003: pod_labels("c")},
                         options=ResolveOptions(cluster_name="default", cluster_id=1))
    record = identity_record(res.identities[1003], "default", 1, {})
    entries = policy_map_entries(record)
    assert {(k.key.peer_id, L.port_int(k.key.dport), k.key.proto) for k in entries} >= {
        (1001, 8, 1)}
    M.apply(dp2.maps, [*entries, M.endpoint_entry(c.host_ifindex, 21, 1003, c.ip,
                                                  policy_ingress=True)])
    # pod-a's ingress is enforced with nothing allowed: echo replies pass only by conntrack
    M.apply(dp1.maps, [M.endpoint_entry(a.host_ifindex, 11, 1001, a.ip, policy_ingress=True)])

    assert icmp_ping(a.netns, c.ip)
    echo = cluster.events.wait_for(
        lambda e: e.proto == 1 and e.direction == L.DIR_INGRESS and e.icmp_type == 8
        and L.ip4_str(e.daddr) == c.ip and e.verdict == L.VERDICT_FORWARDED
        and e.rule_ref != 0)
    (icmp_entry,) = [e for e in res.identities[1003].entries if e.peer == 1001]
    assert echo.rule_ref == rule_id(icmp_entry.rule)
    assert echo.icmp_code == 0 and echo.ct_state == L.CT_NEW

    before = cluster.metric("pod-c", L.DROP_POLICY, L.DIR_INGRESS)
    assert not icmp_timestamp(a.netns, c.ip)
    drop = cluster.events.wait_for(
        lambda e: e.drop_reason == L.DROP_POLICY and e.proto == 1
        and L.ip4_str(e.daddr) == c.ip)
    assert drop.icmp_type == ICMP_TIMESTAMP and drop.icmp_code == 0
    assert drop.type == L.EVENT_DROP and drop.direction == L.DIR_INGRESS
    assert drop.src_identity == 1001
    assert cluster.metric("pod-c", L.DROP_POLICY, L.DIR_INGRESS) > before
    # echo still passes after the drop, and its replies never hit pod-a's policy
    assert icmp_ping(a.netns, c.ip)
    assert cluster.metric("pod-a", L.DROP_POLICY, L.DIR_INGRESS) == 0
