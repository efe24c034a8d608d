"""The kind registry, resource keys and the stored `Resource` envelope.

Invariants:
- `KINDS` is the single list of supported kinds: apiVersion, scope, model type and the
  names the CLI accepts. Adding a kind means adding one entry here (plus model + validator).
- A resource key is ``"<Kind>/<namespace>/<name>"``; cluster-scoped kinds use ``_`` as the
  namespace part (``Node/_/node-1``). `make_key` and `parse_key` are inverses.
- `Resource.namespace` is ``""`` exactly when the kind is cluster-scoped; for namespaced
  kinds it equals ``manifest["metadata"]["namespace"]`` (defaulted to ``default``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from .cilium import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from .core import Namespace, Node
from .discovery import EndpointSlice
from .errors import UnknownKindError
from .multicluster import MCS_API_VERSION, ServiceExport, ServiceImport
from .networking import NetworkPolicy
from .pod import Pod
from .service import Service

CLUSTER_SCOPE = "_"
DEFAULT_NAMESPACE = "default"


class KindInfo(NamedTuple):
    kind: str
    api_version: str
    namespaced: bool
    model: type
    plural: str
    singular: str
    short_names: tuple[str, ...] = ()

    @property
    def group(self) -> str:
        """API group (``""`` for the core group)."""
        return self.api_version.rpartition("/")[0]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.plural, self.singular, *self.short_names)


KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo("Namespace", "v1", False, Namespace, "namespaces", "namespace", ("ns",)),
        KindInfo("Node", "v1", False, Node, "nodes", "node", ("no",)),
        KindInfo("Pod", "v1", True, Pod, "pods", "pod", ("po",)),
        KindInfo("Service", "v1", True, Service, "services", "service", ("svc",)),
        KindInfo(
            "EndpointSlice", "discovery.k8s.io/v1", True, EndpointSlice,
            "endpointslices", "endpointslice",
        ),
        KindInfo(
            "NetworkPolicy", "networking.k8s.io/v1", True, NetworkPolicy,
            "networkpolicies", "networkpolicy", ("netpol",),
        ),
        KindInfo(
            "CiliumNetworkPolicy", "cilium.io/v2", True, CiliumNetworkPolicy,
            "ciliumnetworkpolicies", "ciliumnetworkpolicy", ("cnp",),
        ),
        KindInfo(
            "CiliumClusterwideNetworkPolicy", "cilium.io/v2", False,
            CiliumClusterwideNetworkPolicy,
            "ciliumclusterwidenetworkpolicies", "ciliumclusterwidenetworkpolicy", ("ccnp",),
        ),
        KindInfo("ServiceExport", MCS_API_VERSION, True, ServiceExport, "serviceexports", "serviceexport",
                 ("svcex",)),
        KindInfo("ServiceImport", MCS_API_VERSION, True, ServiceImport, "serviceimports", "serviceimport",
                 ("svcim",)),
    )
}


def kinds_help() -> str:
    """``Kind (plural, singular, short)`` for every kind, for error messages and help."""
    return "; ".join(f"{i.kind} ({', '.join(i.names)})" for i in KINDS.values())


def resolve_kind(word: str) -> str:
    """The Kind for a user word: Kind, plural, singular or short name, case-insensitive,
    optionally qualified by group (``cnp``, ``Pods``, ``networkpolicies.networking.k8s.io``).
    """
    lowered = word.strip().lower()
    name, _, group = lowered.partition(".")
    for info in KINDS.values():
        if name == info.kind.lower() or name in info.names:
            if not group or group == info.group:
                return info.kind
    raise UnknownKindError(f"unknown resource kind {word!r}; valid kinds: {kinds_help()}")


class ResourceKey(NamedTuple):
    kind: str
    namespace: str
    name: str


def make_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace or CLUSTER_SCOPE}/{name}"


def parse_key(key: str) -> ResourceKey:
    """Inverse of `make_key`; raises ``ValueError`` for a malformed key or unknown kind."""
    parts = key.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"resource key {key!r} is not of the form Kind/namespace/name")
    kind, namespace, name = parts
    info = KINDS.get(kind)
    if info is None:
        raise UnknownKindError(f"resource key {key!r}: unknown kind {kind!r}")
    if info.namespaced == (namespace == CLUSTER_SCOPE):
        scope = "a namespace" if info.namespaced else f"{CLUSTER_SCOPE!r} as namespace"
        raise ValueError(f"resource key {key!r}: {kind} needs {scope}")
    return ResourceKey(kind, "" if namespace == CLUSTER_SCOPE else namespace, name)


class Resource(msgspec.Struct, frozen=True, rename="camel"):
    """One validated object: identity plus the manifest as the user wrote it."""

    kind: str
    api_version: str
    namespace: str
    name: str
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return make_key(self.kind, self.namespace, self.name)
