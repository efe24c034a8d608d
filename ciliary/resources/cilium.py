"""``cilium.io/v2`` CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy.

Field names follow Cilium's ``pkg/policy/api`` (Rule, IngressRule, EgressRule, their Deny
variants, PortRule, PortProtocol, CIDRRule, FQDNSelector, Service, ICMPRule, L7Rules).

Invariants:
- Strict: unknown fields are errors; ``kafka`` L7 rules, ``fromGroups``/``toGroups`` and
  ``l7`` key/value rules are accepted as opaque data.
- A policy has ``spec`` and/or ``specs``; `CiliumNetworkPolicy.rules` is their
  concatenation (``spec`` first) and is never empty for a validated object.
- A rule selects its subjects with exactly one of ``endpointSelector`` / ``nodeSelector``
  (the latter only in the clusterwide kind); ``{}`` selects all.
- ``toPorts[].ports[].port`` is always a string after decoding: a number (``"0"`` means all
  ports) or a lower-cased IANA service name; YAML integers are normalised to strings.
  ``protocol`` defaults to ``ANY``; ``endPort`` 0 means "single port".
- Deny rules carry no L7 rules, no FQDNs and no authentication.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .meta import ObjectMeta, Strict
from .selector import LabelSelector

EndpointSelector = LabelSelector

L4Proto = Literal["TCP", "UDP", "SCTP", "ANY"]

ENTITIES: frozenset[str] = frozenset(
    {
        "all",
        "world",
        "world-ipv4",
        "world-ipv6",
        "cluster",
        "host",
        "init",
        "ingress",
        "unmanaged",
        "remote-node",
        "health",
        "none",
        "kube-apiserver",
    }
)


class CIDRRule(Strict, frozen=True):
    """Exactly one of ``cidr`` / ``cidrGroupRef`` / ``cidrGroupSelector``; ``except`` ⊂ cidr."""

    cidr: str = ""
    cidr_group_ref: str = ""
    cidr_group_selector: LabelSelector | None = None
    except_: list[str] = msgspec.field(default_factory=list, name="except")


class FQDNSelector(Strict, frozen=True):
    match_name: str = ""
    match_pattern: str = ""


PortRuleDNS = FQDNSelector


class K8sServiceNamespace(Strict, frozen=True):
    service_name: str = ""
    namespace: str = ""


class K8sServiceSelectorNamespace(Strict, frozen=True):
    selector: LabelSelector
    namespace: str = ""


class Service(Strict, frozen=True):
    """``toServices`` entry: a Service by name, or Services by label selector."""

    k8s_service: K8sServiceNamespace | None = None
    k8s_service_selector: K8sServiceSelectorNamespace | None = None


class ICMPField(Strict, frozen=True):
    type: int | str
    family: Literal["IPv4", "IPv6"] = "IPv4"


class ICMPRule(Strict, frozen=True):
    fields: list[ICMPField] = []


class PortProtocol(Strict, frozen=True):
    port: str
    end_port: int = 0
    protocol: L4Proto = "ANY"

    def is_named(self) -> bool:
        return not self.port.isdigit()


class Secret(Strict, frozen=True):
    name: str
    namespace: str = ""


class TLSContext(Strict, frozen=True):
    secret: Secret | None = None
    trusted_ca: str = msgspec.field(default="", name="trustedCA")
    certificate: str = ""
    private_key: str = ""


class EnvoyConfig(Strict, frozen=True):
    name: str
    kind: str = ""


class Listener(Strict, frozen=True):
    envoy_config: EnvoyConfig
    name: str
    priority: int = 0


class HeaderMatch(Strict, frozen=True):
    name: str
    value: str = ""
    mismatch: Literal["", "LOG", "ADD", "DELETE", "REPLACE"] = ""
    secret: Secret | None = None


class PortRuleHTTP(Strict, frozen=True):
    path: str = ""
    method: str = ""
    host: str = ""
    headers: list[str] = []
    header_matches: list[HeaderMatch] = []


class L7Rules(Strict, frozen=True):
    """At most one L7 protocol per port rule (validated)."""

    http: list[PortRuleHTTP] = []
    kafka: list[dict[str, Any]] = []
    dns: list[PortRuleDNS] = []
    l7proto: str = ""
    l7: list[dict[str, str]] = []

    def is_empty(self) -> bool:
        return not (self.http or self.kafka or self.dns or self.l7)


class PortRule(Strict, frozen=True):
    ports: list[PortProtocol] = []
    terminating_tls: TLSContext | None = msgspec.field(default=None, name="terminatingTLS")
    originating_tls: TLSContext | None = msgspec.field(default=None, name="originatingTLS")
    server_names: list[str] = []
    listener: Listener | None = None
    rules: L7Rules | None = None


class PortDenyRule(Strict, frozen=True):
    ports: list[PortProtocol] = []


class Authentication(Strict, frozen=True):
    mode: Literal["disabled", "required", "test-always-fail"]


class IngressRule(Strict, frozen=True):
    from_endpoints: list[EndpointSelector] = []
    from_requires: list[EndpointSelector] = []
    from_cidr: list[str] = msgspec.field(default_factory=list, name="fromCIDR")
    from_cidr_set: list[CIDRRule] = msgspec.field(default_factory=list, name="fromCIDRSet")
    from_entities: list[str] = []
    from_groups: list[dict[str, Any]] = []
    from_nodes: list[EndpointSelector] = []
    to_ports: list[PortRule] = []
    icmps: list[ICMPRule] = []
    authentication: Authentication | None = None


class IngressDenyRule(Strict, frozen=True):
    from_endpoints: list[EndpointSelector] = []
    from_requires: list[EndpointSelector] = []
    from_cidr: list[str] = msgspec.field(default_factory=list, name="fromCIDR")
    from_cidr_set: list[CIDRRule] = msgspec.field(default_factory=list, name="fromCIDRSet")
    from_entities: list[str] = []
    from_groups: list[dict[str, Any]] = []
    from_nodes: list[EndpointSelector] = []
    to_ports: list[PortDenyRule] = []
    icmps: list[ICMPRule] = []


class EgressRule(Strict, frozen=True):
    to_endpoints: list[EndpointSelector] = []
    to_requires: list[EndpointSelector] = []
    to_cidr: list[str] = msgspec.field(default_factory=list, name="toCIDR")
    to_cidr_set: list[CIDRRule] = msgspec.field(default_factory=list, name="toCIDRSet")
    to_entities: list[str] = []
    to_services: list[Service] = []
    to_groups: list[dict[str, Any]] = []
    to_nodes: list[EndpointSelector] = []
    to_fqdns: list[FQDNSelector] = msgspec.field(default_factory=list, name="toFQDNs")
    to_ports: list[PortRule] = []
    icmps: list[ICMPRule] = []
    authentication: Authentication | None = None


class EgressDenyRule(Strict, frozen=True):
    to_endpoints: list[EndpointSelector] = []
    to_requires: list[EndpointSelector] = []
    to_cidr: list[str] = msgspec.field(default_factory=list, name="toCIDR")
    to_cidr_set: list[CIDRRule] = msgspec.field(default_factory=list, name="toCIDRSet")
    to_entities: list[str] = []
    to_services: list[Service] = []
    to_groups: list[dict[str, Any]] = []
    to_nodes: list[EndpointSelector] = []
    to_ports: list[PortDenyRule] = []
    icmps: list[ICMPRule] = []


class DefaultDenyConfig(Strict, frozen=True):
    """Unset means: default-deny in a direction iff the rule has rules in that direction."""

    ingress: bool | None = None
    egress: bool | None = None


class RuleLabel(Strict, frozen=True):
    key: str
    value: str = ""
    source: str = ""


class Rule(Strict, frozen=True):
    endpoint_selector: EndpointSelector | None = None
    node_selector: EndpointSelector | None = None
    ingress: list[IngressRule] = []
    ingress_deny: list[IngressDenyRule] = []
    egress: list[EgressRule] = []
    egress_deny: list[EgressDenyRule] = []
    labels: list[RuleLabel] = []
    description: str = ""
    enable_default_deny: DefaultDenyConfig | None = None

    def default_deny(self) -> tuple[bool, bool]:
        """Effective ``(ingress, egress)`` default-deny, with Cilium's defaulting."""
        cfg = self.enable_default_deny or DefaultDenyConfig()
        ingress = cfg.ingress if cfg.ingress is not None else bool(self.ingress or self.ingress_deny)
        egress = cfg.egress if cfg.egress is not None else bool(self.egress or self.egress_deny)
        return ingress, egress


class CiliumNetworkPolicy(Strict, frozen=True, tag_field="kind", tag="CiliumNetworkPolicy"):
    api_version: str = "cilium.io/v2"
    metadata: ObjectMeta = ObjectMeta()
    spec: Rule | None = None
    specs: list[Rule] = []
    status: dict[str, Any] | None = None

    @property
    def rules(self) -> list[Rule]:
        return ([self.spec] if self.spec is not None else []) + list(self.specs)


class CiliumClusterwideNetworkPolicy(
    Strict, frozen=True, tag_field="kind", tag="CiliumClusterwideNetworkPolicy"
):
    api_version: str = "cilium.io/v2"
    metadata: ObjectMeta = ObjectMeta()
    spec: Rule | None = None
    specs: list[Rule] = []
    status: dict[str, Any] | None = None

    @property
    def rules(self) -> list[Rule]:
        return ([self.spec] if self.spec is not None else []) + list(self.specs)
