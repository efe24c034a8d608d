"""``v1`` Service: what the servicelb service turns into load-balancer state.

Invariants:
- ``type`` defaults to ``ClusterIP``; ``sessionAffinity`` to ``None``; traffic policies to
  ``Cluster``; port ``protocol`` to ``TCP``.
- ``targetPort`` is an int or a named container port; absent means "same as ``port``"
  (`ServicePort.effective_target_port`).
- ``clusterIP`` is ``""`` (allocate), ``"None"`` (headless) or an IP address.
- Unknown fields are tolerated (``ipFamilies``, ``healthCheckNodePort``, ...).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .meta import ObjectMeta, Tolerant

Protocol = Literal["TCP", "UDP", "SCTP"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]
TrafficPolicy = Literal["Cluster", "Local"]

NODE_PORT_RANGE = (30000, 32767)
DEFAULT_CLIENT_IP_TIMEOUT = 10800


class ServicePort(Tolerant, frozen=True):
    port: int
    name: str = ""
    protocol: Protocol = "TCP"
    target_port: int | str | None = None
    node_port: int = 0
    app_protocol: str = ""

    def effective_target_port(self) -> int | str:
        """``targetPort`` if set, else ``port`` (the Kubernetes default)."""
        return self.port if self.target_port is None else self.target_port


class ClientIPConfig(Tolerant, frozen=True):
    timeout_seconds: int = DEFAULT_CLIENT_IP_TIMEOUT


class SessionAffinityConfig(Tolerant, frozen=True):
    client_ip: ClientIPConfig | None = msgspec.field(default=None, name="clientIP")


class ServiceSpec(Tolerant, frozen=True):
    type: ServiceType = "ClusterIP"
    selector: dict[str, str] = {}
    ports: list[ServicePort] = []
    cluster_ip: str = msgspec.field(default="", name="clusterIP")
    cluster_ips: list[str] = msgspec.field(default_factory=list, name="clusterIPs")
    external_ips: list[str] = msgspec.field(default_factory=list, name="externalIPs")
    external_name: str = ""
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: TrafficPolicy = "Cluster"
    internal_traffic_policy: TrafficPolicy = "Cluster"
    load_balancer_ip: str = msgspec.field(default="", name="loadBalancerIP")
    publish_not_ready_addresses: bool = False

    def is_headless(self) -> bool:
        return self.cluster_ip == "None"

    def affinity_timeout(self) -> int:
        """ClientIP affinity timeout in seconds (0 when affinity is ``None``)."""
        if self.session_affinity != "ClientIP":
            return 0
        cfg = self.session_affinity_config
        if cfg is None or cfg.client_ip is None:
            return DEFAULT_CLIENT_IP_TIMEOUT
        return cfg.client_ip.timeout_seconds


class LoadBalancerIngress(Tolerant, frozen=True):
    ip: str = ""
    hostname: str = ""


class LoadBalancerStatus(Tolerant, frozen=True):
    ingress: list[LoadBalancerIngress] = []


class ServiceStatus(Tolerant, frozen=True):
    load_balancer: LoadBalancerStatus = LoadBalancerStatus()


class Service(Tolerant, frozen=True, tag_field="kind", tag="Service"):
    api_version: str = "v1"
    metadata: ObjectMeta = ObjectMeta()
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus | None = None
