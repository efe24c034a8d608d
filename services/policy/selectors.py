"""Selectors over identity label sets, and the selector cache.

Invariants:
- An identity is plain data: a numeric id and a frozenset of labels ``source:key=value``
  (``reserved:host`` has no value). `IdentityView` parses that once; a reserved identity
  (``schema.RESERVED_IDENTITIES``) always carries its ``reserved:<name>`` label even if
  the caller's set omits it.
- A `Requirement` key carries a label source. Source ``any`` matches a label of any source
  with that key (Cilium's ``any:app`` ≡ ``app``); any other source matches only labels of
  that source. A `Selector` of kind ``labels`` is the AND of its requirements; the empty
  AND selects every identity.
- ``cidr`` selectors select CIDR identities (bit 24 set, labels ``cidr:<prefix>``) whose most
  specific prefix lies inside ``cidr`` and inside none of ``excepts``; a ``/0`` prefix also
  selects the ``world`` identity (Cilium's meaning: CIDR rules describe non-endpoints).
- ``ipblock`` selectors (a Kubernetes NetworkPolicy ``ipBlock``) select what the ``cidr``
  selector of the same block selects, and also every pod identity whose pod addresses
  (labels ``podip:<address>``, see ``podaddresses``) all lie inside ``cidr`` and outside
  every except: Kubernetes' meaning, where an ipBlock also matches pod IPs.
- ``all`` selects everything and is the only selector that resolution emits as the
  wildcard peer 0. ``none`` selects nothing.
- ``fqdn_selector`` (a ``toFQDNs`` entry) is the labels selector ``fqdn:<name> Exists``
  over the normalised name or pattern (lower case, no trailing dot): it selects exactly
  the identities the identity service labelled for that selector, i.e. the CIDR
  identities of addresses that DNS answers for a matching name resolved to.
- Selectors are frozen and hashable: equal selectors share one cache slot.
- `SelectorCache` answers "which identities does this selector select"; after any sequence
  of `update` calls its answers equal those of a cache built from scratch over the same
  identities, and `update` returns exactly the selectors whose selections changed
  (`update_delta`: with the identities each gained and lost). A labels selector is
  registered through the cache's `LabelIndex` of the current identities, so its first
  selection costs the sizes of the label sets it names, not a scan of every identity.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal

from ciliary import schema

from .label_index import LabelIndex
from .selector_anchors import SelectorAnchors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LABEL_SOURCE_PODIP = "podip"  # pod addresses of a pod identity, for ipBlock selectors

# ---------------------------------------------------------------- identity numbering
# The reserved identities and the bit layout are ``ciliary.schema``'s; the policy modules
# use them under these names.

ID_HOST = schema.IDENTITY_HOST
ID_WORLD = schema.IDENTITY_WORLD
ID_HEALTH = schema.IDENTITY_HEALTH
ID_INIT = schema.IDENTITY_INIT
ID_INGRESS = schema.IDENTITY_INGRESS
CIDR_IDENTITY_FLAG = schema.IDENTITY_LOCAL_FLAG
MIN_CLUSTER_IDENTITY = schema.IDENTITY_MIN_CLUSTER
is_cidr_identity = schema.is_local_identity
cluster_of = schema.identity_cluster_id  # cluster ID of a cluster identity, else 0

# label keys Cilium gives every pod identity
LABEL_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
LABEL_CLUSTER = "io.cilium.k8s.policy.cluster"
LABEL_SERVICEACCOUNT = "io.cilium.k8s.policy.serviceaccount"


def parse_label(label: str) -> tuple[str, str, str]:
    """``source:key=value`` → ``(source, key, value)``; a missing source is ``unspec``."""
    if label.startswith("cidr:"):
        return "cidr", label[5:], ""
    key_part, _, value = label.partition("=")
    source, sep, key = key_part.partition(":")
    if not sep:
        return "unspec", key_part, value
    return source, key, value


def parse_cidr_label(key: str) -> Network | None:
    """The prefix of a ``cidr:`` label key; IPv6 may use Cilium's ``-`` for ``:``."""
    text = key if "." in key or ":" in key else key.replace("-", ":")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


@lru_cache(maxsize=4096)  # selectors match by their CIDR texts, once per identity
def parse_cidr(text: str) -> Network:
    """A CIDR or a bare IP (host prefix); raises ``ValueError`` on garbage."""
    return ipaddress.ip_network(text.strip(), strict=False)


@dataclass(frozen=True)
class IdentityView:
    """One identity, parsed for matching."""

    id: int
    labels: frozenset[str]
    pairs: tuple[tuple[str, str, str], ...] = field(init=False, compare=False, repr=False)
    # (source, key) -> values, source "any" for every source: what requirements look up
    by_key: dict[tuple[str, str], list[str]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        labels = set(self.labels)
        name = schema.RESERVED_IDENTITIES.get(self.id)
        if name is not None:
            labels.add(f"reserved:{name}")
        object.__setattr__(self, "labels", frozenset(labels))
        pairs = tuple(sorted(parse_label(lbl) for lbl in labels))
        object.__setattr__(self, "pairs", pairs)
        by_key: dict[tuple[str, str], list[str]] = {}
        for s, k, v in pairs:
            by_key.setdefault((s, k), []).append(v)
            if s != "any":
                by_key.setdefault(("any", k), []).append(v)
        object.__setattr__(self, "by_key", by_key)

    def values(self, source: str, key: str) -> list[str]:
        return self.by_key.get((source, key), [])

    def has_source(self, source: str) -> bool:
        return any(s == source for s, _, _ in self.pairs)

    @cached_property
    def prefix(self) -> Network | None:
        """Most specific ``cidr:`` prefix of a CIDR identity (None for others)."""
        nets = [n for s, k, _ in self.pairs if s == "cidr" and (n := parse_cidr_label(k))]
        if not nets:
            return None
        return max(nets, key=lambda n: (n.prefixlen, n.version))

    @cached_property
    def pod_addresses(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        """The addresses of a pod identity's pods (``podip:`` labels), if it carries them."""
        out = []
        for s, k, _ in self.pairs:
            if s == LABEL_SOURCE_PODIP:
                try:
                    out.append(ipaddress.ip_address(k))
                except ValueError:
                    continue
        return tuple(out)

    @property
    def is_world(self) -> bool:
        return (
            self.id == ID_WORLD
            or is_cidr_identity(self.id)
            or self.prefix is not None
            or any(s == "reserved" and k.startswith("world") for s, k, _ in self.pairs)
        )


Op = Literal["In", "NotIn", "Exists", "DoesNotExist"]


@dataclass(frozen=True, order=True)
class Requirement:
    source: str
    key: str
    op: Op
    values: tuple[str, ...] = ()

    def matches(self, ident: IdentityView) -> bool:
        present = ident.values(self.source, self.key)
        if self.op == "In":
            return any(v in self.values for v in present)
        if self.op == "NotIn":
            return not any(v in self.values for v in present)
        if self.op == "Exists":
            return bool(present)
        return not present

    def __str__(self) -> str:
        key = f"{self.source}:{self.key}"
        if self.op == "In" and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.op in ("Exists", "DoesNotExist"):
            return f"{key} {self.op}"
        return f"{key} {self.op} ({','.join(self.values)})"


SelectorKind = Literal["labels", "cidr", "ipblock", "all", "none", "world"]


@dataclass(frozen=True, order=True)
class Selector:
    """What a peer or subject clause selects; see the module invariants."""

    kind: SelectorKind
    requirements: tuple[Requirement, ...] = ()
    cidr: str = ""
    excepts: tuple[str, ...] = ()
    family: int = 0  # world selectors: 0 both, 4 or 6

    def __hash__(self) -> int:
        # computed once: selectors key every selector-cache lookup
        found = self.__dict__.get("_hash")
        if found is None:
            found = hash((self.kind, self.requirements, self.cidr, self.excepts, self.family))
            object.__setattr__(self, "_hash", found)
        return found

    def __getstate__(self) -> dict[str, object]:  # string hashes differ between processes
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def matches(self, ident: IdentityView) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "none":
            return False
        if self.kind == "labels":
            return all(req.matches(ident) for req in self.requirements)
        if self.kind == "world":
            if not ident.is_world:
                return False
            prefix = ident.prefix
            return self.family == 0 or prefix is None or prefix.version == self.family
        if self.kind == "ipblock":
            return self._matches_cidr(ident) or self._matches_pod_addresses(ident)
        return self._matches_cidr(ident)

    def _matches_pod_addresses(self, ident: IdentityView) -> bool:
        addresses = ident.pod_addresses
        if not addresses:
            return False
        net = parse_cidr(self.cidr)
        excepts = [parse_cidr(text) for text in self.excepts]
        return all(
            addr.version == net.version and addr in net
            and not any(exc.version == addr.version and addr in exc for exc in excepts)
            for addr in addresses
        )

    def _matches_cidr(self, ident: IdentityView) -> bool:
        net = parse_cidr(self.cidr)
        prefix = ident.prefix
        if prefix is None:
            return net.prefixlen == 0 and ident.is_world and ident.id == ID_WORLD
        if prefix.version != net.version or not prefix.subnet_of(net):  # type: ignore[arg-type]
            return False
        for text in self.excepts:
            exc = parse_cidr(text)
            if exc.version == prefix.version and prefix.subnet_of(exc):  # type: ignore[arg-type]
                return False
        return True

    def has_key(self, source_key: str) -> bool:
        source, _, key = source_key.partition(":")
        return any(r.source == source and r.key == key for r in self.requirements)

    def has_key_prefix(self, source_prefix: str) -> bool:
        source, _, prefix = source_prefix.partition(":")
        return any(r.source == source and r.key.startswith(prefix) for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def with_requirement(self, req: Requirement) -> Selector:
        reqs = tuple(sorted(set(self.requirements) | {req}))
        return Selector("labels", reqs)

    def without_key(self, source: str, key: str) -> Selector:
        reqs = tuple(r for r in self.requirements if not (r.source == source and r.key == key))
        return Selector("labels", reqs)

    def __str__(self) -> str:
        if self.kind == "labels":
            return "{" + ", ".join(str(r) for r in self.requirements) + "}"
        if self.kind in ("cidr", "ipblock"):
            exc = f" except {','.join(self.excepts)}" if self.excepts else ""
            return f"{self.kind} {self.cidr}{exc}"
        if self.kind == "world":
            return "world" + (f"-ipv{self.family}" if self.family else "")
        return self.kind


ALL = Selector("all")
NONE = Selector("none")


def labels_selector(requirements: Iterable[Requirement]) -> Selector:
    return Selector("labels", tuple(sorted(set(requirements))))


def from_label_selector(sel: object, default_source: str = "any", key_prefix: str = "") -> Selector:
    """A ``LabelSelector`` (resources model) as a `Selector`.

    Keys without a source get ``default_source`` (``any`` for Cilium policies, ``k8s`` for
    NetworkPolicy); ``key_prefix`` is prepended to the key (namespace selectors).
    """
    reqs: list[Requirement] = []
    for key, value in getattr(sel, "match_labels", {}).items():
        source, k = split_key(key, default_source)
        reqs.append(Requirement(source, key_prefix + k, "In", (value,)))
    for expr in getattr(sel, "match_expressions", []):
        source, k = split_key(expr.key, default_source)
        reqs.append(Requirement(source, key_prefix + k, expr.operator, tuple(sorted(expr.values))))
    return labels_selector(reqs)


def split_key(key: str, default_source: str) -> tuple[str, str]:
    source, sep, rest = key.partition(":")
    if sep and source and "/" not in source and "." not in source:
        return source, rest
    return default_source, key


LABEL_SOURCE_FQDN = "fqdn"


def fqdn_label_key(match_name: str = "", match_pattern: str = "") -> str:
    """The key of the ``fqdn:`` identity label of one ``toFQDNs`` entry ("" if empty)."""
    return (match_name or match_pattern).strip().lower().rstrip(".")


def fqdn_selector(match_name: str = "", match_pattern: str = "") -> Selector:
    key = fqdn_label_key(match_name, match_pattern)
    if not key:
        return NONE
    return Selector("labels", (Requirement(LABEL_SOURCE_FQDN, key, "Exists"),))


def cidr_selector(cidr: str, excepts: Iterable[str] = ()) -> Selector:
    net = parse_cidr(cidr)
    return Selector(
        "cidr", cidr=str(net), excepts=tuple(sorted(str(parse_cidr(e)) for e in excepts))
    )


def ipblock_selector(cidr: str, excepts: Iterable[str] = ()) -> Selector:
    """A NetworkPolicy ``ipBlock``: the CIDR selection plus the pods inside the block."""
    net = parse_cidr(cidr)
    return Selector(
        "ipblock", cidr=str(net), excepts=tuple(sorted(str(parse_cidr(e)) for e in excepts))
    )


# ---------------------------------------------------------------- selector cache


class SelectorCache:
    """Selector → selected identity ids, kept current as identities come and go."""

    def __init__(self, identities: Mapping[int, Iterable[str]] | None = None) -> None:
        self._identities: dict[int, IdentityView] = {}
        self._selections: dict[Selector, set[int]] = {}
        self._index = LabelIndex()  # the labels of `_identities`, for registering selectors
        self._anchors = SelectorAnchors()  # the keys of `_selections`, for identity changes
        if identities:
            self.update(identities, ())

    @property
    def identities(self) -> Mapping[int, IdentityView]:
        return self._identities

    def view(self, identity: int) -> IdentityView | None:
        return self._identities.get(identity)

    def add_selector(self, selector: Selector) -> frozenset[int]:
        """Register `selector` (idempotent) and return its current selections."""
        return frozenset(self.members(selector))

    def _register(self, selector: Selector) -> set[int]:
        if selector.kind == "labels":  # by label index: no scan over every identity
            found = self._index.select(selector.requirements)
        else:
            found = {i for i, v in self._identities.items() if selector.matches(v)}
        self._selections[selector] = found
        self._anchors.add(selector)
        return found

    def remove_selector(self, selector: Selector) -> None:
        if self._selections.pop(selector, None) is not None:
            self._anchors.remove(selector)

    def retain(self, selectors: Iterable[Selector]) -> None:
        """Forget every selector not in `selectors` (no longer used by any policy)."""
        keep = set(selectors)
        for sel in [s for s in self._selections if s not in keep]:
            del self._selections[sel]
            self._anchors.remove(sel)

    def selectors(self) -> list[Selector]:
        return sorted(self._selections)

    def size(self) -> int:
        """Selectors held (the policies' selectors; ``retain`` forgets the rest)."""
        return len(self._selections)

    def selections(self, selector: Selector) -> frozenset[int]:
        return self.add_selector(selector)

    def members(self, selector: Selector) -> AbstractSet[int]:
        """The live selection set of `selector` (registered on first use). Read only, and
        only valid until the next `update`: no copy, for hot loops."""
        found = self._selections.get(selector)
        if found is None:
            found = self._register(selector)
        return found

    def update(
        self, added: Mapping[int, Iterable[str]], removed: Iterable[int]
    ) -> set[Selector]:
        """Apply identity changes; an id in `added` that exists is replaced. Returns the
        selectors whose selections changed."""
        return set(self.update_delta(added, removed))

    def update_delta(
        self, added: Mapping[int, Iterable[str]], removed: Iterable[int]
    ) -> dict[Selector, tuple[set[int], set[int]]]:
        """Like `update`, but returns per changed selector the identities it gained and
        lost (net over the whole batch: removing and re-adding an identity with the same
        labels changes nothing)."""
        before: dict[Selector, dict[int, bool]] = {}
        for ident in removed:
            gone = self._identities.pop(ident, None)
            if gone is None:
                continue
            self._index.remove(ident, gone.pairs)
            for sel in self._anchors.candidates(gone):
                found = self._selections[sel]
                if ident in found:
                    before.setdefault(sel, {}).setdefault(ident, True)
                    found.discard(ident)
        for ident, labels in added.items():
            view = IdentityView(ident, frozenset(labels))
            old = self._identities.get(ident)
            if old is not None and old.labels == view.labels:
                continue
            if old is not None:
                self._index.remove(ident, old.pairs)
            self._index.add(ident, view.pairs)
            self._identities[ident] = view
            # only selectors that could select the new or the old labels can change
            check = self._anchors.candidates(view)
            if old is not None:
                check |= self._anchors.candidates(old)
            for sel in check:
                found = self._selections[sel]
                now = sel.matches(view)
                was = ident in found
                if now != was:
                    before.setdefault(sel, {}).setdefault(ident, was)
                    (found.add if now else found.discard)(ident)
        out: dict[Selector, tuple[set[int], set[int]]] = {}
        for sel, seen in before.items():
            found = self._selections[sel]
            gained = {i for i, was in seen.items() if not was and i in found}
            lost = {i for i, was in seen.items() if was and i not in found}
            if gained or lost:
                out[sel] = (gained, lost)
        return out
