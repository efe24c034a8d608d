"""Map pressure bands and the alerts ``ciliary status`` prints."""

from __future__ import annotations

from ciliary import mappressure, schema
from ciliary.status import map_pressure_alerts


def node(name: str, maps: dict[str, tuple[int, int]]) -> schema.HealthReport:
    detail = {"maps": {m: {"entries": e, "max": cap, "fill": e / cap} for m, (e, cap) in maps.items()}}
    return schema.HealthReport(service="node", instance=f"node-{name}", pid=1, version="0", started=0.0,
                               healthy=True, node=name, detail=detail)


def test_bands_at_the_thresholds() -> None:
    assert mappressure.band(0.0) == mappressure.band(0.7999) == "ok"
    assert mappressure.band(0.80) == mappressure.band(0.9499) == "warn"
    assert mappressure.band(0.95) == mappressure.band(1.0) == "critical"


def test_alerts_are_critical_first_then_fullest() -> None:
    reports = [
        node("node-1", {"ciliary_policy": (13_200, 16_384), "ciliary_lxc": (10, 65_535)}),
        node("node-2", {"ciliary_lb4_services": (63_000, 65_536), "ciliary_policy": (14_000, 16_384)}),
        schema.HealthReport(service="identity", instance="identity", pid=2, version="0", started=0.0,
                            healthy=True, detail={"maps": "not a node"}),
        schema.HealthReport(service="node", instance="node-node-3", pid=3, version="0", started=0.0,
                            healthy=True, node="node-3"),
    ]
    alerts = mappressure.map_alerts(reports)
    assert [(a.node, a.map, a.band) for a in alerts] == [
        ("node-2", "ciliary_lb4_services", "critical"),
        ("node-2", "ciliary_policy", "warn"),
        ("node-1", "ciliary_policy", "warn"),
    ]
    assert len(mappressure.map_fills(reports)) == 4
    assert mappressure.alert_line(alerts[0], "CILIARY_MAP_LB") == (
        "critical: node-2 ciliary_lb4_services 63,000/65,536 (96.1%); raise CILIARY_MAP_LB")


def test_status_alerts_carry_the_setting() -> None:
    alerts = map_pressure_alerts([node("node-1", {"ciliary_policy": (15_000, 16_384), "ciliary_lxc": (1, 10)})])
    assert [a["map"] for a in alerts] == ["ciliary_policy"]
    assert alerts[0]["setting"] == "CILIARY_MAP_POLICY" and alerts[0]["band"] == "warn"
    assert alerts[0]["message"].endswith("raise CILIARY_MAP_POLICY")
    assert map_pressure_alerts([node("node-1", {"ciliary_policy": (1, 16_384)})]) == []
