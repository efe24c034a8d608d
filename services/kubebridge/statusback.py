"""What the bridge writes back to the API server about policies: CNP/CCNP status, Events.

Invariants:
- Pure: inputs are the policy service's status payload for the object (bucket
  ``status``), the nodes running an endpoint of a selected identity (from ``ipcache``)
  and the bridge's own rejection; no clock (timestamps are the caller's).
- The status is Cilium's shape: ``conditions`` with one ``Valid`` condition (``False``
  with the error for a rejected or failing policy) and ``nodes.<node>`` with ``ok``,
  ``enforcing``, ``revision`` (the generation the policy service resolved) and ``error``.
  ``content`` leaves out timestamps so that an unchanged status is never rewritten.
- A merge patch from one status to the next sets nodes no longer present to null.
- An Event names the object it is about (``involvedObject`` with uid and
  resourceVersion) and goes to the object's namespace, ``default`` for cluster-scoped
  objects; ``event_key`` is what makes it once per object version and reason.
"""

from __future__ import annotations

from typing import Any

from .kinds import BY_KIND
from .translate import ObjectRef

COMPONENT = "ciliary-kubebridge"


def cnp_status(policy: dict[str, Any] | None, generation: int, nodes: set[str],
               rejected: str = "") -> dict[str, Any]:
    """The status content (no timestamps) a CNP/CCNP should show."""
    if rejected:
        return {"conditions": [{"type": "Valid", "status": "False", "reason": "Invalid",
                                "message": rejected}], "nodes": {}}
    if policy is None:
        return {"conditions": [{"type": "Valid", "status": "Unknown", "reason": "Pending",
                                "message": "not resolved by the policy service yet"}],
                "nodes": {}}
    state = str(policy.get("state") or "")
    error = str(policy.get("error") or "")
    warnings = [str(w) for w in policy.get("warnings") or []]
    ok = state != "error"
    message = error if not ok else "Policy validation succeeded" + (
        f" ({len(warnings)} warnings: {'; '.join(warnings)})" if warnings else "")
    node_status: dict[str, Any] = {}
    for node in sorted(nodes):
        entry: dict[str, Any] = {"ok": ok, "enforcing": ok, "revision": generation}
        if error:
            entry["error"] = error
        node_status[node] = entry
    return {"conditions": [{"type": "Valid", "status": "True" if ok else "False",
                            "reason": "Valid" if ok else "Error", "message": message}],
            "nodes": node_status}


def with_timestamps(content: dict[str, Any], now: str) -> dict[str, Any]:
    conditions = [{**c, "lastTransitionTime": now} for c in content.get("conditions") or []]
    nodes = {n: {**v, "lastUpdated": now} for n, v in (content.get("nodes") or {}).items()}
    return {"conditions": conditions, "nodes": nodes}


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status ``old`` into ``new``."""
    nodes: dict[str, Any] = dict(new.get("nodes") or {})
    for gone in (old or {}).get("nodes") or {}:
        nodes.setdefault(gone, None)
    return {"status": {"conditions": new.get("conditions") or [], "nodes": nodes}}


def enforcing_nodes(selected: list[int], pod_nodes: dict[int, set[str]]) -> set[str]:
    out: set[str] = set()
    for identity in selected:
        out |= pod_nodes.get(identity, set())
    return out


def event_key(ref: ObjectRef, reason: str) -> tuple[str, str, str, str, str]:
    return ref.kind, ref.namespace, ref.name, ref.resource_version, reason


def event_body(ref: ObjectRef, reason: str, message: str, *, now: str,
               instance: str) -> dict[str, Any]:
    """A ``v1`` Event about ``ref`` (type Warning)."""
    namespace = ref.namespace or "default"
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{ref.name}.", "namespace": namespace},
        "involvedObject": {"apiVersion": BY_KIND[ref.kind].api_version, "kind": ref.kind,
                           "name": ref.name, **({"namespace": ref.namespace} if ref.namespace else {}),
                           "uid": ref.uid, "resourceVersion": ref.resource_version},
        "reason": reason, "message": message[:1024], "type": "Warning",
        "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
        "reportingInstance": instance, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
