"""Policies (CNP, CCNP, NetworkPolicy) normalised into one rule model.

Invariants:
- Translation follows Cilium's parser (``pkg/k8s/apis/cilium.io/utils`` and
  ``pkg/k8s/network_policy.go``):
  * selector keys without a source are ``any:`` in Cilium policies, ``k8s:`` in
    NetworkPolicy;
  * a CNP's ``endpointSelector`` is always restricted to the policy namespace (a different
    namespace named by the user is replaced, with a warning);
  * a CNP peer selector (``fromEndpoints``/``toEndpoints``) gets
    ``k8s:io.kubernetes.pod.namespace=<ns>`` unless it names that key, selects on namespace
    labels (``io.cilium.k8s.namespace.labels.*``) or on a ``reserved:`` label; a CCNP peer
    selector gets ``k8s:io.kubernetes.pod.namespace Exists`` under the same conditions
    (so ``{}`` means "every pod", not "everything"), except when the subject selects
    ``reserved:init``;
  * peer selectors (both kinds and NetworkPolicy peers) that do not name
    ``io.cilium.k8s.policy.cluster`` and are not ``reserved:`` selectors get
    ``k8s:io.cilium.k8s.policy.cluster=<local cluster>`` (Cilium ≥ 1.19
    ``policy-default-local-cluster``); ``local_cluster_only=False`` restores the old
    all-clusters behaviour;
  * NetworkPolicy: podSelector peers are restricted to the policy namespace,
    namespaceSelector keys become ``io.cilium.k8s.namespace.labels.<key>`` (``{}`` = every
    namespace), both together are ANDed, ``ipBlock`` is a CIDR set with ``except`` that
    also selects the pods whose addresses lie inside it (``ipblock_selector``: Kubernetes'
    meaning, which the upstream e2e suite tests; Cilium's own CIDR rules keep ``cidr``), an
    empty ``from``/``to`` is the wildcard, a port without ``port`` is all ports of its
    protocol, and a direction is default-deny exactly when it is in the effective
    ``policyTypes``.
- Ports: ``protocol: ANY`` with a port is TCP, UDP and SCTP (three specs); ``port: 0``
  is every port (with ANY: every protocol too, ICMP included); ``endPort`` makes a range;
  a name stays a name until resolution; ``icmps`` give proto ICMP/ICMPv6 with the type as
  port (Cilium's encoding).
- A section whose L3 clauses are all absent but which has ports/ICMP applies to every peer
  (``wildcard_peers``). A section with neither selects nothing but still counts for
  default-deny. A section with only unsupported L3 clauses (toServices, toGroups,
  fromNodes/toNodes, cidrGroupRef) is never widened to all peers.
- ``toFQDNs`` entries are peers selecting the label ``fqdn:<name or pattern>`` that the
  identity service gives the CIDR identities of DNS-learned addresses (``fqdn_selector``);
  until a selected pod resolves a matching name they select nothing. DNS L7 rules
  (``toPorts[].rules.dns``) stay unenforced (no DNS proxy) and are reported.
- ``fromRequires``/``toRequires`` (deprecated) are ANDed into the same rule's
  ``fromEndpoints``/``toEndpoints`` selectors, as current Cilium does; they are not L3
  clauses of their own.
- Everything accepted but not enforced is reported as a warning on the policy, never
  dropped silently.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ciliary.resources import model as m

from .entities import entity_selectors, reserved
from .selectors import (
    ALL,
    LABEL_CLUSTER,
    LABEL_NAMESPACE,
    LABEL_NAMESPACE_LABELS,
    Requirement,
    Selector,
    cidr_selector,
    fqdn_selector,
    from_label_selector,
    ipblock_selector,
)

Direction = Literal["ingress", "egress"]
DIRECTIONS: tuple[Direction, Direction] = ("ingress", "egress")

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTOCOLS = {"ANY": PROTO_ANY, "TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP,
             "ICMP": PROTO_ICMP, "ICMPV6": PROTO_ICMPV6}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}

ICMP_TYPE_NUMBERS: dict[str, dict[str, int]] = {
    "IPv4": {"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8,
             "EchoRequest": 8, "RouterAdvertisement": 9, "RouterSelection": 10,
             "TimeExceeded": 11, "ParameterProblem": 12, "Timestamp": 13,
             "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
             "ExtendedEchoReply": 43},
    "IPv6": {"DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3,
             "ParameterProblem": 4, "EchoRequest": 128, "EchoReply": 129,
             "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
             "MulticastListenerDone": 132, "RouterSolicitation": 133,
             "RouterAdvertisement": 134, "NeighborSolicitation": 135,
             "NeighborAdvertisement": 136, "RedirectMessage": 137, "RouterRenumbering": 138,
             "ICMPNodeInformationQuery": 139, "ICMPNodeInformationResponse": 140,
             "InverseNeighborDiscoverySolicitation": 141,
             "InverseNeighborDiscoveryAdvertisement": 142,
             "HomeAgentAddressDiscoveryRequest": 144, "HomeAgentAddressDiscoveryReply": 145,
             "MobilePrefixSolicitation": 146, "MobilePrefixAdvertisement": 147,
             "DuplicateAddressRequestCodeSuffix": 157,
             "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
             "ExtendedEchoReply": 161},
}

KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
KIND_NP = "NetworkPolicy"
POLICY_KINDS = (KIND_CNP, KIND_CCNP, KIND_NP)

_NS_K8S = f"k8s:{LABEL_NAMESPACE}"
_NS_ANY = f"any:{LABEL_NAMESPACE}"


@dataclass(frozen=True, order=True)
class PolicyKey:
    kind: str
    namespace: str  # "" for the clusterwide kind
    name: str

    def __post_init__(self) -> None:  # keys are looked up in every pass: hash once
        object.__setattr__(self, "_hash", hash((self.kind, self.namespace, self.name)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind}/{self.name}")


@dataclass(frozen=True, order=True)
class RuleRef:
    """Which rule produced an entry: policy, spec index, section and index in it."""

    kind: str
    namespace: str
    name: str
    spec: int
    section: str  # ingress | ingressDeny | egress | egressDeny | <direction>-default-allow
    index: int

    @property
    def policy(self) -> PolicyKey:
        return PolicyKey(self.kind, self.namespace, self.name)

    def __str__(self) -> str:
        if not self.kind:
            return self.section
        return f"{self.policy} spec[{self.spec}].{self.section}[{self.index}]"


@functools.lru_cache(maxsize=1 << 16)
def rule_id(ref: RuleRef) -> int:
    """The u32 the datapath echoes in flow events for `ref` (``rule_ref``): a stable hash
    of the rule's text, never 0 (0 is "no rule": the default allow-all entry). Records in
    bucket ``policy`` carry the id → rule table, so a collision is visible, not silent.
    Memoised: a record names the same few refs many times."""
    if not ref.kind:
        return 0
    digest = hashlib.sha256(str(ref).encode()).digest()
    return int.from_bytes(digest[:4], "big") or 1


@functools.lru_cache(maxsize=1 << 16)
def rule_text(ref: RuleRef) -> str:
    """``str(ref)``, memoised."""
    return str(ref)


LOCALHOST_REF = RuleRef("", "", "", 0, "allow-localhost", 0)


def default_allow_ref(direction: str) -> RuleRef:
    """Ref of the allow-all entry of a direction that has rules but no default deny."""
    return RuleRef("", "", "", 0, f"{direction}-default-allow", 0)


@dataclass(frozen=True, order=True)
class PortSpec:
    """One L4 match; ``name`` set means a named port (``port`` then unused)."""

    port: int = 0
    end_port: int = 0
    proto: int = PROTO_ANY
    name: str = ""


L4_ANY = (PROTO_TCP, PROTO_UDP, PROTO_SCTP)


def numeric_ports(port: int, end_port: int, proto: int) -> list[PortSpec]:
    """Cilium's ``ANY`` is TCP, UDP and SCTP; only "every port" keeps proto 0 (the
    datapath looks up a wildcard protocol only together with a wildcard port)."""
    if proto == PROTO_ANY and port != 0:
        return [PortSpec(port, end_port, p) for p in L4_ANY]
    return [PortSpec(port, end_port, proto)]


@dataclass(frozen=True)
class Section:
    ref: RuleRef
    direction: Direction
    deny: bool
    peers: tuple[Selector, ...]
    wildcard_peers: bool
    ports: tuple[PortSpec, ...]  # empty: every port and protocol (L3 only)


@dataclass(frozen=True)
class NormRule:
    policy: PolicyKey
    spec: int
    subject: Selector
    node_subject: bool  # nodeSelector: selects only the host identity
    default_deny: tuple[bool, bool]  # (ingress, egress)
    has_sections: tuple[bool, bool]
    sections: tuple[Section, ...]


@dataclass
class NormPolicy:
    key: PolicyKey
    generation: int = 0
    rules: list[NormRule] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


# ---------------------------------------------------------------- entry point


def normalize(obj: Any, cluster_name: str = "default", local_cluster_only: bool = True
              ) -> NormPolicy:
    """One typed policy object (or a raw manifest dict) as a `NormPolicy`."""
    peer_cluster = cluster_name if local_cluster_only else ""
    if isinstance(obj, dict):
        return _from_manifest(obj, cluster_name, local_cluster_only)
    if isinstance(obj, m.NetworkPolicy):
        return _network_policy(obj, peer_cluster)
    if isinstance(obj, m.CiliumNetworkPolicy | m.CiliumClusterwideNetworkPolicy):
        return _cilium_policy(obj, cluster_name, peer_cluster)
    raise TypeError(f"not a policy: {type(obj).__name__}")


def _cluster_filter(sel: Selector, peer_cluster: str) -> Selector:
    """Cilium's ``addClusterFilterByDefault``."""
    if not peer_cluster or sel.has_key(f"k8s:{LABEL_CLUSTER}") or sel.has_key(
        f"any:{LABEL_CLUSTER}"
    ):
        return sel
    return sel.with_requirement(Requirement("k8s", LABEL_CLUSTER, "In", (peer_cluster,)))


def _from_manifest(manifest: dict[str, Any], cluster_name: str, local_cluster_only: bool
                   ) -> NormPolicy:
    from ciliary.resources import ManifestError, decode

    kind = str(manifest.get("kind", ""))
    meta = manifest.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    namespace = "" if kind == KIND_CCNP else str(meta.get("namespace") or "default")
    key = PolicyKey(kind, namespace, str(meta.get("name", "")))
    if kind not in POLICY_KINDS:
        return NormPolicy(key, error=f"not a policy kind: {kind!r}")
    try:
        obj = decode(kind, manifest)
    except ManifestError as err:
        return NormPolicy(key, error=f"invalid policy: {err}")
    return normalize(obj, cluster_name, local_cluster_only)


def _key(obj: Any, kind: str) -> PolicyKey:
    namespace = "" if kind == KIND_CCNP else (obj.metadata.namespace or "default")
    return PolicyKey(kind, namespace, obj.metadata.name)


# ---------------------------------------------------------------- Cilium policies


def _cilium_policy(obj: Any, cluster_name: str, peer_cluster: str) -> NormPolicy:
    kind = KIND_CCNP if isinstance(obj, m.CiliumClusterwideNetworkPolicy) else KIND_CNP
    key = _key(obj, kind)
    pol = NormPolicy(key, generation=obj.metadata.generation)
    for spec_index, rule in enumerate(obj.rules):
        try:
            pol.rules.append(_cilium_rule(pol, spec_index, rule, cluster_name, peer_cluster))
        except ValueError as err:
            pol.error = f"spec[{spec_index}]: {err}"
            pol.rules.clear()
            return pol
    return pol


def _subject(pol: NormPolicy, rule: m.Rule) -> tuple[Selector, bool]:
    namespace = pol.key.namespace
    if rule.endpoint_selector is None:
        if rule.node_selector is None:  # validation refuses it; a stored record may hold it
            raise ValueError("needs endpointSelector or nodeSelector")
        sel = from_label_selector(rule.node_selector, "any")
        return sel.with_requirement(reserved("host").requirements[0]), True
    sel = from_label_selector(rule.endpoint_selector, "any")
    if pol.key.kind == KIND_CNP:
        for req in sel.requirements:
            if (req.source, req.key) == ("k8s", LABEL_NAMESPACE) and req.op == "In" and (
                req.values != (namespace,)
            ):
                pol.warn(
                    "endpointSelector names namespace "
                    f"{','.join(req.values)!r}; a CiliumNetworkPolicy always applies in its "
                    f"own namespace {namespace!r}"
                )
        sel = sel.without_key("k8s", LABEL_NAMESPACE).with_requirement(
            Requirement("k8s", LABEL_NAMESPACE, "In", (namespace,))
        )
    return sel, False


def peer_selector(namespace: str, label_selector: Any, matches_init: bool,
                  peer_cluster: str = "", keep_reserved: bool = True) -> Selector:
    """Cilium's ``getEndpointSelector`` for fromEndpoints/toEndpoints (and, with
    ``keep_reserved=False``, for fromRequires/toRequires)."""
    sel = from_label_selector(label_selector, "any")
    if keep_reserved and sel.has_source("reserved"):
        return sel
    if sel.has_key(_NS_K8S) or sel.has_key(_NS_ANY):
        pass
    elif not namespace:
        if not matches_init:
            sel = sel.with_requirement(Requirement("k8s", LABEL_NAMESPACE, "Exists"))
    elif not (sel.has_key_prefix(f"k8s:{LABEL_NAMESPACE_LABELS}") or sel.has_key_prefix(
        f"any:{LABEL_NAMESPACE_LABELS}"
    )):
        sel = sel.with_requirement(Requirement("k8s", LABEL_NAMESPACE, "In", (namespace,)))
    return _cluster_filter(sel, peer_cluster)


def _cilium_rule(pol: NormPolicy, spec_index: int, rule: m.Rule, cluster_name: str,
                 peer_cluster: str) -> NormRule:
    subject, node_subject = _subject(pol, rule)
    matches_init = subject.has_key("reserved:init")
    key = pol.key
    sections: list[Section] = []
    groups: list[tuple[str, Direction, bool, list[Any]]] = [
        ("ingress", "ingress", False, rule.ingress),
        ("ingressDeny", "ingress", True, rule.ingress_deny),
        ("egress", "egress", False, rule.egress),
        ("egressDeny", "egress", True, rule.egress_deny),
    ]
    for section_name, direction, deny, items in groups:
        for index, item in enumerate(items):
            ref = RuleRef(key.kind, key.namespace, key.name, spec_index, section_name, index)
            where = f"spec[{spec_index}].{section_name}[{index}]"
            peers, l3_clauses = _cilium_peers(pol, item, direction, where, cluster_name,
                                              matches_init, peer_cluster)
            ports = _cilium_ports(pol, item, where, deny)
            sections.append(
                Section(ref, direction, deny, tuple(peers),
                        wildcard_peers=not l3_clauses and bool(ports), ports=tuple(ports))
            )
    dd_in, dd_eg = rule.default_deny()
    has = (bool(rule.ingress or rule.ingress_deny), bool(rule.egress or rule.egress_deny))
    return NormRule(key, spec_index, subject, node_subject, (dd_in, dd_eg), has, tuple(sections))


def _cilium_peers(
    pol: NormPolicy, item: Any, direction: Direction, where: str, cluster_name: str,
    matches_init: bool, peer_cluster: str,
) -> tuple[list[Selector], int]:
    """Supported peer selectors and the number of L3 clauses present (incl. unsupported)."""
    ns = pol.key.namespace
    pfx = "from" if direction == "ingress" else "to"
    peers: list[Selector] = []
    clauses = 0
    endpoints = item.from_endpoints if direction == "ingress" else item.to_endpoints
    requires = item.from_requires if direction == "ingress" else item.to_requires
    required: set[Requirement] = set()
    for sel in requires:
        required |= set(peer_selector(ns, sel, matches_init, peer_cluster,
                                      keep_reserved=False).requirements)
    if requires:
        pol.warn(f"{where}.{pfx}Requires: deprecated in Cilium; ANDed into this rule's "
                 f"{pfx}Endpoints only" + ("" if endpoints else ", which it has none of, so it "
                                               "constrains nothing"))
    if endpoints:
        clauses += 1
        for sel in endpoints:
            peer = peer_selector(ns, sel, matches_init, peer_cluster)
            if required:
                peer = Selector("labels", tuple(sorted(set(peer.requirements) | required)))
            peers.append(peer)
    cidrs = item.from_cidr if direction == "ingress" else item.to_cidr
    if cidrs:
        clauses += 1
        peers += [cidr_selector(c) for c in cidrs]
    cidr_set = item.from_cidr_set if direction == "ingress" else item.to_cidr_set
    if cidr_set:
        clauses += 1
        for j, c in enumerate(cidr_set):
            if c.cidr:
                peers.append(cidr_selector(c.cidr, c.except_))
            else:
                pol.warn(f"{where}.{pfx}CIDRSet[{j}]: cidrGroupRef/cidrGroupSelector not "
                         "enforced (CiliumCIDRGroup is not supported)")
    entities = item.from_entities if direction == "ingress" else item.to_entities
    if entities:
        clauses += 1
        for entity in entities:
            peers += entity_selectors(entity, cluster_name)
    unsupported: list[tuple[str, Any]] = [
        (f"{pfx}Groups", item.from_groups if direction == "ingress" else item.to_groups),
        (f"{pfx}Nodes", item.from_nodes if direction == "ingress" else item.to_nodes),
    ]
    fqdns = getattr(item, "to_fqdns", []) if direction == "egress" else []
    if fqdns:
        clauses += 1
        peers += [fqdn_selector(f.match_name, f.match_pattern) for f in fqdns]
    if direction == "egress":
        unsupported.append(("toServices", item.to_services))
    for name, value in unsupported:
        if value:
            clauses += 1
            pol.warn(f"{where}.{name}: not enforced (peers it names are not allowed or denied)")
    if getattr(item, "authentication", None) is not None:
        pol.warn(f"{where}.authentication: not enforced")
    return peers, clauses


def _cilium_ports(pol: NormPolicy, item: Any, where: str, deny: bool) -> list[PortSpec]:
    specs: list[PortSpec] = []
    for i, port_rule in enumerate(item.to_ports):
        if not deny:
            l7 = port_rule.rules
            if l7 is not None and (not l7.is_empty() or l7.l7proto):
                pol.warn(f"{where}.toPorts[{i}].rules: L7 rules not enforced "
                         "(the L4 part is enforced)")
            for opt in ("terminating_tls", "originating_tls", "listener"):
                if getattr(port_rule, opt) is not None:
                    pol.warn(f"{where}.toPorts[{i}]: {opt} not enforced")
            if port_rule.server_names:
                pol.warn(f"{where}.toPorts[{i}].serverNames: not enforced")
        if not port_rule.ports:
            specs.append(PortSpec())
        for pp in port_rule.ports:
            proto = PROTOCOLS[pp.protocol]
            if pp.is_named():
                specs.append(PortSpec(proto=proto, name=pp.port))
            else:
                port = int(pp.port or 0)
                end = pp.end_port if pp.end_port > port else 0
                specs += numeric_ports(port, end if port else 0, proto)
    for icmp in item.icmps:
        for f in icmp.fields:
            proto = PROTO_ICMP if f.family == "IPv4" else PROTO_ICMPV6
            if isinstance(f.type, int) or str(f.type).isdigit():
                specs.append(PortSpec(int(f.type), 0, proto))
            else:
                number = ICMP_TYPE_NUMBERS[f.family].get(str(f.type))
                if number is None:
                    raise ValueError(f"{where}: unknown ICMP type {f.type!r}")
                specs.append(PortSpec(number, 0, proto))
    return specs


# ---------------------------------------------------------------- NetworkPolicy


def _network_policy(obj: m.NetworkPolicy, peer_cluster: str) -> NormPolicy:
    key = _key(obj, KIND_NP)
    ns = key.namespace
    pol = NormPolicy(key, generation=obj.metadata.generation)
    spec = obj.spec
    types = spec.effective_policy_types()
    subject = from_label_selector(spec.pod_selector, "k8s").with_requirement(
        Requirement("k8s", LABEL_NAMESPACE, "In", (ns,))
    )
    sections: list[Section] = []
    if "Ingress" in types:
        for i, irule in enumerate(spec.ingress):
            ref = RuleRef(KIND_NP, ns, key.name, 0, "ingress", i)
            sections.append(_np_section(ns, ref, "ingress", irule.from_, irule.ports, peer_cluster))
    elif spec.ingress:
        pol.warn("spec.ingress: ignored because policyTypes does not include Ingress")
    if "Egress" in types:
        for i, erule in enumerate(spec.egress):
            ref = RuleRef(KIND_NP, ns, key.name, 0, "egress", i)
            sections.append(_np_section(ns, ref, "egress", erule.to, erule.ports, peer_cluster))
    elif spec.egress:
        pol.warn("spec.egress: ignored because policyTypes does not include Egress")
    dd = ("Ingress" in types, "Egress" in types)
    pol.rules.append(NormRule(key, 0, subject, False, dd, dd, tuple(sections)))
    return pol


def np_peer_selector(namespace: str, peer: m.NetworkPolicyPeer, peer_cluster: str = ""
                     ) -> Selector | None:
    """Cilium's ``parseNetworkPolicyPeer`` (label part; ``None`` for ipBlock-only peers)."""
    sel = _np_peer_labels(namespace, peer)
    return None if sel is None else _cluster_filter(sel, peer_cluster)


def _np_peer_labels(namespace: str, peer: m.NetworkPolicyPeer) -> Selector | None:
    if peer.namespace_selector is not None:
        ns_sel = from_label_selector(peer.namespace_selector, "k8s",
                                     key_prefix=LABEL_NAMESPACE_LABELS)
        reqs = set(ns_sel.requirements) or {Requirement("k8s", LABEL_NAMESPACE, "Exists")}
        if peer.pod_selector is not None:
            reqs |= set(from_label_selector(peer.pod_selector, "k8s").requirements)
        return Selector("labels", tuple(sorted(reqs)))
    if peer.pod_selector is not None:
        return from_label_selector(peer.pod_selector, "k8s").with_requirement(
            Requirement("k8s", LABEL_NAMESPACE, "In", (namespace,))
        )
    return None


def _np_section(
    ns: str, ref: RuleRef, direction: Direction, peers_in: Iterable[m.NetworkPolicyPeer],
    ports_in: Iterable[m.NetworkPolicyPort], peer_cluster: str,
) -> Section:
    peers: list[Selector] = []
    peer_list = list(peers_in)
    for peer in peer_list:
        sel = np_peer_selector(ns, peer, peer_cluster)
        if sel is not None:
            peers.append(sel)
        if peer.ip_block is not None:
            peers.append(ipblock_selector(peer.ip_block.cidr, peer.ip_block.except_))
    if not peer_list:
        peers = [ALL]
    ports: list[PortSpec] = []
    for p in ports_in:
        proto = PROTOCOLS[p.protocol]
        if p.port is None:
            ports.append(PortSpec(0, 0, proto))
        elif isinstance(p.port, str) and not p.port.isdigit():
            ports.append(PortSpec(proto=proto, name=p.port.lower()))
        else:
            port = int(p.port)
            end = p.end_port if p.end_port and p.end_port > port else 0
            ports += numeric_ports(port, end, proto)
    return Section(ref, direction, False, tuple(peers), wildcard_peers=False, ports=tuple(ports))
