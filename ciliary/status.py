"""Client side of ``ciliary status``: who is running, and are they healthy.

Invariants:
- The answer comes from the services themselves (scatter-gather on ``ciliary.health``),
  never from the supervisor's bookkeeping, so it is equally true for an embedded instance
  and for services running as Kubernetes Deployments.
- Map pressure alerts are the maps of the node executors' reports at or above
  ``ciliary.mappressure.WARN``, each with the ``CILIARY_MAP_<NAME>`` setting that raises it
  (``ciliary.preflight.sizing``); they warn, they do not make a service unhealthy.
- `resource_source` says where bucket ``resources`` comes from: an API server when a
  kube bridge reports (its URL, and which instance holds the lease), else ``embedded``
  (written by ``ciliary apply``).
"""

from __future__ import annotations

import logging

import msgspec

from ciliary import mappressure, schema
from ciliary.bus import Bus
from ciliary.preflight.sizing import MAPS_BY_NAME

log = logging.getLogger(__name__)


async def gather_health(bus: Bus, *, timeout: float = 1.0) -> list[schema.HealthReport]:
    """Every service instance's health report, sorted by service then instance."""
    reports: dict[str, schema.HealthReport] = {}
    for raw in await bus.request_many(schema.SUBJECT_HEALTH_ALL, timeout=timeout):
        try:
            report = schema.decode(raw, schema.HealthReport)
        except msgspec.DecodeError as err:
            log.warning("ignoring malformed health report: %s", err)
            continue
        reports[report.instance] = report
    order = {name: i for i, name in enumerate(schema.SERVICE_NAMES)}
    return sorted(reports.values(), key=lambda r: (order.get(r.service, 99), r.instance))


def missing_or_unhealthy(reports: list[schema.HealthReport], nodes: list[str]) -> list[str]:
    """Names of expected services (``identity``, ``node/node-1``…) not reporting healthy."""
    healthy = {
        f"node/{r.node}" if r.service == "node" else r.service for r in reports if r.healthy
    }
    expected = [name for name in schema.SERVICE_NAMES if name != "node"]
    expected += [f"node/{node}" for node in nodes]
    return [name for name in expected if name not in healthy]


def map_pressure_alerts(reports: list[schema.HealthReport]) -> list[dict[str, object]]:
    """Every map at ``warn`` or ``critical`` (critical first), with the setting that raises it."""
    out: list[dict[str, object]] = []
    for alert in mappressure.map_alerts(reports):
        spec = MAPS_BY_NAME.get(alert.map)
        setting = spec.setting if spec else ""
        out.append({"node": alert.node, "map": alert.map, "entries": alert.entries,
                    "max_entries": alert.max_entries, "fill": round(alert.fill, 6), "band": alert.band,
                    "setting": setting, "message": mappressure.alert_line(alert, setting)})
    return out


KUBEBRIDGE = "kubebridge"


def resource_source(reports: list[schema.HealthReport]) -> dict[str, object]:
    """``{"mode": "embedded"}`` or ``{"mode": "apiserver", "apiserver": URL, "leader": ...}``."""
    bridges = [r for r in reports if r.service == KUBEBRIDGE]
    if not bridges:
        return {"mode": "embedded"}
    leader = next((r.instance for r in bridges if r.detail.get("leader")), "")
    urls = sorted({str(r.detail.get("apiserver") or "") for r in bridges} - {""})
    return {"mode": "apiserver", "apiserver": ", ".join(urls), "leader": leader,
            "replicas": len(bridges)}


def resource_source_line(source: dict[str, object]) -> str:
    if source.get("mode") != "apiserver":
        return "resources: embedded (written by ciliary apply)"
    leader = source.get("leader") or "none yet"
    return (f"resources: Kubernetes API server {source.get('apiserver')} "
            f"(kube bridge leader {leader}, {source.get('replicas')} replicas)")
