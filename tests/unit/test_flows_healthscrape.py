"""The flows service's health scrape over the in-memory bus: what it renders, and that an
instance missing from one answer keeps its series until it has been missing for a while."""

from __future__ import annotations

from ciliary import schema
from ciliary.bus import Message
from ciliary.testing import FakeBus
from services.flows.healthscrape import FORGET_AFTER, HealthScrape


def report(service: str, node: str = "", **detail: object) -> schema.HealthReport:
    return schema.HealthReport(service=service, instance=f"{service}-{node}" if node else service, pid=1,
                               version="0", started=0.0, healthy=True, cluster="c1", node=node, detail=detail)


async def test_reports_are_kept_through_a_missed_answer() -> None:
    bus = FakeBus()
    answering = {"identity": True}

    async def node(msg: Message) -> None:
        await msg.respond(report("node", "node-1", endpoints=2,
                                 maps={"ciliary_policy": {"entries": 1, "max": 4, "fill": 0.25}}))

    async def identity(msg: Message) -> None:
        if answering["identity"]:
            await msg.respond(report("identity", identities=5, last_pass_ms=2.0,
                                     recent_passes=[{"start": 1.0, "ms": 2.0}]))

    await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, node)
    await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, identity)
    scrape = HealthScrape(bus, max_age=0)
    text = await scrape.text()
    assert 'ciliary_bpf_map_pressure{map_name="ciliary_policy",node="node-1"} 0.25\n' in text
    assert 'ciliary_identity{cluster="c1",instance="identity"} 5\n' in text
    assert 'ciliary_controlplane_pass_duration_seconds_count{service="identity"} 1\n' in text

    answering["identity"] = False
    for _ in range(FORGET_AFTER - 1):
        assert 'ciliary_identity{cluster="c1",instance="identity"} 5\n' in await scrape.text()
    text = await scrape.text()
    assert "ciliary_identity{" not in text
    assert 'ciliary_endpoint{node="node-1"} 2\n' in text
    # the histogram keeps what it counted (a counter never goes back)
    assert 'ciliary_controlplane_pass_duration_seconds_count{service="identity"} 1\n' in text
