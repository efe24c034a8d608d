"""Incremental policy resolution: one long-lived state updated by deltas.

`PolicyEngine.apply` takes what changed (policies, identities added / relabelled /
removed, the named-port table) and updates the resolution in place.

Invariants:
- After any sequence of `apply` calls, `resolution()` equals `resolve_policy` from scratch
  over the current policies, identities and named ports with the same options: the same
  `IdentityPolicy` per identity, the same statuses and counters (a seeded property test
  checks this after every step).
- Work is proportional to what a change affects. The selector cache reports which
  selectors gained or lost which identities; then
  * a local identity that appeared, disappeared, changed labels or named ports, or is
    selected by a policy that changed, is resolved in full (as a subject);
  * for every other subject whose rules name a peer selector that gained or lost an
    identity X (or whose peer X changed named ports), only its entries with peer X are
    recomputed and spliced into its sorted entries (keys are sorted by direction, then
    peer, so they are one contiguous run per direction);
  * a change of the node-wide set of named ports (egress named ports to the wildcard
    peer) re-resolves the subjects that use such a port;
  * a policy change rebinds only that policy's rules to the selector cache; a selector
    stays registered while a bound rule uses it (reference count), and is dropped
    from the cache when the last one goes.
- `Step.ops()` equals `diff(old, new)` over the whole resolution, computed only from
  the parts that changed.
- `apply` is `begin` then `finish`. After `begin` the identities resolved in full have
  their final policy (peer-only updates never touch them), so their records can be
  written before the peer-only updates are computed; `finish` must come next.
- Not thread-safe: one thread at a time. Named-port tables passed in must not be mutated
  afterwards (they are kept by reference).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any

from .diff import Op, diff
from .resolve import (
    ALLOW,
    DENY,
    EntryKey,
    IdentityPolicy,
    Merged,
    NamedPorts,
    PolicyEntry,
    PolicyStatus,
    Resolution,
    ResolveOptions,
    SectionEntries,
    _resolve_identity,
    is_local,
    make_entries,
    map_keys,
    merge_entry,
    normalize_all,
    overflow_error,
    section_ports,
)
from .rules import LOCALHOST_REF, PROTO_ANY, NormPolicy, NormRule, PolicyKey, Section
from .selectors import ID_HOST, Selector, SelectorCache


class _Rule:
    """A rule bound to the selector cache's live selection sets (no lookups per use)."""

    __slots__ = ("rule", "pos", "subject", "sections")

    def __init__(self, rule: NormRule, pos: tuple[PolicyKey, int], cache: SelectorCache) -> None:
        self.rule = rule
        self.pos = pos
        self.subject = cache.members(rule.subject)
        # per section: (section, verdict, peer selections); None when the section's only
        # peer is the wildcard 0 (never a peer X of its own)
        self.sections: list[tuple[Section, str, tuple[AbstractSet[int], ...] | None]] = []
        for section in rule.sections:
            wildcard = section.wildcard_peers or any(s.kind == "all" for s in section.peers)
            sets = None if wildcard else tuple(cache.members(s) for s in section.peers)
            self.sections.append((section, DENY if section.deny else ALLOW, sets))

    def selects(self, ident: int) -> bool:
        return ident in self.subject and (ident == ID_HOST) == self.rule.node_subject


@dataclass
class _Subject:
    """A local identity with policy: its rules and its entries, sorted by key."""

    rules: list[_Rule]
    keys: list[EntryKey]
    entries: list[PolicyEntry]
    nkeys: int  # map keys, ranges expanded
    policy: IdentityPolicy


@dataclass
class Step:
    """The outcome of one `apply`."""

    resolution: Resolution
    changed: set[int]  # local identities whose IdentityPolicy was added, replaced or removed
    # identities resolved in full (their own labels, rules or named ports changed), as
    # opposed to subjects that only had entries of a peer recomputed
    resolved: set[int] = field(default_factory=set)
    old_parts: dict[int, list[PolicyEntry]] = field(default_factory=dict)
    new_parts: dict[int, list[PolicyEntry]] = field(default_factory=dict)
    # between `begin` and `finish`: subject -> peers to recompute, and the dirty policies
    pending: tuple[dict[int, set[int]], set[PolicyKey]] | None = None

    def ops(self) -> list[Op]:
        """Map operations from the previous resolution to this one (as `diff`)."""
        return diff(self.old_parts, self.new_parts)


class PolicyEngine:
    def __init__(self, options: ResolveOptions | None = None,
                 cache: SelectorCache | None = None) -> None:
        self.opts = options or ResolveOptions()
        self.cache = cache or SelectorCache()
        self._policies: dict[PolicyKey, NormPolicy] = {}
        self._named: dict[int, Mapping[str, tuple[int, int]]] = {}
        self._every: dict[str, Counter[tuple[int, int]]] = {}
        self._rules: list[_Rule] = []  # every policy's, in policy key order
        self._bound: dict[PolicyKey, list[_Rule]] = {}  # policy -> its rules' bindings
        self._uses: Counter[Selector] = Counter()  # bound rules using each selector
        self._peer_rules: dict[Selector, list[_Rule]] = {}
        self._subjects: dict[int, _Subject] = {}
        self._result: dict[int, IdentityPolicy] = {}
        self._statuses: dict[PolicyKey, PolicyStatus] = {}
        self._entries = 0

    # ---------------------------------------------------------------- public

    def resolution(self) -> Resolution:
        counters = {
            "identities": len(self._result),
            "entries": self._entries,
            "overflow": sum(1 for p in self._result.values() if p.error),
        }
        return Resolution(dict(self._result), dict(self._statuses), counters)

    def apply(
        self,
        policies: Iterable[Any] | None = None,
        added: Mapping[int, Iterable[str]] | None = None,
        removed: Iterable[int] = (),
        named_ports: NamedPorts | None = None,
    ) -> Step:
        """Apply changes: `policies` (None: unchanged) is the complete new set; `added`
        (new or relabelled identities) and `removed` are identity deltas; `named_ports`
        (None: unchanged) is the complete new table."""
        return self.finish(self.begin(policies, added, removed, named_ports))

    def begin(
        self,
        policies: Iterable[Any] | None = None,
        added: Mapping[int, Iterable[str]] | None = None,
        removed: Iterable[int] = (),
        named_ports: NamedPorts | None = None,
    ) -> Step:
        """The first half of `apply` (same arguments): the identities resolved in full
        (`Step.resolved`) get their final policy, in `step.resolution` too; the subjects
        that only gain or lose a peer's entries wait for `finish`, which must come next."""
        full: set[int] = set()
        dirty: set[PolicyKey] = set()
        removed = list(removed)
        added = {i: frozenset(lbls) for i, lbls in (added or {}).items()}

        changed_policies: set[PolicyKey] = set()
        if policies is not None:
            changed_policies = self._set_policies(policies, full)
            dirty |= changed_policies

        touched = set(removed) | set(added)
        before = {i: self.cache.view(i) for i in touched}
        delta = self.cache.update_delta(added, removed)
        for ident in touched:  # net label changes (a re-add with equal labels is none)
            old, now = before[ident], self.cache.view(ident)
            if (old.labels if old else None) != (now.labels if now else None):
                full.add(ident)

        named_moved: set[int] = set()
        if named_ports is not None:
            named_moved = self._set_named(named_ports, full)
            full |= named_moved

        for key in changed_policies:
            pol = self._policies.get(key)
            if pol is not None:
                full |= self._rule_subjects(pol.rules)

        slices: dict[int, set[int]] = {}
        for sel, (gained, lost) in delta.items():
            rules = self._peer_rules.get(sel)
            if rules:
                self._add_slices(rules, gained | lost, full, slices)
        for peer in named_moved:
            for sel, rules in self._peer_rules.items():
                if peer in self.cache.members(sel):
                    self._add_slices(rules, {peer}, full, slices)

        step = Step(Resolution({}, {}, {}), set(), full)
        memo = SectionEntries(self.cache, self._named)  # both are final for this step
        for ident in sorted(full):
            self._resolve_full(ident, step, dirty, memo)
        step.pending = ({i: peers for i, peers in slices.items() if i not in full}, dirty)
        step.resolution = self.resolution()
        return step

    def finish(self, step: Step) -> Step:
        """The second half of `apply`: peer-only updates, statuses, the resolution."""
        assert step.pending is not None, "finish() follows begin(), once"
        slices, dirty = step.pending
        step.pending = None
        for ident in sorted(slices):
            self._resolve_peers(ident, sorted(slices[ident]), step, dirty)

        for key in sorted(dirty):
            pol = self._policies.get(key)
            if pol is None:
                self._statuses.pop(key, None)
            else:
                self._statuses[key] = self._status(pol)
        step.resolution = self.resolution()
        return step

    # ---------------------------------------------------------------- inputs

    def _set_policies(self, policies: Iterable[Any], full: set[int]) -> set[PolicyKey]:
        norm = normalize_all(policies, self.opts)
        new = {p.key: p for p in norm}
        old = self._policies
        changed = {k for k, pol in new.items() if (was := old.get(k)) is not pol and was != pol}
        changed.update(k for k in old if k not in new)
        if not changed:
            return changed
        for key in changed:  # subjects before the change (selections not yet updated)
            if key in old:
                full |= self._rule_subjects(old[key].rules)
        self._policies = new
        released: set[Selector] = set()
        for key in changed:
            for bound in self._bound.pop(key, []):
                released |= self._unbind(bound)
        for key in sorted(changed):
            pol = new.get(key)
            if pol is not None:
                self._bound[key] = [self._bind(rule, (key, n)) for n, rule in enumerate(pol.rules)]
        for sel in released:
            if not self._uses.get(sel):
                self._uses.pop(sel, None)
                self.cache.remove_selector(sel)
        # unchanged policies keep their bindings (and their subjects the bound rules);
        # the subjects of a changed policy are in `full`, re-resolved with the new ones
        self._rules = [bound for pol in norm for bound in self._bound[pol.key]]
        return changed

    def _bind(self, rule: NormRule, pos: tuple[PolicyKey, int]) -> _Rule:
        bound = _Rule(rule, pos, self.cache)
        for sel in _rule_selectors(rule):
            self._uses[sel] += 1
        for sel in _peer_selectors(rule):
            self._peer_rules.setdefault(sel, []).append(bound)
        return bound

    def _unbind(self, bound: _Rule) -> set[Selector]:
        """Forget a binding; returns the selectors it used."""
        for sel in _peer_selectors(bound.rule):
            rules = self._peer_rules[sel]
            rules.remove(bound)
            if not rules:
                del self._peer_rules[sel]
        used = _rule_selectors(bound.rule)
        for sel in used:
            self._uses[sel] -= 1
        return used

    def _set_named(self, named: NamedPorts, full: set[int]) -> set[int]:
        old = self._named
        moved = {i for i in old.keys() | named.keys() if old.get(i) != named.get(i)}
        names_moved: set[str] = set()
        for ident in moved:
            for name, value in (old.get(ident) or {}).items():
                counter = self._every[name]
                counter[value] -= 1
                if not counter[value]:
                    del counter[value]
                    names_moved.add(name)
            for name, value in (named.get(ident) or {}).items():
                counter = self._every.setdefault(name, Counter())
                if not counter[value]:
                    names_moved.add(name)
                counter[value] += 1
        self._named = dict(named)
        if names_moved:  # egress named ports towards the wildcard peer use every pod's
            full |= self._rule_subjects(
                r.rule for r in self._rules if _uses_every_named(r.rule, names_moved))
        return moved

    # ---------------------------------------------------------------- selection

    def _selects(self, rule: NormRule, ident: int) -> bool:
        return (ident == ID_HOST) == rule.node_subject and is_local(ident, self.opts.cluster_id)

    def _rule_subjects(self, rules: Iterable[NormRule]) -> set[int]:
        out: set[int] = set()
        for rule in rules:
            out.update(i for i in self.cache.members(rule.subject) if self._selects(rule, i))
        return out

    def _rules_for(self, ident: int) -> list[_Rule]:
        if not is_local(ident, self.opts.cluster_id):
            return []
        return [r for r in self._rules if r.selects(ident)]

    def _add_slices(self, rules: list[_Rule], peers: set[int], full: set[int],
                    slices: dict[int, set[int]]) -> None:
        subjects = self._subjects
        for rule in rules:
            host = rule.rule.node_subject
            for ident in rule.subject:
                if ident in subjects and ident not in full and (ident == ID_HOST) == host:
                    slices.setdefault(ident, set()).update(peers)

    # ---------------------------------------------------------------- resolution

    def _forget(self, ident: int, step: Step, dirty: set[PolicyKey]) -> None:
        old = self._subjects.pop(ident, None)
        if old is None:
            return
        self._result.pop(ident, None)
        self._entries -= len(old.entries)
        dirty.update(old.policy.policies)
        step.changed.add(ident)
        step.old_parts[ident] = list(old.entries)
        step.new_parts.setdefault(ident, [])

    def _resolve_full(self, ident: int, step: Step, dirty: set[PolicyKey],
                      memo: SectionEntries) -> None:
        rules = self._rules_for(ident) if self.cache.view(ident) is not None else []
        if not rules:
            self._forget(ident, step, dirty)
            return
        ip = _resolve_identity(ident, [r.rule for r in rules], self.cache, self._named,
                               self.opts, memo)
        old = self._subjects.get(ident)
        self._subjects[ident] = _Subject(rules, [e.key for e in ip.entries], list(ip.entries),
                                         map_keys(ip.entries), ip)
        self._entries += len(ip.entries) - (len(old.entries) if old else 0)
        dirty.update(ip.policies)
        if old is not None:
            dirty.update(old.policy.policies)
            if old.policy == ip:
                return
        self._result[ident] = ip
        step.changed.add(ident)
        step.old_parts[ident] = list(old.entries) if old else []
        step.new_parts[ident] = list(ip.entries)

    def _resolve_peers(self, ident: int, peers: list[int], step: Step,
                       dirty: set[PolicyKey]) -> None:
        subj = self._subjects[ident]
        ip = subj.policy
        old_parts: list[PolicyEntry] = []
        new_parts: list[PolicyEntry] = []
        for peer in peers:
            fresh = self._peer_entries(ident, subj, peer)
            for direction in ("egress", "ingress"):
                lo = bisect.bisect_left(subj.keys, (direction, peer))
                hi = bisect.bisect_left(subj.keys, (direction, peer + 1), lo)
                before = subj.entries[lo:hi]
                after = [e for e in fresh if e.direction == direction]
                if before == after:
                    continue
                old_parts.extend(before)
                new_parts.extend(after)
                subj.keys[lo:hi] = [e.key for e in after]
                subj.entries[lo:hi] = after
                subj.nkeys += map_keys(after) - map_keys(before)
                self._entries += len(after) - len(before)
        if not old_parts and not new_parts:
            return
        error = overflow_error(ident, subj.nkeys, self.opts)
        if error or ip.error:
            dirty.update(ip.policies)
        subj.policy = replace(ip, entries=tuple(subj.entries), error=error)
        self._result[ident] = subj.policy
        step.changed.add(ident)
        step.old_parts.setdefault(ident, []).extend(old_parts)
        step.new_parts.setdefault(ident, []).extend(new_parts)

    def _peer_entries(self, ident: int, subj: _Subject, peer: int) -> list[PolicyEntry]:
        """The entries of `ident` with peer `peer` (as `_resolve_identity` makes them)."""
        merged: Merged = {}
        for rule in subj.rules:
            for section, verdict, sets in rule.sections:
                if sets is None or not any(peer in found for found in sets):
                    continue
                for port, end, proto in section_ports(section, ident, peer, self._named):
                    merge_entry(merged, (section.direction, peer, proto, port, end), verdict,
                                section.ref)
        if (peer == ID_HOST and self.opts.allow_localhost and subj.policy.ingress_enforced
                and ident != ID_HOST):
            merged.setdefault(("ingress", ID_HOST, PROTO_ANY, 0, 0), (ALLOW, LOCALHOST_REF))
        return make_entries(merged, subj.policy.audit)

    def _status(self, pol: NormPolicy) -> PolicyStatus:
        st = PolicyStatus(pol.key, pol.generation, "error" if pol.error else "ok", pol.error,
                          list(pol.warnings))
        selected: set[int] = set()
        for rule in pol.rules:
            selected.update(i for i in self.cache.members(rule.subject)
                            if i in self._subjects and (i == ID_HOST) == rule.node_subject)
        st.selected = sorted(selected)
        for ident in st.selected:
            error = self._result[ident].error
            if error:
                st.state = "error"
                st.error = st.error or error
                break
        return st


def _peer_selectors(rule: NormRule) -> set[Selector]:
    return {sel for section in rule.sections for sel in section.peers}


def _rule_selectors(rule: NormRule) -> set[Selector]:
    return _peer_selectors(rule) | {rule.subject}


def _uses_every_named(rule: NormRule, names: set[str]) -> bool:
    for section in rule.sections:
        if section.direction != "egress":
            continue
        if not (section.wildcard_peers or any(s.kind == "all" for s in section.peers)):
            continue
        if any(spec.name in names for spec in section.ports):
            return True
    return False
