"""toFQDNs: selectors from policies, and the DNS name cache that turns them into prefixes.

Pure code: manifests, DNS payloads and clock readings in, plain data out; no I/O.

Invariants:
- An ``FQDNSelector`` is Cilium's ``matchName``/``matchPattern``, normalised: lower case,
  surrounding blanks and the trailing dot removed. Its identity label is
  ``fqdn:<normalised text>`` (Cilium's ``FQDNSelector.IdentityLabel``); a ``matchName``
  and a ``matchPattern`` without ``*`` that spell the same name are the same selector.
- Pattern matching follows Cilium's ``pkg/fqdn/matchpattern``: ``*`` alone matches every
  name; a leading ``**.`` matches one or more whole labels (``**.example.com`` matches
  ``a.example.com`` and ``a.b.example.com``, not ``example.com``); any other ``*``
  matches zero or more DNS characters ``[-a-zA-Z0-9_]`` *within one label*, so
  ``*.example.com`` matches ``a.example.com`` but neither ``a.b.example.com`` nor
  ``example.com``. Matching is case-insensitive on whole names.
- The `FQDNAddressCache` is a ``ciliary.dnscache.DNSCache`` of name -> {ip: expiry}, times in
  seconds. A DNS answer keeps an address for ``max(TTL, min_ttl)`` seconds from the
  moment it was seen (Cilium's ``tofqdns-min-ttl``); a later answer only ever extends an
  entry. Only answers with rcode 0 teach addresses, only A/AAAA records reached from the
  query name through its CNAME chain count, and the name learned is the query name.
- The cache holds at most ``max_entries`` (name, ip) pairs: inserting beyond that evicts
  the entries that expire first, and every eviction is counted (``evicted``).
- ``expire(now)`` removes exactly the entries whose expiry is ``<= now``;
  ``next_expiry`` is the earliest expiry still held (None when empty).
- ``fqdn_prefixes`` is a pure function of the cache content and the selector set:
  host prefix -> sorted ``fqdn:`` labels of every selector matching a name that
  resolved to it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ciliary.dnscache import DNSCache
from ciliary.dnswire import parse_dns

ENV_MIN_TTL = "CILIARY_FQDN_MIN_TTL"
ENV_MAX_ENTRIES = "CILIARY_FQDN_MAX_ENTRIES"
DEFAULT_MIN_TTL = 3600  # Cilium's tofqdns-min-ttl default
DEFAULT_MAX_ENTRIES = 50_000
LABEL_SOURCE = "fqdn"

_DNS_CHARS = "[-a-zA-Z0-9_]"
_POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


def normalize_name(name: str) -> str:
    """``API.Example.com.`` -> ``api.example.com``."""
    return name.strip().lower().rstrip(".")


@dataclass(frozen=True, order=True)
class FQDNSelector:
    """One ``toFQDNs`` entry (see module invariants)."""

    text: str

    @property
    def label(self) -> str:
        return f"{LABEL_SOURCE}:{self.text}"

    @property
    def is_pattern(self) -> bool:
        return "*" in self.text

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return re.compile(pattern_regex(self.text))

    def matches(self, name: str) -> bool:
        name = normalize_name(name)
        if not self.is_pattern:
            return name == self.text
        return self._regex.fullmatch(name) is not None


def pattern_regex(pattern: str) -> str:
    """Cilium's matchPattern as an (unanchored; use fullmatch) regular expression."""
    pattern = normalize_name(pattern)
    if pattern == "*":
        return rf"({_DNS_CHARS}+\.)*{_DNS_CHARS}+"
    prefix = ""
    if pattern.startswith("**."):
        prefix = rf"({_DNS_CHARS}+\.)+"
        pattern = pattern[3:]
    parts = [re.escape(p) for p in pattern.split("*")]
    return prefix + f"{_DNS_CHARS}*".join(parts)


def selector(match_name: str = "", match_pattern: str = "") -> FQDNSelector | None:
    """A selector from one ``toFQDNs`` entry; None when it names nothing."""
    text = normalize_name(match_name or match_pattern)
    return FQDNSelector(text) if text else None


def policy_selectors(kind: str, manifest: Mapping[str, Any]) -> set[FQDNSelector]:
    """Every ``toFQDNs`` selector of a CNP/CCNP (``spec`` and ``specs``, egress rules)."""
    if kind not in _POLICY_KINDS:
        return set()
    out: set[FQDNSelector] = set()
    rules = [manifest.get("spec"), *list(manifest.get("specs") or [])]
    for rule in _dicts(rules):
        for egress in _dicts(rule.get("egress")):
            for entry in _dicts(egress.get("toFQDNs")):
                name, pattern = entry.get("matchName"), entry.get("matchPattern")
                found = selector(name if isinstance(name, str) else "",
                                 pattern if isinstance(pattern, str) else "")
                if found is not None:
                    out.add(found)
    return out


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def host_prefix(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


# ---------------------------------------------------------------- the name cache


class FQDNAddressCache(DNSCache):
    """name -> {ip: expiry}, bounded; see module invariants."""

    def __init__(self, min_ttl: float = DEFAULT_MIN_TTL, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        super().__init__(depth=2, max_entries=max_entries, min_ttl=min_ttl)

    @property
    def names(self) -> dict[str, dict[str, float]]:
        return self.root

    def add(self, name: str, ip: str, ttl: float, now: float) -> bool:
        """Learn ``name -> ip``; True when the pair is new (the desired set changed)."""
        path = (normalize_name(name), ip)
        new = self.get(path) is None
        if not self.put(path, float(ttl), now):
            return False
        self.evict()
        return new and self.get(path) is not None

    def ingest(self, payload: bytes, now: float, wanted: Any = None) -> int:
        """Learn the addresses of one DNS response payload; returns how many (name, ip)
        pairs are new. ``wanted(name) -> bool`` filters the names kept (None: all)."""
        msg = parse_dns(payload)
        if msg is None or not msg.response or msg.rcode != 0 or not msg.query:
            return 0
        name = normalize_name(msg.query)
        if not name or (wanted is not None and not wanted(name)):
            return 0
        added = 0
        for ip, ttl in msg.address_ttls().items():
            added += self.add(name, ip, ttl, now)
        return added


# ---------------------------------------------------------------- cache x selectors


class SelectorMatcher:
    """name -> labels of the selectors matching it, memoised per selector set."""

    def __init__(self, memo_limit: int = 4 * DEFAULT_MAX_ENTRIES) -> None:
        self.selectors: frozenset[FQDNSelector] = frozenset()
        self._exact: dict[str, FQDNSelector] = {}
        self._patterns: list[FQDNSelector] = []
        self._memo: dict[str, tuple[str, ...]] = {}
        self._memo_limit = memo_limit

    def set_selectors(self, selectors: Iterable[FQDNSelector]) -> bool:
        """Replace the selector set; True when it changed."""
        new = frozenset(selectors)
        if new == self.selectors:
            return False
        self.selectors = new
        self._exact = {s.text: s for s in new if not s.is_pattern}
        self._patterns = sorted(s for s in new if s.is_pattern)
        self._memo.clear()
        return True

    def labels(self, name: str) -> tuple[str, ...]:
        found = self._memo.get(name)
        if found is None:
            hits = [s.label for s in self._patterns if s.matches(name)]
            exact = self._exact.get(name)
            if exact is not None:
                hits.append(exact.label)
            found = tuple(sorted(hits))
            if len(self._memo) >= self._memo_limit:
                self._memo.clear()
            self._memo[name] = found
        return found

    def wanted(self, name: str) -> bool:
        return bool(self.labels(normalize_name(name)))


def fqdn_prefixes(cache: FQDNAddressCache, matcher: SelectorMatcher) -> dict[str, tuple[str, ...]]:
    """Host prefix -> sorted ``fqdn:`` labels (see module invariants)."""
    out: dict[str, set[str]] = {}
    for name, ips in cache.names.items():
        labels = matcher.labels(name)
        if not labels:
            continue
        for ip in ips:
            out.setdefault(host_prefix(ip), set()).update(labels)
    return {prefix: tuple(sorted(labels)) for prefix, labels in out.items()}
