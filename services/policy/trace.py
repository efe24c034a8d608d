"""Policy trace: would traffic from A to B on port/proto be allowed, and by which rules?

Invariants:
- Evaluated directly from the policies (rules matched against label sets), never from
  resolved entries; `resolve.lookup` over resolved entries must give the same verdicts
  (tested as a property).
- Egress is evaluated at the source when it is a local endpoint, ingress at the destination
  when it is a local endpoint; traffic is allowed when both allow. A CIDR/IP side given as
  a string is a world peer carrying ``reserved:world`` and its own prefix; the service
  instead resolves an IP/CIDR with `ipcache_lookup` to the identity the datapath would see
  (a pod, a node, a policy CIDR or world) and traces that identity.
- Within a direction: any matching deny rule denies (all matching deny rules are
  reported); otherwise any matching allow rule allows (all reported); otherwise the verdict
  is the direction's default (deny under default deny, allow when rules exist without it,
  allow when no rule applies); with ``allow_localhost`` the host may always reach an
  endpoint unless a deny rule matches. An audited endpoint's denies are reported with
  ``audit``.
- Named ports resolve against the destination's ports; for a wildcard peer against every
  known port of that name (``all_named_ports``), as resolution does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .resolve import ALLOW, DENY, ResolveOptions, is_local, normalize_all
from .rules import PROTO_ANY, NormPolicy, NormRule, PortSpec, RuleRef, Section
from .selectors import (
    CIDR_IDENTITY_FLAG,
    ID_HOST,
    ID_WORLD,
    LABEL_CLUSTER,
    LABEL_NAMESPACE,
    IdentityView,
    parse_cidr,
)


@dataclass(frozen=True)
class DirectionTrace:
    direction: str
    verdict: str  # allow | deny
    reason: str  # rule | default-deny | no-default-deny | allow-localhost | not-enforced | not-local
    rules: tuple[RuleRef, ...]  # the deciding rules (deny rules when denied)
    audit: bool = False

    def __str__(self) -> str:
        rules = ", ".join(str(r) for r in self.rules) or "-"
        audit = " (audit: allowed, logged)" if self.audit else ""
        return f"{self.direction}: {self.verdict.upper()} [{self.reason}] {rules}{audit}"


@dataclass(frozen=True)
class TraceResult:
    verdict: str  # allow | deny
    egress: DirectionTrace
    ingress: DirectionTrace

    @property
    def allowed(self) -> bool:
        return self.verdict == ALLOW

    def __str__(self) -> str:
        return f"{self.verdict.upper()}\n  {self.egress}\n  {self.ingress}"


def trace(
    from_labels: Iterable[str] | str,
    to: Iterable[str] | str,
    port: int,
    proto: int,
    policies: Iterable[Any],
    *,
    from_identity: int | None = None,
    to_identity: int | None = None,
    named_ports: Mapping[str, tuple[int, int]] | None = None,
    all_named_ports: Mapping[str, Iterable[tuple[int, int]]] | None = None,
    options: ResolveOptions | None = None,
) -> TraceResult:
    """Verdict for traffic ``from_labels → to``; each side is a label set or a CIDR/IP
    string (a peer outside the cluster)."""
    opts = options or ResolveOptions()
    norm = normalize_all(policies, opts)
    src, src_local = _endpoint(from_labels, from_identity, opts)
    dst, dst_local = _endpoint(to, to_identity, opts)
    ports = dict(named_ports or {})
    every = {k: set(v) for k, v in (all_named_ports or {}).items()}
    for name, value in ports.items():
        every.setdefault(name, set()).add(value)
    egress = _direction(norm, src, dst, "egress", port, proto, ports, every, opts, src_local)
    ingress = _direction(norm, dst, src, "ingress", port, proto, ports, every, opts, dst_local)
    ok = _passes(egress) and _passes(ingress)
    return TraceResult(ALLOW if ok else DENY, egress, ingress)


def _endpoint(what: Iterable[str] | str, ident: int | None, opts: ResolveOptions
              ) -> tuple[IdentityView, bool]:
    """A side of the flow: labels (local or not), or a CIDR/IP (a world peer)."""
    if isinstance(what, str):
        net = parse_cidr(what)
        return IdentityView(CIDR_IDENTITY_FLAG, frozenset({"reserved:world", f"cidr:{net}"})), False
    view = IdentityView(ident or 0, frozenset(what))
    return view, _local(view, ident, opts)


def ipcache_lookup(what: str, prefixes: Iterable[tuple[str, int]]) -> tuple[int, str]:
    """The identity the ipcache gives an IP or CIDR, and the prefix that decided it: the
    longest ipcache prefix that contains it (as the datapath's longest-prefix match), else
    world. Raises ``ValueError`` for something that is not an IP or CIDR."""
    net = parse_cidr(what)
    best: tuple[int, int, str] | None = None
    for text, identity in prefixes:
        try:
            prefix = parse_cidr(text)
        except ValueError:
            continue
        if prefix.version == net.version and net.subnet_of(prefix):  # type: ignore[arg-type]
            if best is None or prefix.prefixlen > best[0]:
                best = (prefix.prefixlen, identity, str(prefix))
    if best is None:
        return ID_WORLD, ""
    return best[1], best[2]


def _passes(d: DirectionTrace) -> bool:
    return d.verdict == ALLOW or d.audit


def _local(view: IdentityView, ident: int | None, opts: ResolveOptions) -> bool:
    if ident is not None:
        return is_local(ident, opts.cluster_id)
    if view.is_world:
        return False
    reserved = {k for s, k, _ in view.pairs if s == "reserved"}
    if reserved & {"host", "health", "init", "ingress"}:
        return True
    clusters = view.values("k8s", LABEL_CLUSTER)
    if clusters and opts.cluster_name not in clusters:
        return False
    return bool(view.values("k8s", LABEL_NAMESPACE))


def _is_host(view: IdentityView) -> bool:
    return view.id == ID_HOST or (view.id == 0 and "reserved:host" in view.labels)


def _selects(rule: NormRule, local: IdentityView) -> bool:
    if rule.node_subject != _is_host(local):
        return False
    return rule.subject.matches(local)


def _direction(
    norm: list[NormPolicy], local: IdentityView, peer: IdentityView, direction: str,
    port: int, proto: int, named: Mapping[str, tuple[int, int]],
    every: Mapping[str, set[tuple[int, int]]], opts: ResolveOptions, is_local_ep: bool,
) -> DirectionTrace:
    if not is_local_ep:
        return DirectionTrace(direction, ALLOW, "not-local", ())
    d = 0 if direction == "ingress" else 1
    rules = [r for p in norm for r in p.rules if _selects(r, local)]
    default_deny = any(r.default_deny[d] for r in rules)
    has = any(r.has_sections[d] for r in rules)
    if not default_deny and not has:
        return DirectionTrace(direction, ALLOW, "not-enforced", ())
    allows: list[RuleRef] = []
    denies: list[RuleRef] = []
    for rule in rules:
        for section in rule.sections:
            if section.direction != direction:
                continue
            if _section_matches(section, peer, port, proto, named, every):
                (denies if section.deny else allows).append(section.ref)
    audit = opts.audit_mode or (local.id != 0 and local.id in opts.audit_identities)
    if denies:
        return DirectionTrace(direction, DENY, "rule", tuple(sorted(denies)), audit)
    if allows:
        return DirectionTrace(direction, ALLOW, "rule", tuple(sorted(allows)))
    if (direction == "ingress" and opts.allow_localhost and not _is_host(local)
            and _is_host(peer)):
        return DirectionTrace(direction, ALLOW, "allow-localhost", ())
    if default_deny:
        return DirectionTrace(direction, DENY, "default-deny", (), audit)
    return DirectionTrace(direction, ALLOW, "no-default-deny", ())


def _section_matches(
    section: Section, peer: IdentityView, port: int, proto: int,
    named: Mapping[str, tuple[int, int]], every: Mapping[str, set[tuple[int, int]]],
) -> bool:
    if section.wildcard_peers:
        wildcard = True
    else:
        hits = [s for s in section.peers if s.matches(peer)]
        if not hits:
            return False
        wildcard = any(s.kind == "all" for s in hits)
    if not section.ports:
        return True
    egress_wild = section.direction == "egress" and wildcard
    return any(_port_matches(spec, port, proto, named, every, egress_wild)
               for spec in section.ports)


def _port_matches(
    spec: PortSpec, port: int, proto: int, named: Mapping[str, tuple[int, int]],
    every: Mapping[str, set[tuple[int, int]]], use_every: bool,
) -> bool:
    if spec.name:
        candidates = every.get(spec.name, set()) if use_every else (
            {named[spec.name]} if spec.name in named else set())
        return any(
            spec.proto in (PROTO_ANY, p_proto) and p_proto == proto and p_port == port
            for p_port, p_proto in candidates
        )
    if spec.port == 0:
        return spec.proto in (PROTO_ANY, proto)
    return spec.proto == proto and spec.port <= port <= max(spec.port, spec.end_port)
