"""Flows on the wire: FlowBatch messages and chunked query replies within the size limit."""

from __future__ import annotations

import msgspec
import pytest

from ciliary import schema
from services.flows.core import FlowsCore
from services.flows.decode import BatchContext, decode_batch, flow_uuid
from services.flows.wire import REPLY_MARGIN, flow_batches, reply_chunks
from tests.unit.test_flows_scenario import LOOKUPS, scenario_batch, scenario_flows

FLOWS = scenario_flows()


def test_one_batch_when_it_fits() -> None:
    out = flow_batches(FLOWS, 1 << 20)
    assert len(out.messages) == 1 and out.too_large == 0
    assert schema.decode(out.messages[0], schema.FlowBatch).flows == FLOWS


@pytest.mark.parametrize("limit", [1500, 3000, 8000])
def test_batches_split_to_fit_and_keep_order(limit: int) -> None:
    out = flow_batches(FLOWS, limit)
    assert len(out.messages) > 1 and out.too_large == 0
    assert all(len(m) <= limit for m in out.messages)
    assert [f for m in out.messages for f in schema.decode(m, schema.FlowBatch).flows] == FLOWS


def test_flow_larger_than_any_message_is_reported() -> None:
    out = flow_batches(FLOWS, 300)
    assert out.too_large > 0
    assert all(len(m) <= 300 for m in out.messages)
    assert out.too_large + sum(len(schema.decode(m, schema.FlowBatch).flows) for m in out.messages) == len(FLOWS)


def test_a_single_flow_is_not_a_batch() -> None:
    with pytest.raises(msgspec.ValidationError):
        schema.decode(schema.encode(FLOWS[0]), schema.FlowBatch)


@pytest.mark.parametrize("limit", [1400, 4096, 1 << 20])
def test_reply_chunks_fit_and_end_with_the_counters(limit: int) -> None:
    chunks = reply_chunks(FLOWS, limit, seen=50, capacity=4095, lost=3, chunk_flows=7)
    replies = [schema.decode(c, schema.FlowQueryReply) for c in chunks]
    assert all(len(c) <= limit for c in chunks)
    assert [r.chunk for r in replies] == list(range(len(replies)))
    assert [r.more for r in replies] == [True] * (len(replies) - 1) + [False]
    assert [f for r in replies for f in r.flows] == FLOWS
    assert (replies[-1].seen, replies[-1].capacity, replies[-1].lost) == (50, 4095, 3)
    assert all(r.ok for r in replies)


def test_empty_answer_is_one_final_chunk() -> None:
    (only,) = reply_chunks([], 1 << 20, seen=4)
    reply = schema.decode(only, schema.FlowQueryReply)
    assert (reply.flows, reply.more, reply.chunk, reply.seen) == ([], False, 0, 4)


def test_reply_that_cannot_fit_is_an_error() -> None:
    (only,) = reply_chunks(FLOWS, REPLY_MARGIN + 100)
    reply = schema.decode(only, schema.FlowQueryReply)
    assert not reply.ok and "maximum message size" in reply.error


def test_core_answers_more_flows_than_one_message_holds() -> None:
    core = FlowsCore("default")
    for seq in range(1, 41):
        core.ingest(schema.encode(msgspec.structs.replace(scenario_batch(), seq=seq)))
    assert core.store.seen == 40 * len(FLOWS)
    one_message = len(schema.encode(core.query(schema.encode(schema.FlowQuery()))))
    limit = one_message // 5
    chunks = core.query_chunks(schema.encode(schema.FlowQuery()), limit)
    assert len(chunks) >= 5 and all(len(c) <= limit for c in chunks)
    flows = [f for c in chunks for f in schema.decode(c, schema.FlowQueryReply).flows]
    assert len(flows) == 40 * len(FLOWS) and len({f.uuid for f in flows}) == len(flows)
    bad = core.query_chunks(schema.encode(schema.FlowQuery(whitelist=[schema.FlowFilter(source_ip=["x/99"])])),
                            limit)
    assert len(bad) == 1 and not schema.decode(bad[0], schema.FlowQueryReply).ok


def test_core_publishes_one_batch_per_ingest() -> None:
    core = FlowsCore("default")
    flows = core.ingest(schema.encode(scenario_batch()))
    (message,) = core.publish_payloads(flows, 1 << 20)
    assert schema.decode(message, schema.FlowBatch).flows == flows
    assert len(core.publish_payloads(flows, 2000)) > 1
    assert core.publish_payloads(flows, 200) == []
    assert core.metrics.value("hubble_lost_events_total", source="publish") == len(flows)
    assert core.lost == len(flows)  # status "lost" stays the sum of hubble_lost_events_total


def test_uuids_are_unique_when_an_executor_restarts_with_the_same_seq() -> None:
    first = scenario_batch()
    later = msgspec.structs.replace(first, events=[
        msgspec.structs.replace(e, ts_ns=e.ts_ns + 10**9) for e in first.events])
    a = {f.uuid for f in decode_batch(first, LOOKUPS).flows}
    b = {f.uuid for f in decode_batch(later, LOOKUPS).flows}
    assert len(a) == len(b) == len(FLOWS) and not a & b


def test_uuid_layout() -> None:
    ctx = BatchContext("c", "n", 1, 2, 3)
    u = flow_uuid(ctx, 5, 1)
    assert len(u) == 36 and u[14] == "4" and u[19] in "89ab"
    assert u.endswith(f"{5 * 4 + 1:012x}")
    assert [f.uuid for f in decode_batch(scenario_batch(), LOOKUPS).flows][0] == flow_uuid(
        BatchContext.of(scenario_batch()), 0, 0)
