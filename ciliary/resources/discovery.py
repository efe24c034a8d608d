"""``discovery.k8s.io/v1`` EndpointSlice: the backends of a Service.

Invariants:
- The owning Service is named by the ``kubernetes.io/service-name`` label
  (`EndpointSlice.service_name`), not by a spec field.
- Every address matches ``addressType`` (validated).
- Endpoint conditions are tri-state: ``ready`` unset means ready; ``serving`` unset means
  "same as ready"; ``terminating`` unset means not terminating (`Endpoint.is_ready` etc.).
- A port with no ``port`` number means "all ports".
"""

from __future__ import annotations

from typing import Literal

from .meta import ObjectMeta, Tolerant

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

AddressType = Literal["IPv4", "IPv6", "FQDN"]


class EndpointConditions(Tolerant, frozen=True):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ObjectReference(Tolerant, frozen=True):
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


class Endpoint(Tolerant, frozen=True):
    addresses: list[str]
    conditions: EndpointConditions = EndpointConditions()
    hostname: str = ""
    node_name: str = ""
    zone: str = ""
    target_ref: ObjectReference | None = None

    def is_ready(self) -> bool:
        return self.conditions.ready is not False

    def is_serving(self) -> bool:
        serving = self.conditions.serving
        return self.is_ready() if serving is None else serving

    def is_terminating(self) -> bool:
        return bool(self.conditions.terminating)


class EndpointPort(Tolerant, frozen=True):
    name: str = ""
    port: int | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str = ""


class EndpointSlice(Tolerant, frozen=True, tag_field="kind", tag="EndpointSlice"):
    address_type: AddressType
    api_version: str = "discovery.k8s.io/v1"
    metadata: ObjectMeta = ObjectMeta()
    endpoints: list[Endpoint] = []
    ports: list[EndpointPort] = []

    @property
    def service_name(self) -> str:
        return self.metadata.labels.get(SERVICE_NAME_LABEL, "")
