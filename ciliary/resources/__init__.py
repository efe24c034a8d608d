"""The typed Kubernetes/Cilium resource subset ciliary understands.

Pure code: decoding and validation of manifests (YAML/JSON) into frozen msgspec structs.
Every service decodes stored objects through this package, so field names and semantics
follow the Kubernetes and Cilium APIs.

Entry points:
- `load_manifests(paths, stdin)` / `loads(text)` / `resource_from_manifest(obj)` →
  validated `Resource`s, or one `ManifestError` listing every `Problem`.
- `decode(resource_or_kind, manifest)` → the typed model object (see `model`);
  `to_manifest(obj)` → back to a manifest dict.
- `KINDS`, `resolve_kind`, `make_key`, `parse_key` for names and keys.
- `validate(obj)` → `FieldError`s; `LabelSelector.matches(labels)` for selection.
"""

from .decoding import decode, to_manifest
from .errors import FieldError, ManifestError, Problem, UnknownKindError
from .kinds import (
    CLUSTER_SCOPE,
    DEFAULT_NAMESPACE,
    KINDS,
    KindInfo,
    Resource,
    ResourceKey,
    make_key,
    parse_key,
    resolve_kind,
)
from .loader import STDIN, load_manifests, loads, resource_from_manifest
from .model import KubeObject
from .selector import LabelSelector, LabelSelectorRequirement
from .validate import validate

__all__ = [
    "CLUSTER_SCOPE",
    "DEFAULT_NAMESPACE",
    "KINDS",
    "STDIN",
    "FieldError",
    "KindInfo",
    "KubeObject",
    "LabelSelector",
    "LabelSelectorRequirement",
    "ManifestError",
    "Problem",
    "Resource",
    "ResourceKey",
    "UnknownKindError",
    "decode",
    "load_manifests",
    "loads",
    "make_key",
    "parse_key",
    "resolve_kind",
    "resource_from_manifest",
    "to_manifest",
    "validate",
]
