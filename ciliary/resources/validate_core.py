"""Semantic validation of Namespace, Node, Pod, Service and EndpointSlice.

Invariants:
- Rules mirror Kubernetes API validation for the modelled fields (name formats per kind,
  port ranges, unique names, address syntax); nothing here mutates or defaults.
- Each function takes a decoded object and an `Errors` collector.
"""

from __future__ import annotations

from . import clustermesh, names
from .checks import Errors, at, check_labels, check_metadata, check_port_or_name, check_unique
from .core import Namespace, Node
from .discovery import EndpointSlice
from .multicluster import ServiceExport, ServiceImport
from .pod import Container, Pod, Probe
from .service import NODE_PORT_RANGE, Service, ServiceSpec

MAX_AFFINITY_TIMEOUT = 86400
_IP_ADDRESS_TYPES = {"InternalIP", "ExternalIP"}


def validate_namespace(obj: Namespace, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1123_label)


def validate_node(obj: Node, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1123_subdomain)
    spec = obj.spec
    if spec.pod_cidr:
        errs.check("spec.podCIDR", names.check_cidr(spec.pod_cidr))
    for i, cidr in enumerate(spec.pod_cidrs):
        errs.check(f"spec.podCIDRs[{i}]", names.check_cidr(cidr))
    if len(spec.pod_cidrs) > 2:
        errs.add("spec.podCIDRs", "may specify no more than one CIDR for each IP family")
    if spec.pod_cidr and spec.pod_cidrs and spec.pod_cidrs[0] != spec.pod_cidr:
        errs.add("spec.podCIDRs[0]", f"must match spec.podCIDR {spec.pod_cidr!r}")
    for i, addr in enumerate(obj.status.addresses):
        if addr.type in _IP_ADDRESS_TYPES:
            errs.check(f"status.addresses[{i}].address", names.check_ip(addr.address))
        elif not addr.address:
            errs.add(f"status.addresses[{i}].address", "address is required")


def validate_pod(obj: Pod, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1123_subdomain)
    spec = obj.spec
    if not spec.containers:
        errs.add("spec.containers", "must have at least one container")
    check_unique(
        [c.name for c in spec.containers],
        lambda i: f"spec.containers[{i}].name",
        "container name",
        errs,
    )
    port_names: set[str] = set()
    for i, container in enumerate(spec.containers):
        _validate_container(container, f"spec.containers[{i}]", spec.host_network, port_names, errs)
    if spec.node_name:
        errs.check("spec.nodeName", names.check_dns1123_subdomain(spec.node_name))
    errs.check("spec.serviceAccountName", names.check_dns1123_subdomain(spec.service_account_name))
    if spec.hostname:
        errs.check("spec.hostname", names.check_dns1123_label(spec.hostname))
    if spec.subdomain:
        errs.check("spec.subdomain", names.check_dns1123_label(spec.subdomain))
    if spec.termination_grace_period_seconds < 0:
        errs.add("spec.terminationGracePeriodSeconds", "must be non-negative")
    if obj.status is not None:
        if obj.status.pod_ip:
            errs.check("status.podIP", names.check_ip(obj.status.pod_ip))
        for i, pod_ip in enumerate(obj.status.pod_ips):
            errs.check(f"status.podIPs[{i}].ip", names.check_ip(pod_ip.ip))
        if obj.status.host_ip:
            errs.check("status.hostIP", names.check_ip(obj.status.host_ip))


def _validate_container(
    c: Container, path: str, host_network: bool, port_names: set[str], errs: Errors
) -> None:
    errs.check(at(path, "name"), names.check_dns1123_label(c.name))
    if not c.image:
        errs.add(at(path, "image"), "image is required")
    for i, env in enumerate(c.env):
        if not env.name or "=" in env.name:
            errs.add(f"{path}.env[{i}].name", f"invalid environment variable name {env.name!r}")
    for i, port in enumerate(c.ports):
        ppath = f"{path}.ports[{i}]"
        errs.check(at(ppath, "containerPort"), names.check_port_number(port.container_port))
        if port.host_port:
            errs.check(at(ppath, "hostPort"), names.check_port_number(port.host_port))
            if host_network and port.host_port != port.container_port:
                errs.add(at(ppath, "hostPort"), "must match containerPort when hostNetwork is true")
        if port.name:
            errs.check(at(ppath, "name"), names.check_port_name(port.name))
            if port.name in port_names:
                errs.add(at(ppath, "name"), f"duplicate port name {port.name!r} in pod")
            port_names.add(port.name)
    for field, probe in (
        ("readinessProbe", c.readiness_probe),
        ("livenessProbe", c.liveness_probe),
        ("startupProbe", c.startup_probe),
    ):
        if probe is not None:
            _validate_probe(probe, at(path, field), errs)


def _validate_probe(probe: Probe, path: str, errs: Errors) -> None:
    handlers = [
        h for h in (probe.exec, probe.tcp_socket, probe.http_get, probe.grpc) if h is not None
    ]
    if len(handlers) != 1:
        errs.add(path, "must specify exactly one handler (exec, tcpSocket, httpGet or grpc)")
    if probe.exec is not None and not probe.exec.command:
        errs.add(at(path, "exec.command"), "command is required")
    if probe.tcp_socket is not None:
        check_port_or_name(probe.tcp_socket.port, at(path, "tcpSocket.port"), errs)
    if probe.http_get is not None:
        check_port_or_name(probe.http_get.port, at(path, "httpGet.port"), errs)
    for field in ("period_seconds", "timeout_seconds", "success_threshold", "failure_threshold"):
        value = getattr(probe, field)
        if value < 1:
            camel = "".join(w.capitalize() if n else w for n, w in enumerate(field.split("_")))
            errs.add(at(path, camel), f"must be at least 1, got {value}")
    if probe.initial_delay_seconds < 0:
        errs.add(at(path, "initialDelaySeconds"), "must be non-negative")


def validate_service(obj: Service, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1035_label)
    for field, message in clustermesh.annotation_errors(obj.metadata.annotations):
        errs.add(field, message)
    spec = obj.spec
    check_labels(spec.selector, "spec.selector", errs)
    _validate_service_ports(spec, errs)
    _validate_service_ips(spec, errs)
    if spec.type == "ExternalName":
        if not spec.external_name:
            errs.add("spec.externalName", "required for type ExternalName")
        else:
            errs.check("spec.externalName", names.check_dns1123_subdomain(spec.external_name))
    if spec.external_traffic_policy == "Local" and spec.type not in ("NodePort", "LoadBalancer"):
        errs.add("spec.externalTrafficPolicy", "may only be Local for NodePort or LoadBalancer")
    cfg = spec.session_affinity_config
    if cfg is not None and cfg.client_ip is not None:
        timeout = cfg.client_ip.timeout_seconds
        path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        if spec.session_affinity != "ClientIP":
            errs.add(path, "may only be set when sessionAffinity is ClientIP")
        elif not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
            errs.add(path, f"must be between 1 and {MAX_AFFINITY_TIMEOUT}, got {timeout}")


def _validate_service_ports(spec: ServiceSpec, errs: Errors) -> None:
    if not spec.ports and not spec.is_headless() and spec.type != "ExternalName":
        errs.add("spec.ports", "at least one port is required")
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    low, high = NODE_PORT_RANGE
    for i, port in enumerate(spec.ports):
        path = f"spec.ports[{i}]"
        if len(spec.ports) > 1 and not port.name:
            errs.add(at(path, "name"), "name is required when a Service has more than one port")
        if port.name:
            errs.check(at(path, "name"), names.check_dns1123_label(port.name))
            if port.name in seen_names:
                errs.add(at(path, "name"), f"duplicate port name {port.name!r}")
            seen_names.add(port.name)
        errs.check(at(path, "port"), names.check_port_number(port.port))
        if (port.port, port.protocol) in seen_ports:
            errs.add(path, f"duplicate port {port.port}/{port.protocol}")
        seen_ports.add((port.port, port.protocol))
        if port.target_port is not None:
            check_port_or_name(port.target_port, at(path, "targetPort"), errs)
        if port.node_port:
            if spec.type not in ("NodePort", "LoadBalancer"):
                errs.add(at(path, "nodePort"), f"may not be used when type is {spec.type}")
            elif not low <= port.node_port <= high:
                errs.add(
                    at(path, "nodePort"),
                    f"must be between {low} and {high}, got {port.node_port}",
                )


def _validate_service_ips(spec: ServiceSpec, errs: Errors) -> None:
    if spec.cluster_ip and spec.cluster_ip != "None":
        errs.check("spec.clusterIP", names.check_ip(spec.cluster_ip))
    if spec.type == "ExternalName" and spec.cluster_ip:
        errs.add("spec.clusterIP", "must be empty when type is ExternalName")
    elif spec.is_headless() and spec.type != "ClusterIP":
        errs.add("spec.clusterIP", f"may not be None when type is {spec.type}")
    for i, ip in enumerate(spec.cluster_ips):
        if ip != "None":
            errs.check(f"spec.clusterIPs[{i}]", names.check_ip(ip))
    if len(spec.cluster_ips) > 2:
        errs.add("spec.clusterIPs", "may specify no more than one IP for each IP family")
    if spec.cluster_ip and spec.cluster_ips and spec.cluster_ips[0] != spec.cluster_ip:
        errs.add("spec.clusterIPs[0]", f"must match spec.clusterIP {spec.cluster_ip!r}")
    for i, ip in enumerate(spec.external_ips):
        errs.check(f"spec.externalIPs[{i}]", names.check_ip(ip))
    if spec.load_balancer_ip:
        errs.check("spec.loadBalancerIP", names.check_ip(spec.load_balancer_ip))


def validate_endpoint_slice(obj: EndpointSlice, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1123_subdomain)
    family = {"IPv4": 4, "IPv6": 6}.get(obj.address_type)
    for i, ep in enumerate(obj.endpoints):
        path = f"endpoints[{i}]"
        if not 1 <= len(ep.addresses) <= 100:
            errs.add(at(path, "addresses"), "must have between 1 and 100 addresses")
        for j, addr in enumerate(ep.addresses):
            apath = f"{path}.addresses[{j}]"
            if family is None:
                errs.check(apath, names.check_dns1123_subdomain(addr))
            else:
                errs.check(apath, names.check_ip(addr, family=family))
        if ep.hostname:
            errs.check(at(path, "hostname"), names.check_dns1123_label(ep.hostname))
        if ep.node_name:
            errs.check(at(path, "nodeName"), names.check_dns1123_subdomain(ep.node_name))
    seen: set[str] = set()
    for i, port in enumerate(obj.ports):
        path = f"ports[{i}]"
        if port.name:
            errs.check(at(path, "name"), names.check_dns1123_label(port.name))
        if port.name in seen:
            errs.add(at(path, "name"), f"duplicate port name {port.name!r}")
        seen.add(port.name)
        if port.port is not None:
            errs.check(at(path, "port"), names.check_port_number(port.port))


def validate_service_export(obj: ServiceExport, errs: Errors) -> None:
    """Named like the Service it exports (a DNS-1035 label)."""
    check_metadata(obj.metadata, errs, names.check_dns1035_label)


def validate_service_import(obj: ServiceImport, errs: Errors) -> None:
    check_metadata(obj.metadata, errs, names.check_dns1035_label)
    seen: set[tuple[int, str]] = set()
    for i, port in enumerate(obj.spec.ports):
        if not 1 <= port.port <= 65535:
            errs.add(f"spec.ports[{i}].port", f"must be between 1 and 65535, got {port.port}")
        if (port.port, port.protocol) in seen:
            errs.add(f"spec.ports[{i}]", f"duplicate port {port.port}/{port.protocol}")
        seen.add((port.port, port.protocol))
