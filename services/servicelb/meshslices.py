"""Backends of connected clusters as EndpointSlices: how ClusterMesh enters the model.

Pure. Invariants:
- Every ``mesh`` bucket ``service.<cluster>.<namespace>.<name>`` record becomes exactly
  one EndpointSlice ``mesh.<cluster>.<name>`` in ``<namespace>``, labelled
  ``kubernetes.io/service-name: <name>`` and ``multicluster.kubernetes.io/source-cluster:
  <cluster>`` (the MCS API's label for imported slices): the model's own slice path
  (ports matched by name and protocol, readiness -> state) applies to remote backends,
  and the model uses them only for a Service that is global here (annotation) or has a
  ServiceImport here (``ciliary.io/service-import: "true"`` on the slice).
- Remote endpoints carry no ``nodeName`` (a remote node is not one of this cluster's
  nodes: traffic policy Local never picks it); the backing pod is kept as ``targetRef``.
- A key that is not ``service.<cluster>.<namespace>.<name>`` gives None.
"""

from __future__ import annotations

from typing import Any

from ciliary import schema
from ciliary.resources.clustermesh import SERVICE_IMPORT_LABEL, SOURCE_CLUSTER_LABEL
from ciliary.resources.discovery import SERVICE_NAME_LABEL

Ref = tuple[str, str]


def slice_ref(mesh_key: str) -> Ref | None:
    """The slice a ``mesh`` service key stands for."""
    parts = mesh_key.split(".", 3)
    if len(parts) != 4 or parts[0] != schema.MESH_SERVICE_PREFIX or not all(parts[1:]):
        return None
    _, cluster, namespace, name = parts
    return namespace, f"mesh.{cluster}.{name}"


def mesh_slice(record: schema.MeshService) -> dict[str, Any]:
    """The EndpointSlice manifest of one remote global service."""
    ports = sorted({(b.port_name, b.port, b.proto) for b in record.backends})
    endpoints = []
    for backend in sorted({b.ip: b for b in record.backends}.values(), key=lambda b: b.ip):
        endpoint: dict[str, Any] = {"addresses": [backend.ip], "conditions": {"ready": backend.ready,
                                                                             "serving": backend.ready}}
        if backend.pod and "/" in backend.pod:
            namespace, pod = backend.pod.split("/", 1)
            endpoint["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod}
        endpoints.append(endpoint)
    labels = {SERVICE_NAME_LABEL: record.name, SOURCE_CLUSTER_LABEL: record.cluster}
    if record.imported:
        labels[SERVICE_IMPORT_LABEL] = "true"
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"mesh.{record.cluster}.{record.name}", "namespace": record.namespace,
                     "labels": labels},
        "ports": [{"name": name, "port": port, "protocol": proto} for name, port, proto in ports],
        "endpoints": endpoints,
    }
