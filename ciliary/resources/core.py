"""``v1`` Namespace and Node.

Invariants:
- Both are cluster-scoped: their ``metadata.namespace`` is always ``""``.
- A Namespace is just its metadata (its labels feed namespace selectors); ``spec`` and
  ``status`` are tolerated and ignored.
- Node ``podCIDRs[0]``, when both are set, equals ``podCIDR`` (validated, not derived).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .meta import ObjectMeta, Tolerant

NodeAddressType = Literal["InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS"]


class Namespace(Tolerant, frozen=True, tag_field="kind", tag="Namespace"):
    api_version: str = "v1"
    metadata: ObjectMeta = ObjectMeta()


class NodeSpec(Tolerant, frozen=True):
    pod_cidr: str = msgspec.field(default="", name="podCIDR")
    pod_cidrs: list[str] = msgspec.field(default_factory=list, name="podCIDRs")
    unschedulable: bool = False

    def cidrs(self) -> list[str]:
        """All pod CIDRs (``podCIDRs`` if set, else ``[podCIDR]``, else ``[]``)."""
        if self.pod_cidrs:
            return list(self.pod_cidrs)
        return [self.pod_cidr] if self.pod_cidr else []


class NodeAddress(Tolerant, frozen=True):
    type: NodeAddressType
    address: str


class NodeStatus(Tolerant, frozen=True):
    addresses: list[NodeAddress] = []

    def address(self, kind: NodeAddressType = "InternalIP") -> str:
        """First address of the given type, or ``""``."""
        return next((a.address for a in self.addresses if a.type == kind), "")


class Node(Tolerant, frozen=True, tag_field="kind", tag="Node"):
    api_version: str = "v1"
    metadata: ObjectMeta = ObjectMeta()
    spec: NodeSpec = NodeSpec()
    status: NodeStatus = NodeStatus()
