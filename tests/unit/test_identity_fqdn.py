"""toFQDNs name cache and selectors (services/identity/fqdn.py)."""

from __future__ import annotations

import pytest

from ciliary.dnswire import a_record, build_query, build_response, encode_name
from services.identity import fqdn
from services.identity.fqdn import FQDNAddressCache, FQDNSelector, SelectorMatcher


@pytest.mark.parametrize(("spec", "name", "hit"), [
    # matchName: exact, case and trailing dot normalised
    ("api.payment-gateway.example", "api.payment-gateway.example.", True),
    ("API.Payment-Gateway.example.", "api.payment-gateway.example", True),
    ("api.payment-gateway.example", "x.api.payment-gateway.example", False),
    ("api.payment-gateway.example", "api.payment-gateway.example.com", False),
    # one * stays inside one label (Cilium's [-a-zA-Z0-9_]*)
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "A-b_9.Example.COM.", True),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "example.com", False),
    ("*.example.com", "aexample.com", False),
    ("api*.example.com", "api.example.com", True),
    ("api*.example.com", "api-v2.example.com", True),
    ("api*.example.com", "v2api.example.com", False),
    ("*.*.example.com", "a.b.example.com", True),
    # ** prefix: one or more whole labels
    ("**.example.com", "a.example.com", True),
    ("**.example.com", "a.b.c.example.com", True),
    ("**.example.com", "example.com", False),
    # * alone: every name
    ("*", "example.com", True),
    ("*", "a.b.c", True),
    ("*", "localhost", True),
    # dots in a pattern are literal
    ("a.example.com", "aXexample.com", False),
])
def test_selector_matching_table(spec: str, name: str, hit: bool) -> None:
    sel = fqdn.selector(match_pattern=spec) if "*" in spec else fqdn.selector(match_name=spec)
    assert sel is not None
    assert sel.matches(name) is hit


def test_selector_label_and_normalisation() -> None:
    assert fqdn.selector(match_name="API.Example.com.") == FQDNSelector("api.example.com")
    assert FQDNSelector("api.example.com").label == "fqdn:api.example.com"
    assert fqdn.selector(match_pattern="*.Example.com").label == "fqdn:*.example.com"  # type: ignore[union-attr]
    # a pattern without * selects the same as the name: one selector, one label
    assert fqdn.selector(match_pattern="a.example") == fqdn.selector(match_name="a.example")
    assert fqdn.selector() is None


def test_policy_selectors_from_specs() -> None:
    manifest = {"spec": {"egress": [{"toFQDNs": [{"matchName": "a.example."},
                                                  {"matchPattern": "*.b.example"}]},
                                    {"toEndpoints": [{}]}]},
                "specs": [{"egress": [{"toFQDNs": [{"matchName": "C.example"}, "junk", {}]}]},
                          "junk"]}
    found = fqdn.policy_selectors("CiliumNetworkPolicy", manifest)
    assert found == {FQDNSelector("a.example"), FQDNSelector("*.b.example"), FQDNSelector("c.example")}
    assert fqdn.policy_selectors("CiliumClusterwideNetworkPolicy", manifest) == found
    assert fqdn.policy_selectors("NetworkPolicy", manifest) == set()
    assert fqdn.policy_selectors("CiliumNetworkPolicy", {"spec": None}) == set()


def response(name: str, *answers: tuple[str, int], rcode: int = 0) -> bytes:
    return build_response(name, 1, [(1, ttl, a_record(ip)) for ip, ttl in answers], rcode=rcode)


def test_min_ttl_and_expiry() -> None:
    cache = FQDNAddressCache(min_ttl=60, max_entries=100)
    assert cache.ingest(response("a.example", ("203.0.113.1", 5), ("203.0.113.2", 600)), now=1000) == 2
    assert cache.names == {"a.example": {"203.0.113.1": 1060.0, "203.0.113.2": 1600.0}}
    assert cache.next_expiry == 1060.0
    assert cache.expire(1059.9) == 0
    assert cache.expire(1060) == 1
    assert cache.names == {"a.example": {"203.0.113.2": 1600.0}}
    assert cache.next_expiry == 1600.0
    assert cache.expire(5000) == 1
    assert cache.names == {} and cache.size == 0 and cache.next_expiry is None
    assert cache.expired == 2


def test_later_answers_extend_never_shorten() -> None:
    cache = FQDNAddressCache(min_ttl=0, max_entries=100)
    assert cache.add("a.example", "203.0.113.1", 100, now=0) is True
    assert cache.add("a.example", "203.0.113.1", 10, now=50) is False  # 60 < 100: kept
    assert cache.names["a.example"]["203.0.113.1"] == 100
    assert cache.add("a.example", "203.0.113.1", 100, now=50) is False  # extended, not new
    assert cache.names["a.example"]["203.0.113.1"] == 150
    assert cache.expire(100) == 0  # the stale heap entry of the first answer expires nothing
    assert cache.size == 1 and cache.next_expiry == 150


def test_cap_evicts_what_expires_first_and_counts() -> None:
    cache = FQDNAddressCache(min_ttl=0, max_entries=3)
    for i, ttl in enumerate((50, 10, 30)):
        cache.add(f"n{i}.example", f"203.0.113.{i}", ttl, now=0)
    assert cache.add("n3.example", "203.0.113.3", 40, now=0) is True
    assert cache.size == 3 and cache.evicted == 1
    assert "n1.example" not in cache.names  # ttl 10 expired first: evicted
    # a newcomer that would expire first is itself the one evicted
    assert cache.add("n4.example", "203.0.113.4", 1, now=0) is False
    assert cache.size == 3 and cache.evicted == 2
    assert sorted(cache.names) == ["n0.example", "n2.example", "n3.example"]


def test_heap_stays_bounded_under_refreshes() -> None:
    cache = FQDNAddressCache(min_ttl=0, max_entries=10)
    for t in range(1000):
        cache.add("a.example", "203.0.113.1", 10, now=t)
    assert len(cache._heap) <= 2 * cache.size + 65
    assert cache.next_expiry == 1009


def test_ingest_ignores_queries_errors_garbage_and_unwanted_names() -> None:
    cache = FQDNAddressCache(min_ttl=0)
    assert cache.ingest(build_query("a.example"), now=0) == 0
    assert cache.ingest(response("a.example", ("203.0.113.1", 5), rcode=2), now=0) == 0
    assert cache.ingest(b"\x00\x01garbage", now=0) == 0
    assert cache.ingest(response("b.example", ("203.0.113.2", 5)), now=0,
                        wanted=lambda name: name == "a.example") == 0
    assert cache.size == 0
    chained = build_response("www.a.example", 1, [
        (5, 30, encode_name("edge.cdn.example"), "www.a.example"),
        (1, 30, a_record("203.0.113.3"), "edge.cdn.example")])
    assert cache.ingest(chained, now=0) == 1
    assert cache.names == {"www.a.example": {"203.0.113.3": 30.0}}  # the query name learns it


def test_prefixes_carry_every_matching_selector_label() -> None:
    cache = FQDNAddressCache(min_ttl=0)
    cache.add("api.example.com", "203.0.113.5", 60, now=0)
    cache.add("www.example.com", "203.0.113.5", 60, now=0)
    cache.add("www.example.com", "203.0.113.6", 60, now=0)
    cache.add("other.test", "203.0.113.7", 60, now=0)
    cache.add("v6.example.com", "2001:db8::5", 60, now=0)
    matcher = SelectorMatcher()
    assert matcher.set_selectors([FQDNSelector("api.example.com"), FQDNSelector("*.example.com")])
    assert not matcher.set_selectors([FQDNSelector("*.example.com"), FQDNSelector("api.example.com")])
    assert fqdn.fqdn_prefixes(cache, matcher) == {
        "203.0.113.5/32": ("fqdn:*.example.com", "fqdn:api.example.com"),
        "203.0.113.6/32": ("fqdn:*.example.com",),
        "2001:db8::5/128": ("fqdn:*.example.com",),
    }
    assert matcher.wanted("OTHER.test.") is False
    matcher.set_selectors([FQDNSelector("other.test")])
    assert fqdn.fqdn_prefixes(cache, matcher) == {"203.0.113.7/32": ("fqdn:other.test",)}
