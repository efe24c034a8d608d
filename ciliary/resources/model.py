"""The typed Kubernetes/Cilium resource subset, in one import.

Invariants:
- Every top-level kind is a frozen ``msgspec.Struct`` tagged by ``kind``; ``KubeObject`` is
  the union of them, so ``msgspec.convert(raw, KubeObject)`` dispatches on ``kind``.
- The structs live in small per-group modules (`pod`, `core`, `service`, `discovery`,
  `networking`, `cilium`); this module only re-exports them.
"""

from __future__ import annotations

from . import cilium
from .cilium import (
    ENTITIES,
    CIDRRule,
    CiliumClusterwideNetworkPolicy,
    CiliumNetworkPolicy,
    DefaultDenyConfig,
    EgressDenyRule,
    EgressRule,
    EndpointSelector,
    FQDNSelector,
    ICMPField,
    ICMPRule,
    IngressDenyRule,
    IngressRule,
    K8sServiceNamespace,
    K8sServiceSelectorNamespace,
    L7Rules,
    PortDenyRule,
    PortProtocol,
    PortRule,
    PortRuleDNS,
    PortRuleHTTP,
    Rule,
)
from .core import Namespace, Node, NodeAddress, NodeSpec, NodeStatus
from .discovery import (
    SERVICE_NAME_LABEL,
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    ObjectReference,
)
from .meta import ObjectMeta
from .networking import (
    IPBlock,
    NetworkPolicy,
    NetworkPolicyEgressRule,
    NetworkPolicyIngressRule,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    NetworkPolicySpec,
)
from .pod import (
    Container,
    ContainerPort,
    EnvVar,
    ExecAction,
    HTTPGetAction,
    Pod,
    PodCondition,
    PodIP,
    PodSpec,
    PodStatus,
    Probe,
    TCPSocketAction,
)
from .selector import LabelSelector, LabelSelectorRequirement
from .service import (
    NODE_PORT_RANGE,
    LoadBalancerIngress,
    Service,
    ServicePort,
    ServiceSpec,
    ServiceStatus,
    SessionAffinityConfig,
)

# Cilium's ``toServices`` entry, under a name that does not clash with the v1 Service.
CiliumService = cilium.Service

KubeObject = (
    Namespace
    | Node
    | Pod
    | Service
    | EndpointSlice
    | NetworkPolicy
    | CiliumNetworkPolicy
    | CiliumClusterwideNetworkPolicy
)

__all__ = [
    "ENTITIES",
    "NODE_PORT_RANGE",
    "SERVICE_NAME_LABEL",
    "CIDRRule",
    "CiliumClusterwideNetworkPolicy",
    "CiliumNetworkPolicy",
    "CiliumService",
    "Container",
    "ContainerPort",
    "DefaultDenyConfig",
    "EgressDenyRule",
    "EgressRule",
    "Endpoint",
    "EndpointConditions",
    "EndpointPort",
    "EndpointSelector",
    "EndpointSlice",
    "EnvVar",
    "ExecAction",
    "HTTPGetAction",
    "FQDNSelector",
    "ICMPField",
    "ICMPRule",
    "IPBlock",
    "IngressDenyRule",
    "IngressRule",
    "K8sServiceNamespace",
    "K8sServiceSelectorNamespace",
    "KubeObject",
    "L7Rules",
    "LabelSelector",
    "LabelSelectorRequirement",
    "LoadBalancerIngress",
    "Namespace",
    "NetworkPolicy",
    "NetworkPolicyEgressRule",
    "NetworkPolicyIngressRule",
    "NetworkPolicyPeer",
    "NetworkPolicyPort",
    "NetworkPolicySpec",
    "Node",
    "NodeAddress",
    "NodeSpec",
    "NodeStatus",
    "ObjectMeta",
    "ObjectReference",
    "Pod",
    "PodCondition",
    "PodIP",
    "PodSpec",
    "PodStatus",
    "PortDenyRule",
    "PortProtocol",
    "PortRule",
    "PortRuleDNS",
    "PortRuleHTTP",
    "Probe",
    "Rule",
    "Service",
    "ServicePort",
    "ServiceSpec",
    "ServiceStatus",
    "SessionAffinityConfig",
    "TCPSocketAction",
]
