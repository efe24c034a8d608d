"""ciliary.dnswire on real response packets: answer records, TTLs and CNAME chains."""

from __future__ import annotations

import ipaddress

from ciliary.dnswire import (
    TTL_NONE,
    DNSRecord,
    a_record,
    build_query,
    build_response,
    encode_name,
    parse_dns,
)
from services.flows import dns as flows_dns

# www.example.com AAAA -> CNAME example.com. (300s) -> AAAA (60s), as captured
RESPONSE_AAAA_CNAME = bytes.fromhex(
    "9a4e81800001000200000000"
    "03777777076578616d706c6503636f6d00001c0001"
    "c00c000500010000012c0002c010"
    "c010001c00010000003c001026062800022000010248189325c81946"
)


def test_flows_names_are_the_shared_parser() -> None:
    assert flows_dns.parse_dns is parse_dns
    assert flows_dns.build_response is build_response


def test_records_of_a_captured_cname_chain() -> None:
    msg = parse_dns(RESPONSE_AAAA_CNAME)
    assert msg is not None
    assert msg.records == [
        DNSRecord("www.example.com.", "CNAME", 300, "example.com."),
        DNSRecord("example.com.", "AAAA", 60, "2606:2800:220:1:248:1893:25c8:1946"),
    ]
    assert msg.address_ttls() == {"2606:2800:220:1:248:1893:25c8:1946": 60}


def test_a_records_with_ttls() -> None:
    payload = build_response("api.payment-gateway.example", 1, [
        (1, 30, a_record("203.0.113.10")), (1, 10, a_record("203.0.113.11"))])
    msg = parse_dns(payload)
    assert msg is not None and msg.response and msg.rcode == 0
    assert msg.query == "api.payment-gateway.example."
    assert msg.qtypes == ["A"]
    assert msg.address_ttls() == {"203.0.113.10": 30, "203.0.113.11": 10}
    assert msg.ttl == 10


def test_chain_ttl_is_the_lowest_along_the_chain_and_strangers_are_ignored() -> None:
    payload = build_response("www.shop.example", 1, [
        (5, 20, encode_name("edge.cdn.example"), "www.shop.example"),
        (1, 600, a_record("203.0.113.20"), "edge.cdn.example"),
        # an address owned by a name outside the chain (a hostile or sloppy server)
        (1, 600, a_record("203.0.113.66"), "other.example"),
    ])
    msg = parse_dns(payload)
    assert msg is not None
    assert msg.cnames == ["edge.cdn.example."]
    assert sorted(msg.ips) == ["203.0.113.20", "203.0.113.66"]
    assert msg.address_ttls() == {"203.0.113.20": 20}


def test_chain_in_reverse_order_and_case_insensitive_owner() -> None:
    payload = build_response("WWW.Shop.Example", 1, [
        (1, 50, a_record("203.0.113.21"), "b.example"),
        (5, 40, encode_name("b.example"), "a.example"),
        (5, 60, encode_name("A.example"), "www.shop.example"),
    ])
    msg = parse_dns(payload)
    assert msg is not None
    assert msg.address_ttls() == {"203.0.113.21": 40}


def test_truncated_answer_keeps_complete_records() -> None:
    payload = build_response("x.example", 1, [(1, 5, a_record("203.0.113.1")),
                                              (1, 5, a_record("203.0.113.2"))])
    msg = parse_dns(payload[:-3])
    assert msg is not None and msg.truncated
    assert msg.address_ttls() == {"203.0.113.1": 5}


def test_query_and_nxdomain_teach_no_addresses() -> None:
    query = parse_dns(build_query("x.example"))
    assert query is not None and not query.response and query.address_ttls() == {}
    nx = parse_dns(build_response("x.example", 1, [], rcode=3))
    assert nx is not None and nx.rcode == 3 and nx.ttl == TTL_NONE and nx.records == []


def test_ipv6_record_value_is_canonical_text() -> None:
    addr = ipaddress.IPv6Address("2001:db8::1")
    msg = parse_dns(build_response("v6.example", 28, [(28, 7, addr.packed)]))
    assert msg is not None
    assert msg.address_ttls() == {"2001:db8::1": 7}


def test_garbage_never_raises() -> None:
    for data in (b"", b"\x00" * 11, b"\xff" * 64, RESPONSE_AAAA_CNAME[:20]):
        msg = parse_dns(data)
        assert msg is None or msg.address_ttls() == {}
