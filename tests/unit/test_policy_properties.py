"""Properties of the policy core: selector cache, trace ≡ entries, diff ordering."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ciliary.resources import ManifestError, decode
from services.policy.diff import Op, apply, diff
from services.policy.resolve import (
    ALLOW,
    DENY,
    IdentityPolicy,
    PolicyEntry,
    ResolveOptions,
    lookup,
    resolve_policy,
)
from services.policy.rules import RuleRef
from services.policy.selectors import (
    Requirement,
    Selector,
    SelectorCache,
    cidr_selector,
    labels_selector,
)
from services.policy.trace import trace

# ---------------------------------------------------------------- identities

NAMESPACES = ("n1", "n2")
APPS = ("a", "b", "c")
TIERS = ("x", "y")
CIDR_IDS = {
    (1 << 24) | 1: frozenset({"cidr:10.0.0.0/8", "reserved:world"}),
    (1 << 24) | 2: frozenset({"cidr:10.1.0.0/16", "cidr:10.0.0.0/8", "reserved:world"}),
}
NAMED = ("http", "web")


def pod_labels(ns: str, app: str, tier: str | None, cluster: str) -> frozenset[str]:
    labels = {
        f"k8s:io.kubernetes.pod.namespace={ns}",
        f"k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={ns}",
        f"k8s:io.cilium.k8s.policy.cluster={cluster}",
        f"k8s:app={app}",
    }
    if tier:
        labels.add(f"k8s:tier={tier}")
    return frozenset(labels)


@st.composite
def identity_sets(draw: Any) -> tuple[dict[int, frozenset[str]], dict[int, dict[str, tuple[int, int]]]]:
    ids: dict[int, frozenset[str]] = {1: frozenset(), 2: frozenset(), 6: frozenset()}
    ids.update(CIDR_IDS)
    pods = draw(st.lists(
        st.tuples(st.sampled_from(NAMESPACES), st.sampled_from(APPS),
                  st.sampled_from((None, *TIERS)), st.sampled_from(("default", "east"))),
        min_size=1, max_size=5, unique=True,
    ))
    named: dict[int, dict[str, tuple[int, int]]] = {}
    for n, (ns, app, tier, cluster) in enumerate(pods):
        cid = 1 if cluster == "default" else 2
        ident = (cid << 16) | (256 + n)
        ids[ident] = pod_labels(ns, app, tier, cluster)
        ports = draw(st.dictionaries(st.sampled_from(NAMED),
                                     st.tuples(st.sampled_from((80, 8080, 53)),
                                               st.sampled_from((6, 17))), max_size=2))
        if ports:
            named[ident] = ports
    return ids, named


# ---------------------------------------------------------------- selector cache

requirements = st.builds(
    Requirement,
    st.sampled_from(("any", "k8s", "reserved")),
    st.sampled_from(("app", "tier", "io.kubernetes.pod.namespace", "host", "world")),
    st.sampled_from(("In", "NotIn", "Exists", "DoesNotExist")),
    st.lists(st.sampled_from((*APPS, *TIERS, *NAMESPACES, "")), min_size=1, max_size=2,
             unique=True).map(lambda v: tuple(sorted(v))),
).map(lambda r: r if r.op in ("In", "NotIn") else Requirement(r.source, r.key, r.op))

selectors = st.one_of(
    st.lists(requirements, max_size=3).map(labels_selector),
    st.sampled_from([cidr_selector("10.0.0.0/8"), cidr_selector("10.0.0.0/8", ["10.1.0.0/16"]),
                     cidr_selector("0.0.0.0/0"), Selector("world"), Selector("all"),
                     Selector("none")]),
)

label_pool = st.frozensets(st.sampled_from(sorted(
    {lbl for ns in NAMESPACES for app in APPS for t in (None, *TIERS)
     for lbl in pod_labels(ns, app, t, "default")} | {"reserved:host", "cidr:10.1.0.0/16"}
)), max_size=5)

changes = st.lists(
    st.tuples(st.booleans(), st.integers(min_value=0, max_value=6), label_pool), max_size=12
)


@given(sels=st.lists(selectors, min_size=1, max_size=6), steps=changes)
@settings(max_examples=200, deadline=None)
def test_selector_cache_incremental_equals_scratch(
    sels: list[Selector], steps: list[tuple[bool, int, frozenset[str]]]
) -> None:
    cache = SelectorCache()
    for sel in sels:
        cache.add_selector(sel)
    current: dict[int, frozenset[str]] = {}
    for add, slot, labels in steps:
        ident = 65792 + slot if slot != 0 else 2
        before = {sel: cache.selections(sel) for sel in sels}
        if add:
            changed = cache.update({ident: labels}, ())
            current[ident] = labels
        else:
            changed = cache.update({}, [ident])
            current.pop(ident, None)
        scratch = SelectorCache(current)
        for sel in sels:
            assert cache.selections(sel) == scratch.selections(sel), sel
        assert changed == {sel for sel in sels if before[sel] != cache.selections(sel)}


# ---------------------------------------------------------------- trace ≡ entries

match_labels = st.dictionaries(st.sampled_from(("app", "tier")), st.sampled_from((*APPS, *TIERS)),
                               max_size=1)
peer_selectors = st.one_of(
    match_labels.map(lambda m: {"matchLabels": m}),
    st.just({"matchLabels": {"k8s:io.kubernetes.pod.namespace": "n2"}}),
    st.just({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
    st.just({"matchLabels": {"io.cilium.k8s.policy.cluster": "east"}}),
)
ports = st.one_of(
    st.builds(lambda p, proto: {"port": p, "protocol": proto},
              st.sampled_from(("80", "0", "53", "http", "web")),
              st.sampled_from(("TCP", "UDP", "ANY"))),
    st.just({"port": "79", "endPort": 81, "protocol": "TCP"}),
)


@st.composite
def sections(draw: Any, direction: str, deny: bool) -> dict[str, Any]:
    pfx = "from" if direction == "ingress" else "to"
    out: dict[str, Any] = {}
    l3 = draw(st.sampled_from(("", "endpoints", "entities", "cidr", "endpoints+entities")))
    if "endpoints" in l3:
        out[f"{pfx}Endpoints"] = draw(st.lists(peer_selectors, min_size=1, max_size=2))
        if draw(st.integers(0, 4)) == 0:
            out[f"{pfx}Requires"] = [{"matchLabels": draw(match_labels)}]
    if "entities" in l3:
        out[f"{pfx}Entities"] = draw(st.lists(
            st.sampled_from(("world", "cluster", "host", "all", "remote-node")),
            min_size=1, max_size=2, unique=True))
    if l3 == "cidr":
        out[f"{pfx}CIDRSet"] = [draw(st.sampled_from(
            ({"cidr": "10.0.0.0/8"}, {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]})))]
    if draw(st.booleans()):
        out["toPorts"] = [{"ports": draw(st.lists(ports, min_size=1, max_size=2))}]
    return out


@st.composite
def policies(draw: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")))
        spec: dict[str, Any] = {"endpointSelector": {"matchLabels": draw(match_labels)}}
        for section, direction, deny in (("ingress", "ingress", False),
                                         ("ingressDeny", "ingress", True),
                                         ("egress", "egress", False),
                                         ("egressDeny", "egress", True)):
            items = draw(st.lists(sections(direction, deny), max_size=2))
            if items:
                spec[section] = items
        dd = draw(st.sampled_from((None, {"ingress": False}, {"egress": False},
                                   {"ingress": True, "egress": False})))
        if dd is not None:
            spec["enableDefaultDeny"] = dd
        meta: dict[str, Any] = {"name": f"p{i}"}
        if kind == "CiliumNetworkPolicy":
            meta["namespace"] = draw(st.sampled_from(NAMESPACES))
        out.append({"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, "spec": spec})
    return out


PACKETS = ((80, 6), (80, 17), (53, 17), (8080, 6), (81, 6), (443, 6))


def _decode_all(manifests: list[dict[str, Any]]) -> list[Any]:
    out = []
    for doc in manifests:
        try:
            out.append(decode(doc["kind"], doc))
        except ManifestError:
            assume(False)
    return out


def _direction_check(policy: IdentityPolicy | None, peer: int, port: int, proto: int,
                     direction: str, traced_rules: tuple[RuleRef, ...]) -> bool:
    verdict, entries = lookup(policy, peer, port, proto, direction)
    for e in entries:
        if e.rule.kind:
            assert e.rule in traced_rules, (e, traced_rules)
    return verdict == ALLOW or bool(policy and policy.audit)


@given(universe=identity_sets(), docs=policies(), audit=st.booleans(),
       localhost=st.booleans(), local_cluster=st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_trace_agrees_with_entries(
    universe: tuple[dict[int, frozenset[str]], dict[int, dict[str, tuple[int, int]]]],
    docs: list[dict[str, Any]], audit: bool, localhost: bool, local_cluster: bool,
) -> None:
    ids, named = universe
    pols = _decode_all(docs)
    opts = ResolveOptions(audit_mode=audit, allow_localhost=localhost,
                          local_cluster_only=local_cluster)
    res = resolve_policy(pols, ids, named, opts)
    every: dict[str, set[tuple[int, int]]] = {}
    for pp in named.values():
        for name, value in pp.items():
            every.setdefault(name, set()).add(value)
    for src in ids:
        for dst in ids:
            for port, proto in PACKETS:
                t = trace(ids[src], ids[dst], port, proto, pols, from_identity=src,
                          to_identity=dst, named_ports=named.get(dst, {}),
                          all_named_ports=every, options=opts)
                eg = _direction_check(res.identities.get(src), dst, port, proto, "egress",
                                      t.egress.rules)
                ing = _direction_check(res.identities.get(dst), src, port, proto, "ingress",
                                       t.ingress.rules)
                expected = ALLOW if eg and ing else DENY
                assert t.verdict == expected, (src, dst, port, proto, str(t))


# ---------------------------------------------------------------- diff

REF = RuleRef("CiliumNetworkPolicy", "default", "p", 0, "ingress", 0)
entries = st.builds(
    PolicyEntry,
    peer=st.sampled_from((0, 65792, 65793)),
    port=st.sampled_from((0, 80)),
    end_port=st.just(0),
    proto=st.sampled_from((0, 6)),
    direction=st.sampled_from(("ingress", "egress")),
    verdict=st.sampled_from((ALLOW, DENY)),
    audit=st.just(False),
    rule=st.just(REF),
)
tables = st.dictionaries(
    st.sampled_from((65792, 65793)),
    st.lists(entries, max_size=6).map(lambda es: list({e.key: e for e in es}.values())),
    max_size=2,
)


def _norm(table: dict[int, list[PolicyEntry]]) -> dict[int, list[PolicyEntry]]:
    return {i: sorted(es, key=lambda e: e.key) for i, es in table.items() if es}


@given(old=tables, new=tables)
@settings(max_examples=300, deadline=None)
def test_diff_applies_and_orders_adds_before_deletes(
    old: dict[int, list[PolicyEntry]], new: dict[int, list[PolicyEntry]]
) -> None:
    ops = diff(old, new)
    assert _norm(apply(old, ops)) == _norm(new)
    kinds = [op.action for op in ops]
    if "delete" in kinds:
        first_delete = kinds.index("delete")
        assert all(k == "delete" for k in kinds[first_delete:])
    adds = [op for op in ops if op.action != "delete"]
    verdicts = [op.entry.verdict for op in adds]
    assert verdicts == sorted(verdicts, key=lambda v: v != DENY)
    deletes = [op.entry.verdict for op in ops if op.action == "delete"]
    assert deletes == sorted(deletes, key=lambda v: v == DENY)
    assert diff(new, new) == []


def test_diff_example_order() -> None:
    allow80 = PolicyEntry(65793, 80, 0, 6, "ingress", ALLOW, False, REF)
    deny80 = PolicyEntry(65793, 80, 0, 6, "ingress", DENY, False, REF)
    allow_all = PolicyEntry(0, 0, 0, 0, "ingress", ALLOW, False, REF)
    deny22 = PolicyEntry(0, 22, 0, 6, "ingress", DENY, False, REF)
    new_allow = PolicyEntry(65794, 0, 0, 0, "ingress", ALLOW, False, REF)
    old = {65792: [allow80, allow_all, deny22]}
    new = {65792: [deny80, new_allow]}
    ops = diff(old, new)
    assert [(o.action, o.entry.verdict, o.entry.peer) for o in ops] == [
        ("update", DENY, 65793),
        ("add", ALLOW, 65794),
        ("delete", ALLOW, 0),
        ("delete", DENY, 0),
    ]
    assert all(isinstance(o, Op) for o in ops)
