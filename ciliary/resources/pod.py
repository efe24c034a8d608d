"""``v1`` Pod: the subset the node pod runner and the identity service consume.

Invariants:
- Unknown fields are tolerated (volumes, resources, securityContext, ... are not modelled).
- Defaults follow the Kubernetes API: ``serviceAccountName`` ``default``, ``restartPolicy``
  ``Always``, container port ``protocol`` ``TCP``, ``terminationGracePeriodSeconds`` 30,
  probe ``periodSeconds`` 10 / ``timeoutSeconds`` 1 / thresholds 1 and 3.
- ``status`` is optional and observed, never desired state.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from .meta import ObjectMeta, Tolerant

Protocol = Literal["TCP", "UDP", "SCTP"]
RestartPolicy = Literal["Always", "OnFailure", "Never"]


class EnvVar(Tolerant, frozen=True):
    name: str
    value: str = ""


class ContainerPort(Tolerant, frozen=True):
    container_port: int
    name: str = ""
    protocol: Protocol = "TCP"
    host_port: int = 0
    host_ip: str = msgspec.field(default="", name="hostIP")


class ExecAction(Tolerant, frozen=True):
    command: list[str] = []


class TCPSocketAction(Tolerant, frozen=True):
    port: int | str
    host: str = ""


class HTTPGetAction(Tolerant, frozen=True):
    port: int | str
    path: str = ""
    host: str = ""
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"


class Probe(Tolerant, frozen=True):
    """Exactly one handler (``exec``, ``tcpSocket``, ``httpGet``, ``grpc``) must be set."""

    exec: ExecAction | None = None
    tcp_socket: TCPSocketAction | None = None
    http_get: HTTPGetAction | None = None
    grpc: dict[str, Any] | None = None
    initial_delay_seconds: int = 0
    period_seconds: int = 10
    timeout_seconds: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3


class Container(Tolerant, frozen=True):
    name: str
    image: str = ""
    command: list[str] = []
    args: list[str] = []
    working_dir: str = ""
    env: list[EnvVar] = []
    ports: list[ContainerPort] = []
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None
    startup_probe: Probe | None = None


class PodSpec(Tolerant, frozen=True):
    containers: list[Container] = []
    node_name: str = ""
    service_account_name: str = "default"
    restart_policy: RestartPolicy = "Always"
    host_network: bool = False
    hostname: str = ""
    subdomain: str = ""
    termination_grace_period_seconds: int = 30


class PodIP(Tolerant, frozen=True):
    ip: str


class PodCondition(Tolerant, frozen=True):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class PodStatus(Tolerant, frozen=True):
    phase: Literal["", "Pending", "Running", "Succeeded", "Failed", "Unknown"] = ""
    pod_ip: str = msgspec.field(default="", name="podIP")
    pod_ips: list[PodIP] = msgspec.field(default_factory=list, name="podIPs")
    host_ip: str = msgspec.field(default="", name="hostIP")
    conditions: list[PodCondition] = []

    def is_ready(self) -> bool:
        """True when the ``Ready`` condition is ``True``."""
        return any(c.type == "Ready" and c.status == "True" for c in self.conditions)


class Pod(Tolerant, frozen=True, tag_field="kind", tag="Pod"):
    api_version: str = "v1"
    metadata: ObjectMeta = ObjectMeta()
    spec: PodSpec = PodSpec()
    status: PodStatus | None = None
