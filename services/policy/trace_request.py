"""Answers ``ciliary policy trace`` requests from the policy service's view.

Invariants:
- Pure: the answer depends only on the request and the ``TraceView`` (the policies,
  identities, named ports and ipcache prefixes the service holds); a request naming an
  unknown protocol or an address that does not parse gets ``ok=False`` with the field.
- An address resolves like the datapath resolves it: the longest ipcache prefix holding
  it, else ``reserved:world``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ciliary import schema

from .resolve import ResolveOptions
from .rules import PROTOCOLS, NormPolicy
from .selectors import LABEL_SOURCE_PODIP, IdentityView, is_cidr_identity
from .trace import ipcache_lookup, trace


@dataclass(frozen=True)
class TraceView:
    """What the service knows that a trace needs."""

    norm: list[NormPolicy]
    named_ports: Mapping[int, Mapping[str, tuple[int, int]]]
    identities: Mapping[int, IdentityView]
    ipcache_prefixes: Mapping[str, tuple[str, int]]  # ipcache key -> (prefix, identity)
    options: ResolveOptions


def answer_trace(req: schema.PolicyTraceRequest, view: TraceView) -> schema.PolicyTraceReply:
    """The verdict for one trace request, or an ``ok=False`` reply naming the bad field."""
    proto = PROTOCOLS.get(req.proto.upper())
    if proto is None:
        return schema.PolicyTraceReply(ok=False, error=f"unknown protocol {req.proto!r}")
    try:
        from_labels, from_identity = _trace_side(
            view, "from", req.from_cidr, req.from_labels, req.from_identity)
        to_labels, to_identity = _trace_side(
            view, "to", req.to_cidr, req.to_labels, req.to_identity)
    except ValueError as err:
        return schema.PolicyTraceReply(ok=False, error=str(err))
    named = view.named_ports.get(to_identity, {})
    every: dict[str, set[tuple[int, int]]] = {}
    for ports in view.named_ports.values():
        for name, value in ports.items():
            every.setdefault(name, set()).add(value)
    t = trace(from_labels, to_labels, req.port, proto, view.norm,
              from_identity=from_identity or None, to_identity=to_identity or None,
              named_ports=named, all_named_ports=every, options=view.options)

    def step(d: Any) -> schema.PolicyTraceStep:
        return schema.PolicyTraceStep(direction=d.direction, verdict=d.verdict,
                                      reason=d.reason, rules=[str(r) for r in d.rules],
                                      audit=d.audit)

    return schema.PolicyTraceReply(verdict=t.verdict, egress=step(t.egress),
                                   ingress=step(t.ingress))

def _trace_side(view: TraceView, side: str, cidr: str, labels: list[str], identity: int
                ) -> tuple[list[str], int]:
    """Labels and identity of one side of a trace: an IP/CIDR is the identity the
    ipcache maps it to (pod, node, policy CIDR or world); labels without an identity
    get the identity with exactly those labels, when there is one."""
    if cidr:
        try:
            ident, prefix = ipcache_lookup(cidr, view.ipcache_prefixes.values())
        except ValueError:
            raise ValueError(f"{side}_cidr: {cidr!r} is not an IP address or CIDR") from None
        view = view.identities.get(ident)
        if view is not None:
            return sorted(view.labels), ident
        found = ["reserved:world"] + ([f"cidr:{prefix}"] if is_cidr_identity(ident) else [])
        return found, ident
    if not identity:
        wanted = frozenset(labels)
        identity = next((i for i, v in sorted(view.identities.items())
                         if _own_labels(v) == wanted), 0)
    known = view.identities.get(identity) if identity else None
    if known is not None:  # the pod addresses the service gave the identity (ipBlocks)
        labels = sorted(set(labels) | {x for x in known.labels
                                       if x.startswith(f"{LABEL_SOURCE_PODIP}:")})
    return list(labels), identity


def _own_labels(view: IdentityView) -> frozenset[str]:
    """An identity's labels without the pod addresses the policy service added."""
    return frozenset(x for x in view.labels if not x.startswith(f"{LABEL_SOURCE_PODIP}:"))
