"""Leader election over a ``coordination.k8s.io/v1`` Lease: the pure decisions.

Invariants (client-go's leader election, which this follows):
- A candidate takes the lease only when it is absent, released (no holder), held by
  itself, or expired: its record (holder, renew time, transitions) has not changed for
  ``leaseDurationSeconds`` of the candidate's own clock since it last saw it change. The
  holder's timestamps are never compared with the local clock (clocks may differ).
- Every write is an update against the resourceVersion read (or a create), so of two
  candidates at most one succeeds; the other gets 409 and reads again.
- A leader counts as leader only until ``renew_deadline`` (< lease duration) after its last
  successful renewal: it stops writing before any other candidate may take over.
- Releasing keeps the record but clears the holder, so the next candidate need not wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Action = Literal["create", "renew", "acquire", "wait"]


def micro_time(now: datetime | None = None) -> str:
    """Kubernetes' MicroTime: ``2026-12-06T10:00:00.123456Z``."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseView:
    holder: str
    duration: float
    renew_time: str
    transitions: int
    resource_version: str

    @property
    def record(self) -> tuple[str, str, int]:
        """What changes when anyone renews or takes the lease."""
        return self.holder, self.renew_time, self.transitions

    @classmethod
    def of(cls, lease: dict[str, Any]) -> LeaseView:
        spec = lease.get("spec") or {}
        meta = lease.get("metadata") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=float(spec.get("leaseDurationSeconds") or 0),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str(meta.get("resourceVersion") or ""),
        )


def decide(view: LeaseView | None, identity: str, *, now: float,
           observed_at: float) -> Action:
    """What a candidate does with the lease it just read. ``observed_at``: when (local
    monotonic clock) it first saw the lease record as it is now."""
    if view is None:
        return "create"
    if view.holder == identity:
        return "renew"
    if not view.holder or now >= observed_at + view.duration:
        return "acquire"
    return "wait"


def lease_body(namespace: str, name: str, identity: str, duration: float, *,
               previous: LeaseView | None = None, acquire: bool = False,
               now: datetime | None = None, release: bool = False) -> dict[str, Any]:
    """The Lease to create (``previous`` None) or to update over ``previous``."""
    stamp = micro_time(now)
    spec: dict[str, Any] = {
        "holderIdentity": "" if release else identity,
        "leaseDurationSeconds": 1 if release else max(1, round(duration)),
        "renewTime": stamp,
    }
    transitions = previous.transitions if previous else 0
    if previous is None or acquire:
        spec["acquireTime"] = stamp
        if previous is not None:
            transitions += 1
    spec["leaseTransitions"] = transitions
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if previous is not None:
        metadata["resourceVersion"] = previous.resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": spec}
