"""Pure parts of flow history beyond the rings (services/flows/history.py) and the rings'
horizon (store.py): when the stream is needed, where reading starts and stops, the scan
bound, and merging with the rings' answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest

from ciliary import schema
from services.flows import core as service
from services.flows.core import FlowsCore
from services.flows.history import (
    ENV_MARGIN,
    ENV_MAX_SCAN,
    HistoryLimits,
    StreamScan,
    merge,
    needs_stream,
    read_history,
    start_time_ns,
)
from services.flows.store import NO_HORIZON, FlowStore

S = 10**9
T0 = 1_790_000_000 * S
LIMITS = HistoryLimits(max_scan=1000, margin_ns=5 * S)


def stamp(t: int) -> str:
    secs, ns = divmod(t, S)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


def flow(t: int, node: str = "c/n1", uuid: str = "", verdict: str = "FORWARDED") -> schema.Flow:
    return schema.Flow(time=stamp(t), uuid=uuid or f"{node}-{t}", node_name=node, verdict=verdict)


def batch(*flows: schema.Flow) -> bytes:
    return schema.encode(schema.FlowBatch(flows=list(flows)))


def timed(flows: Sequence[schema.Flow]) -> list[tuple[int, schema.Flow]]:
    from ciliary.hubble import flow_time_ns

    return [(flow_time_ns(f), f) for f in flows]


def uuids(items: Sequence[tuple[int, schema.Flow]] | Sequence[schema.Flow]) -> list[str]:
    return [(i[1] if isinstance(i, tuple) else i).uuid for i in items]


# ---------------------------------------------------------------- settings and planning


def test_limits_from_env() -> None:
    assert HistoryLimits.from_env({}) == HistoryLimits()
    got = HistoryLimits.from_env({ENV_MAX_SCAN: "500", ENV_MARGIN: "2.5"})
    assert got == HistoryLimits(max_scan=500, margin_ns=2_500_000_000)
    assert not HistoryLimits.from_env({ENV_MAX_SCAN: "0"}).enabled
    with pytest.raises(ValueError, match=ENV_MAX_SCAN):
        HistoryLimits.from_env({ENV_MAX_SCAN: "lots"})
    with pytest.raises(ValueError, match=ENV_MARGIN):
        HistoryLimits.from_env({ENV_MARGIN: "-1"})


def test_needs_stream() -> None:
    horizon = T0 + 100
    ring = timed([flow(T0 + 100 + i) for i in range(10)])  # the rings hold every flow from the horizon on
    q = schema.FlowQuery
    assert not needs_stream(q(), ring, 0), "the rings hold everything"
    assert needs_stream(q(), ring, horizon), "--all wants the whole retained history"
    assert needs_stream(q(number=5, first=True), ring, horizon), "--first N: the oldest are in the stream"
    assert needs_stream(q(until_ns=T0 + 150), ring, horizon), "--until alone starts at the beginning"
    assert needs_stream(q(since_ns=T0 + 99), ring, horizon)
    assert not needs_stream(q(since_ns=T0 + 100), ring, horizon)
    assert not needs_stream(q(since_ns=T0 + 50, until_ns=T0 + 60), ring, 0)
    assert not needs_stream(q(number=20, rings_only=True), ring[:3], horizon), "the default --last 20"
    assert not needs_stream(q(since_ns=T0 + 100, number=3, first=True), ring, horizon)
    assert not needs_stream(q(since_ns=T0 + 200, until_ns=T0 + 100), ring, horizon), "an empty range"
    # --last N: the rings answer when their newest N all lie after the horizon
    assert not needs_stream(q(number=10), ring, horizon)
    assert needs_stream(q(number=11), ring[:10], horizon)
    assert needs_stream(q(number=10), timed([flow(T0 + 99)]) + ring[1:], horizon)


def test_start_time() -> None:
    assert start_time_ns(0, 5 * S) == 0, "no since: from the first message"
    assert start_time_ns(T0, 5 * S) == T0 - 5 * S
    assert start_time_ns(3 * S, 5 * S) == 0


def test_store_horizon() -> None:
    store = FlowStore(capacity=3)
    assert store.horizon_ns() == 0
    store.add_batch("c/n1", [T0 + 1, T0 + 2, T0 + 3], [flow(T0 + i) for i in (1, 2, 3)])
    store.add_batch("c/n2", [T0 + 5], [flow(T0 + 5, "c/n2")])
    assert store.horizon_ns() == 0, "nothing overwritten yet"
    store.add_batch("c/n1", [T0 + 4, T0 + 6], [flow(T0 + 4), flow(T0 + 6)])  # n1 keeps 3, 4, 6
    assert store.horizon_ns() == T0 + 3
    store.history_before = True  # a restart: every ring may lack older flows
    assert store.horizon_ns() == T0 + 5
    assert FlowStore(capacity=3).horizon_ns() == 0
    fresh = FlowStore(capacity=3)
    fresh.history_before = True
    assert fresh.horizon_ns() == NO_HORIZON


# ---------------------------------------------------------------- scanning


def test_scan_keeps_matching_flows_before_the_horizon_in_time_order() -> None:
    q = schema.FlowQuery(since_ns=T0 + 2, whitelist=[schema.FlowFilter(verdict=["FORWARDED"])])
    scan = StreamScan(q, T0 + 50, LIMITS)
    # two nodes interleaved in arrival order, not in time order across nodes
    assert scan.feed(batch(flow(T0 + 1), flow(T0 + 3), flow(T0 + 5, verdict="DROPPED")), T0 + 6)
    assert scan.feed(batch(flow(T0 + 2, "c/n2"), flow(T0 + 4, "c/n2")), T0 + 6)
    assert scan.feed(batch(flow(T0 + 49), flow(T0 + 50), flow(T0 + 51)), T0 + 61)
    assert uuids(scan.timed()) == [f"c/n2-{T0 + 2}", f"c/n1-{T0 + 3}", f"c/n2-{T0 + 4}", f"c/n1-{T0 + 49}",
                                   f"c/n1-{T0 + 50}"], "up to the horizon (a tie the ring overwrote)"
    assert scan.scanned == 8 and not scan.truncated


def test_scan_until_and_stop_position() -> None:
    q = schema.FlowQuery(until_ns=T0 + 10 * S)
    scan = StreamScan(q, NO_HORIZON, LIMITS)
    assert scan.feed(batch(flow(T0 + 9 * S)), T0 + 9 * S + 1000)
    assert scan.feed(batch(flow(T0 + 11 * S)), T0 + 11 * S), "within the margin: keep reading"
    assert not scan.feed(batch(flow(T0 + 16 * S)), T0 + 16 * S), "stored after until + margin: done"
    assert uuids(scan.timed()) == [f"c/n1-{T0 + 9 * S}"]


def test_scan_stop_adapts_to_clocks_behind_the_server() -> None:
    # flow times far behind the server's clock (a node clock in the past): the store delay
    # seen so far moves the stop position, so later batches of older flows are still read
    q = schema.FlowQuery(until_ns=T0 + 10 * S)
    scan = StreamScan(q, NO_HORIZON, LIMITS)
    now = T0 + 3600 * S
    assert scan.feed(batch(flow(T0 + 1 * S)), now)
    assert scan.feed(batch(flow(T0 + 2 * S, "c/n2")), now + S)
    assert scan.feed(batch(flow(T0 + 12 * S)), now + 2 * S)
    assert len(scan.timed()) == 2


def test_scan_first_and_last_n_across_nodes() -> None:
    messages = [batch(flow(T0 + 10), flow(T0 + 11)), batch(flow(T0 + 1, "c/n2"), flow(T0 + 2, "c/n2")),
                batch(flow(T0 + 12), flow(T0 + 13)), batch(flow(T0 + 3, "c/n2"))]
    first = StreamScan(schema.FlowQuery(number=3, first=True), NO_HORIZON, LIMITS)
    last = StreamScan(schema.FlowQuery(number=3), NO_HORIZON, LIMITS)
    for data in messages:
        first.feed(data, T0 + 20)
        last.feed(data, T0 + 20)
    assert [t - T0 for t, _ in first.timed()] == [1, 2, 3]
    assert [t - T0 for t, _ in last.timed()] == [11, 12, 13]


def test_scan_first_n_stops_once_later_batches_cannot_be_older() -> None:
    scan = StreamScan(schema.FlowQuery(number=2, first=True), NO_HORIZON, LIMITS)
    assert scan.feed(batch(flow(T0 + 1 * S), flow(T0 + 2 * S)), T0 + 2 * S)
    assert scan.feed(batch(flow(T0 + 3 * S)), T0 + 3 * S), "within the margin"
    assert not scan.feed(batch(flow(T0 + 9 * S)), T0 + 9 * S)
    assert [t - T0 for t, _ in scan.timed()] == [1 * S, 2 * S]


def test_scan_bound_truncates_mid_batch() -> None:
    scan = StreamScan(schema.FlowQuery(), NO_HORIZON, HistoryLimits(max_scan=5, margin_ns=S))
    assert scan.feed(batch(*(flow(T0 + i) for i in range(3))), T0)
    assert not scan.feed(batch(*(flow(T0 + i) for i in range(3, 6))), T0)
    assert scan.truncated and scan.scanned == 5
    assert len(scan.timed()) == 5


def test_scan_skips_payloads_that_are_not_flow_batches() -> None:
    scan = StreamScan(schema.FlowQuery(), NO_HORIZON, LIMITS)
    assert scan.feed(b"\xc1not msgpack", T0)
    assert scan.feed(schema.encode(flow(T0)), T0), "a single Flow is not a FlowBatch"
    assert scan.undecodable == 2 and scan.scanned == 0


# ---------------------------------------------------------------- merging


def test_merge_dedups_and_cuts() -> None:
    stream = timed([flow(T0 + 1), flow(T0 + 2), flow(T0 + 3, "c/n2")])
    ring = timed([flow(T0 + 3, "c/n2"), flow(T0 + 3), flow(T0 + 4)])
    all_ = merge(stream, ring, schema.FlowQuery())
    assert [t for t, _ in timed(all_)] == [T0 + 1, T0 + 2, T0 + 3, T0 + 3, T0 + 4]
    assert len(set(uuids(all_))) == 5, "the flow in both parts appears once"
    assert uuids(all_)[2] == f"c/n2-{T0 + 3}", "ties: the stream part first"
    assert uuids(merge(stream, ring, schema.FlowQuery(number=2, first=True))) == [f"c/n1-{T0 + 1}", f"c/n1-{T0 + 2}"]
    assert uuids(merge(stream, ring, schema.FlowQuery(number=2))) == [f"c/n1-{T0 + 3}", f"c/n1-{T0 + 4}"]


@dataclass
class Stored:
    time_ns: int
    data: bytes


def test_read_history_stops_early_closes_the_source_and_reports_progress() -> None:
    closed: list[bool] = []
    fed: list[int] = []

    async def source() -> AsyncIterator[list[Stored]]:
        try:
            for i in range(100):
                fed.append(i)
                yield [Stored(T0, batch(flow(T0 + i)))]
        finally:
            closed.append(True)

    async def run() -> list[int]:
        progress: list[int] = []

        async def report(scanned: int) -> None:
            progress.append(scanned)

        scan = StreamScan(schema.FlowQuery(), NO_HORIZON, HistoryLimits(max_scan=10, margin_ns=S))
        await read_history(source(), scan, report, progress_every_s=0)
        assert scan.truncated and scan.scanned == 10
        return progress

    progress = asyncio.run(run())
    assert closed == [True], "the consumer behind the source is released"
    assert len(fed) == 10
    assert progress == list(range(1, 10))


# ---------------------------------------------------------------- the service core


def test_core_plans_and_answers_with_the_stream_part(monkeypatch: pytest.MonkeyPatch) -> None:
    core = FlowsCore("c", capacity=2)
    core.store.add_batch("c/n1", [T0 + i for i in range(4)], [flow(T0 + i) for i in range(4)])
    plan = core.plan_query(schema.encode(schema.FlowQuery(number=2)))
    assert not isinstance(plan, schema.FlowQueryReply)
    assert not plan.stream, "the last 2 are in the ring"
    plan = core.plan_query(schema.encode(schema.FlowQuery()))
    assert not isinstance(plan, schema.FlowQueryReply)
    assert plan.stream and plan.horizon_ns == T0 + 2
    assert not core.plan_query(schema.encode(schema.FlowQuery()), history=False).stream  # type: ignore[union-attr]
    scan = StreamScan(plan.query, plan.horizon_ns, LIMITS)
    scan.feed(batch(*(flow(T0 + i) for i in range(4))), T0 + 4)
    chunks = [schema.decode(c, schema.FlowQueryReply)
              for c in core.answer_chunks(plan, 1 << 20, scan, first_chunk=3, notice="n")]
    assert [c.chunk for c in chunks] == [3]
    assert [f.uuid for f in chunks[0].flows] == [f"c/n1-{T0 + i}" for i in range(4)]
    assert (chunks[0].scanned, chunks[0].truncated, chunks[0].notice, chunks[0].seen) == (4, False, "n", 4)
    # a large answer is decoded and sent in parts: numbering and ``more`` run on across them
    monkeypatch.setattr(service, "ANSWER_DECODE_FLOWS", 2)
    chunks = [schema.decode(c, schema.FlowQueryReply)
              for c in core.answer_chunks(plan, 1 << 20, scan, first_chunk=1)]
    assert [c.chunk for c in chunks] == [1, 2]
    assert [c.more for c in chunks] == [True, False] and chunks[-1].scanned == 4
    assert [f.uuid for c in chunks for f in c.flows] == [f"c/n1-{T0 + i}" for i in range(4)]
    bad = core.plan_query(schema.encode(schema.FlowQuery(whitelist=[schema.FlowFilter(source_ip=["x/99"])])))
    assert isinstance(bad, schema.FlowQueryReply) and not bad.ok and "x/99" in bad.error


# ---------------------------------------------------------------- the CLI side


def test_cli_shows_progress_and_notices(capsys: pytest.CaptureFixture[str]) -> None:
    from services.flows.wire import reply_chunks
    from tests.unit.test_flows_cli import run

    flows = [flow(T0 + i) for i in range(3)]
    progress = [schema.encode(schema.FlowQueryReply(chunk=i, more=True, scanned=1000 * (i + 1))) for i in range(2)]
    answer = reply_chunks(flows, 1 << 20, first_chunk=2, scanned=2500, truncated=True,
                          notice="flows older than the rings could not be read: gone")
    run(["observe", "--all", "--progress", "-o", "json"], progress + answer)
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3
    assert "reading flow history: 1,000 flows scanned\n" in err and "2,000 flows scanned" in err
    assert "notice: flows older than the rings could not be read: gone\n" in err
    assert "notice: the answer may be incomplete" in err and "2,500 flows" in err

    run(["observe", "--all", "-o", "json"], progress + reply_chunks(flows, 1 << 20, first_chunk=2))
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and err == "", "no progress off a terminal without --progress"


def test_cli_default_query_reads_the_rings_only() -> None:
    from tests.unit.test_flows_cli import query_of

    assert query_of([]).rings_only
    assert not any(query_of(argv).rings_only for argv in (["--last", "20"], ["--first", "3"], ["--all"],
                                                         ["--since", "5m"], ["--until", "5m"]))
