"""toFQDNs in the policy service: YAML -> fqdn label selectors -> entries, incrementally."""

from __future__ import annotations

import yaml

from services.policy.incremental import PolicyEngine
from services.policy.resolve import resolve, resolve_policy
from services.policy.rules import RuleRef, normalize
from services.policy.selectors import (
    CIDR_IDENTITY_FLAG,
    NONE,
    IdentityView,
    Requirement,
    Selector,
    fqdn_selector,
)
from services.policy.trace import trace

POLICY = yaml.safe_load("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: payments, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: checkout}}
  egress:
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules: {dns: [{matchPattern: "*"}]}
  - toFQDNs:
    - matchName: API.Payment-Gateway.example.
    - matchPattern: "*.example.com"
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
""")

CHECKOUT = 65792
DNS = 65793
GATEWAY_IP = CIDR_IDENTITY_FLAG | 1  # 203.0.113.10, learned for api.payment-gateway.example
SHOP_IP = CIDR_IDENTITY_FLAG | 2  # 203.0.113.11, learned for www.example.com
OTHER_IP = CIDR_IDENTITY_FLAG | 3  # 203.0.113.12: a policy CIDR no name resolved to
IDENTITIES: dict[int, frozenset[str]] = {
    CHECKOUT: frozenset({"k8s:app=checkout", "k8s:io.kubernetes.pod.namespace=shop",
                         "k8s:io.cilium.k8s.policy.cluster=default"}),
    DNS: frozenset({"k8s:k8s-app=kube-dns", "k8s:io.kubernetes.pod.namespace=kube-system",
                    "k8s:io.cilium.k8s.policy.cluster=default"}),
    GATEWAY_IP: frozenset({"cidr:203.0.113.10/32", "reserved:world",
                           "fqdn:api.payment-gateway.example"}),
    SHOP_IP: frozenset({"cidr:203.0.113.11/32", "reserved:world", "fqdn:*.example.com"}),
    OTHER_IP: frozenset({"cidr:203.0.113.12/32", "reserved:world"}),
}
FQDN_REF = RuleRef("CiliumNetworkPolicy", "shop", "payments", 0, "egress", 1)


def egress(entries: list) -> set[tuple[int, int, int, str]]:
    return {(e.peer, e.port, e.proto, e.verdict) for e in entries if e.direction == "egress"}


def test_to_fqdns_becomes_fqdn_label_selectors_without_warning() -> None:
    pol = normalize(POLICY)
    assert not pol.error
    section = pol.rules[0].sections[1]
    assert section.peers == (
        Selector("labels", (Requirement("fqdn", "api.payment-gateway.example", "Exists"),)),
        Selector("labels", (Requirement("fqdn", "*.example.com", "Exists"),)),
    )
    assert not section.wildcard_peers  # no identity learned yet: selects nothing, not all
    assert not any("toFQDNs" in w for w in pol.warnings)
    assert pol.warnings == ["spec[0].egress[0].toPorts[0].rules: L7 rules not enforced "
                            "(the L4 part is enforced)"]
    assert fqdn_selector() is NONE


def test_fqdn_selector_selects_exactly_the_labelled_identities() -> None:
    sel = fqdn_selector(match_pattern="*.Example.com.")
    assert [i for i, lbls in IDENTITIES.items() if sel.matches(IdentityView(i, lbls))] == [SHOP_IP]
    name = fqdn_selector(match_name="api.payment-gateway.example")
    assert [i for i, lbls in IDENTITIES.items() if name.matches(IdentityView(i, lbls))] == [GATEWAY_IP]


def test_entries_for_learned_addresses_only() -> None:
    entries = resolve([POLICY], IDENTITIES)
    assert egress(entries[CHECKOUT]) == {
        (DNS, 53, 17, "allow"),
        (GATEWAY_IP, 443, 6, "allow"),
        (SHOP_IP, 443, 6, "allow"),
    }
    res = resolve_policy([POLICY], IDENTITIES)
    assert res.identities[CHECKOUT].egress_enforced


def test_incremental_engine_follows_identities_coming_and_going() -> None:
    base = {i: lbls for i, lbls in IDENTITIES.items() if i not in (GATEWAY_IP, SHOP_IP)}
    engine = PolicyEngine()
    first = engine.apply([POLICY], added=base)
    assert egress(first.resolution.identities[CHECKOUT].entries) == {(DNS, 53, 17, "allow")}
    step = engine.apply(added={GATEWAY_IP: IDENTITIES[GATEWAY_IP]})
    assert egress(step.resolution.identities[CHECKOUT].entries) == {
        (DNS, 53, 17, "allow"), (GATEWAY_IP, 443, 6, "allow")}
    assert any(op for op in step.ops())
    gone = engine.apply(removed=[GATEWAY_IP])
    assert egress(gone.resolution.identities[CHECKOUT].entries) == {(DNS, 53, 17, "allow")}


def test_trace_to_a_learned_address_names_the_to_fqdns_rule() -> None:
    t = trace(IDENTITIES[CHECKOUT], IDENTITIES[GATEWAY_IP], 443, 6, [POLICY],
              from_identity=CHECKOUT, to_identity=GATEWAY_IP)
    assert t.allowed and t.egress.rules == (FQDN_REF,)
    denied = trace(IDENTITIES[CHECKOUT], IDENTITIES[OTHER_IP], 443, 6, [POLICY],
                   from_identity=CHECKOUT, to_identity=OTHER_IP)
    assert not denied.allowed and denied.egress.reason == "default-deny"
