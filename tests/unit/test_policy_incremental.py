"""Incremental resolution (`PolicyEngine`) ≡ resolution from scratch, step by step.

Seeded random sequences of identity appearances / removals / relabels, named-port
changes and policy creations / updates / deletions; after every step the engine's
resolution must equal `resolve_policy` over the same inputs, and the step's map
operations must equal `diff` of the two whole resolutions.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.policy.diff import apply, diff
from services.policy.incremental import PolicyEngine
from services.policy.resolve import (
    ResolveOptions,
    normalize_all,
    policy_selectors,
    resolve_policy,
)

NAMESPACES = ("n1", "n2")
APPS = ("a", "b", "c")
TIERS = (None, "x", "y")
CLUSTERS = ("default", "default", "east")
RESERVED = {1: frozenset(), 2: frozenset(), 4: frozenset(), 6: frozenset()}
CIDR_IDS = {
    (1 << 24) | 1: frozenset({"cidr:10.0.0.0/8", "reserved:world"}),
    (1 << 24) | 2: frozenset({"cidr:10.1.0.0/16", "cidr:10.0.0.0/8", "reserved:world"}),
    (1 << 24) | 3: frozenset({"cidr:192.168.0.0/16", "reserved:world"}),
}


def pod_labels(rng: random.Random) -> frozenset[str]:
    ns, app, tier, cluster = (rng.choice(NAMESPACES), rng.choice(APPS), rng.choice(TIERS),
                              rng.choice(CLUSTERS))
    labels = {
        f"k8s:io.kubernetes.pod.namespace={ns}",
        f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={ns}",
        f"k8s:io.cilium.k8s.namespace.labels.team={'t' + ns[-1]}",
        f"k8s:io.cilium.k8s.policy.cluster={cluster}",
        f"k8s:app={app}",
    }
    if tier:
        labels.add(f"k8s:tier={tier}")
    return frozenset(labels)


def named_ports(rng: random.Random) -> dict[str, tuple[int, int]]:
    out = {}
    for name in ("http", "web"):
        if rng.random() < 0.5:
            out[name] = (rng.choice((80, 8080, 53)), rng.choice((6, 17)))
    return out


def match_labels(rng: random.Random) -> dict[str, Any]:
    r = rng.random()
    if r < 0.15:
        return {}
    if r < 0.25:
        return {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}
    if r < 0.35:
        return {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]}
    if r < 0.45:
        return {"matchLabels": {"io.cilium.k8s.policy.cluster": "east"}}
    if r < 0.55:
        return {"matchLabels": {"io.cilium.k8s.namespace.labels.team": rng.choice(("t1", "t2"))}}
    key = rng.choice(("app", "tier"))
    return {"matchLabels": {key: rng.choice(APPS if key == "app" else ("x", "y"))}}


def ports(rng: random.Random) -> list[dict[str, Any]]:
    choices = [
        {"port": "80", "protocol": "TCP"}, {"port": "53", "protocol": "UDP"},
        {"port": "80", "protocol": "ANY"}, {"port": "0", "protocol": "TCP"},
        {"port": "http", "protocol": "TCP"}, {"port": "web"},
        {"port": "79", "endPort": 82, "protocol": "TCP"},
    ]
    return rng.sample(choices, rng.randint(1, 2))


def section(rng: random.Random, direction: str, deny: bool) -> dict[str, Any]:
    pfx = "from" if direction == "ingress" else "to"
    out: dict[str, Any] = {}
    l3 = rng.choice(("", "endpoints", "endpoints", "entities", "cidr", "endpoints+entities"))
    if "endpoints" in l3:
        out[f"{pfx}Endpoints"] = [match_labels(rng) for _ in range(rng.randint(1, 2))]
    if "entities" in l3:
        out[f"{pfx}Entities"] = rng.sample(("world", "cluster", "host", "all", "remote-node"),
                                           rng.randint(1, 2))
    if l3 == "cidr":
        out[f"{pfx}CIDRSet"] = [rng.choice(({"cidr": "10.0.0.0/8"},
                                            {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]},
                                            {"cidr": "0.0.0.0/0"}))]
    r = rng.random()
    if r < 0.45:
        out["toPorts"] = [{"ports": ports(rng)}]
    elif r < 0.55 and not deny:
        out["icmps"] = [{"fields": [{"type": rng.choice((8, 13)), "family": "IPv4"}]}]
    return out


def cilium_policy(rng: random.Random, name: str) -> dict[str, Any]:
    kind = rng.choice(("CiliumNetworkPolicy", "CiliumNetworkPolicy",
                       "CiliumClusterwideNetworkPolicy"))
    spec: dict[str, Any] = {"endpointSelector": match_labels(rng)}
    if kind == "CiliumClusterwideNetworkPolicy" and rng.random() < 0.2:
        spec = {"nodeSelector": {}}
    for key, direction, deny in (("ingress", "ingress", False), ("ingressDeny", "ingress", True),
                                 ("egress", "egress", False), ("egressDeny", "egress", True)):
        if rng.random() < (0.6 if not deny else 0.25):
            spec[key] = [section(rng, direction, deny) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.2:
        spec["enableDefaultDeny"] = rng.choice(({"ingress": False}, {"egress": False}))
    meta: dict[str, Any] = {"name": name}
    if kind == "CiliumNetworkPolicy":
        meta["namespace"] = rng.choice(NAMESPACES)
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, "spec": spec}


def network_policy(rng: random.Random, name: str) -> dict[str, Any]:
    peer: dict[str, Any] = rng.choice((
        {"podSelector": {"matchLabels": {"app": rng.choice(APPS)}}},
        {"namespaceSelector": {"matchLabels": {"team": rng.choice(("t1", "t2"))}}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "x"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    ))
    rule: dict[str, Any] = {"from": [peer]}
    if rng.random() < 0.5:
        rule["ports"] = [rng.choice(({"port": 80}, {"port": "http"},
                                     {"port": 79, "endPort": 81, "protocol": "TCP"}))]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": rng.choice(NAMESPACES)},
        "spec": {"podSelector": match_labels(rng) if rng.random() < 0.7 else {},
                 "policyTypes": ["Ingress"], "ingress": [rule]},
    }


def random_policy(rng: random.Random, name: str) -> dict[str, Any]:
    return network_policy(rng, name) if rng.random() < 0.25 else cilium_policy(rng, name)


def policy_key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace", ""), meta["name"]


OPTIONS = [
    ResolveOptions(cluster_name="default", cluster_id=1),
    ResolveOptions(cluster_name="default", cluster_id=1, allow_localhost=False,
                   local_cluster_only=False, audit_identities=frozenset({65793})),
    ResolveOptions(cluster_name="default", cluster_id=1, max_entries=12, audit_mode=True),
]


@pytest.mark.parametrize("seed", range(16))
def test_incremental_equals_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    opts = OPTIONS[seed % len(OPTIONS)]
    identities: dict[int, frozenset[str]] = {**RESERVED, **CIDR_IDS}
    next_pod = 0

    def new_pod_id() -> int:
        nonlocal next_pod
        cid = 1 if rng.random() < 0.85 else 2
        next_pod += 1
        return (cid << 16) | (256 + next_pod)

    for _ in range(6):
        identities[new_pod_id()] = pod_labels(rng)
    named = {i: p for i in identities if i >= 256 and i < (1 << 24) and (p := named_ports(rng))}
    policies = {}
    for n in range(rng.randint(2, 5)):
        doc = random_policy(rng, f"p{n}")
        policies[policy_key(doc)] = doc

    engine = PolicyEngine(opts)
    step = engine.apply(list(policies.values()), identities, (), named)
    prev = resolve_policy(list(policies.values()), identities, named, opts)
    _same(step.resolution, prev)
    assert step.ops() == diff({}, prev.entries)

    for n in range(60):
        added: dict[int, frozenset[str]] = {}
        removed: list[int] = []
        new_named = None
        new_policies = None
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            pods = sorted(i for i in identities if 256 <= i < (1 << 24))
            what = rng.random()
            if what < 0.2 or not pods:
                ident = new_pod_id()
                added[ident] = identities[ident] = pod_labels(rng)
            elif what < 0.4:
                ident = rng.choice(pods)
                added[ident] = identities[ident] = pod_labels(rng)
            elif what < 0.55:
                ident = rng.choice(pods)
                del identities[ident]
                added.pop(ident, None)
                removed.append(ident)
            elif what < 0.65:
                ident = rng.choice(pods)
                new_named = dict(new_named if new_named is not None else named)
                ports_now = named_ports(rng)
                if ports_now:
                    new_named[ident] = ports_now
                else:
                    new_named.pop(ident, None)
            elif what < 0.7:  # a re-add with unchanged labels is no change at all
                ident = rng.choice(pods)
                removed.append(ident)
                added[ident] = identities[ident]
            elif what < 0.75:  # reserved and CIDR identities come and go too
                ident = rng.choice(sorted({**RESERVED, **CIDR_IDS}))
                if ident in identities:
                    del identities[ident]
                    added.pop(ident, None)
                    removed.append(ident)
                else:
                    added[ident] = identities[ident] = {**RESERVED, **CIDR_IDS}[ident]
            else:
                new_policies = dict(new_policies if new_policies is not None else policies)
                keys = sorted(new_policies)
                r = rng.random()
                if r < 0.3 and keys:
                    del new_policies[rng.choice(keys)]
                else:
                    doc = random_policy(rng, f"p{rng.randint(0, 6)}")
                    new_policies[policy_key(doc)] = doc
        if new_named is not None:
            named = new_named
        if new_policies is not None:
            policies = new_policies
        step = engine.apply(None if new_policies is None else list(policies.values()),
                            added, removed, new_named)
        scratch = resolve_policy(list(policies.values()), identities, named, opts)
        _same(step.resolution, scratch, f"seed {seed} step {n}")
        ops = step.ops()
        assert ops == diff(prev.entries, scratch.entries), f"seed {seed} step {n}"
        assert _norm(apply(prev.entries, ops)) == _norm(scratch.entries)
        assert step.changed == {
            i for i in prev.identities.keys() | scratch.identities.keys()
            if prev.identities.get(i) != scratch.identities.get(i)
        }
        # the selector cache keeps no selector the current policies do not use
        assert set(engine.cache.selectors()) <= policy_selectors(
            normalize_all(policies.values(), opts)), f"seed {seed} step {n}"
        prev = scratch


def _norm(table: dict[int, list[Any]]) -> dict[int, list[Any]]:
    return {i: sorted(es, key=lambda e: e.key) for i, es in table.items() if es}


def _same(got: Any, want: Any, where: str = "initial") -> None:
    assert got.identities.keys() == want.identities.keys(), where
    for ident, ip in want.identities.items():
        assert got.identities[ident] == ip, (where, ident)
    assert got.statuses == want.statuses, where
    assert got.counters == want.counters, where


def test_one_identity_change_touches_only_its_peer_entries() -> None:
    """A new pod selected as a peer of another subject adds exactly that peer's entries."""
    opts = ResolveOptions(cluster_name="default", cluster_id=1)
    base = {"k8s:io.kubernetes.pod.namespace=n1", "k8s:io.cilium.k8s.policy.cluster=default"}
    web = frozenset(base | {"k8s:app=web"})
    client = frozenset(base | {"k8s:app=client"})
    pol = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "web", "namespace": "n1"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                 "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"},
                                                        {"port": "443", "protocol": "TCP"}]}]}]}}
    engine = PolicyEngine(opts)
    engine.apply([pol], {1: frozenset(), 65792: web, 65793: client})
    step = engine.apply(None, {65794: client})
    assert step.changed == {65792}
    assert 65794 in step.resolved and 65792 not in step.resolved  # web: only a peer slice
    assert [(op.action, op.identity, op.entry.peer, op.entry.port) for op in step.ops()] == [
        ("add", 65792, 65794, 80), ("add", 65792, 65794, 443)]
    assert step.old_parts == {65792: []}  # nothing else of 65792 was recomputed
    step = engine.apply(None, {}, [65793])
    assert [(op.action, op.entry.peer) for op in step.ops()] == [("delete", 65793)] * 2


def test_begin_settles_identities_resolved_in_full_before_peer_updates() -> None:
    """`begin` gives a new subject its final policy; the subject that only gains it as a
    peer changes in `finish`; together they equal `apply` (and a resolve from scratch)."""
    opts = ResolveOptions(cluster_name="default", cluster_id=1)
    base = {"k8s:io.kubernetes.pod.namespace=n1", "k8s:io.cilium.k8s.policy.cluster=default"}
    web = frozenset(base | {"k8s:app=web"})
    locked = frozenset(base | {"k8s:app=client", "k8s:locked=yes"})
    policies = [
        {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
         "metadata": {"name": "web", "namespace": "n1"},
         "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "lock", "namespace": "n1"},
         "spec": {"podSelector": {"matchLabels": {"locked": "yes"}}, "policyTypes": ["Ingress"],
                  "ingress": []}},
    ]
    engine = PolicyEngine(opts)
    before = engine.apply(policies, {1: frozenset(), 65792: web}).resolution
    step = engine.begin(None, {65793: locked})
    assert step.changed == {65793} and step.resolved == {65793}
    assert step.resolution.identities[65792] == before.identities[65792]  # not yet
    final = resolve_policy(policies, {1: frozenset(), 65792: web, 65793: locked}, None, opts)
    assert step.resolution.identities[65793] == final.identities[65793]
    step = engine.finish(step)
    assert step.changed == {65792, 65793}
    _same(step.resolution, final, "finish")
