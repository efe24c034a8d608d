"""Losses between the node executor and the flows service are counted, never silent."""

from __future__ import annotations

from ciliary import schema
from services.flows.core import FlowsCore
from tests.unit.test_flows_scenario import scenario_batch


def batch(seq: int, node: str = "node-1", lost: int = 0) -> bytes:
    b = scenario_batch()
    return schema.encode(schema.RawEventBatch(cluster=b.cluster, node=node, events=b.events[:2],
                                              boot_time_ns=b.boot_time_ns, seq=seq, lost=lost))


def lost(core: FlowsCore) -> dict[str, float]:
    return {dict(k)["source"]: v for k, v in core.metrics.counters["hubble_lost_events_total"].items()}


def test_sequence_gaps_are_counted_per_node() -> None:
    core = FlowsCore("default")
    for seq in (1, 2, 5):  # 3 and 4 never arrived
        core.ingest(batch(seq))
    core.ingest(batch(10, node="node-2"))  # first batch of a node: no gap
    core.ingest(batch(11, node="node-2"))
    assert lost(core) == {"bus": 2} and core.missed_batches == 2 and core.lost == 2


def test_restart_and_unsequenced_batches_are_not_gaps() -> None:
    core = FlowsCore("default")
    core.ingest(batch(7))
    core.ingest(batch(1))  # the executor restarted
    core.ingest(batch(0, lost=3))  # seq 0: not tracked; ring-buffer losses still counted
    core.ingest(batch(2))
    assert lost(core) == {"perf_event_ring_buffer": 3} and core.lost == 3


def test_undecodable_payload_is_counted() -> None:
    core = FlowsCore("default")
    assert core.ingest(b"\x00garbage") == []
    assert lost(core) == {"decode": 1}
    text = core.metrics.render()
    assert 'hubble_lost_events_total{source="decode"} 1' in text
