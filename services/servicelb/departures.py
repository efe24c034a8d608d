"""Pods that left the store stay terminating endpoints for their grace period.

A deleted Pod vanishes from bucket ``resources`` at once (there is no two-phase deletion
with ``deletionTimestamp``), while its processes keep running until the node executor
has stopped them. Kubernetes keeps such a pod's endpoint as ``terminating`` until the
pod is gone; this module does the same for servicelb, so a deletion takes the backend
out of the slots (no new connections) but keeps it in the backend list, and connections
that were already established finish on it instead of being re-balanced mid-stream.

Pure code over plain data; time is whatever the caller passes as ``now`` (seconds,
monotonic).

Invariants:
- A pod that was seen with a pod IP and is no longer in the inputs becomes departed
  until ``now + terminationGracePeriodSeconds`` (default 30, at most
  ``MAX_GRACE_S``); pods that never had an IP or had finished (Succeeded/Failed) are
  forgotten.
- A departed pod is added to the inputs with its last manifest and last status that had
  a pod IP, marked ``terminating`` and not ready, so the model makes it a terminating,
  not-serving backend: never in the slots, not even as the terminating fallback (the
  pod is going away).
- A pod of the same namespace/name that appears again replaces the departed one.
- State is in memory only: a restarted servicelb no longer knows departed pods, which
  then simply are no backends (as before this module existed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.servicelb.model import Inputs, Ref

DEFAULT_GRACE_S = 30.0
MAX_GRACE_S = 300.0


@dataclass
class Departed:
    manifest: dict[str, Any]
    status: dict[str, Any]
    until: float
    effective: dict[str, Any] | None = None  # the status it stands in the inputs with


@dataclass
class Departures:
    seen: dict[Ref, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    departed: dict[Ref, Departed] = field(default_factory=dict)

    def apply(self, inputs: Inputs, now: float) -> float | None:
        """Record the live pods of ``inputs``, add the departed ones to it, and return when
        the next departed pod expires (None: none left)."""
        for ref, manifest in inputs.pods.items():
            self.observe(ref, manifest, inputs.pod_status.get(ref))
        for ref in [r for r in self.seen if r not in inputs.pods]:
            self.gone(ref, now)
        self.expire(now)
        for ref in self.departed:
            inputs.pods[ref], inputs.pod_status[ref] = self.effective(ref)
        return self.next_expiry()

    # ------------------------------------------------------------------ one pod at a time

    def observe(self, ref: Ref, manifest: dict[str, Any], status: dict[str, Any] | None) -> None:
        """``ref`` is a live pod with this manifest and status (from the status bucket)."""
        self.departed.pop(ref, None)
        status = status or _own_status(manifest)
        if not _pod_ip(status):
            previous = self.seen.get(ref)
            status = previous[1] if previous and _uid(previous[0]) == _uid(manifest) else status
        self.seen[ref] = (manifest, status)

    def gone(self, ref: Ref, now: float) -> None:
        """``ref`` is no longer a live pod: it departs if it was running with an IP."""
        if ref not in self.seen:
            return
        manifest, status = self.seen.pop(ref)
        if _pod_ip(status) and status.get("phase") not in ("Succeeded", "Failed"):
            self.departed[ref] = Departed(manifest, status, now + grace_seconds(manifest))

    def expire(self, now: float) -> list[Ref]:
        """Forget the departed pods whose grace period has ended; their refs."""
        ended = [r for r, d in self.departed.items() if d.until <= now]
        for ref in ended:
            del self.departed[ref]
        return ended

    def effective(self, ref: Ref) -> tuple[dict[str, Any], dict[str, Any]]:
        """A departed pod's manifest and the status it stands in the inputs with."""
        gone = self.departed[ref]
        if gone.effective is None:
            gone.effective = {**gone.status, "terminating": True,
                              "conditions": [{"type": "Ready", "status": "False"}]}
        return gone.manifest, gone.effective

    def next_expiry(self) -> float | None:
        return min((d.until for d in self.departed.values()), default=None)


def grace_seconds(manifest: dict[str, Any]) -> float:
    spec = manifest.get("spec") or {}
    value = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = DEFAULT_GRACE_S
    return min(max(seconds, 0.0), MAX_GRACE_S)


def _own_status(manifest: dict[str, Any]) -> dict[str, Any]:
    status = manifest.get("status")
    return status if isinstance(status, dict) else {}


def _pod_ip(status: dict[str, Any]) -> str:
    return str(status.get("podIP") or "")


def _uid(manifest: dict[str, Any]) -> str:
    return str((manifest.get("metadata") or {}).get("uid") or "")
