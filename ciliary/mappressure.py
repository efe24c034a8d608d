"""Map pressure: how full a node's BPF maps are, and when that is an alert.

Pure. The fill of every map the node executor writes is in its health detail (``maps``:
``{name: {entries, max, fill}}``, and ``map_pressure_max``); ``ciliary status`` warns from
it, ``ciliary preflight`` checks it, and ``ciliary metrics`` exports it as
``ciliary_bpf_map_pressure`` (alert on the same thresholds in Prometheus).

Invariants:
- Bands: ``ok`` below ``WARN`` (80 %), ``warn`` from 80 %, ``critical`` from ``CRITICAL``
  (95 %). Cilium's map-pressure guidance alerts at 90 %; ciliary warns earlier because a
  full map fails writes (a policy or service that does not fit is not enforced), and
  critical leaves 5 % for a burst.
- ``map_alerts`` lists every map at ``warn`` or ``critical`` on every node, critical
  first, then by fill; a report without ``maps`` gives none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ciliary import schema

WARN = 0.80
CRITICAL = 0.95
OK, WARNING, CRITICAL_BAND = "ok", "warn", "critical"
BANDS = (OK, WARNING, CRITICAL_BAND)


def band(fill: float) -> str:
    if fill >= CRITICAL:
        return CRITICAL_BAND
    if fill >= WARN:
        return WARNING
    return OK


@dataclass(frozen=True)
class MapFill:
    node: str
    map: str
    entries: int
    max_entries: int
    fill: float

    @property
    def band(self) -> str:
        return band(self.fill)


def map_fills(reports: Iterable[schema.HealthReport]) -> list[MapFill]:
    """Every map of every node executor's report, by node then map name."""
    out = []
    for report in reports:
        if report.service != "node":
            continue
        maps: Mapping[str, Any] = report.detail.get("maps") or {}
        for name, m in sorted(maps.items()):
            if not isinstance(m, Mapping) or not m.get("max"):
                continue
            entries, cap = int(m.get("entries") or 0), int(m["max"])
            fill = float(m.get("fill") if m.get("fill") is not None else entries / cap)
            out.append(MapFill(report.node, name, entries, cap, fill))
    return sorted(out, key=lambda f: (f.node, f.map))


def map_alerts(reports: Iterable[schema.HealthReport]) -> list[MapFill]:
    """Maps at ``warn`` or ``critical``: critical first, then the fullest."""
    alerts = [f for f in map_fills(reports) if f.band != OK]
    return sorted(alerts, key=lambda f: (f.band != CRITICAL_BAND, -f.fill, f.node, f.map))


def alert_line(alert: MapFill, setting: str = "") -> str:
    """``critical: node-1 ciliary_policy 15,800/16,384 (96.4%); raise CILIARY_MAP_POLICY``."""
    hint = f"; raise {setting}" if setting else ""
    return (f"{alert.band}: {alert.node or '-'} {alert.map} {alert.entries:,}/{alert.max_entries:,} "
            f"({alert.fill:.1%}){hint}")
