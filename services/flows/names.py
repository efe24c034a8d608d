"""Per-endpoint DNS name cache: which names a local endpoint resolved to an IP (pure).

Hubble fills a flow's ``destination_names`` with the names the *source* endpoint's FQDN
cache holds for the destination IP, and ``source_names`` with the names the
*destination* endpoint's cache holds for the source IP; an endpoint that is not local to
the node that saw the packet has no cache, so its side stays empty. This module is that
cache for the flows service, fed by the DNS responses it decodes.

Invariants:
- Keyed by (node name ``<cluster>/<node>``, endpoint IP) → peer IP → {name: expiry ns}.
  The endpoint IP is the address the response was delivered to; it is stable for the
  endpoint's life and, unlike the datapath's endpoint id, known for both sides of every
  flow, so a flow between two endpoints of one node names both sides as Hubble does.
  Only endpoints that received a DNS response on that node have entries, which is what
  makes the lookup "local endpoints only". ``forget_ip`` drops an endpoint whose address
  is gone (a deleted pod), so a reused address does not inherit the old pod's names.
- Names come from a successful response (rcode 0): the query name and every name of the
  CNAME chain from it that leads to an A/AAAA record, without the trailing dot and in
  lower case (Hubble trims the dot). Each gets the addresses the chain reaches.
- An entry expires at response time + max(answer TTL, ``min_ttl_s``); the TTL is the
  lowest along the chain, as a resolver caches it. A newer answer extends, never
  shortens, an entry. Times are the flows' own timestamps (boot time + kernel ns), so
  the cache is a pure function of the flows fed to it.
- The cache is a ``ciliary.dnscache.DNSCache`` of (node, endpoint, peer, name) -> expiry
  ns. Expired entries are pruned lazily: on lookup (that endpoint and peer only), and on
  every ``learn`` all entries expired at that response's time. At most ``max_entries``
  (endpoint, peer, name) entries are kept; beyond that the entries with the oldest
  expiry are evicted (``evicted``). A node's endpoint map, once created, is never
  removed, so a caller may hold it across ``learn`` calls (``decode_batch`` does).
- A lookup is two dict probes when the endpoint has no entry; names come back sorted
  and deduplicated, as a new list the caller may keep.
"""

from __future__ import annotations

from ciliary.dnscache import DNSCache
from ciliary.dnswire import DNSMessage

DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MIN_TTL_S = 3600  # Cilium's tofqdns-min-ttl default, as the identity service uses
ENV_MAX_ENTRIES = "CILIARY_FLOWS_NAMES_MAX"
ENV_MIN_TTL = "CILIARY_FLOWS_NAMES_MIN_TTL"
_NS = 1_000_000_000

# endpoint ip -> peer ip -> name -> expiry (unix ns)
EndpointNames = dict[str, dict[str, dict[str, int]]]


def answer_names(msg: DNSMessage) -> dict[str, dict[str, int]]:
    """Address -> {name: TTL s} for a successful response: the query name and each
    CNAME-chain name that reaches the address (no trailing dot, lower case)."""
    if not msg.response or msg.rcode != 0 or not msg.query or not msg.records:
        return {}
    query = msg.query.lower()
    chain, parent = msg.cname_chain()
    out: dict[str, dict[str, int]] = {}
    for rec in msg.records:
        owner = rec.name.lower()
        if rec.type not in ("A", "AAAA") or owner not in chain:
            continue
        ttl = min(chain[owner], rec.ttl)
        names = out.setdefault(rec.value, {})
        name, seen = owner, set()
        while name and name not in seen:  # the owner and every name leading to it
            seen.add(name)
            key = name.rstrip(".")
            if key:
                names[key] = max(names.get(key, 0), ttl)
            name = parent.get(name, "")
        names.setdefault(query.rstrip("."), ttl)
    return out


class EndpointNameCache(DNSCache):
    """Names local endpoints resolved, per node (see the module invariants)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, min_ttl_s: float = DEFAULT_MIN_TTL_S) -> None:
        if max_entries < 1:
            raise ValueError(f"{ENV_MAX_ENTRIES}: must be at least 1, got {max_entries}")
        if min_ttl_s < 0:
            raise ValueError(f"{ENV_MIN_TTL}: must not be negative, got {min_ttl_s}")
        # (node, endpoint ip, peer ip, name) -> expiry ns; node dicts are never removed
        super().__init__(depth=4, max_entries=max_entries, min_ttl=int(min_ttl_s * _NS), pinned_levels=1)

    @property
    def nodes(self) -> dict[str, EndpointNames]:
        return self.root

    @property
    def entries(self) -> int:
        return self.size

    @property
    def min_ttl_ns(self) -> int:
        return int(self.min_ttl)

    # ------------------------------------------------------------ feeding

    def node(self, node_name: str) -> EndpointNames:
        """The (live, possibly empty) endpoint map of one node, for ``lookup``."""
        hit = self.root.get(node_name)
        if hit is None:
            hit = self.root[node_name] = {}
        return hit

    def learn(self, node_name: str, endpoint_ip: str, msg: DNSMessage, now_ns: int) -> int:
        """Record a response delivered to ``endpoint_ip``; returns the entries it set."""
        answers = answer_names(msg)
        if not answers:
            return 0
        self.expire(now_ns)
        changed = 0
        for address, names in answers.items():
            for name, ttl in names.items():
                changed += self.put((node_name, endpoint_ip, address, name), ttl * _NS, now_ns)
        self.evict()
        return changed

    def forget_ip(self, ip: str) -> None:
        """Drop the names of an endpoint whose address is gone, on every node."""
        for node_name in list(self.root):
            self.discard((node_name, ip))

    # ------------------------------------------------------------ lookups

    def lookup(self, endpoints: EndpointNames, endpoint_ip: str, peer_ip: str, now_ns: int) -> list[str]:
        """Sorted names ``endpoint_ip`` resolved to ``peer_ip`` still valid at ``now_ns``."""
        peers = endpoints.get(endpoint_ip)
        if peers is None:
            return []
        names = peers.get(peer_ip)
        if not names:
            return []
        live = [name for name, expiry in names.items() if expiry > now_ns]
        if len(live) != len(names):
            self.drop_expired(((endpoints, endpoint_ip), (peers, peer_ip)), now_ns, level=1)
        live.sort()
        return live

    def names_of(self, node_name: str, endpoint_ip: str, peer_ip: str, now_ns: int) -> list[str]:
        endpoints = self.root.get(node_name)
        return self.lookup(endpoints, endpoint_ip, peer_ip, now_ns) if endpoints else []
