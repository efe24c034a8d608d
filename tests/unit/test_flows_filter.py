"""Hubble filter semantics over the scenario flows, and flag -> FlowFilter construction."""

from __future__ import annotations

import msgspec
import pytest

from ciliary import flowfilter, schema
from ciliary.flowfilter import FilterError, build_filters, filters_json, selector_matches
from tests.unit.test_flows_scenario import scenario_flows

F = schema.FlowFilter
FLOWS = scenario_flows()
ALL = set(range(len(FLOWS)))
# Names as the name cache gives them (test_flows_names covers how they get there): the
# ICMP echo to the world went to an address checkout resolved as example.com / www.example.com,
# its reply comes from it; 1.1.1.1 is one.one.one.one.
_NAMED = {13: ([], ["example.com", "www.example.com"]), 14: (["example.com", "www.example.com"], []),
          17: ([], ["one.one.one.one"]), 18: ([], ["one.one.one.one"])}
for _i, (_src, _dst) in _NAMED.items():
    FLOWS[_i] = msgspec.structs.replace(FLOWS[_i], source_names=_src, destination_names=_dst)

# Scenario flows by index (see test_flows_scenario):
#  0 checkout->payments SYN from-endpoint      10 DNS L7 response (A)
#  1 checkout->payments SYN to-endpoint        11 DNS NXDOMAIN reply trace
#  2 payments->checkout SYN-ACK reply          12 DNS L7 response NXDOMAIN
#  3 checkout->payments FIN                    13 ICMP echo request to world
#  4 frontend->payments policy-verdict DENIED  14 ICMP echo reply
#  5 frontend->payments drop POLICY_DENIED     15 frontend->checkout policy-verdict AUDIT
#  6 checkout->empty VIP drop NO backend       16 frontend->checkout trace FORWARDED
#  7 checkout->coredns DNS query trace         17 checkout->1.1.1.1 policy-verdict DENIED
#  8 DNS L7 request                            18 checkout->1.1.1.1 drop POLICY_DENY
#  9 DNS answer reply trace                    19 payments->checkout RST reply
# 20 checkout->payments policy-verdict ALLOWED (L3-L4, ingress), 21 its SYN to-endpoint,
# 22 its FIN to-endpoint (established: no verdict); 23 world->frontend:80 policy-verdict
# ALLOWED (L4-Only), 24 its SYN to-endpoint; 25 checkout->1.1.1.1:853 policy-verdict DENIED
# (deny rule, L3-Only), 26 its drop POLICY_DENY; 27 checkout->coredns:5353 policy-verdict
# ALLOWED (UDP, unpublished rule), 28 its from-endpoint trace
CASES: list[tuple[str, list[schema.FlowFilter], list[schema.FlowFilter], set[int]]] = [
    ("no filters match everything", [], [], ALL),
    ("verdict", [F(verdict=["DROPPED"])], [], {4, 5, 6, 17, 18, 25, 26}),
    ("values of one field are OR'ed", [F(verdict=["DROPPED", "AUDIT"])], [], {4, 5, 6, 15, 17, 18, 25, 26}),
    ("pod with namespace prefix", [F(source_pod=["default/frontend"])], [], {4, 5, 15, 16}),
    ("pod without namespace means default", [F(source_pod=["frontend"])], [], {4, 5, 15, 16}),
    ("pod name prefix in another namespace", [F(source_pod=["kube-system/frontend"])], [], set()),
    ("namespace only", [F(destination_pod=["kube-system/"])], [], {7, 8, 27, 28}),
    ("fields of one filter are AND'ed", [F(source_pod=["default/frontend"], verdict=["DROPPED"])], [], {4, 5}),
    ("filters of a whitelist are OR'ed", [F(source_pod=["frontend"]), F(destination_ip=["1.1.1.1"])], [],
     {4, 5, 15, 16, 17, 18, 25, 26}),
    ("blacklist excludes", [F(verdict=["DROPPED"])], [F(drop_reason_desc=["POLICY_DENY"])], {4, 5, 6}),
    ("blacklist alone", [], [F(protocol=["udp"])], ALL - {7, 8, 9, 10, 11, 12, 17, 18, 27, 28}),
    ("source CIDR", [F(source_ip=["10.0.1.0/24"])], [], ALL - {9, 10, 11, 12, 14, 23, 24}),
    ("destination exact IP", [F(destination_ip=["93.184.216.34"])], [], {13}),
    ("label selector any source", [F(source_label=["app=frontend"])], [], {4, 5, 15, 16}),
    ("label set selector with source", [F(destination_label=["k8s:app in (payments,checkout)"])], [],
     {0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 14, 15, 16, 19, 20, 21, 22}),
    ("label selector AND inside", [F(source_label=["tier=backend,app!=payments"])], [],
     {0, 1, 3, 6, 7, 8, 13, 17, 18, 20, 21, 22, 25, 26, 27, 28}),
    ("reserved label", [F(destination_label=["reserved:world"])], [], {6, 13, 17, 18, 25, 26}),
    ("label absence", [F(source_label=["!app"])], [], {9, 10, 11, 12, 14, 23, 24}),
    ("source identity", [F(source_identity=[9012])], [], {4, 5, 15, 16}),
    ("destination identity world", [F(destination_identity=[2])], [], {6, 13, 17, 18, 25, 26}),
    ("protocol dns is L7", [F(protocol=["dns"])], [], {8, 10, 12}),
    ("protocol udp", [F(protocol=["udp"])], [], {7, 8, 9, 10, 11, 12, 17, 18, 27, 28}),
    ("protocol icmp", [F(protocol=["icmp"])], [], {13, 14}),
    ("protocol and verdict", [F(protocol=["tcp"], verdict=["FORWARDED"])], [],
     {0, 1, 2, 3, 16, 19, 20, 21, 22, 23, 24}),
    ("destination port", [F(destination_port=["8080"])], [], {0, 1, 3, 4, 5, 20, 21, 22}),
    ("source port", [F(source_port=["8080"])], [], {2, 19}),
    ("--port as two filters", [F(source_port=["53"]), F(destination_port=["53"])], [], {7, 8, 9, 10, 11, 12}),
    ("traffic direction", [F(traffic_direction=["INGRESS"])], [], {1, 4, 5, 15, 16, 19, 20, 21, 22, 23, 24}),
    ("event type drop", [F(event_type=[schema.FlowEventTypeFilter(type=1)])], [], {5, 6, 18, 26}),
    ("event type policy-verdict", [F(event_type=[schema.FlowEventTypeFilter(type=5)])], [],
     {4, 15, 17, 20, 23, 25, 27}),
    ("allowed policy verdicts", [F(event_type=[schema.FlowEventTypeFilter(type=5)], verdict=["FORWARDED"])], [],
     {20, 23, 27}),
    ("event type with sub type", [F(event_type=[schema.FlowEventTypeFilter(type=4, match_sub_type=True)])],
     [], {1, 2, 9, 11, 14, 16, 21, 22, 24}),
    ("drop reason desc", [F(drop_reason_desc=["POLICY_DENIED"])], [], {4, 5}),
    ("node name", [F(node_name=["node-1"])], [], ALL),
    ("node name with cluster", [F(node_name=["default/"])], [], ALL),
    ("node name glob miss", [F(node_name=["other/*"])], [], set()),
    ("node name glob", [F(node_name=["node-*"])], [], ALL),
    ("reply", [F(reply=[True])], [], {2, 9, 10, 11, 12, 14, 19}),
    ("dns query regex", [F(dns_query=[r"^payments\."])], [], {8, 10}),
    ("tcp flag", [F(tcp_flags=[schema.TCPFlags(SYN=True)])], [], {0, 1, 2, 4, 5, 6, 15, 16, 20, 21, 23, 24, 25, 26}),
    ("tcp flags all of one", [F(tcp_flags=[schema.TCPFlags(SYN=True, ACK=True)])], [], {2}),
    ("ip version", [F(ip_version=["IPv6"])], [], set()),
    ("uuid", [F(uuid=[FLOWS[3].uuid])], [], {3}),
    ("destination service", [F(destination_service=["default/payments"])], [], {0}),
    ("destination service namespace", [F(destination_service=["default/"])], [], {0, 6}),
    ("source service", [F(source_service=["kube-system/kube-dns"])], [], {9, 10, 11, 12}),
    ("to fqdn exact", [F(destination_fqdn=["example.com"])], [], {13}),
    ("to fqdn trailing dot and case", [F(destination_fqdn=["WWW.Example.com."])], [], {13}),
    ("to fqdn wildcard", [F(destination_fqdn=["*.example.com"])], [], {13}),
    ("fqdn wildcard crosses dots", [F(destination_fqdn=["*.one"])], [], {17, 18}),
    ("fqdn blacklist wildcard", [F(destination_fqdn=["*.example.com"])], [F(destination_fqdn=["www.*"])], set()),
    ("from fqdn", [F(source_fqdn=["example.com"])], [], {14}),
    ("fqdn values OR'ed", [F(destination_fqdn=["example.com", "one.one.one.one"])], [], {13, 17, 18}),
    ("fqdn AND verdict", [F(destination_fqdn=["*"], verdict=["DROPPED"])], [], {17, 18}),
    ("--fqdn as two filters", [F(source_fqdn=["example.com"]), F(destination_fqdn=["example.com"])], [], {13, 14}),
    ("not --to-fqdn", [F(protocol=["icmp"])], [F(destination_fqdn=["*example.com"])], {14}),
    ("fqdn partial name does not match", [F(destination_fqdn=["example"])], [], set()),
    ("flows without names never match", [F(source_fqdn=["*"])], [], {14}),
]


@pytest.mark.parametrize(("name", "whitelist", "blacklist", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filter_semantics(name: str, whitelist: list[schema.FlowFilter],
                          blacklist: list[schema.FlowFilter], expected: set[int]) -> None:
    got = {i for i, f in enumerate(FLOWS) if flowfilter.matches(f, whitelist, blacklist)}
    assert got == expected


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("app=x", ["k8s:app=x"], True),
    ("app==x", ["k8s:app=x"], True),
    ("k8s:app=x", ["k8s:app=x"], True),
    ("container:app=x", ["k8s:app=x"], False),
    ("app!=x", ["k8s:app=y"], True),
    ("app!=x", [], True),
    ("app notin (x, y)", ["k8s:app=z"], True),
    ("app in (x,y),env", ["k8s:app=y", "k8s:env=prod"], True),
    ("app in (x,y),env", ["k8s:app=y"], False),
    ("reserved:world", ["reserved:world"], True),
    ("!reserved:world", ["reserved:world"], False),
])
def test_selector(selector: str, labels: list[str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


@pytest.mark.parametrize("bad", ["app in x", "a b", "=x", "app=(x)"])
def test_bad_selector(bad: str) -> None:
    with pytest.raises(FilterError):
        flowfilter.parse_selector(bad)


# flags (in command-line order) -> (whitelist JSON, blacklist JSON), as hubble builds them
FLAG_CASES: list[tuple[list[tuple[str, str | None]], str, str]] = [
    ([], "[]", "[]"),
    ([("from-pod", "default/checkout"), ("to-pod", "payments")],
     '[{"source_pod":["default/checkout"],"destination_pod":["payments"]}]', "[]"),
    ([("pod", "checkout")],
     '[{"source_pod":["checkout"]},{"destination_pod":["checkout"]}]', "[]"),
    ([("pod", "checkout"), ("verdict", "DROPPED")],
     '[{"source_pod":["checkout"],"verdict":["DROPPED"]},{"destination_pod":["checkout"],"verdict":["DROPPED"]}]', "[]"),
    ([("namespace", "kube-system")],
     '[{"source_pod":["kube-system/"]},{"destination_pod":["kube-system/"]}]', "[]"),
    ([("from-namespace", "a"), ("to-namespace", "b")],
     '[{"source_pod":["a/"],"destination_pod":["b/"]}]', "[]"),
    ([("verdict", "DROPPED"), ("verdict", "forwarded")],
     '[{"verdict":["DROPPED","FORWARDED"]}]', "[]"),
    ([("label", "app=x")],
     '[{"source_label":["app=x"]},{"destination_label":["app=x"]}]', "[]"),
    ([("from-identity", "world"), ("to-identity", "1234")],
     '[{"source_identity":[2],"destination_identity":[1234]}]', "[]"),
    ([("fqdn", "*.example.com")],
     '[{"source_fqdn":["*.example.com"]},{"destination_fqdn":["*.example.com"]}]', "[]"),
    ([("to-fqdn", "a.com"), ("to-fqdn", "b.com"), ("not", None), ("from-fqdn", "c.com")],
     '[{"destination_fqdn":["a.com","b.com"]}]', '[{"source_fqdn":["c.com"]}]'),
    ([("ip", "10.0.0.0/8")],
     '[{"source_ip":["10.0.0.0/8"]},{"destination_ip":["10.0.0.0/8"]}]', "[]"),
    ([("port", "53"), ("protocol", "UDP")],
     '[{"protocol":["udp"],"source_port":["53"]},{"protocol":["udp"],"destination_port":["53"]}]', "[]"),
    ([("to-port", "8080"), ("traffic-direction", "ingress")],
     '[{"traffic_direction":["INGRESS"],"destination_port":["8080"]}]', "[]"),
    ([("type", "trace:to-endpoint")],
     '[{"event_type":[{"type":4,"match_sub_type":true}]}]', "[]"),
    ([("type", "drop"), ("type", "policy-verdict")],
     '[{"event_type":[{"type":1},{"type":5}]}]', "[]"),
    ([("drop-reason-desc", "policy_denied")], '[{"drop_reason_desc":["POLICY_DENIED"]}]', "[]"),
    ([("node-name", "default/node-1")], '[{"node_name":["default/node-1"]}]', "[]"),
    ([("not", None), ("protocol", "dns")], "[]", '[{"protocol":["dns"]}]'),
    ([("from-pod", "x"), ("not", None), ("to-pod", "y")],
     '[{"source_pod":["x"]}]', '[{"destination_pod":["y"]}]'),
    ([("not", None), ("pod", "y")], "[]", '[{"source_pod":["y"]},{"destination_pod":["y"]}]'),
    ([("tcp-flags", "syn,ack")], '[{"tcp_flags":[{"SYN":true,"ACK":true}]}]', "[]"),
]


@pytest.mark.parametrize(("flags", "white", "black"), FLAG_CASES)
def test_flags_to_filters(flags: list[tuple[str, str | None]], white: str, black: str) -> None:
    whitelist, blacklist = build_filters(flags)
    assert filters_json(whitelist) == white
    assert filters_json(blacklist) == black


@pytest.mark.parametrize(("flags", "message"), [
    ([("pod", "a"), ("from-pod", "b")], "cannot be combined"),
    ([("namespace", "a"), ("to-ip", "1.1.1.1")], "cannot be combined"),
    ([("label", "a"), ("to-label", "b")], "cannot be combined"),
    ([("port", "1"), ("from-port", "2")], "cannot be combined"),
    ([("not", None), ("not", None)], "consecutive --not"),
    ([("not", None)], "--not must be followed"),
    ([("verdict", "MAYBE")], "invalid --verdict"),
    ([("traffic-direction", "up")], "invalid traffic direction"),
    ([("identity", "nobody")], "invalid security identity"),
    ([("ip", "10.0.0.300")], "invalid IP"),
    ([("type", "bogus")], "unable to parse type"),
    ([("port", "99999")], "invalid port"),
    ([("protocol", "http2")], "invalid --protocol"),
    ([("drop-reason-desc", "NOPE")], "invalid --drop-reason-desc"),
    ([("fqdn", "a.com"), ("to-fqdn", "b.com")], "cannot be combined"),
    ([("from-fqdn", "a.com"), ("from-ip", "1.1.1.1")], "cannot be combined"),
    ([("to-fqdn", "exa mple.com")], "invalid FQDN filter"),
    ([("from-fqdn", "ex(ample).com")], "invalid FQDN filter"),
])
def test_bad_flags(flags: list[tuple[str, str | None]], message: str) -> None:
    with pytest.raises(FilterError, match=message):
        build_filters(flags)


def test_built_filters_select_the_expected_flows() -> None:
    whitelist, blacklist = build_filters([("pod", "default/frontend"), ("not", None), ("verdict", "DROPPED")])
    got = {i for i, f in enumerate(FLOWS) if flowfilter.matches(f, whitelist, blacklist)}
    assert got == {15, 16, 23, 24}  # the audited connection, and world -> frontend:80


@pytest.mark.parametrize(("flags", "expected"), [
    ([("type", "policy-verdict")], {4, 15, 17, 20, 23, 25, 27}),
    ([("type", "policy-verdict"), ("verdict", "FORWARDED")], {20, 23, 27}),
    ([("type", "policy-verdict"), ("to-pod", "default/payments")], {4, 20}),
    ([("verdict", "FORWARDED"), ("to-pod", "default/payments"), ("to-port", "8080")], {0, 1, 3, 20, 21, 22}),
])
def test_type_policy_verdict_selects_allowed_and_denied_verdicts(flags, expected: set[int]) -> None:
    whitelist, blacklist = build_filters(flags)
    got = {i for i, f in enumerate(FLOWS) if flowfilter.matches(f, whitelist, blacklist)}
    assert got == expected


@pytest.mark.parametrize(("text", "ns"), [
    ("5m", 300 * 10**9), ("1h30m", 5400 * 10**9), ("250ms", 250 * 10**6), ("1.5s", 1500 * 10**6),
    ("2d", 2 * 86400 * 10**9), ("10us", 10_000),
])
def test_durations(text: str, ns: int) -> None:
    assert flowfilter.parse_duration(text) == ns


def test_time_args() -> None:
    now = 1_800_000_000 * 10**9
    assert flowfilter.parse_time_arg("5m", now) == now - 300 * 10**9
    assert flowfilter.parse_time_arg("2026-11-26T05:44:56Z", now) == 1795671896 * 10**9
    assert flowfilter.parse_time_arg("2026-11-26T06:44:56.5+01:00", now) == 1795671896 * 10**9 + 5 * 10**8
    assert flowfilter.parse_time_arg("2026-11-26", now) == 1795651200 * 10**9
    with pytest.raises(FilterError):
        flowfilter.parse_time_arg("yesterday", now)


def test_fqdn_filter_from_a_query_is_validated() -> None:
    with pytest.raises(FilterError, match="invalid FQDN filter 'a/b'"):
        flowfilter.validate([F(destination_fqdn=["a/b"])])
