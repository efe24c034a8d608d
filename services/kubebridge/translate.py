"""API server objects → records of bucket ``resources``, exactly as ``ciliary apply`` writes them.

Invariants:
- Pure. An object goes through the apply path's validation
  (``ciliary.resources.resource_from_manifest``): what ``apply`` would reject is rejected
  here, with the same message naming object and field, and never written.
- The stored manifest is the object without its status and without server bookkeeping
  (``uid``, ``resourceVersion``, ``generation``, ``creationTimestamp``, ``managedFields``,
  ``selfLink``), plus the annotation ``ciliary.io/source: kubernetes`` that marks records
  the bridge owns (only those does it ever update over or delete). The record keeps the
  API server's ``uid``, ``creationTimestamp`` and ``generation`` (1 when the kind has none).
- List items carry no ``kind``/``apiVersion``: they come from the watched kind.
- The encoding is deterministic: the same object gives the same bytes whether it came in
  a list (items without ``kind``) or a watch event, so an unchanged object is never
  rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ciliary import schema
from ciliary.resources import ManifestError, resource_from_manifest

from .kinds import WatchedKind

SOURCE_ANNOTATION = "ciliary.io/source"
SOURCE_KUBERNETES = "kubernetes"
SERVER_METADATA = ("uid", "resourceVersion", "generation", "creationTimestamp",
                   "managedFields", "selfLink")
CLUSTER_SCOPE = "_"


def bucket_key(kind: str, namespace: str, name: str) -> str:
    """The key of an object in bucket ``resources`` (as ``ciliary.store.kv_key``)."""
    return f"{kind}.{namespace or CLUSTER_SCOPE}.{name}"


@dataclass(frozen=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str
    uid: str = ""
    resource_version: str = ""
    generation: int = 0

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else (
            f"{self.kind} {self.name}")


@dataclass(frozen=True)
class Translated:
    key: str
    ref: ObjectRef
    data: bytes | None  # the encoded ResourceRecord; None when rejected
    problem: str = ""  # why it was rejected


def object_ref(kind: WatchedKind, obj: dict[str, Any]) -> ObjectRef:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    generation = meta.get("generation")
    return ObjectRef(
        kind=kind.kind,
        namespace=str(meta.get("namespace") or "") if kind.namespaced else "",
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        generation=generation if isinstance(generation, int) and generation > 0 else 0,
    )


def stored_manifest(kind: WatchedKind, obj: dict[str, Any]) -> dict[str, Any]:
    """What the bucket keeps of ``obj`` (see the module invariants)."""
    manifest: dict[str, Any] = {"apiVersion": kind.api_version, "kind": kind.kind}
    manifest.update((k, v) for k, v in obj.items()
                    if k not in ("status", "apiVersion", "kind", "metadata"))
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    meta = {k: v for k, v in meta.items() if k not in SERVER_METADATA}
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    assert isinstance(annotations, dict)
    meta["annotations"] = {**annotations, SOURCE_ANNOTATION: SOURCE_KUBERNETES}
    manifest["metadata"] = meta
    return manifest


def translate(kind: WatchedKind, obj: dict[str, Any]) -> Translated:
    """One API object as the record ``apply`` would store, or why it is rejected."""
    ref = object_ref(kind, obj)
    key = bucket_key(kind.kind, ref.namespace, ref.name)
    if not ref.name or (kind.namespaced and not ref.namespace):
        return Translated(key, ref, None, f"{ref}: metadata.name/namespace missing")
    manifest = stored_manifest(kind, obj)
    try:
        resource = resource_from_manifest(manifest, source=str(ref))
    except ManifestError as err:
        found = "; ".join(f"{p.field}: {p.message}" if p.field else p.message
                          for p in err.problems)
        return Translated(key, ref, None, f"{ref}: {found}")
    meta = obj.get("metadata") or {}
    record = schema.ResourceRecord(
        kind=resource.kind, api_version=resource.api_version, namespace=resource.namespace,
        name=resource.name, uid=ref.uid, generation=ref.generation or 1,
        created=str(meta.get("creationTimestamp") or ""), manifest=manifest,
    )
    return Translated(key, ref, schema.encode(record))


class _Meta(msgspec.Struct, frozen=True):
    annotations: dict[str, Any] = {}


class _Manifest(msgspec.Struct, frozen=True):
    metadata: _Meta = _Meta()


class _OwnerView(msgspec.Struct, frozen=True):
    manifest: _Manifest = _Manifest()


def owned_by_bridge(value: bytes | None) -> bool:
    """Whether a stored record is one the bridge wrote (False for anything unreadable)."""
    if not value:
        return False
    try:
        view = msgspec.msgpack.decode(value, type=_OwnerView)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return view.manifest.metadata.annotations.get(SOURCE_ANNOTATION) == SOURCE_KUBERNETES
