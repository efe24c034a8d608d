"""DNS decoding of real query/response packets (hex as captured on the wire)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from services.flows.decode import dns_summary
from services.flows.dns import TTL_NONE, build_query, build_response, parse_dns

# dig example.com A (EDNS0 with a client cookie)
QUERY_A = bytes.fromhex(
    "2c0f01200001000000000001"
    "076578616d706c6503636f6d0000010001"
    "0000290fa0000000000000000c000a00080123456789abcdef"
)
# its answer: example.com. 86400 IN A 93.184.216.34 (+ OPT)
RESPONSE_A = bytes.fromhex(
    "2c0f81800001000100000001"
    "076578616d706c6503636f6d0000010001"
    "c00c000100010001518000045db8d822"
    "0000290fa0000000000000"
)
# www.example.com AAAA -> CNAME example.com. (300s) -> AAAA 2606:2800:220:1:248:1893:25c8:1946 (60s)
RESPONSE_AAAA_CNAME = bytes.fromhex(
    "9a4e81800001000200000000"
    "03777777076578616d706c6503636f6d00001c0001"
    "c00c000500010000012c0002c010"
    "c010001c00010000003c001026062800022000010248189325c81946"
)
# nope.example.com A -> NXDOMAIN with the zone's SOA in the authority section
RESPONSE_NXDOMAIN = bytes.fromhex(
    "51d181830001000000010000"
    "046e6f7065076578616d706c6503636f6d0000010001"
    "c01100060001000007080018"
    "026e73c011"
    "0561646d696ec011"
    "78a1b2c3000007080000038400093a8000000e10"
)


def test_query_a() -> None:
    msg = parse_dns(QUERY_A)
    assert msg is not None
    assert not msg.response
    assert msg.id == 0x2C0F
    assert msg.query == "example.com."
    assert msg.qtypes == ["A"]
    assert msg.ips == [] and msg.ttl == 0
    assert dns_summary(msg) == "DNS Query example.com. A"


def test_response_a() -> None:
    msg = parse_dns(RESPONSE_A)
    assert msg is not None and msg.response and msg.rcode == 0
    assert msg.query == "example.com."
    assert msg.ips == ["93.184.216.34"]
    assert msg.ttl == 86400
    assert msg.rrtypes == ["A"]
    assert not msg.truncated
    assert dns_summary(msg) == 'DNS Answer "93.184.216.34" TTL: 86400 (Query example.com. A)'


def test_response_aaaa_with_cname() -> None:
    msg = parse_dns(RESPONSE_AAAA_CNAME)
    assert msg is not None
    assert msg.query == "www.example.com."
    assert msg.qtypes == ["AAAA"]
    assert msg.cnames == ["example.com."]
    assert msg.ips == ["2606:2800:220:1:248:1893:25c8:1946"]
    assert msg.rrtypes == ["CNAME", "AAAA"]
    assert msg.ttl == 60


def test_nxdomain() -> None:
    msg = parse_dns(RESPONSE_NXDOMAIN)
    assert msg is not None
    assert msg.rcode == 3
    assert msg.query == "nope.example.com."
    assert msg.ips == [] and msg.ttl == TTL_NONE
    assert dns_summary(msg) == (
        "DNS Answer RCode: Non-Existent Domain TTL: 4294967295 (Query nope.example.com. A)"
    )


def test_response_cut_at_payload_limit_keeps_complete_answers() -> None:
    answers = [(1, 30, bytes([10, 0, 0, i])) for i in range(1, 12)]
    full = build_response("svc.ns.svc.cluster.local", 1, answers)
    assert len(full) > 128
    msg = parse_dns(full[:128])
    assert msg is not None and msg.truncated
    assert 0 < len(msg.ips) < 11
    assert msg.ips[0] == "10.0.0.1"
    assert parse_dns(full).ips[-1] == "10.0.0.11"


def test_truncated_question_is_not_dns() -> None:
    assert parse_dns(QUERY_A[:20]) is None
    assert parse_dns(QUERY_A[:11]) is None
    assert parse_dns(b"") is None


def test_compression_loop_and_forward_pointer_are_rejected() -> None:
    looped = bytes.fromhex("000101000001000000000000") + b"\xc0\x0c\x00\x01\x00\x01"
    assert parse_dns(looped) is None
    forward = bytes.fromhex("000101000001000000000000") + b"\xc0\x20\x00\x01\x00\x01"
    assert parse_dns(forward) is None


def test_builders_round_trip() -> None:
    q = parse_dns(build_query("a.b.c", 28))
    assert q is not None and q.query == "a.b.c." and q.qtypes == ["AAAA"]
    r = parse_dns(build_response("a.b.c", 1, [(1, 5, b"\x01\x02\x03\x04")], rcode=0))
    assert r is not None and r.ips == ["1.2.3.4"] and r.ttl == 5


def test_unknown_types_are_named_like_miekg() -> None:
    msg = parse_dns(build_query("x.y", 4242))
    assert msg is not None and msg.qtypes == ["TYPE4242"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=160))
def test_never_raises_on_garbage(data: bytes) -> None:
    parse_dns(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(RESPONSE_AAAA_CNAME)), st.integers(0, 2**32 - 1))
def test_never_raises_on_corrupted_real_packets(cut: int, seed: int) -> None:
    rnd = random.Random(seed)
    data = bytearray(RESPONSE_AAAA_CNAME[:cut])
    for _ in range(3):
        if data:
            data[rnd.randrange(len(data))] = rnd.randrange(256)
    parse_dns(bytes(data))
