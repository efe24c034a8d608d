"""The per-endpoint DNS name cache and the ``source_names``/``destination_names`` it gives flows."""

from __future__ import annotations

import pytest

from ciliary import hubble, schema
from ciliary.cli import flowrender
from ciliary.dnswire import a_record, build_response, encode_name, parse_dns
from services.flows.decode import decode_batch
from services.flows.enrich import EnrichmentState
from services.flows.names import EndpointNameCache, answer_names
from services.flows.settings import name_cache_from_env as _name_cache
from tests.unit.test_flows_scenario import LOOKUPS

S = 1_000_000_000
NODE = "default/node-1"
POD, OTHER_POD, DNS_SERVER = "10.0.1.5", "10.0.1.9", "10.0.2.3"
WORLD = "203.0.113.80"


def response(query: str, *answers: tuple[int, int, bytes, str], rcode: int = 0):  # noqa: ANN201
    msg = parse_dns(build_response(query, 1, list(answers), rcode=rcode))
    assert msg is not None
    return msg


def a(owner: str, ip: str, ttl: int = 30) -> tuple[int, int, bytes, str]:
    return (1, ttl, a_record(ip), owner)


def cname(owner: str, target: str, ttl: int = 300) -> tuple[int, int, bytes, str]:
    return (5, ttl, encode_name(target), owner)


# ---------------------------------------------------------------- answer_names


def test_query_name_without_trailing_dot_lower_case() -> None:
    assert answer_names(response("WWW.Example.COM", a("WWW.Example.COM", WORLD, 30))) == {
        WORLD: {"www.example.com": 30}}


def test_cname_chain_names_every_step_with_the_lowest_ttl() -> None:
    msg = response("www.example.com", cname("www.example.com", "edge.cdn.net", 300),
                   cname("edge.cdn.net", "pop1.cdn.net", 60), a("pop1.cdn.net", WORLD, 120),
                   a("unrelated.org", "203.0.113.99", 5))
    assert answer_names(msg) == {
        WORLD: {"www.example.com": 60, "edge.cdn.net": 60, "pop1.cdn.net": 60}}


@pytest.mark.parametrize("msg", [
    response("gone.example.com", rcode=3),
    response("empty.example.com"),
])
def test_failed_or_empty_answers_teach_nothing(msg) -> None:  # noqa: ANN001
    assert answer_names(msg) == {}


# ---------------------------------------------------------------- EndpointNameCache


def test_ttl_is_respected_without_a_floor() -> None:
    cache = EndpointNameCache(min_ttl_s=0)
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD, 30)), 100 * S)
    assert cache.names_of(NODE, POD, WORLD, 129 * S) == ["example.com"]
    assert cache.names_of(NODE, POD, WORLD, 130 * S) == []
    assert cache.stats()["entries"] == 0 and cache.stats()["expired"] == 1


def test_min_ttl_floor_and_refresh_only_extends() -> None:
    cache = EndpointNameCache(min_ttl_s=600)
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD, 0)), 100 * S)
    assert cache.names_of(NODE, POD, WORLD, 699 * S) == ["example.com"]
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD, 30)), 90 * S)  # earlier expiry
    assert cache.names_of(NODE, POD, WORLD, 700 * S) == []
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD, 900)), 100 * S)  # later one
    assert cache.names_of(NODE, POD, WORLD, 999 * S) == ["example.com"]


def test_several_names_for_one_address_sorted() -> None:
    cache = EndpointNameCache(min_ttl_s=0)
    cache.learn(NODE, POD, response("www.example.com", a("www.example.com", WORLD)), 0)
    cache.learn(NODE, POD, response("api.example.com", a("api.example.com", WORLD)), 0)
    cache.learn(NODE, POD, response("api.example.com", a("api.example.com", WORLD)), 0)
    assert cache.names_of(NODE, POD, WORLD, S) == ["api.example.com", "www.example.com"]
    assert cache.entries == 2


def test_endpoints_and_nodes_are_isolated() -> None:
    cache = EndpointNameCache(min_ttl_s=0)
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD)), 0)
    assert cache.names_of(NODE, OTHER_POD, WORLD, S) == []
    assert cache.names_of("default/node-2", POD, WORLD, S) == []
    assert cache.names_of(NODE, POD, "203.0.113.81", S) == []


def test_bounded_oldest_expiry_evicted() -> None:
    cache = EndpointNameCache(max_entries=3, min_ttl_s=0)
    for i, ttl in enumerate([50, 10, 40, 30]):
        cache.learn(NODE, POD, response(f"n{i}.example.com", a(f"n{i}.example.com", f"203.0.113.{i}", ttl)), 0)
    assert cache.entries == 3 and cache.evicted == 1
    assert cache.names_of(NODE, POD, "203.0.113.1", S) == []  # TTL 10: the oldest expiry
    assert [cache.names_of(NODE, POD, f"203.0.113.{i}", S) for i in (0, 2, 3)] == [
        ["n0.example.com"], ["n2.example.com"], ["n3.example.com"]]


def test_expired_entries_are_pruned_when_learning() -> None:
    cache = EndpointNameCache(max_entries=10, min_ttl_s=0)
    for i in range(5):
        cache.learn(NODE, POD, response(f"n{i}.example.com", a(f"n{i}.example.com", f"203.0.113.{i}", 1)), 0)
    cache.learn(NODE, POD, response("late.example.com", a("late.example.com", WORLD, 1)), 5 * S)
    assert cache.entries == 1 and cache.expired == 5 and cache.evicted == 0
    assert set(cache.nodes[NODE][POD]) == {WORLD}


def test_pruning_keeps_an_entry_a_later_answer_extended() -> None:
    cache = EndpointNameCache(min_ttl_s=0)
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD, 100)), 0)
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD, 200)), 0)
    cache.learn(NODE, POD, response("other.example", a("other.example", "203.0.113.9", 1000)), 150 * S)
    assert cache.names_of(NODE, POD, WORLD, 160 * S) == ["example.com"]
    assert cache.stats()["expired"] == 0


def test_forget_ip_and_pod_deletion() -> None:
    cache = EndpointNameCache(min_ttl_s=0)
    state = EnrichmentState("default", cache)
    state.apply_pod("default/client", {"metadata": {"name": "client"}, "status": {"podIP": POD}})
    cache.learn(NODE, POD, response("example.com", a("example.com", WORLD)), 0)
    state.apply_pod_status("default/client", {"podIP": POD})  # same address: kept
    assert cache.names_of(NODE, POD, WORLD, S) == ["example.com"]
    state.apply_pod("default/client", None)
    state.apply_pod_status("default/client", None)
    assert cache.names_of(NODE, POD, WORLD, S) == [] and cache.entries == 0


@pytest.mark.parametrize(("env", "expected"), [
    ({}, (100_000, 3600 * S)),
    ({"CILIARY_FLOWS_NAMES_MAX": "10", "CILIARY_FLOWS_NAMES_MIN_TTL": "0"}, (10, 0)),
    ({"CILIARY_FLOWS_NAMES_MAX": "many"}, (100_000, 3600 * S)),
    ({"CILIARY_FLOWS_NAMES_MIN_TTL": "-1"}, (100_000, 3600 * S)),
])
def test_settings_from_the_environment(env: dict[str, str], expected: tuple[int, int]) -> None:
    cache = _name_cache(env)
    assert (cache.max_entries, cache.min_ttl_ns) == expected


# ---------------------------------------------------------------- enrichment of flows

BOOT = 1_795_671_000 * S


def _ev(t_s: float, **kw: object) -> schema.RawFlowEvent:
    return schema.RawFlowEvent(ts_ns=int(t_s * S), **kw)  # type: ignore[arg-type]


def _batch(*events: schema.RawFlowEvent, seq: int = 1) -> schema.RawEventBatch:
    return schema.RawEventBatch(cluster="default", node="node-1", boot_time_ns=BOOT, events=list(events), seq=seq)


DNS_RESPONSE = build_response("api.example.com", 1, [a("api.example.com", WORLD, 30)])
# the answer entering POD (client side, ingress): teaches POD's cache
LEARN = _ev(1, saddr=DNS_SERVER, daddr=POD, sport=53, dport=40000, proto=17, src_identity=102,
            dst_identity=1234, ep_id=101, direction=1, is_reply=True, payload=DNS_RESPONSE)
CONNECT = _ev(2, saddr=POD, daddr=WORLD, sport=43000, dport=443, proto=6, src_identity=1234,
              dst_identity=2, ep_id=101, direction=2, tcp_flags=0x02)
REPLY = _ev(2.1, saddr=WORLD, daddr=POD, sport=443, dport=43000, proto=6, src_identity=2,
            dst_identity=1234, ep_id=101, direction=1, tcp_flags=0x12, is_reply=True)
OTHER = _ev(2.2, saddr=OTHER_POD, daddr=WORLD, sport=43001, dport=443, proto=6, src_identity=9012,
            dst_identity=2, ep_id=103, direction=2, tcp_flags=0x02)


def test_flows_carry_the_names_the_local_endpoint_resolved() -> None:
    cache = EndpointNameCache(min_ttl_s=0)
    flows = decode_batch(_batch(LEARN, CONNECT, REPLY, OTHER), LOOKUPS, cache).flows
    by_ip = [(f.ip.source, f.ip.destination, f.source_names, f.destination_names) for f in flows]
    assert (POD, WORLD, [], ["api.example.com"]) in by_ip  # egress: the source's names for the peer
    assert (WORLD, POD, ["api.example.com"], []) in by_ip  # reply: the destination's names for the source
    assert (OTHER_POD, WORLD, [], []) in by_ip  # another endpoint did not resolve it
    assert all(not f.source_names and not f.destination_names for f in flows if f.ip.source == DNS_SERVER)
    connect = next(f for f in flows if f.ip.source == POD)
    assert flowrender.host_names(connect)[1] == "api.example.com:443"
    assert " -> api.example.com:443 " in flowrender.format_compact(connect)
    assert "api.example.com:443" in flowrender.format_table([connect])
    assert hubble.flow_dict(connect)["destination_names"] == ["api.example.com"]


def test_names_expire_with_the_answer_and_need_a_cache() -> None:
    late = _ev(40, saddr=POD, daddr=WORLD, sport=43002, dport=443, proto=6, src_identity=1234,
               dst_identity=2, ep_id=101, direction=2, tcp_flags=0x02)
    cache = EndpointNameCache(min_ttl_s=0)
    decode_batch(_batch(LEARN), LOOKUPS, cache)
    assert decode_batch(_batch(CONNECT, seq=2), LOOKUPS, cache).flows[0].destination_names == ["api.example.com"]
    assert decode_batch(_batch(late, seq=3), LOOKUPS, cache).flows[0].destination_names == []
    assert all(not f.destination_names for f in decode_batch(_batch(LEARN, CONNECT), LOOKUPS).flows)


def test_a_dns_response_seen_leaving_the_server_teaches_nothing() -> None:
    leaving = _ev(1, saddr=DNS_SERVER, daddr=POD, sport=53, dport=40000, proto=17, src_identity=102,
                  dst_identity=1234, ep_id=55, direction=2, payload=DNS_RESPONSE)
    cache = EndpointNameCache(min_ttl_s=0)
    decode_batch(_batch(leaving), LOOKUPS, cache)
    assert cache.entries == 0
