"""Global services: Cilium's ClusterMesh annotations on a Service, read in one place.

Pure. Invariants:
- ``service.cilium.io/global: "true"`` makes a Service global: it uses the backends
  that connected clusters share under the same namespace/name. ``service.cilium.io/shared``
  (default ``"true"``) says whether this cluster shares its own backends; ``"false"``
  shares none. ``service.cilium.io/affinity`` is ``local`` (remote backends only while no
  local backend is ready), ``remote`` (the other way round) or ``none`` (default: all).
- An annotation value outside its set is a problem naming the Service and the annotation;
  such a Service is treated as not global (nothing is shared or used by mistake).
- The Multi-Cluster Services API says the same thing with objects: a ServiceExport of a
  Service shares it (global and shared), a ServiceImport of the same namespace/name uses
  the remote backends (global). Annotations and objects combine by "either says so".
"""

from __future__ import annotations

from typing import Any, NamedTuple

ANNOTATION_GLOBAL = "service.cilium.io/global"
ANNOTATION_SHARED = "service.cilium.io/shared"
ANNOTATION_AFFINITY = "service.cilium.io/affinity"
AFFINITY_LOCAL = "local"
AFFINITY_REMOTE = "remote"
AFFINITY_NONE = "none"
AFFINITIES = (AFFINITY_LOCAL, AFFINITY_REMOTE, AFFINITY_NONE)
SOURCE_CLUSTER_LABEL = "multicluster.kubernetes.io/source-cluster"  # on imported slices
SERVICE_IMPORT_LABEL = "ciliary.io/service-import"  # "true" on them: a ServiceImport asks for them
_BOOLS = {"true": True, "false": False}


class GlobalService(NamedTuple):
    is_global: bool
    shared: bool
    affinity: str
    source: str  # "annotation" | "ServiceExport" | "ServiceImport" | ""


NOT_GLOBAL = GlobalService(False, False, AFFINITY_NONE, "")


def annotation_errors(notes: dict[str, str]) -> list[tuple[str, str]]:
    """``(field, message)`` for every ClusterMesh annotation value outside its set."""
    errors = []
    for key in (ANNOTATION_GLOBAL, ANNOTATION_SHARED):
        if key in notes and str(notes[key]).lower() not in _BOOLS:
            errors.append((f"metadata.annotations[{key}]", f'is {notes[key]!r}; use "true" or "false"'))
    if ANNOTATION_AFFINITY in notes and str(notes[ANNOTATION_AFFINITY]).lower() not in AFFINITIES:
        errors.append((f"metadata.annotations[{ANNOTATION_AFFINITY}]",
                       f"is {notes[ANNOTATION_AFFINITY]!r}; use one of {', '.join(AFFINITIES)}"))
    return errors


def annotation_problems(manifest: dict[str, Any]) -> list[str]:
    """Bad ClusterMesh annotation values of one Service, each naming the object and field."""
    meta = manifest.get("metadata") or {}
    where = f"Service {meta.get('namespace') or 'default'}/{meta.get('name', '?')}"
    return [f"{where}: {field} {message}" for field, message in annotation_errors(meta.get("annotations") or {})]


def global_service(manifest: dict[str, Any], *, exported: bool = False, imported: bool = False) -> GlobalService:
    """How a Service takes part in the mesh; ``exported``/``imported``: a ServiceExport /
    ServiceImport of the same namespace/name exists."""
    notes = (manifest.get("metadata") or {}).get("annotations") or {}
    if annotation_errors(notes):
        return NOT_GLOBAL
    annotated = _BOOLS.get(str(notes.get(ANNOTATION_GLOBAL, "false")).lower(), False)
    shared_note = _BOOLS.get(str(notes.get(ANNOTATION_SHARED, "true")).lower(), True)
    affinity = str(notes.get(ANNOTATION_AFFINITY, AFFINITY_NONE)).lower()
    if annotated:
        return GlobalService(True, shared_note or exported, affinity, "annotation")
    if exported or imported:
        return GlobalService(True, exported, affinity, "ServiceExport" if exported else "ServiceImport")
    return NOT_GLOBAL
