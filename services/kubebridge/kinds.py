"""The Kubernetes resources the bridge follows, and where the API serves them.

Invariants:
- Pure data: one `WatchedKind` per kind ciliary models (``ciliary.resources.KINDS``),
  with the collection path that lists it across every namespace.
- ``collection`` lists and watches the kind cluster-wide; ``object_path`` names one object
  (``status=True``: its status subresource).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WatchedKind:
    kind: str
    api_version: str  # group/version as objects carry it ("v1" for the core group)
    plural: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    @property
    def collection(self) -> str:
        return f"{self.prefix}/{self.plural}"

    def object_path(self, namespace: str, name: str, *, status: bool = False) -> str:
        scope = f"/namespaces/{namespace}" if self.namespaced else ""
        return f"{self.prefix}{scope}/{self.plural}/{name}" + ("/status" if status else "")


WATCHED_KINDS: tuple[WatchedKind, ...] = (
    WatchedKind("Namespace", "v1", "namespaces", False),
    WatchedKind("Node", "v1", "nodes", False),
    WatchedKind("Pod", "v1", "pods", True),
    WatchedKind("Service", "v1", "services", True),
    WatchedKind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True),
    WatchedKind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", True),
    WatchedKind("CiliumNetworkPolicy", "cilium.io/v2", "ciliumnetworkpolicies", True),
    WatchedKind("CiliumClusterwideNetworkPolicy", "cilium.io/v2",
                "ciliumclusterwidenetworkpolicies", False),
)
BY_KIND = {k.kind: k for k in WATCHED_KINDS}
POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
CILIUM_POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
