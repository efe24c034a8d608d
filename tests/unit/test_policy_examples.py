"""Real manifests through the policy core: the shop example and upstream doc examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ciliary.resources import decode, load_manifests
from services.policy.records import named_ports_from_pods
from services.policy.resolve import ResolveOptions, lookup, resolve_policy
from services.policy.trace import trace
from tests.unit.test_policy_harness import load_universe, render_entry

ROOT = Path(__file__).resolve().parents[2]
SHOP = sorted((ROOT / "examples" / "shop").glob("*.yaml"))
DOC_EXAMPLES = [ROOT / "tests/unit/data/manifests/cilium-examples.yaml",
                ROOT / "tests/unit/data/manifests/k8s-netpol-docs.yaml"]
POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")


def _policies(paths: list[Path]) -> list[Any]:
    return [decode(r.kind, r.manifest) for r in load_manifests([str(p) for p in paths])
            if r.kind in POLICY_KINDS]


def _shop() -> tuple[dict[int, frozenset[str]], dict[str, int], dict[int, Any], list[Any]]:
    resources = load_manifests([str(p) for p in SHOP])
    ids: dict[int, frozenset[str]] = {1: frozenset(), 2: frozenset(),
                                      (1 << 24) | 1: frozenset({"cidr:203.0.113.0/24"})}
    names: dict[str, int] = {}
    pods = []
    for n, r in enumerate(r for r in resources if r.kind == "Pod"):
        labels = {f"k8s:{k}={v}" for k, v in (r.manifest["metadata"].get("labels") or {}).items()}
        labels |= {f"k8s:io.kubernetes.pod.namespace={r.namespace}",
                   "k8s:io.cilium.k8s.policy.cluster=default"}
        ident = 65536 + 256 + n
        ids[ident] = frozenset(labels)
        names[r.name] = ident
        pods.append((f"{r.namespace}/{r.name}", r.manifest))
    if "coredns" in names:  # the shop brings its own cluster DNS pod
        names["kube-dns"] = names.pop("coredns")
    else:
        dns = 65536 + 300
        ids[dns] = frozenset({"k8s:k8s-app=kube-dns", "k8s:io.kubernetes.pod.namespace=kube-system",
                              "k8s:io.cilium.k8s.policy.cluster=default"})
        names["kube-dns"] = dns
    named = named_ports_from_pods(pods, {f"default/{k}": v for k, v in names.items()})
    pols = [decode(r.kind, r.manifest) for r in resources if r.kind in POLICY_KINDS]
    return ids, names, named, pols


def test_shop_story() -> None:
    ids, names, named, pols = _shop()
    res = resolve_policy(pols, ids, named, ResolveOptions(allow_localhost=False))
    assert all(st.state == "ok" for st in res.statuses.values())
    payments = res.identities[names["payments"]]
    universe = load_universe({"identities": {
        **{n: {"id": i, "raw": sorted(ids[i])} for n, i in names.items()},
        "gateway": {"id": (1 << 24) | 1, "raw": ["cidr:203.0.113.0/24"]}}})
    assert [render_entry(e, universe) for e in payments.entries] == [
        "egress kube-dns 53/UDP allow CNP/default/payments-egress egress[1]",
        "egress gateway 443/TCP allow CNP/default/payments-egress egress[0]",
        "ingress checkout 8080/TCP allow CNP/default/payments-ingress ingress[0]",
    ]

    def verdict(src: str, dst: str | frozenset[str], port: int, proto: int = 6) -> str:
        to = dst if isinstance(dst, str) and dst[0].isdigit() else ids[names[str(dst)]]
        return trace(ids[names[src]], to, port, proto, pols, from_identity=names[src],
                     options=ResolveOptions(allow_localhost=False)).verdict

    assert verdict("checkout", "payments", 8080) == "allow"
    assert verdict("frontend", "payments", 8080) == "deny"
    assert verdict("payments", "203.0.113.10", 443) == "allow"
    assert verdict("payments", "198.51.100.1", 443) == "deny"
    assert verdict("payments", "kube-dns", 53, 17) == "allow"


@pytest.mark.parametrize("paths", [SHOP, DOC_EXAMPLES], ids=["shop", "upstream-docs"])
def test_examples_resolve_and_trace_agrees(paths: list[Path]) -> None:
    u = load_universe()
    pols = _policies(paths)
    assert pols
    opts = ResolveOptions()
    res = resolve_policy(pols, u.identities, u.named_ports, opts)
    for st in res.statuses.values():
        assert st.state == "ok", st.error
    every: dict[str, set[tuple[int, int]]] = {}
    for ports in u.named_ports.values():
        for name, value in ports.items():
            every.setdefault(name, set()).add(value)
    for src, src_labels in u.identities.items():
        for dst, dst_labels in u.identities.items():
            for port, proto in ((80, 6), (8080, 6), (53, 17), (443, 6), (9090, 6)):
                t = trace(src_labels, dst_labels, port, proto, pols, from_identity=src,
                          to_identity=dst, named_ports=u.named_ports.get(dst, {}),
                          all_named_ports=every, options=opts)
                eg, _ = lookup(res.identities.get(src), dst, port, proto, "egress")
                ing, _ = lookup(res.identities.get(dst), src, port, proto, "ingress")
                expected = "allow" if eg == ing == "allow" else "deny"
                assert t.verdict == expected, (u.name(src), u.name(dst), port, proto, str(t))
