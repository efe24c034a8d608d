"""Policy resolution: normalised rules × identities → per-identity policy map entries.

Invariants:
- Output is a pure function of (policies, identities, named ports, options) and is
  deterministic: entries sorted by (direction, peer, proto, port, end_port).
- Local identities are endpoints this cluster enforces policy for: host, health, init,
  ingress and cluster identities of the local cluster (cluster ID bits equal to
  ``options.cluster_id``, or 0). The host identity is selected only by ``nodeSelector``
  rules, every other identity only by ``endpointSelector`` rules. Only identities selected
  by at least one rule appear in the result; absence means "no policy, allow all".
- One entry per key (direction, peer, proto, port, end_port); ``peer``/``port``/``proto`` 0
  are wildcards; ``end_port`` 0 means a single port. ``proto`` 0 occurs only with ``port``
  0, because the datapath looks up {peer|0} × {(port, proto), (0, proto), (0, 0)}. When allow and deny rules produce the
  same key the entry is a deny (deny beats allow); its rule is the smallest contributing
  `RuleRef` of the winning verdict.
- Datapath semantics (see `lookup`): a packet in a direction that is not enforced is
  allowed; otherwise it is denied if any matching entry denies, allowed if any matching
  entry allows, denied otherwise. A direction is enforced when a selecting rule enables
  default deny in it, or when selecting rules have sections in it without default deny;
  in the latter case an explicit allow-all entry (`default_allow_ref`) keeps the
  direction open while its deny entries still apply.
- With ``allow_localhost`` (Cilium's ``allow-localhost=always``, its default under
  Kubernetes) every enforced ingress of an endpoint other than the host gets an allow
  entry for peer host (1), so kubelet probes keep working; deny rules still win.
- Audit mode (agent-wide or per identity): deny entries carry ``audit`` and the identity's
  ``audit`` flag tells the datapath to let default-denied traffic pass, logged.
- An identity whose entries occupy more than ``options.max_entries`` map keys (port
  ranges counted expanded) gets ``error`` set (its entries are still returned, never
  truncated), every policy selecting it gets an error
  status, and ``counters["overflow"]`` counts such identities.
- Cost: each rule section's entries are built once per resolution (`SectionEntries`)
  and merged per selected identity by dict updates in precedence order, so a section
  shared by many identities is not re-expanded for each of them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ciliary import schema

from .rules import (
    DIRECTIONS,
    LOCALHOST_REF,
    PROTO_ANY,
    NormPolicy,
    NormRule,
    PolicyKey,
    PortSpec,
    RuleRef,
    Section,
    default_allow_ref,
    normalize,
    rule_id,
    rule_text,
)
from .selectors import (
    CIDR_IDENTITY_FLAG,
    ID_HEALTH,
    ID_HOST,
    ID_INGRESS,
    ID_INIT,
    MIN_CLUSTER_IDENTITY,
    Selector,
    SelectorCache,
    cluster_of,
)

DEFAULT_MAX_ENTRIES = 16384
ALLOW = "allow"
DENY = "deny"

NamedPorts = Mapping[int, Mapping[str, tuple[int, int]]]


@dataclass(frozen=True)
class ResolveOptions:
    cluster_name: str = "default"
    cluster_id: int = 1
    max_entries: int = DEFAULT_MAX_ENTRIES
    audit_mode: bool = False
    audit_identities: frozenset[int] = frozenset()
    local_cluster_only: bool = True  # Cilium's policy-default-local-cluster
    allow_localhost: bool = True  # Cilium's allow-localhost=always (its Kubernetes default)


@dataclass(frozen=True)
class PolicyEntry:
    """One policy map entry of a local identity."""

    peer: int
    port: int
    end_port: int
    proto: int
    direction: str
    verdict: str
    audit: bool
    rule: RuleRef

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        return (self.direction, self.peer, self.proto, self.port, self.end_port)

    def matches(self, peer: int, port: int, proto: int, direction: str) -> bool:
        """Whether the datapath's lookup (keys {peer|0} × {(port, proto), (0, proto),
        (0, 0)}, ranges expanded) finds this entry for the packet."""
        if self.direction != direction or self.peer not in (0, peer):
            return False
        if self.port == 0:
            return self.proto in (PROTO_ANY, proto)
        return self.proto == proto and self.port <= port <= max(self.port, self.end_port)

    @functools.cached_property
    def record(self) -> schema.PolicyEntryRecord:
        """This entry as bucket ``policy`` carries it. Built on first use and kept: entries
        are shared by the records of many identities and live across passes, so a record
        re-encoded for one new peer builds only that peer's entries."""
        return schema.PolicyEntryRecord(
            peer=self.peer, port=self.port, proto=self.proto, direction=self.direction,
            verdict=self.verdict, end_port=self.end_port, audit=self.audit, rule_ref=rule_id(self.rule))

    @functools.cached_property
    def rule_ref_text(self) -> tuple[int, str]:
        """``(rule_ref, rule text)`` for a record's rule table; ``(0, "")`` for no rule."""
        ref = rule_id(self.rule)
        return (ref, rule_text(self.rule) if ref else "")

    def __str__(self) -> str:
        port = f"{self.port}-{self.end_port}" if self.end_port else str(self.port)
        audit = " audit" if self.audit else ""
        return (f"{self.direction} peer={self.peer} port={port} proto={self.proto} "
                f"{self.verdict}{audit} ({self.rule})")


@dataclass(frozen=True)
class IdentityPolicy:
    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    ingress_default_deny: bool
    egress_default_deny: bool
    audit: bool
    entries: tuple[PolicyEntry, ...]
    policies: tuple[PolicyKey, ...]
    error: str = ""

    def enforced(self, direction: str) -> bool:
        return self.ingress_enforced if direction == "ingress" else self.egress_enforced


@dataclass
class PolicyStatus:
    key: PolicyKey
    generation: int = 0
    state: str = "ok"  # ok | error
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    selected: list[int] = field(default_factory=list)


@dataclass
class Resolution:
    identities: dict[int, IdentityPolicy]
    statuses: dict[PolicyKey, PolicyStatus]
    counters: dict[str, int]

    @property
    def entries(self) -> dict[int, list[PolicyEntry]]:
        return {i: list(p.entries) for i, p in self.identities.items()}


def is_local(identity: int, cluster_id: int) -> bool:
    if identity in (ID_HOST, ID_HEALTH, ID_INIT, ID_INGRESS):
        return True
    if identity < MIN_CLUSTER_IDENTITY or identity & CIDR_IDENTITY_FLAG:
        return False
    return cluster_of(identity) in (0, cluster_id)


def normalize_all(policies: Iterable[Any], opts: ResolveOptions) -> list[NormPolicy]:
    out = [
        p if isinstance(p, NormPolicy)
        else normalize(p, opts.cluster_name, opts.local_cluster_only)
        for p in policies
    ]
    return sorted(out, key=lambda p: p.key)


def resolve_policy(
    policies: Iterable[Any],
    identities: Mapping[int, Iterable[str]],
    named_ports: NamedPorts | None = None,
    options: ResolveOptions | None = None,
    cache: SelectorCache | None = None,
) -> Resolution:
    """Resolve `policies` (typed objects, manifests or `NormPolicy`) over `identities`.

    `cache`, when given, must already hold exactly `identities`; it is reused (and its
    selectors kept), which is what the service does between incremental updates.
    """
    opts = options or ResolveOptions()
    named = named_ports or {}
    norm = normalize_all(policies, opts)
    if cache is None:
        cache = SelectorCache({i: frozenset(lbls) for i, lbls in identities.items()})
    statuses = {
        p.key: PolicyStatus(p.key, p.generation, "error" if p.error else "ok", p.error,
                            list(p.warnings))
        for p in norm
    }
    locals_ = {i for i in cache.identities if is_local(i, opts.cluster_id)}
    selecting: dict[int, list[NormRule]] = {}
    for pol in norm:
        selected: set[int] = set()
        for rule in pol.rules:
            for ident in cache.members(rule.subject):
                if ident not in locals_ or (ident == ID_HOST) != rule.node_subject:
                    continue
                selecting.setdefault(ident, []).append(rule)
                selected.add(ident)
        statuses[pol.key].selected = sorted(selected)
    result: dict[int, IdentityPolicy] = {}
    counters = {"identities": 0, "entries": 0, "overflow": 0}
    memo = SectionEntries(cache, named)
    for ident in sorted(selecting):
        ip = _resolve_identity(ident, selecting[ident], cache, named, opts, memo)
        result[ident] = ip
        counters["identities"] += 1
        counters["entries"] += len(ip.entries)
        if ip.error:
            counters["overflow"] += 1
            for key in ip.policies:
                st = statuses[key]
                st.state = "error"
                if not st.error:
                    st.error = ip.error
    return Resolution(result, statuses, counters)


def resolve(
    policies: Iterable[Any],
    identities: Mapping[int, Iterable[str]],
    named_ports: NamedPorts | None = None,
    options: ResolveOptions | None = None,
) -> dict[int, list[PolicyEntry]]:
    """Per local identity, its sorted policy entries (see `resolve_policy` for the rest)."""
    return resolve_policy(policies, identities, named_ports, options).entries


def _resolve_identity(
    ident: int, rules: list[NormRule], cache: SelectorCache, named: NamedPorts,
    opts: ResolveOptions, memo: SectionEntries | None = None,
) -> IdentityPolicy:
    """`memo`, when given, must have been made over the same `cache` and `named` (and
    neither may have changed since)."""
    memo = memo or SectionEntries(cache, named)
    audit = opts.audit_mode or ident in opts.audit_identities
    default_deny = [False, False]
    has = [False, False]
    parts: list[tuple[tuple[bool, RuleRef], dict[EntryKey, PolicyEntry]]] = []
    for rule in rules:
        for d in (0, 1):
            default_deny[d] |= rule.default_deny[d]
            has[d] |= rule.has_sections[d]
        for section in rule.sections:
            part = memo.entries(section, ident)
            if part:
                parts.append(((not section.deny, section.ref), part))
    # lowest rank last: deny beats allow, then the smallest ref (as `merge_entry`)
    parts.sort(key=lambda p: p[0], reverse=True)
    merged: dict[EntryKey, PolicyEntry] = dict(parts[0][1]) if parts else {}
    for _, part in parts[1:]:
        merged.update(part)
    enforced = [default_deny[d] or has[d] for d in (0, 1)]
    for d, direction in enumerate(DIRECTIONS):
        # the allow-all that keeps a direction without default deny open; a rule that
        # already produced this key (allow or deny) keeps it
        if has[d] and not default_deny[d]:
            entry = _DEFAULT_ALLOW[direction]
            merged.setdefault(entry.key, entry)
    if opts.allow_localhost and enforced[0] and ident != ID_HOST:
        merged.setdefault(_LOCALHOST.key, _LOCALHOST)
    entries = tuple(merged[k] for k in sorted(merged))
    if audit:
        entries = tuple(replace(e, audit=True) if e.verdict == DENY else e for e in entries)
    error = overflow_error(ident, map_keys(entries), opts)
    return IdentityPolicy(
        ident, enforced[0], enforced[1], default_deny[0], default_deny[1], audit, entries,
        tuple(sorted({r.policy for r in rules})), error,
    )


class SectionEntries:
    """What each rule section contributes to the identities it applies to, computed once
    per section over one selector cache and named-port table: key → entry (``audit``
    unset). Every contribution is independent of the local identity except the ports of
    an ingress section with named ports (the local endpoint's), memoised per named-port
    table of the local identity."""

    def __init__(self, cache: SelectorCache, named: NamedPorts) -> None:
        self.cache = cache
        self.named = named
        self._memo: dict[tuple[int, Any], dict[EntryKey, PolicyEntry]] = {}
        self._sections: list[Section] = []  # keeps memoised sections alive (ids stay unique)

    def entries(self, section: Section, ident: int) -> dict[EntryKey, PolicyEntry]:
        per_local = section.direction == "ingress" and any(s.name for s in section.ports)
        local_ports = _named_key(self.named.get(ident)) if per_local else None
        key = (id(section), local_ports)
        found = self._memo.get(key)
        if found is None:
            found = self._compute(section, ident)
            self._memo[key] = found
            self._sections.append(section)
        return found

    def _compute(self, section: Section, ident: int) -> dict[EntryKey, PolicyEntry]:
        peers = section_peers(section, self.cache)
        if not peers:
            return {}
        verdict = DENY if section.deny else ALLOW
        direction, ref = section.direction, section.ref
        out: dict[EntryKey, PolicyEntry] = {}
        per_peer = any(spec.name for spec in section.ports)
        ports = [] if per_peer else section_ports(section, ident, 0, self.named)
        for peer in peers:
            if per_peer:
                ports = section_ports(section, ident, peer, self.named)
            for port, end, proto in ports:
                out[(direction, peer, proto, port, end)] = PolicyEntry(
                    peer, port, end, proto, direction, verdict, False, ref)
        return out


def _named_key(ports: Mapping[str, tuple[int, int]] | None) -> tuple[Any, ...]:
    return tuple(sorted(ports.items())) if ports else ()


EntryKey = tuple[str, int, int, int, int]  # direction, peer, proto, port, end_port
Merged = dict[EntryKey, tuple[str, RuleRef]]


def merge_entry(merged: Merged, key: EntryKey, verdict: str, ref: RuleRef) -> None:
    """Add one rule's contribution to a key: deny beats allow, then the smallest ref."""
    old = merged.get(key)
    if old is None or (verdict == DENY and old[0] == ALLOW) or (
        verdict == old[0] and ref < old[1]
    ):
        merged[key] = (verdict, ref)


def make_entries(merged: Merged, audit: bool) -> list[PolicyEntry]:
    """Merged keys as entries, sorted by key."""
    return [
        PolicyEntry(peer, port, end, proto, direction, verdict, audit and verdict == DENY, ref)
        for (direction, peer, proto, port, end), (verdict, ref) in sorted(merged.items())
    ]


_DEFAULT_ALLOW = {
    d: PolicyEntry(0, 0, 0, PROTO_ANY, d, ALLOW, False, default_allow_ref(d)) for d in DIRECTIONS
}
_LOCALHOST = PolicyEntry(ID_HOST, 0, 0, PROTO_ANY, "ingress", ALLOW, False, LOCALHOST_REF)


def overflow_error(ident: int, keys: int, opts: ResolveOptions) -> str:
    if keys <= opts.max_entries:
        return ""
    return (f"policy map overflow for identity {ident}: {keys} entries exceed "
            f"the limit of {opts.max_entries}")


def map_keys(entries: Iterable[PolicyEntry]) -> int:
    """Policy map keys the entries occupy once the executor expands port ranges."""
    return sum(e.end_port - e.port + 1 if e.end_port else 1 for e in entries)


def section_peers(section: Section, cache: SelectorCache) -> list[int]:
    """Peer identities of a section; 0 stands for every peer."""
    if section.wildcard_peers:
        return [0]
    peers: set[int] = set()
    for sel in section.peers:
        if sel.kind == "all":
            return [0]
        peers |= cache.members(sel)
    return sorted(peers)


def section_ports(
    section: Section, local: int, peer: int, named: NamedPorts
) -> list[tuple[int, int, int]]:
    """``(port, end_port, proto)`` triples of a section for one peer."""
    if not section.ports:
        return [(0, 0, PROTO_ANY)]
    out: set[tuple[int, int, int]] = set()
    for spec in section.ports:
        if not spec.name:
            out.add((spec.port, spec.end_port, spec.proto))
            continue
        for port, proto in resolve_named_port(spec, section.direction, local, peer, named):
            out.add((port, 0, proto))
    return sorted(out)


def resolve_named_port(
    spec: PortSpec, direction: str, local: int, peer: int, named: NamedPorts
) -> list[tuple[int, int]]:
    """Ingress: the local endpoint's port of that name; egress: the peer's, or every
    identity's when the peer is the wildcard (Cilium's node-wide named-port map)."""
    if direction == "ingress":
        owners: Iterable[int] = [local]
    elif peer == 0:
        owners = sorted(named)
    else:
        owners = [peer]
    found: set[tuple[int, int]] = set()
    for owner in owners:
        hit = named.get(owner, {}).get(spec.name)
        if hit is not None and spec.proto in (PROTO_ANY, hit[1]):
            found.add((hit[0], hit[1]))
    return sorted(found)


def lookup(
    policy: IdentityPolicy | None, peer: int, port: int, proto: int, direction: str
) -> tuple[str, list[PolicyEntry]]:
    """The datapath's verdict for one packet and the entries that decided it."""
    if policy is None or not policy.enforced(direction):
        return ALLOW, []
    hits = [e for e in policy.entries if e.matches(peer, port, proto, direction)]
    denies = [e for e in hits if e.verdict == DENY]
    if denies:
        return DENY, denies
    allows = [e for e in hits if e.verdict == ALLOW]
    if allows:
        return ALLOW, allows
    return DENY, []


def policy_selectors(policies: Iterable[NormPolicy]) -> set[Selector]:
    """Every selector the policies use (subjects and peers)."""
    out: set[Selector] = set()
    for pol in policies:
        for rule in pol.rules:
            out.add(rule.subject)
            for section in rule.sections:
                out.update(section.peers)
    return out


def policy_cidrs(policies: Sequence[NormPolicy]) -> list[str]:
    """Every prefix the policies name (cidr and except): the CIDR identities the identity
    service has to allocate for them to be selectable."""
    out: set[str] = set()
    for pol in policies:
        for rule in pol.rules:
            for section in rule.sections:
                for sel in section.peers:
                    if sel.kind in ("cidr", "ipblock"):
                        out.add(sel.cidr)
                        out.update(sel.excepts)
    return sorted(out)
