"""``networking.k8s.io/v1`` NetworkPolicy.

Invariants:
- Strict: unknown fields anywhere below the top level are errors.
- ``spec.podSelector`` is required; ``{}`` selects every pod in the namespace.
- A peer sets ``ipBlock`` alone, or ``podSelector`` and/or ``namespaceSelector``
  (validated). An absent selector in a peer is ``None`` and means "not constrained by this
  selector", which differs from ``{}`` only when both are absent.
- An empty ``from``/``to`` list allows all peers; an empty ``ports`` list allows all ports.
- Port ``protocol`` defaults to ``TCP``; ``endPort`` only with a numeric ``port``.
- ``policyTypes`` unset means ``[Ingress]`` plus ``Egress`` when egress rules exist
  (`NetworkPolicySpec.effective_policy_types`).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .meta import ObjectMeta, Strict
from .selector import LabelSelector

PolicyType = Literal["Ingress", "Egress"]


class IPBlock(Strict, frozen=True):
    cidr: str
    except_: list[str] = msgspec.field(default_factory=list, name="except")


class NetworkPolicyPeer(Strict, frozen=True):
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


class NetworkPolicyPort(Strict, frozen=True):
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    port: int | str | None = None
    end_port: int | None = None


class NetworkPolicyIngressRule(Strict, frozen=True):
    from_: list[NetworkPolicyPeer] = msgspec.field(default_factory=list, name="from")
    ports: list[NetworkPolicyPort] = []


class NetworkPolicyEgressRule(Strict, frozen=True):
    to: list[NetworkPolicyPeer] = []
    ports: list[NetworkPolicyPort] = []


class NetworkPolicySpec(Strict, frozen=True):
    pod_selector: LabelSelector
    policy_types: list[PolicyType] = []
    ingress: list[NetworkPolicyIngressRule] = []
    egress: list[NetworkPolicyEgressRule] = []

    def effective_policy_types(self) -> list[PolicyType]:
        if self.policy_types:
            return list(self.policy_types)
        return ["Ingress", "Egress"] if self.egress else ["Ingress"]


class NetworkPolicy(Strict, frozen=True, tag_field="kind", tag="NetworkPolicy"):
    spec: NetworkPolicySpec
    api_version: str = "networking.k8s.io/v1"
    metadata: ObjectMeta = ObjectMeta()
    status: dict[str, Any] | None = None
