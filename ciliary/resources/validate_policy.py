"""Semantic validation of NetworkPolicy, CiliumNetworkPolicy and
CiliumClusterwideNetworkPolicy.

Invariants:
- NetworkPolicy rules mirror Kubernetes validation (peer shape, ports, ``endPort``, strict
  ``ipBlock.except`` subsets).
- Cilium rules mirror Cilium's ``Rule.Sanitize`` and CRD schema: exactly one subject
  selector (``nodeSelector`` only clusterwide), known entities, ports 0-65535 (0 = all
  ports, not with L7 rules) or IANA names, ``endPort`` ≥ ``port`` and only with numeric ports,
  L7 only over TCP (DNS excepted, and egress-only), at most one L7 protocol per port rule,
  ``icmps`` not combined with ``toPorts``, ``except`` inside ``cidr``.
"""

from __future__ import annotations

import re

from . import cilium as c
from . import names
from .checks import Errors, at, check_cidr_with_except, check_metadata, check_port_or_name
from .checks import check_selector as _check_selector
from .networking import NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort
from .selector import LabelSelector

MAX_PORTS = 40
MAX_ICMP_FIELDS = 40
_FQDN_NAME = re.compile(r"^[-a-zA-Z0-9_]+(\.[-a-zA-Z0-9_]+)*\.?$")
_FQDN_PATTERN = re.compile(r"^[-a-zA-Z0-9_*]+(\.[-a-zA-Z0-9_*]+)*\.?$")
_FQDN_MAX = 255
_NUMBER = re.compile(r"^-?[0-9]+$")

ICMP_TYPES = {
    "IPv4": frozenset(
        "EchoReply DestinationUnreachable Redirect Echo EchoRequest RouterAdvertisement "
        "RouterSelection TimeExceeded ParameterProblem Timestamp TimestampReply Photuris "
        "ExtendedEchoRequest ExtendedEchoReply".split()
    ),
    "IPv6": frozenset(
        "DestinationUnreachable PacketTooBig TimeExceeded ParameterProblem EchoRequest "
        "EchoReply MulticastListenerQuery MulticastListenerReport MulticastListenerDone "
        "RouterSolicitation RouterAdvertisement NeighborSolicitation NeighborAdvertisement "
        "RedirectMessage RouterRenumbering ICMPNodeInformationQuery ICMPNodeInformationResponse "
        "InverseNeighborDiscoverySolicitation InverseNeighborDiscoveryAdvertisement "
        "HomeAgentAddressDiscoveryRequest HomeAgentAddressDiscoveryReply "
        "MobilePrefixSolicitation MobilePrefixAdvertisement DuplicateAddressRequestCodeSuffix "
        "DuplicateAddressConfirmationCodeSuffix ExtendedEchoRequest ExtendedEchoReply".split()
    ),
}


# --- Kubernetes NetworkPolicy ---------------------------------------------------------


def validate_network_policy(obj: NetworkPolicy, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1123_subdomain)
    spec = obj.spec
    _check_selector(spec.pod_selector, "spec.podSelector", errs)
    if len(set(spec.policy_types)) != len(spec.policy_types):
        errs.add("spec.policyTypes", "duplicate policy type")
    for i, rule in enumerate(spec.ingress):
        _np_rule(rule.from_, rule.ports, f"spec.ingress[{i}]", "from", errs)
    for i, rule in enumerate(spec.egress):
        _np_rule(rule.to, rule.ports, f"spec.egress[{i}]", "to", errs)


def _np_rule(
    peers: list[NetworkPolicyPeer], ports: list[NetworkPolicyPort], path: str, peer_field: str,
    errs: Errors,
) -> None:
    for j, peer in enumerate(peers):
        ppath = f"{path}.{peer_field}[{j}]"
        selectors = [s for s in (peer.pod_selector, peer.namespace_selector) if s is not None]
        if peer.ip_block is None and not selectors:
            errs.add(ppath, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
        if peer.ip_block is not None and selectors:
            errs.add(ppath, "may not combine ipBlock with podSelector or namespaceSelector")
        if peer.pod_selector is not None:
            _check_selector(peer.pod_selector, at(ppath, "podSelector"), errs)
        if peer.namespace_selector is not None:
            _check_selector(peer.namespace_selector, at(ppath, "namespaceSelector"), errs)
        if peer.ip_block is not None:
            block = peer.ip_block
            check_cidr_with_except(
                block.cidr, block.except_, at(ppath, "ipBlock"), errs, cidr_field="cidr",
                strict=True,
            )
    for k, port in enumerate(ports):
        _np_port(port, f"{path}.ports[{k}]", errs)


def _np_port(port: NetworkPolicyPort, path: str, errs: Errors) -> None:
    if port.port is not None:
        check_port_or_name(port.port, at(path, "port"), errs)
    if port.end_port is None:
        return
    epath = at(path, "endPort")
    if port.port is None:
        errs.add(epath, "may not be specified without port")
    elif isinstance(port.port, str):
        errs.add(epath, "may not be specified when port is a named port")
    elif port.end_port < port.port:
        errs.add(epath, f"must be greater than or equal to port {port.port}, got {port.end_port}")
    else:
        errs.check(epath, names.check_port_number(port.end_port))


# --- Cilium ---------------------------------------------------------------------------


def validate_cilium_policy(
    obj: c.CiliumNetworkPolicy | c.CiliumClusterwideNetworkPolicy, errs: Errors
) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1123_subdomain)
    clusterwide = isinstance(obj, c.CiliumClusterwideNetworkPolicy)
    if obj.spec is None and not obj.specs:
        errs.add("spec", "a policy needs spec or specs (at least one rule)")
    if obj.spec is not None:
        _rule(obj.spec, "spec", clusterwide, errs)
    for i, rule in enumerate(obj.specs):
        _rule(rule, f"specs[{i}]", clusterwide, errs)


def _sel(sel: LabelSelector, path: str, errs: Errors) -> None:
    _check_selector(sel, path, errs, allow_source=True)


def _rule(rule: c.Rule, path: str, clusterwide: bool, errs: Errors) -> None:
    if rule.endpoint_selector is None and rule.node_selector is None:
        errs.add(path, "rule must have one of endpointSelector or nodeSelector")
    elif rule.endpoint_selector is not None and rule.node_selector is not None:
        errs.add(at(path, "nodeSelector"), "may not be combined with endpointSelector")
    elif rule.node_selector is not None and not clusterwide:
        errs.add(at(path, "nodeSelector"), "only allowed in CiliumClusterwideNetworkPolicy")
    if rule.endpoint_selector is not None:
        _sel(rule.endpoint_selector, at(path, "endpointSelector"), errs)
    if rule.node_selector is not None:
        _sel(rule.node_selector, at(path, "nodeSelector"), errs)
    host = rule.node_selector is not None and rule.endpoint_selector is None
    for i, ing in enumerate(rule.ingress):
        _ingress(ing, f"{path}.ingress[{i}]", host, errs)
    for i, ing in enumerate(rule.ingress_deny):
        _ingress(ing, f"{path}.ingressDeny[{i}]", host, errs)
    for i, eg in enumerate(rule.egress):
        _egress(eg, f"{path}.egress[{i}]", host, errs)
    for i, eg in enumerate(rule.egress_deny):
        _egress(eg, f"{path}.egressDeny[{i}]", host, errs)
    for i, label in enumerate(rule.labels):
        if not label.key:
            errs.add(f"{path}.labels[{i}].key", "key is required")


def _ingress(r: c.IngressRule | c.IngressDenyRule, path: str, host: bool, errs: Errors) -> None:
    for field, sels in (
        ("fromEndpoints", r.from_endpoints),
        ("fromRequires", r.from_requires),
        ("fromNodes", r.from_nodes),
    ):
        for i, sel in enumerate(sels):
            _sel(sel, f"{path}.{field}[{i}]", errs)
    _cidrs(r.from_cidr, at(path, "fromCIDR"), errs)
    _cidr_set(r.from_cidr_set, at(path, "fromCIDRSet"), errs)
    _entities(r.from_entities, at(path, "fromEntities"), errs)
    _ports_and_icmps(r.to_ports, r.icmps, path, True, host, errs)


def _egress(r: c.EgressRule | c.EgressDenyRule, path: str, host: bool, errs: Errors) -> None:
    for field, sels in (
        ("toEndpoints", r.to_endpoints),
        ("toRequires", r.to_requires),
        ("toNodes", r.to_nodes),
    ):
        for i, sel in enumerate(sels):
            _sel(sel, f"{path}.{field}[{i}]", errs)
    _cidrs(r.to_cidr, at(path, "toCIDR"), errs)
    _cidr_set(r.to_cidr_set, at(path, "toCIDRSet"), errs)
    _entities(r.to_entities, at(path, "toEntities"), errs)
    for i, svc in enumerate(r.to_services):
        spath = f"{path}.toServices[{i}]"
        if (svc.k8s_service is None) == (svc.k8s_service_selector is None):
            errs.add(spath, "must set exactly one of k8sService or k8sServiceSelector")
        if svc.k8s_service_selector is not None:
            _sel(svc.k8s_service_selector.selector, at(spath, "k8sServiceSelector.selector"), errs)
    if r.to_services and r.to_ports:
        errs.add(at(path, "toPorts"), "may not be combined with toServices")
    if isinstance(r, c.EgressRule):
        for i, fqdn in enumerate(r.to_fqdns):
            _fqdn(fqdn, f"{path}.toFQDNs[{i}]", errs)
    _ports_and_icmps(r.to_ports, r.icmps, path, False, host, errs)


def _cidrs(values: list[str], path: str, errs: Errors) -> None:
    for i, value in enumerate(values):
        if names.parse_cidr(value) is None and names.parse_ip(value) is None:
            errs.add(at(path, i), f"must be a valid CIDR or IP address, got {value!r}")


def _cidr_set(rules: list[c.CIDRRule], path: str, errs: Errors) -> None:
    for i, rule in enumerate(rules):
        rpath = at(path, i)
        chosen = [bool(rule.cidr), bool(rule.cidr_group_ref), rule.cidr_group_selector is not None]
        if sum(chosen) != 1:
            errs.add(rpath, "must set exactly one of cidr, cidrGroupRef or cidrGroupSelector")
        if rule.cidr:
            check_cidr_with_except(
                rule.cidr, rule.except_, rpath, errs, cidr_field="cidr", strict=False
            )
        elif rule.except_:
            errs.add(at(rpath, "except"), "may only be used together with cidr")
        if rule.cidr_group_ref:
            errs.check(at(rpath, "cidrGroupRef"), names.check_dns1123_subdomain(rule.cidr_group_ref))
        if rule.cidr_group_selector is not None:
            _sel(rule.cidr_group_selector, at(rpath, "cidrGroupSelector"), errs)


def _entities(entities: list[str], path: str, errs: Errors) -> None:
    for i, entity in enumerate(entities):
        if entity not in c.ENTITIES:
            valid = ", ".join(sorted(c.ENTITIES))
            errs.add(at(path, i), f"unknown entity {entity!r}; valid entities: {valid}")


def _fqdn(sel: c.FQDNSelector, path: str, errs: Errors) -> None:
    if bool(sel.match_name) == bool(sel.match_pattern):
        errs.add(path, "must set exactly one of matchName or matchPattern")
    for field, value, pattern in (
        ("matchName", sel.match_name, _FQDN_NAME),
        ("matchPattern", sel.match_pattern, _FQDN_PATTERN),
    ):
        if value and (len(value) > _FQDN_MAX or not pattern.match(value)):
            errs.add(at(path, field), f"invalid DNS {field[5:].lower()} {value!r}")


def _ports_and_icmps(
    port_rules: list[c.PortRule] | list[c.PortDenyRule], icmps: list[c.ICMPRule], path: str,
    ingress: bool, host: bool, errs: Errors,
) -> None:
    if icmps and port_rules:
        errs.add(at(path, "icmps"), "may only be present without toPorts")
    for i, pr in enumerate(port_rules):
        _port_rule(pr, f"{path}.toPorts[{i}]", ingress, host, errs)
    for i, icmp in enumerate(icmps):
        ipath = f"{path}.icmps[{i}]"
        if len(icmp.fields) > MAX_ICMP_FIELDS:
            errs.add(at(ipath, "fields"), f"may have at most {MAX_ICMP_FIELDS} entries")
        for j, field in enumerate(icmp.fields):
            _icmp_field(field, f"{ipath}.fields[{j}].type", errs)


def _icmp_field(field: c.ICMPField, path: str, errs: Errors) -> None:
    if isinstance(field.type, int):
        if not 0 <= field.type <= 255:
            errs.add(path, f"must be between 0 and 255, got {field.type}")
    elif field.type not in ICMP_TYPES[field.family]:
        errs.add(path, f"unknown {field.family} ICMP type {field.type!r}")


def _port_protocol(pp: c.PortProtocol, path: str, errs: Errors) -> None:
    ppath = at(path, "port")
    numeric = _NUMBER.match(pp.port) is not None
    if not pp.port:
        problem: str | None = "port is required"
    elif numeric:
        problem = names.check_port_number(int(pp.port), allow_zero=True)
    else:
        problem = names.check_port_name(pp.port)
    errs.check(ppath, problem)
    if not pp.end_port:
        return
    epath = at(path, "endPort")
    if not 0 <= pp.end_port <= 65535:
        errs.add(epath, f"must be between 0 and 65535, got {pp.end_port}")
    elif problem is not None:
        return
    elif not numeric:
        errs.add(epath, "may only be used with a numeric port")
    elif pp.end_port < int(pp.port):
        errs.add(epath, f"must be greater than or equal to port {pp.port}, got {pp.end_port}")


def _port_rule(
    pr: c.PortRule | c.PortDenyRule, path: str, ingress: bool, host: bool, errs: Errors
) -> None:
    if len(pr.ports) > MAX_PORTS:
        errs.add(at(path, "ports"), f"may have at most {MAX_PORTS} entries")
    for i, pp in enumerate(pr.ports):
        _port_protocol(pp, f"{path}.ports[{i}]", errs)
    if not isinstance(pr, c.PortRule):
        return
    for i, sni in enumerate(pr.server_names):
        if not sni:
            errs.add(f"{path}.serverNames[{i}]", "empty server name is not allowed")
    rules = pr.rules
    has_l7 = rules is not None and not rules.is_empty()
    if pr.listener is not None:
        if ingress:
            errs.add(at(path, "listener"), "is not allowed on ingress")
        elif has_l7:
            errs.add(at(path, "listener"), "is not allowed together with L7 rules")
    if rules is None:
        return
    if rules.l7 and not rules.l7proto:
        errs.add(at(path, "rules.l7"), "may only be specified together with l7proto")
    for i, dns in enumerate(rules.dns):
        _fqdn(dns, f"{path}.rules.dns[{i}]", errs)
    if not has_l7:
        return
    _l7_constraints(pr, rules, path, ingress, host, errs)


def _l7_constraints(
    pr: c.PortRule, rules: c.L7Rules, path: str, ingress: bool, host: bool, errs: Errors
) -> None:
    kinds = [k for k, v in (("http", rules.http), ("kafka", rules.kafka), ("dns", rules.dns))
             if v]
    if rules.l7proto:
        kinds.append("l7proto")
    if len(kinds) > 1:
        errs.add(at(path, "rules"), f"multiple L7 protocols in one port rule: {', '.join(kinds)}")
    if host:
        errs.add(at(path, "rules"), "host policies (nodeSelector) do not support L7 rules")
    if rules.dns and ingress:
        errs.add(at(path, "rules.dns"), "DNS rules are not allowed on ingress")
    if rules.dns and not pr.ports:
        errs.add(at(path, "ports"), "port 53 must be specified for DNS rules")
    if pr.server_names and pr.terminating_tls is None:
        errs.add(at(path, "serverNames"), "not allowed with L7 rules without terminatingTLS")
    for i, pp in enumerate(pr.ports):
        if pp.port == "0":
            errs.add(f"{path}.ports[{i}].port", "L7 rules can not be used when a port is 0")
        if not rules.dns and pp.protocol != "TCP":
            errs.add(
                f"{path}.ports[{i}].protocol",
                f"L7 rules can only apply to TCP (not {pp.protocol}) except for DNS rules",
            )
