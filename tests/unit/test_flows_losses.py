"""Events that never reached the flows service are counted exactly: gaps in a node
executor's run, restarts of either side, duplicates and late batches."""

from __future__ import annotations

import asyncio
import time

from ciliary import schema
from ciliary.cli.flowrender import FlowPrinter
from ciliary.cli.instance import flows_lost_line
from services.flows.core import FlowsCore
from services.flows.history import HistoryLimits, StreamScan
from services.flows.losses import LOST_BUS, LOST_OUTAGE, NO_GAP, Gap, LossLedger
from services.flows.metrics import LOST_RING_BUFFER
from services.node.events import EventPump
from tests.unit.test_flows_scenario import scenario_batch

NODE = "default/node-1"
RUN = 1_790_000_000_000_000_000


class Executor:
    """A node executor's batches: sizes and ring-buffer losses in, positioned batches out."""

    def __init__(self, run: int = RUN, node: str = "node-1") -> None:
        self.run, self.node, self.seq, self.events_total, self.lost_total = run, node, 0, 0, 0

    def batch(self, events: int, lost: int = 0) -> schema.RawEventBatch:
        self.seq += 1
        self.events_total += events
        self.lost_total += lost
        template = scenario_batch()
        raws = (template.events * (events // len(template.events) + 1))[:events]
        return schema.RawEventBatch(cluster="default", node=self.node, events=raws, lost=lost,
                                    boot_time_ns=template.boot_time_ns, seq=self.seq, run=self.run,
                                    events_total=self.events_total, lost_total=self.lost_total)


def lost(core: FlowsCore) -> dict[str, int]:
    return core.lost_by_source()


def test_consecutive_batches_have_no_gap() -> None:
    ledger, ex = LossLedger(), Executor()
    assert [ledger.account(NODE, ex.batch(n)) for n in (3, 5, 1)] == [NO_GAP] * 3


def test_missing_batches_count_their_events_and_ring_losses_exactly() -> None:
    ledger, ex = LossLedger(), Executor()
    ledger.account(NODE, ex.batch(3))
    ex.batch(7, lost=2), ex.batch(4)  # never arrive
    assert ledger.account(NODE, ex.batch(5, lost=1)) == Gap(LOST_BUS, events=11, ring_lost=2, batches=2)
    assert ledger.account(NODE, ex.batch(1)) == NO_GAP


def test_the_first_batch_without_a_position_counts_nothing() -> None:
    ledger, ex = LossLedger(), Executor()
    ex.batch(100)  # before the service started: unknowable without a stored position
    assert ledger.account(NODE, ex.batch(2)) == NO_GAP
    ledger.restore("default/node-2", None)  # nothing stored for that node either
    assert ledger.account("default/node-2", Executor(node="node-2").batch(4)) == NO_GAP


def test_a_restored_position_makes_the_outage_a_counted_loss() -> None:
    ex = Executor()
    before = LossLedger()
    before.account(NODE, ex.batch(3))
    stored = before.positions[NODE]
    ex.batch(6), ex.batch(2, lost=4)  # published while the flows service was down
    after = LossLedger()  # the restarted service
    assert after.needs_restore(NODE)
    after.restore(NODE, stored)
    assert not after.needs_restore(NODE)
    assert after.account(NODE, ex.batch(1)) == Gap(LOST_OUTAGE, events=8, ring_lost=4, batches=2)
    ex.batch(9)  # a later gap, while the service runs, is the bus's
    assert after.account(NODE, ex.batch(1)) == Gap(LOST_BUS, events=9, ring_lost=0, batches=1)


def test_a_restored_position_that_is_current_counts_nothing() -> None:
    ex = Executor()
    ledger = LossLedger()
    first = ex.batch(3)
    ledger.restore(NODE, schema.BatchPosition(run=first.run, seq=first.seq, events_total=first.events_total))
    assert ledger.account(NODE, ex.batch(2)) == NO_GAP
    assert ledger.account(NODE, first) == NO_GAP  # the stored batch again: a duplicate


def test_an_executor_restart_counts_only_what_the_new_run_sent_before() -> None:
    ledger, old = LossLedger(), Executor()
    ledger.account(NODE, old.batch(3))
    old.batch(50)  # the old run's tail: cannot be known once the run is gone
    new = Executor(run=RUN + 10**9)
    assert ledger.account(NODE, new.batch(4)) == NO_GAP  # seq 1 of the new run: nothing before
    newer = Executor(run=RUN + 2 * 10**9)
    newer.batch(6, lost=1)  # the newer run's first batch never arrives
    assert ledger.account(NODE, newer.batch(2)) == Gap(LOST_BUS, events=6, ring_lost=1, batches=0)


def test_stale_runs_duplicates_and_late_batches_count_nothing_and_keep_the_position() -> None:
    ledger, ex = LossLedger(), Executor()
    one, two, three = ex.batch(1), ex.batch(2), ex.batch(3)
    ledger.account(NODE, one)
    assert ledger.account(NODE, three) == Gap(LOST_BUS, events=2, ring_lost=0, batches=1)
    assert ledger.account(NODE, two) == NO_GAP  # late: already counted when the gap was seen
    assert ledger.account(NODE, three) == NO_GAP  # duplicate
    stale = Executor(run=RUN - 1)
    stale.batch(40)
    assert ledger.account(NODE, stale.batch(1)) == NO_GAP  # an older run still publishing
    assert ledger.positions[NODE].seq == 3 and ledger.positions[NODE].run == RUN
    assert ledger.account(NODE, ex.batch(5)) == NO_GAP


def test_unsequenced_and_legacy_batches() -> None:
    ledger = LossLedger()
    legacy = [schema.RawEventBatch(cluster="default", node="node-1", seq=s) for s in (1, 2, 5, 1)]
    gaps = [ledger.account(NODE, b) for b in legacy]
    assert gaps == [NO_GAP, NO_GAP, Gap(LOST_BUS, events=2, ring_lost=0, batches=2), NO_GAP]
    assert ledger.account(NODE, schema.RawEventBatch(cluster="default", node="node-1", lost=3)) == NO_GAP
    ledger.restore("default/node-2", schema.BatchPosition(seq=4))  # no run: not a usable position
    assert "default/node-2" not in ledger.positions


def test_core_counts_records_and_answers_with_lost_events() -> None:
    core, ex = FlowsCore("default"), Executor()
    core.ingest_raw(ex.batch(2))
    ex.batch(5, lost=1)
    got = core.ingest_raw(ex.batch(2, lost=2))
    assert got.position == schema.BatchPosition(run=RUN, seq=3, events_total=9, lost_total=3)
    assert lost(core) == {LOST_BUS: 5, LOST_RING_BUFFER: 3} and core.lost == 8 and core.missed_batches == 1
    reply = schema.decode(core.query_chunks(schema.encode(schema.FlowQuery()), 1 << 20)[-1], schema.FlowQueryReply)
    assert [(e.source, e.num_events_lost, e.node_name) for e in reply.lost_events] == [
        ("BUS", 5, NODE), ("PERF_EVENT_RING_BUFFER", 1, NODE), ("PERF_EVENT_RING_BUFFER", 2, NODE)]
    plan = core.plan_query(schema.encode(schema.FlowQuery(since_ns=reply.lost_events[-1].time_ns + 1)))
    assert not isinstance(plan, schema.FlowQueryReply)
    final = schema.decode(list(core.answer_chunks(plan, 1 << 20))[-1], schema.FlowQueryReply)
    assert final.lost_events == []  # noticed before the answer's span


def test_every_positioned_batch_leaves_a_stored_message() -> None:
    core, ex = FlowsCore("default"), Executor()
    got = core.ingest_raw(ex.batch(0, lost=4))  # no events, only losses: still a position
    assert got.flows == [] and got.position is not None
    (message,) = core.publish_payloads(got.flows, 1 << 20, got.position)
    assert schema.decode(message, schema.FlowBatch) == schema.FlowBatch(position=got.position)
    got = core.ingest_raw(ex.batch(3))
    (whole,) = core.publish_payloads(got.flows, 1 << 20, got.position)
    messages = core.publish_payloads(got.flows, len(whole) - 1, got.position)
    assert len(messages) > 1  # split: every part carries the position
    assert {schema.decode(m, schema.FlowBatch).position for m in messages} == {got.position}
    assert core.publish_payloads([], 1 << 20, None) == []


def test_lost_events_print_as_hubble_does() -> None:
    record = schema.LostEvent(source="OBSERVER_EVENTS_QUEUE", num_events_lost=12, node_name=NODE,
                              time_ns=1_790_000_000_123_456_789)
    assert FlowPrinter("compact").write_lost(record) == "EVENTS LOST: OBSERVER_EVENTS_QUEUE CPU(0) 12"
    assert FlowPrinter("json").write_lost(record) == (
        '{"lost_events":{"source":"OBSERVER_EVENTS_QUEUE","num_events_lost":"12"},'
        '"node_name":"default/node-1","time":"2026-09-21T14:13:20.123456789Z"}')
    table = FlowPrinter("table")
    assert table.write_lost(record) is None
    assert table.close() == "EVENTS LOST: OBSERVER_EVENTS_QUEUE CPU(0) 12"


async def test_the_executor_positions_its_batches_and_takes_back_an_unpublished_one() -> None:
    pump = EventPump(asyncio.get_running_loop(), "default", 1, "node-1")
    events = scenario_batch().events
    first = pump.batch(events[:2], kernel_lost_total=1)
    failed = pump.batch(events[:3], kernel_lost_total=1)
    pump.unpublished(failed)
    third = pump.batch(events[:1], kernel_lost_total=3)
    assert (first.run, first.seq, first.events_total, first.lost_total) == (pump.run, 1, 2, 1)
    # the failed batch's 3 events are reported lost by the next one, which takes its seq
    assert (third.seq, third.events_total, third.lost, third.lost_total) == (2, 3, 5, 6)
    ledger = LossLedger()
    assert [ledger.account(NODE, b) for b in (first, third)] == [NO_GAP, NO_GAP]


def test_stored_batches_with_a_position_are_read_as_history() -> None:
    core, ex = FlowsCore("default"), Executor()
    got = core.ingest_raw(ex.batch(3))
    (message,) = core.publish_payloads(got.flows, 1 << 20, got.position)
    scan = StreamScan(schema.FlowQuery(), 0, HistoryLimits())
    assert scan.feed(message, time.time_ns())
    assert scan.undecodable == 0 and [u for _, u, _ in scan.entries()] == [f.uuid for f in got.flows]


def test_status_names_the_flows_losses_by_source() -> None:
    def report(detail: dict) -> schema.HealthReport:
        return schema.HealthReport(service="flows", instance="flows", pid=1, version="1", started=0.0,
                                   healthy=True, detail=detail)

    assert flows_lost_line([report({"flows": {"seen": 5, "lost": 0}})]) == ""
    line = flows_lost_line([report({"flows": {"seen": 5, "lost": 32, "lost_by_source": {
        "observer_events_queue": 26, "bus": 6}}})])
    assert line.startswith("flows lost 32 events (bus 6, observer_events_queue 26)")
