"""Service health: what every service instance answers on ``ciliary.health.<instance>``.

Invariants:
- Each running instance answers ``SUBJECT_HEALTH`` (its own instance name) and
  ``SUBJECT_HEALTH_ALL`` (everyone) with one ``HealthReport`` about itself.
- ``healthy`` is the instance's own verdict; ``watching`` names the buckets/subjects it
  follows and ``detail`` carries service-specific counters, both informational.
"""

from __future__ import annotations

from typing import Any

from .names import DEFAULT_CLUSTER_NAME
from .wire import Record

__all__ = ["HealthReport"]


class HealthReport(Record):
    """Answer of a service instance on ``ciliary.health.<instance>``."""

    service: str
    instance: str
    pid: int
    version: str
    started: float  # unix time
    healthy: bool
    cluster: str = DEFAULT_CLUSTER_NAME
    node: str = ""
    watching: list[str] = []
    detail: dict[str, Any] = {}
