"""Map pressure bands and the warnings ``ciliary status`` prints."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from ciliary import config, mappressure, schema
from ciliary.bus import Message
from ciliary.cli import app, common
from ciliary.status import map_pressure_alerts
from ciliary.testing import FakeBus


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


def test_status_prints_the_warnings_and_keeps_its_exit_code(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    reports = [schema.HealthReport(service=s, instance=s, pid=1, version="0", started=0.0, healthy=True)
               for s in schema.SERVICE_NAMES if s != "node"]
    reports.append(node("node-1", {"ciliary_policy": (16_000, 16_384), "ciliary_lxc": (1, 10)}))
    config.write_instance(tmp_path, config.InstanceState(nats_url="nats://fake", supervisor_pid=os.getpid(),
                                                         nodes=["node-1"]))

    async def with_services(work):
        bus = FakeBus()

        async def on_health(msg: Message) -> None:
            for report in reports:
                await msg.respond(report)

        await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, on_health)
        return await work(bus)

    def status(*args: str) -> tuple[int, str]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(common, "run_with_bus", lambda _args, work: asyncio.run(with_services(work)))
            with pytest.raises(SystemExit) as done:
                app.main(["status", "--data-dir", str(tmp_path), *args])
        return int(done.value.code or 0), capsys.readouterr().out

    code, out = status()
    assert code == 0
    assert out.splitlines()[-1] == ("WARNING map pressure critical: node-1 ciliary_policy 16,000/16,384 (97.7%); "
                                    "raise CILIARY_MAP_POLICY")
    code, out = status("-o", "json")
    alerts = json.loads(out)["map_alerts"]
    assert code == 0 and [(a["map"], a["band"], a["setting"]) for a in alerts] == [
        ("ciliary_policy", "critical", "CILIARY_MAP_POLICY")]
