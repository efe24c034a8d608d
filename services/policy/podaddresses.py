"""Pod addresses as identity labels, so that NetworkPolicy ipBlocks can select pods.

In Kubernetes an ``ipBlock`` also matches pod IPs inside it; ciliary enforces by identity,
so the policy service gives the engine, for some pod identities, one extra label
``podip:<address>`` per address of the identity's pods, and the ``ipblock`` selector
(``selectors``) selects a pod identity when all of those addresses lie inside the block.

Invariants:
- Pure: no bus, no clock.
- Only an identity with at least one pod address inside some NetworkPolicy ipBlock carries
  extra labels, and then one per address of its pods (all of them, so that "every address
  inside" is decided on the whole set). Without ipBlocks covering pod addresses no
  identity carries any: a cluster without such policies pays nothing.
- `PodAddressLabels.update` returns exactly the identities whose extra labels differ from
  those the previous call handed out; `extra(identity)` is the current set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from .rules import NormPolicy
from .selectors import LABEL_SOURCE_PODIP, Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def ipblock_networks(policies: Iterable[NormPolicy]) -> tuple[Network, ...]:
    """The ``cidr`` of every ipBlock peer of the policies (sorted, without repeats)."""
    found: set[Network] = set()
    for pol in policies:
        for rule in pol.rules:
            for section in rule.sections:
                for sel in section.peers:
                    if sel.kind == "ipblock":
                        found.add(ipaddress.ip_network(sel.cidr, strict=False))
    return tuple(sorted(found, key=lambda n: (n.version, n.network_address, n.prefixlen)))


def address_of(prefix: str) -> Address | None:
    """The address of a host prefix (``10.0.0.5/32``) or a bare address; else None."""
    try:
        net = ipaddress.ip_network(prefix.strip(), strict=False)
    except ValueError:
        return None
    if net.num_addresses != 1:
        return None
    return net.network_address


class PodAddressLabels:
    """Which pod identities carry ``podip:`` labels, and which."""

    def __init__(self) -> None:
        self._extra: dict[int, frozenset[str]] = {}

    def extra(self, identity: int) -> frozenset[str]:
        return self._extra.get(identity, frozenset())

    def update(self, pod_addresses: Mapping[str, int], blocks: Sequence[Network]) -> set[int]:
        """``pod_addresses``: pod address (``10.0.0.5`` or ``10.0.0.5/32``) → identity;
        ``blocks``: the ipBlock CIDRs in force. Returns the identities whose labels changed."""
        wanted: dict[int, frozenset[str]] = {}
        if blocks:
            by_identity: dict[int, list[Address]] = {}
            for text, identity in pod_addresses.items():
                addr = address_of(text)
                if addr is not None:
                    by_identity.setdefault(identity, []).append(addr)
            for identity, addresses in by_identity.items():
                if any(addr.version == net.version and addr in net
                       for addr in addresses for net in blocks):
                    wanted[identity] = frozenset(
                        f"{LABEL_SOURCE_PODIP}:{addr}" for addr in addresses)
        changed = {i for i in set(wanted) | set(self._extra)
                   if wanted.get(i) != self._extra.get(i)}
        self._extra = wanted
        return changed
