"""Multi-Cluster Services API (``multicluster.x-k8s.io/v1alpha1``): ServiceExport, ServiceImport.

Invariants:
- A ServiceExport is just its name: it shares the Service of the same namespace/name
  with the clusters of the mesh (as ``service.cilium.io/global`` + ``shared`` would).
- A ServiceImport of a namespace/name makes the local Service of that name use the
  backends other clusters export (as ``service.cilium.io/global`` would); its ``spec``
  (``type`` ClusterSetIP or Headless, ``ports``) is accepted as the API defines it.
- Both are namespaced; unknown fields are tolerated (as for other workload kinds).
"""

from __future__ import annotations

from typing import Literal

from .meta import ObjectMeta, Tolerant

MCS_API_VERSION = "multicluster.x-k8s.io/v1alpha1"


class ServiceExport(Tolerant, frozen=True, tag_field="kind", tag="ServiceExport"):
    api_version: str = MCS_API_VERSION
    metadata: ObjectMeta = ObjectMeta()


class ServiceImportPort(Tolerant, frozen=True):
    port: int
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str = ""


class ServiceImportSpec(Tolerant, frozen=True):
    type: Literal["ClusterSetIP", "Headless"] = "ClusterSetIP"
    ports: list[ServiceImportPort] = []
    ips: list[str] = []


class ServiceImport(Tolerant, frozen=True, tag_field="kind", tag="ServiceImport"):
    api_version: str = MCS_API_VERSION
    metadata: ObjectMeta = ObjectMeta()
    spec: ServiceImportSpec = ServiceImportSpec()
