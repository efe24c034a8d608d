"""Raw datapath events -> Hubble flows: every event kind, every drop reason, enrichment."""

from __future__ import annotations

import msgspec
import pytest

from ciliary import hubble, schema
from ciliary.cli import flowrender
from services.flows.decode import (
    BatchContext,
    IPInfo,
    StaticLookups,
    decode_batch,
    decode_event,
    decode_raw_batch,
)
from services.flows.enrich import EnrichmentState
from services.node import layouts
from tests.unit.test_flows_scenario import (
    CHECKOUT_IP,
    CTX,
    DNS_QUERY,
    DNS_VIP,
    LOOKUPS,
    PAYMENTS_IP,
    PAYMENTS_VIP,
    ev,
    scenario_batch,
)


def one(event: schema.RawFlowEvent, lookups=LOOKUPS) -> list[schema.Flow]:
    return decode_event(event, CTX, lookups)


def test_raw_event_mirrors_the_c_flow_event() -> None:
    c_fields = {name for name, _ in layouts.FlowEvent._fields_} - {"pad", "payload_len"}
    assert set(schema.RawFlowEvent.__struct_fields__) == c_fields


def test_raw_event_from_layout_fields() -> None:
    """What the node executor does: FlowEvent -> RawFlowEvent, payload cut to payload_len."""
    c_ev = layouts.FlowEvent(
        ts_ns=5, saddr=layouts.ip4(CHECKOUT_IP), daddr=layouts.ip4(PAYMENTS_IP),
        sport=layouts.port(43210), dport=layouts.port(8080), proto=6, tcp_flags=2,
        direction=2, type=1, verdict=1, ep_id=101, src_identity=1234, dst_identity=5678,
    )
    fields = c_ev.fields()
    fields.pop("payload_len", None)
    fields.pop("payload", None)
    fields["orig_daddr"] = "" if fields["orig_daddr"] == "0.0.0.0" else fields["orig_daddr"]
    raw = schema.RawFlowEvent(**fields, payload=c_ev.payload_bytes())
    (flow,) = one(raw)
    assert flow.ip.source == CHECKOUT_IP and flow.l4.TCP.destination_port == 8080


def test_trace_egress_is_from_endpoint() -> None:
    (flow,) = one(ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=1, dport=8080, proto=6,
                     src_identity=1234, dst_identity=5678, ep_id=101, direction=2, tcp_flags=2))
    assert flow.verdict == "FORWARDED"
    assert flow.event_type == schema.FlowEventType(type=4, sub_type=5)
    assert flow.trace_observation_point == "FROM_ENDPOINT"
    assert flow.traffic_direction == "EGRESS"
    assert flow.is_reply is False
    assert flow.flow_type == "L3_L4"
    assert flow.source.id == 101 and flow.destination.id == 0
    assert flow.source.pod_name == "checkout-7d9f8b6c5-x2x9q"
    assert flow.source.workloads == [schema.FlowWorkload(name="checkout", kind="Deployment")]
    assert flow.source.labels[0] == "k8s:app=checkout"
    assert flow.source.cluster_name == "default"
    assert flow.node_name == "default/node-1"
    assert flow.time == "2026-11-26T05:44:56.123456789Z"
    assert flow.summary == "TCP Flags: SYN"


def test_trace_ingress_reply_flips_traffic_direction() -> None:
    (flow,) = one(ev(0, saddr=PAYMENTS_IP, daddr=CHECKOUT_IP, sport=8080, dport=1, proto=6,
                     ep_id=101, direction=1, tcp_flags=0x12, is_reply=True, ct_state=2))
    assert flow.event_type == schema.FlowEventType(type=4, sub_type=0)
    assert flow.trace_observation_point == "TO_ENDPOINT"
    assert flow.traffic_direction == "EGRESS"  # the connection was opened by the local pod
    assert flow.is_reply is True and flow.reply is True
    assert flow.destination.id == 101
    assert flow.l4.TCP.flags == schema.TCPFlags(SYN=True, ACK=True)


def test_identity_falls_back_to_ipcache_then_world() -> None:
    (flow,) = one(ev(0, saddr=CHECKOUT_IP, daddr="8.8.8.8", sport=1, dport=53, proto=17,
                     direction=2, ep_id=101))
    assert flow.source.identity == 1234  # event said 0: ipcache knows the pod
    assert flow.destination.identity == 2
    assert flow.destination.labels == ["reserved:world"]
    (flow,) = decode_event(ev(0, saddr="192.0.2.1", daddr="192.0.2.2", proto=17, direction=1),
                           CTX, StaticLookups())
    assert flow.source.identity == 2 and flow.source.labels == ["reserved:world"]
    assert flow.source.pod_name == "" and flow.source.cluster_name == ""


def test_reserved_identity_labels_without_identity_records() -> None:
    (flow,) = decode_event(ev(0, saddr="10.0.0.1", daddr="10.0.0.2", proto=17, src_identity=1,
                              dst_identity=6, direction=1), CTX, StaticLookups())
    assert flow.source.labels == ["reserved:host"]
    assert flow.destination.labels == ["reserved:remote-node"]
    assert flowrender.format_compact(flow).count("(host)") == 1


def test_service_from_orig_daddr() -> None:
    (flow,) = one(ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=1, dport=8080, proto=6,
                     direction=2, orig_daddr=PAYMENTS_VIP, orig_dport=8080))
    assert flow.destination_service == schema.FlowService(name="payments", namespace="default")
    assert flow.source_service is None
    (reply,) = one(ev(0, saddr=PAYMENTS_VIP, daddr=CHECKOUT_IP, sport=8080, dport=1, proto=6,
                      direction=1, is_reply=True, orig_daddr=PAYMENTS_VIP, orig_dport=8080))
    assert reply.source_service == schema.FlowService(name="payments", namespace="default")


def test_policy_drop_gives_policy_verdict_then_drop() -> None:
    pv, drop = one(ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=1, dport=8080, proto=6,
                      direction=1, type=2, verdict=2, drop_reason=133))
    assert pv.event_type == schema.FlowEventType(type=5)
    assert pv.verdict == "DROPPED" and pv.is_reply is False
    assert pv.drop_reason_desc == "POLICY_DENIED"
    assert drop.event_type == schema.FlowEventType(type=1, sub_type=133)
    assert drop.drop_reason == 133 and drop.drop_reason_desc == "POLICY_DENIED"
    assert drop.is_reply is None  # Hubble does not know for drops
    assert drop.traffic_direction == "INGRESS"
    assert pv.uuid != drop.uuid


def test_audit_gives_policy_verdict_then_forwarded_trace() -> None:
    pv, trace = one(ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=1, dport=80, proto=6,
                       direction=1, verdict=4))
    assert (pv.event_type.type, pv.verdict) == (5, "AUDIT")
    assert "policy-verdict:none INGRESS AUDITED" in flowrender.format_compact(pv)
    assert (trace.event_type.type, trace.verdict) == (4, "FORWARDED")


PAYMENTS_INGRESS_RULE = "CiliumNetworkPolicy/default/payments-ingress spec[0].ingress[0]"


def _policy_state(rules: dict[int, str], identity: int = 5678, revision: int = 42) -> EnrichmentState:
    state = EnrichmentState("default")
    record = schema.PolicyMapRecord(identity=identity, cluster="default", cluster_id=1,
                                    ingress_enforced=True, egress_enforced=False, rules=rules)
    state.apply_policy(schema.policy_key(identity), record, revision)
    return state


def _allowed(match: int = 2, rule_ref: int = 77, **kw: object) -> schema.RawFlowEvent:
    fields: dict[str, object] = dict(saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=43210, dport=8080, proto=6,
                                     src_identity=1234, dst_identity=5678, ep_id=102, direction=1,
                                     tcp_flags=2, rule_ref=rule_ref, policy_match=match, flags=1)
    fields.update(kw)
    return ev(0, **fields)


@pytest.mark.parametrize(("match", "name"), [
    (2, "L3-L4"), (5, "L3-Proto"), (1, "L3-Only"), (3, "L4-Only"), (6, "Proto-Only"), (4, "all"),
])
def test_allowed_new_connection_gives_policy_verdict_then_trace(match: int, name: str) -> None:
    pv, trace = one(_allowed(match), _policy_state({77: PAYMENTS_INGRESS_RULE}))
    assert pv.event_type == schema.FlowEventType(type=5) and pv.verdict == "FORWARDED"
    assert pv.policy_match_type == match and pv.traffic_direction == "INGRESS" and pv.is_reply is False
    assert pv.ingress_allowed_by == [schema.FlowPolicy(
        name="payments-ingress", namespace="default", kind="CiliumNetworkPolicy", revision="42",
        labels=["k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
                "k8s:io.cilium.k8s.policy.name=payments-ingress",
                "k8s:io.cilium.k8s.policy.namespace=default"])]
    assert pv.egress_allowed_by == [] and pv.ingress_denied_by == [] and pv.egress_denied_by == []
    assert f"policy-verdict:{name} INGRESS ALLOWED (TCP Flags: SYN)" in flowrender.format_compact(pv)
    assert (trace.event_type.type, trace.verdict, trace.policy_match_type) == (4, "FORWARDED", 0)
    assert trace.ingress_allowed_by == [] and pv.uuid != trace.uuid


def test_allowed_egress_uses_the_source_identity_rules() -> None:
    rule = "CiliumClusterwideNetworkPolicy/egress-to-payments spec[0].egress[0]"
    pv, _ = one(_allowed(3, rule_ref=9, direction=2, ep_id=101), _policy_state({9: rule}, identity=1234))
    assert pv.traffic_direction == "EGRESS" and pv.ingress_allowed_by == []
    (pol,) = pv.egress_allowed_by
    assert (pol.name, pol.namespace, pol.kind) == ("egress-to-payments", "", "CiliumClusterwideNetworkPolicy")
    assert pol.labels == ["k8s:io.cilium.k8s.policy.derived-from=CiliumClusterwideNetworkPolicy",
                          "k8s:io.cilium.k8s.policy.name=egress-to-payments"]


@pytest.mark.parametrize("rule_ref", [0, 12345])
def test_unknown_rule_ref_gives_no_policy_not_an_error(rule_ref: int) -> None:
    pv, trace = one(_allowed(4, rule_ref=rule_ref), _policy_state({77: PAYMENTS_INGRESS_RULE}))
    assert pv.verdict == "FORWARDED" and pv.policy_match_type == 4 and pv.ingress_allowed_by == []
    assert b"allowed_by" not in schema.to_json(pv)  # an empty list is omitted, as protojson does
    pv, _ = one(_allowed(4, rule_ref=rule_ref), StaticLookups())
    assert pv.ingress_allowed_by == []


def test_rule_ref_of_another_identity_record_still_resolves() -> None:
    """The deciding identity's record may have been replaced meanwhile: any table knows the ref."""
    state = _policy_state({77: PAYMENTS_INGRESS_RULE}, identity=4242)
    pv, _ = one(_allowed(), state)
    assert [p.name for p in pv.ingress_allowed_by] == ["payments-ingress"]
    state.apply_policy(schema.policy_key(4242), None)
    pv, _ = one(_allowed(), state)
    assert pv.ingress_allowed_by == []


def test_rules_without_a_policy_object_name_none() -> None:
    state = _policy_state({5: "ingress-default-allow", 6: "allow-localhost", 7: "garbage/"})
    for ref in (5, 6, 7):
        pv, _ = one(_allowed(4, rule_ref=ref), state)
        assert pv.ingress_allowed_by == []


def test_no_policy_verdict_without_the_flag() -> None:
    """Not enforced, or a later packet of the connection: the datapath leaves the flag clear."""
    (trace,) = one(_allowed(flags=0))
    assert trace.event_type.type == 4
    (reply,) = one(_allowed(flags=0, is_reply=True, ct_state=2))
    assert reply.event_type.type == 4


def test_deny_rule_names_the_denying_policy() -> None:
    rule = "CiliumNetworkPolicy/default/no-frontend spec[0].ingressDeny[0]"
    pv, drop = one(_allowed(1, rule_ref=31, type=2, verdict=2, drop_reason=181, flags=0),
                   _policy_state({31: rule}))
    assert (pv.verdict, pv.policy_match_type, pv.drop_reason_desc) == ("DROPPED", 1, "POLICY_DENY")
    assert [p.name for p in pv.ingress_denied_by] == ["no-frontend"] and pv.ingress_allowed_by == []
    assert drop.ingress_denied_by == []  # only the policy-verdict flow names policies
    # a default deny (133, no entry) names nobody
    pv, _ = one(_allowed(0, rule_ref=0, type=2, verdict=2, drop_reason=133, flags=0), _policy_state({}))
    assert pv.ingress_denied_by == [] and pv.policy_match_type == 0


def test_audit_carries_the_match_type_but_no_policy() -> None:
    pv, trace = one(_allowed(1, rule_ref=31, verdict=4, flags=0),
                    _policy_state({31: "CiliumNetworkPolicy/default/no-frontend spec[0].ingressDeny[0]"}))
    assert (pv.verdict, pv.policy_match_type) == ("AUDIT", 1)
    assert pv.ingress_denied_by == [] and pv.ingress_allowed_by == []
    assert trace.verdict == "FORWARDED"


def test_allowed_dns_query_gives_verdict_trace_and_l7() -> None:
    flows = one(ev(0, saddr=CHECKOUT_IP, daddr="10.0.2.3", sport=40000, dport=53, proto=17,
                   src_identity=1234, dst_identity=102, ep_id=101, direction=2, payload=DNS_QUERY,
                   policy_match=2, flags=1))
    assert [(f.event_type.type, f.verdict) for f in flows] == [(5, "FORWARDED"), (4, "FORWARDED"), (129, "FORWARDED")]
    assert len({f.uuid for f in flows}) == 3


# every drop reason the datapath may emit (bpf/lib/drop.h) -> Cilium enum name and text
DROP_CASES = [
    (132, "INVALID_SOURCE_IP", "Invalid source ip"),
    (133, "POLICY_DENIED", "Policy denied"),
    (134, "INVALID_PACKET_DROPPED", "Invalid packet"),
    (135, "CT_TRUNCATED_OR_INVALID_HEADER", "CT: Truncated or invalid header"),
    (139, "UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol"),
    (141, "ERROR_WRITING_TO_PACKET", "Error writing to packet"),
    (142, "UNKNOWN_L4_PROTOCOL", "Unknown L4 protocol"),
    (153, "ERROR_WHILE_CORRECTING_L3_CHECKSUM", "Error while correcting L3 checksum"),
    (154, "ERROR_WHILE_CORRECTING_L4_CHECKSUM", "Error while correcting L4 checksum"),
    (155, "CT_MAP_INSERTION_FAILED", "CT: Map insertion failed"),
    (157, "IP_FRAGMENTATION_NOT_SUPPORTED", "IP fragmentation not supported"),
    (158, "SERVICE_BACKEND_NOT_FOUND", "Service backend not found"),
    (167, "NO_MAPPING_FOR_NAT_MASQUERADE", "No mapping for NAT masquerade"),
    (169, "FIB_LOOKUP_FAILED", "FIB lookup failed"),
    (181, "POLICY_DENY", "Policy denied by denylist"),
]


def test_drop_cases_cover_the_datapath() -> None:
    assert {code for code, _, _ in DROP_CASES} == set(layouts.DROP_REASONS)


@pytest.mark.parametrize(("code", "desc", "text"), DROP_CASES)
def test_every_drop_reason(code: int, desc: str, text: str) -> None:
    flows = one(ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, sport=1, dport=80, proto=6,
                   direction=2, type=2, verdict=2, drop_reason=code, tcp_flags=2))
    drop = flows[-1]
    assert len(flows) == (2 if code in (133, 181) else 1)
    assert drop.verdict == "DROPPED"
    assert drop.drop_reason == code
    assert drop.drop_reason_desc == desc
    assert drop.event_type == schema.FlowEventType(type=1, sub_type=code)
    assert f" {text} DROPPED (TCP Flags: SYN)" in flowrender.format_compact(drop)


def test_unknown_drop_reason_keeps_number() -> None:
    (drop,) = one(ev(0, saddr="10.0.0.1", daddr="10.0.0.2", proto=6, type=2, verdict=2,
                     drop_reason=250))
    assert drop.drop_reason_desc == "250"
    assert " 250 DROPPED " in flowrender.format_compact(drop)


def test_icmp_echo_request_reply_and_related() -> None:
    (req,) = one(ev(0, saddr=CHECKOUT_IP, daddr="8.8.8.8", sport=7, dport=0, proto=1, direction=2,
                    icmp_type=8))
    assert req.l4.ICMPv4 == schema.FlowICMP(type=8, code=0)
    assert req.summary == "ICMPv4 EchoRequest"
    (rep,) = one(ev(0, saddr="8.8.8.8", daddr=CHECKOUT_IP, sport=0, dport=7, proto=1, direction=1,
                    is_reply=True))
    assert rep.l4.ICMPv4 == schema.FlowICMP(type=0, code=0) and rep.summary == "ICMPv4 EchoReply"
    (rel,) = one(ev(0, saddr="8.8.8.8", daddr=CHECKOUT_IP, proto=1, direction=1, ct_state=3,
                    icmp_type=3, icmp_code=3))
    assert rel.l4.ICMPv4 == schema.FlowICMP(type=3, code=3)
    assert rel.summary == "ICMPv4 DestinationUnreachable(Port)"
    *_, ts = one(ev(0, saddr=CHECKOUT_IP, daddr="8.8.8.8", proto=1, direction=2, type=2,
                    verdict=2, drop_reason=133, icmp_type=13))
    assert ts.verdict == "DROPPED" and ts.l4.ICMPv4 == schema.FlowICMP(type=13, code=0)
    assert ts.summary == "ICMPv4 TimestampRequest"
    # an event from an executor without the type fields: the echo id as source port
    (old,) = one(ev(0, saddr=CHECKOUT_IP, daddr="8.8.8.8", sport=7, dport=0, proto=1, direction=2))
    assert old.summary == "ICMPv4 EchoRequest"


def test_other_protocol_summary_is_ip_version() -> None:
    (flow,) = one(ev(0, saddr="10.0.0.1", daddr="10.0.0.2", proto=47, direction=1))
    assert flow.l4 is None and flow.summary == "IPv4"


def test_dns_request_on_client_egress_adds_l7_flow() -> None:
    trace, l7 = one(ev(0, saddr=CHECKOUT_IP, daddr="10.0.2.3", sport=40000, dport=53, proto=17,
                       direction=2, ep_id=101, orig_daddr=DNS_VIP, orig_dport=53, payload=DNS_QUERY))
    assert trace.l7 is None
    assert l7.flow_type == "L7"
    assert l7.event_type == schema.FlowEventType(type=129)
    assert l7.l7.type == "REQUEST"
    assert l7.l7.dns.query == "payments.default.svc.cluster.local."
    assert l7.l7.dns.qtypes == ["A"]
    assert l7.summary == "DNS Query payments.default.svc.cluster.local. A"
    assert l7.destination_service == schema.FlowService(name="kube-dns", namespace="kube-system")


def test_dns_on_server_side_hook_has_no_l7_flow() -> None:
    (trace,) = one(ev(0, saddr=CHECKOUT_IP, daddr="10.0.2.3", sport=40000, dport=53, proto=17,
                      direction=1, payload=DNS_QUERY))
    assert trace.l7 is None


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\xff" * 11, b"\xde\xad\xbe\xef" * 32,
                                     DNS_QUERY[:20]])
def test_dns_garbage_never_fails_the_event(garbage: bytes) -> None:
    flows = one(ev(0, saddr=CHECKOUT_IP, daddr="10.0.2.3", sport=40000, dport=53, proto=17,
                   direction=2, payload=garbage))
    assert len(flows) == 1 and flows[0].l7 is None and flows[0].summary == "UDP"


def test_undecodable_payloads() -> None:
    assert decode_raw_batch(b"\x93garbage") is None
    assert decode_raw_batch(msgspec.msgpack.encode({"cluster": 1})) is None
    ok = decode_raw_batch(schema.encode(scenario_batch()), LOOKUPS)
    assert ok is not None and ok.undecodable == 0 and len(ok.flows) == 29


def test_empty_batch() -> None:
    assert decode_batch(schema.RawEventBatch(cluster="c", node="n")).flows == []


def test_static_lookups_longest_prefix() -> None:
    lk = StaticLookups(cidrs={"10.0.0.0/8": IPInfo(identity=16777217),
                              "10.1.0.0/16": IPInfo(identity=16777218)})
    assert lk.ip("10.1.2.3").identity == 16777218
    assert lk.ip("10.2.0.1").identity == 16777217
    assert lk.ip("11.0.0.1") is None


def test_enrichment_state_from_kv_records() -> None:
    st = EnrichmentState("c1")
    st.apply_ipcache("10.0.1.5_32", schema.IPCacheRecord(
        prefix="10.0.1.5/32", identity=300, source="pod", cluster="c1", cluster_id=1,
        node="n1", namespace="shop", pod="cart-1"))
    st.apply_ipcache("0.0.0.0_0", schema.IPCacheRecord(
        prefix="0.0.0.0/0", identity=2, source="world", cluster="c1", cluster_id=1))
    st.apply_identity("id.300", schema.IdentityRecord(id=300, labels=["k8s:app=cart"],
                                                      scope="cluster", cluster="c1", cluster_id=1))
    st.apply_frontend("fe.10-96-0-1.80.TCP", schema.LBFrontend(
        namespace="shop", name="cart", type="ClusterIP", address="10.96.0.1", port=80,
        proto="TCP", service_id=1, rev_nat_id=1))
    st.apply_pod("shop/web-1", {"metadata": {"labels": {"app": "web", "pod-template-hash": "abc"},
                                             "ownerReferences": [{"kind": "ReplicaSet", "name": "web-abc"}]},
                                "spec": {"nodeName": "n2"}})
    st.apply_pod_status("shop/web-1", {"podIP": "10.0.2.9"})
    ctx = BatchContext("c1", "n1", 0)
    (flow,) = decode_event(ev(0, saddr="10.0.1.5", daddr="10.96.0.1", sport=1, dport=80, proto=6,
                              direction=2, ep_id=7), ctx, st)
    assert flow.source.identity == 300 and flow.source.labels == ["k8s:app=cart"]
    assert flow.source.pod_name == "cart-1" and flow.source.cluster_name == "c1"
    assert flow.destination_service == schema.FlowService(name="cart", namespace="shop")
    (flow,) = decode_event(ev(0, saddr="10.0.2.9", daddr="1.2.3.4", proto=17, direction=1), ctx, st)
    assert flow.source.pod_name == "web-1" and flow.source.namespace == "shop"
    assert flow.source.workloads == [schema.FlowWorkload(name="web", kind="Deployment")]
    assert "k8s:app=web" in flow.source.labels
    assert flow.destination.identity == 2 and flow.destination.labels == ["reserved:world"]
    st.apply_ipcache("10.0.1.5_32", None)
    st.apply_pod("shop/web-1", None)
    st.apply_pod_status("shop/web-1", None)
    assert st.ip("10.0.1.5").identity == 2
    assert st.ip("10.0.2.9").pod == ""


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_u8 = st.integers(0, 255)
_u16 = st.integers(0, 65535)
_u32 = st.integers(0, 2**32 - 1)
_addr = st.one_of(st.sampled_from([CHECKOUT_IP, PAYMENTS_IP, "0.0.0.0", "", "x", "::1"]),
                  st.ip_addresses(v=4).map(str))


@settings(max_examples=300, deadline=None)
@given(st.builds(
    schema.RawFlowEvent, ts_ns=st.integers(0, 2**64 - 1), saddr=_addr, daddr=_addr,
    sport=_u16, dport=_u16, src_identity=_u32, dst_identity=_u32, ep_id=_u32, ifindex=_u32,
    rule_ref=_u32, orig_daddr=_addr, orig_dport=_u16, pkt_len=_u16, type=_u8, verdict=_u8,
    drop_reason=_u8, direction=_u8, proto=_u8, tcp_flags=_u8, is_reply=st.booleans(),
    ct_state=_u8, payload=st.binary(max_size=128)))
def test_decode_never_raises(raw: schema.RawFlowEvent) -> None:
    batch = schema.RawEventBatch(cluster="c", node="n", events=[raw], boot_time_ns=2**62)
    result = decode_batch(batch, LOOKUPS)
    assert result.undecodable + bool(result.flows) == 1
    for flow in result.flows:
        flowrender.format_compact(flow)
        hubble.format_jsonpb(flow)


def test_trace_carries_interface_index() -> None:
    (flow,) = one(ev(0, saddr=CHECKOUT_IP, daddr=PAYMENTS_IP, proto=17, direction=2, ifindex=17))
    assert flow.interface == {"index": 17}
    assert '"interface":{"index":17}' in hubble.format_jsonpb(flow)
