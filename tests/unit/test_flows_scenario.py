"""A small cluster and a stream of raw datapath events shared by the flows tests.

The checkout/payments story: checkout (ID 1234) calls the payments Service VIP, talks DNS
to kube-dns, pings the internet; frontend (ID 9012) is denied by policy; one call goes to
a Service without backends. Events 14-18 add policy verdicts of allowed connections: a
new checkout -> payments connection allowed by payments-ingress (L3-L4) and a later packet
of it (no verdict), world -> frontend:80 allowed by a NetworkPolicy (L4-Only), a deny rule
of a clusterwide policy (L3-Only) and an allowing entry whose rule_ref nobody published.
Also tests that the scenario decodes into the expected kinds.
"""

from __future__ import annotations

import socket

from ciliary import schema
from services.flows.decode import BatchContext, IPInfo, StaticLookups, decode_batch
from services.flows.dns import build_query, build_response
from services.flows.enrich import flow_policy

CLUSTER = "default"
NODE = "node-1"
# 2026-11-26T05:44:56.123456789Z == BOOT + TS0
BOOT_NS = 1795671000_000_000_000
TS0 = 1795671896_123_456_789 - BOOT_NS

CHECKOUT_IP, PAYMENTS_IP, FRONTEND_IP, COREDNS_IP = "10.0.1.5", "10.0.1.7", "10.0.1.9", "10.0.2.3"
PAYMENTS_VIP, DNS_VIP, EMPTY_VIP = "10.96.0.20", "10.96.0.10", "10.96.0.30"
WORLD_IP = "93.184.216.34"
CLIENT_IP = "203.0.113.7"

# rule_ref values as the policy service derives them (a hash of the rule text)
RULE_PAYMENTS_INGRESS = 0x1A2B3C4D
RULE_FRONTEND_WEB = 0x00C0FFEE
RULE_DENY_DOT = 0x7E57AB1E
RULE_UNPUBLISHED = 0x0BADF00D
POLICIES = {
    RULE_PAYMENTS_INGRESS: flow_policy("CiliumNetworkPolicy/default/payments-ingress spec[0].ingress[0]", 42),
    RULE_FRONTEND_WEB: flow_policy("NetworkPolicy/default/frontend-web-only spec[0].ingress[0]", 43),
    RULE_DENY_DOT: flow_policy("CiliumClusterwideNetworkPolicy/no-dns-over-tls spec[0].egressDeny[0]", 44),
}

LOOKUPS = StaticLookups(
    ips={
        CHECKOUT_IP: IPInfo(identity=1234, namespace="default", pod="checkout-7d9f8b6c5-x2x9q",
                            node=NODE, cluster=CLUSTER, workloads=(("checkout", "Deployment"),)),
        PAYMENTS_IP: IPInfo(identity=5678, namespace="default", pod="payments-5c6d7f9b8-abcde",
                            node=NODE, cluster=CLUSTER, workloads=(("payments", "Deployment"),)),
        FRONTEND_IP: IPInfo(identity=9012, namespace="default", pod="frontend-6b8c9d7e4-zzzzz",
                            node=NODE, cluster=CLUSTER),
        COREDNS_IP: IPInfo(identity=102, namespace="kube-system", pod="coredns-5d78c9869d-q8w7e",
                           node="node-2", cluster=CLUSTER),
    },
    cidrs={"0.0.0.0/0": IPInfo(identity=2)},
    identities={
        1234: ["k8s:app=checkout", "k8s:io.kubernetes.pod.namespace=default", "k8s:tier=backend"],
        5678: ["k8s:app=payments", "k8s:io.kubernetes.pod.namespace=default", "k8s:tier=backend"],
        9012: ["k8s:app=frontend", "k8s:io.kubernetes.pod.namespace=default", "k8s:tier=web"],
        102: ["k8s:io.kubernetes.pod.namespace=kube-system", "k8s:k8s-app=kube-dns"],
        2: ["reserved:world"],
    },
    frontends={
        (PAYMENTS_VIP, 8080, "TCP"): ("default", "payments"),
        (DNS_VIP, 53, "UDP"): ("kube-system", "kube-dns"),
        (EMPTY_VIP, 80, "TCP"): ("default", "empty"),
    },
    policies={ref: pol for ref, pol in POLICIES.items() if pol is not None},
)

SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08
INGRESS, EGRESS = 1, 2


def ev(i: int, **kw: object) -> schema.RawFlowEvent:
    """Event ``i`` milliseconds after TS0."""
    return schema.RawFlowEvent(ts_ns=TS0 + i * 1_000_000, **kw)  # type: ignore[arg-type]


DNS_QUERY = build_query("payments.default.svc.cluster.local", 1, ident=0x4A1B)
DNS_ANSWER = build_response("payments.default.svc.cluster.local", 1,
                            [(1, 30, socket.inet_aton(PAYMENTS_VIP))], ident=0x4A1B)
DNS_NXDOMAIN = build_response("nope.default.svc.cluster.local", 28, [], rcode=3, ident=0x77)


def scenario_events() -> list[schema.RawFlowEvent]:
    tcp = {"proto": 6, "sport": 43210, "dport": 8080}
    return [
        # 0: checkout -> payments VIP, DNATed to the backend, leaving checkout (SYN)
        ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, src_identity=1234, dst_identity=5678, ep_id=101,
           direction=EGRESS, tcp_flags=SYN, orig_daddr=PAYMENTS_VIP, orig_dport=8080, **tcp),
        # 1: the SYN entering payments
        ev(1, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, src_identity=1234, dst_identity=5678, ep_id=102,
           direction=INGRESS, tcp_flags=SYN, **tcp),
        # 2: SYN-ACK reply entering checkout, reverse-NATed from the VIP
        ev(2, saddr=PAYMENTS_IP, daddr=CHECKOUT_IP, sport=8080, dport=43210, proto=6,
           src_identity=5678, dst_identity=1234, ep_id=101, direction=INGRESS, tcp_flags=SYN | ACK,
           is_reply=True, ct_state=2, orig_daddr=PAYMENTS_VIP, orig_dport=8080),
        # 3: FIN from checkout
        ev(3, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, src_identity=1234, dst_identity=5678, ep_id=101,
           direction=EGRESS, tcp_flags=FIN | ACK, ct_state=1, **tcp),
        # 4: frontend -> payments denied by policy at payments' ingress
        ev(4, saddr=FRONTEND_IP, daddr=PAYMENTS_IP, sport=51000, dport=8080, proto=6,
           src_identity=9012, dst_identity=5678, ep_id=102, direction=INGRESS, tcp_flags=SYN,
           type=2, verdict=2, drop_reason=133),
        # 5: checkout -> a Service without backends
        ev(5, saddr=CHECKOUT_IP, daddr=EMPTY_VIP, sport=43300, dport=80, proto=6,
           src_identity=1234, dst_identity=2, ep_id=101, direction=EGRESS, tcp_flags=SYN,
           type=2, verdict=2, drop_reason=158),
        # 6: DNS query via the kube-dns VIP
        ev(6, saddr=CHECKOUT_IP, daddr=COREDNS_IP, sport=40000, dport=53, proto=17,
           src_identity=1234, dst_identity=102, ep_id=101, direction=EGRESS,
           orig_daddr=DNS_VIP, orig_dport=53, payload=DNS_QUERY),
        # 7: DNS answer entering checkout
        ev(7, saddr=DNS_VIP, daddr=CHECKOUT_IP, sport=53, dport=40000, proto=17,
           src_identity=102, dst_identity=1234, ep_id=101, direction=INGRESS, is_reply=True,
           ct_state=2, orig_daddr=DNS_VIP, orig_dport=53, payload=DNS_ANSWER),
        # 8: NXDOMAIN answer
        ev(8, saddr=DNS_VIP, daddr=CHECKOUT_IP, sport=53, dport=40001, proto=17,
           src_identity=102, dst_identity=1234, ep_id=101, direction=INGRESS, is_reply=True,
           ct_state=2, orig_daddr=DNS_VIP, orig_dport=53, payload=DNS_NXDOMAIN),
        # 9: ping to the internet and its reply
        ev(9, saddr=CHECKOUT_IP, daddr=WORLD_IP, sport=7, dport=0, proto=1,
           src_identity=1234, dst_identity=2, ep_id=101, direction=EGRESS),
        ev(10, saddr=WORLD_IP, daddr=CHECKOUT_IP, sport=0, dport=7, proto=1,
           src_identity=2, dst_identity=1234, ep_id=101, direction=INGRESS, is_reply=True, ct_state=2),
        # 11: audit-mode policy verdict on frontend -> checkout
        ev(11, saddr=FRONTEND_IP, daddr=CHECKOUT_IP, sport=51500, dport=9090, proto=6,
           src_identity=9012, dst_identity=1234, ep_id=101, direction=INGRESS, tcp_flags=SYN,
           verdict=4),
        # 12: explicit deny entry at checkout's egress (UDP to the world)
        ev(12, saddr=CHECKOUT_IP, daddr="1.1.1.1", sport=41000, dport=443, proto=17,
           src_identity=1234, dst_identity=0, ep_id=101, direction=EGRESS,
           type=2, verdict=2, drop_reason=181),
        # 13: RST from payments
        ev(13, saddr=PAYMENTS_IP, daddr=CHECKOUT_IP, sport=8080, dport=43210, proto=6,
           src_identity=5678, dst_identity=1234, ep_id=102, direction=EGRESS, tcp_flags=RST | ACK,
           is_reply=True, ct_state=2),
        # 14: a new checkout -> payments connection allowed at payments' ingress by
        # payments-ingress ({1234, 8080, TCP}: L3-L4): policy verdict + trace
        ev(14, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=43220, dport=8080, proto=6,
           src_identity=1234, dst_identity=5678, ep_id=102, direction=INGRESS, tcp_flags=SYN,
           rule_ref=RULE_PAYMENTS_INGRESS, policy_match=2, flags=1),
        # 15: the FIN of that connection (established: same rule, no verdict)
        ev(15, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=43220, dport=8080, proto=6,
           src_identity=1234, dst_identity=5678, ep_id=102, direction=INGRESS, tcp_flags=FIN | ACK,
           ct_state=1, rule_ref=RULE_PAYMENTS_INGRESS, policy_match=2),
        # 16: world -> frontend:80 allowed by a NetworkPolicy with ports only (L4-Only)
        ev(16, saddr=CLIENT_IP, daddr=FRONTEND_IP, sport=55000, dport=80, proto=6,
           src_identity=2, dst_identity=9012, ep_id=103, direction=INGRESS, tcp_flags=SYN,
           rule_ref=RULE_FRONTEND_WEB, policy_match=3, flags=1),
        # 17: checkout -> 1.1.1.1:853 denied by a clusterwide deny rule ({2, *, *}: L3-Only)
        ev(17, saddr=CHECKOUT_IP, daddr="1.1.1.1", sport=41100, dport=853, proto=6,
           src_identity=1234, dst_identity=2, ep_id=101, direction=EGRESS, tcp_flags=SYN,
           type=2, verdict=2, drop_reason=181, rule_ref=RULE_DENY_DOT, policy_match=1),
        # 18: checkout -> coredns allowed by an entry whose rule nobody published (L3-Proto)
        ev(18, saddr=CHECKOUT_IP, daddr=COREDNS_IP, sport=40500, dport=5353, proto=17,
           src_identity=1234, dst_identity=102, ep_id=101, direction=EGRESS,
           rule_ref=RULE_UNPUBLISHED, policy_match=5, flags=1),
    ]


def scenario_batch() -> schema.RawEventBatch:
    return schema.RawEventBatch(cluster=CLUSTER, node=NODE, boot_time_ns=BOOT_NS,
                                events=scenario_events(), seq=1)


def scenario_flows() -> list[schema.Flow]:
    return decode_batch(scenario_batch(), LOOKUPS).flows


CTX = BatchContext(CLUSTER, NODE, BOOT_NS, 1)


def test_scenario_decodes_every_event() -> None:
    result = decode_batch(scenario_batch(), LOOKUPS)
    assert result.undecodable == 0
    kinds = [(f.event_type.type if f.event_type else 0, f.verdict) for f in result.flows]
    # 19 events -> 19 primary flows + 4 policy verdicts of drops/audits (133, 181 twice,
    # audit) + 3 of allowed connections + 3 DNS L7 flows
    assert len(result.flows) == 29
    assert kinds.count((4, "FORWARDED")) == 15
    assert kinds.count((1, "DROPPED")) == 4
    assert kinds.count((5, "DROPPED")) == 3
    assert kinds.count((5, "AUDIT")) == 1
    assert kinds.count((5, "FORWARDED")) == 3
    assert kinds.count((129, "FORWARDED")) == 3
    assert all(f.node_name == "default/node-1" for f in result.flows)
    assert len({f.uuid for f in result.flows}) == len(result.flows)


def test_scenario_is_deterministic() -> None:
    assert scenario_flows() == scenario_flows()
