"""The node executor's request/reply records: endpoint registration and debug views.

Invariants:
- The CNI plugin tells its node executor about a wired (``add``) or removed (``del``)
  endpoint with an ``EndpointRegistration`` on SUBJECT_NODE_ENDPOINT of that node and
  gets an ``EndpointReply`` (the endpoint id on success).
- Each node executor answers ``NodeDebugRequest`` on its SUBJECT_NODE_DEBUG (``ciliary
  bpf …``, ``ciliary endpoint list``) with the rows of one of NODE_DEBUG_VIEWS.
"""

from __future__ import annotations

from typing import Any

from .wire import Record

__all__ = [
    "NODE_DEBUG_VIEWS",
    "EndpointRegistration",
    "EndpointReply",
    "NodeDebugReply",
    "NodeDebugRequest",
]

NODE_DEBUG_VIEWS = ("ct", "ipcache", "policy", "lb", "endpoints", "metrics")


class EndpointRegistration(Record):
    """CNI ADD/DEL telling the node executor about a wired (or removed) endpoint."""

    op: str  # "add" | "del"
    container_id: str
    pod_namespace: str = ""
    pod_name: str = ""
    netns: str = ""
    ifname: str = ""
    host_ifname: str = ""
    host_ifindex: int = 0
    ip: str = ""
    mac: str = ""


class EndpointReply(Record):
    ok: bool
    error: str = ""
    endpoint_id: int = 0


class NodeDebugRequest(Record):
    view: str  # one of NODE_DEBUG_VIEWS
    identity: int = 0  # policy: only entries of this local identity (0 = all)


class NodeDebugReply(Record):
    ok: bool
    node: str = ""
    error: str = ""
    rows: list[dict[str, Any]] = []
