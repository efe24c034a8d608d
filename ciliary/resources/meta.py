"""Struct bases and ``metadata`` shared by every kind.

Invariants:
- All model structs are frozen, camelCase on the wire and omit default values when encoded.
- `Tolerant` structs ignore fields they do not model (Pods, Services, ... carry many);
  `Strict` structs reject them (policy kinds, like Cilium's strict CRD validation).
- `ObjectMeta` is tolerant everywhere: ``managedFields``, ``ownerReferences`` and the like
  are apiserver bookkeeping, not policy.
"""

from __future__ import annotations

import msgspec


class Tolerant(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """Base for structs that ignore unknown fields."""


class Strict(Tolerant, frozen=True, forbid_unknown_fields=True):
    """Base for structs that reject unknown fields."""


class ObjectMeta(Tolerant, frozen=True):
    """``metadata``: strings where Kubernetes uses strings (``resourceVersion`` is opaque)."""

    name: str = ""
    namespace: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    creation_timestamp: str | None = None
