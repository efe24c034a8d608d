"""Semantic validation of decoded objects: everything msgspec's type checks cannot see.

Invariants:
- `validate` is pure: it takes a typed object (already past msgspec decoding) and returns
  every `FieldError` it finds, in document order, without stopping at the first.
- An empty list means the object is acceptable to every ciliary service.
- Per-kind rules live in `validate_core` and `validate_policy`; shared building blocks in
  `checks`; name/address syntax in `names`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .checks import Errors
from .cilium import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from .core import Namespace, Node
from .discovery import EndpointSlice
from .errors import FieldError
from .multicluster import ServiceExport, ServiceImport
from .networking import NetworkPolicy
from .pod import Pod
from .service import Service
from .validate_core import (
    validate_endpoint_slice,
    validate_namespace,
    validate_node,
    validate_pod,
    validate_service,
    validate_service_export,
    validate_service_import,
)
from .validate_policy import validate_cilium_policy, validate_network_policy

_VALIDATORS: dict[type, Callable[[Any, Errors], None]] = {
    Namespace: validate_namespace,
    Node: validate_node,
    Pod: validate_pod,
    Service: validate_service,
    EndpointSlice: validate_endpoint_slice,
    NetworkPolicy: validate_network_policy,
    CiliumNetworkPolicy: validate_cilium_policy,
    CiliumClusterwideNetworkPolicy: validate_cilium_policy,
    ServiceExport: validate_service_export,
    ServiceImport: validate_service_import,
}


def validate(obj: object) -> list[FieldError]:
    """All semantic problems of `obj` (a model object of a supported kind)."""
    validator = _VALIDATORS.get(type(obj))
    if validator is None:
        raise TypeError(f"no validator for {type(obj).__name__}")
    errs = Errors()
    validator(obj, errs)
    return errs.items
