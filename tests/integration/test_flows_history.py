"""History beyond the rings: the real flows service (small rings) and the real CLI over a
real nats-server answer ``--all``, ``--since``, ``--until``, ``--first N`` and ``--last N``
from the ``FLOWS`` stream merged with the rings, exactly as published, in order."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary import config, hubble, schema
from ciliary.bus import Bus
from ciliary.cli.observe import ReplyChunks, query_flows
from tests.integration.conftest import (
    FLOWS_SETTINGS,
    ensure_buckets,
    eventually,
    flows_counters,
    run_cli,
    running_service,
)

CLUSTER = "histit"
NODES = ("node-1", "node-2")
RING = 300  # flows per node in the rings
EVENTS = 100  # per raw batch
GROUPS = (5, 5)  # batches per node in group A, then (after a pause) group B
PAUSE_S = 2.0  # between the groups: more than the service's margin below
MARGIN_S = "0.5"

Key = tuple[int, str]  # (flow time ns, node name)


def raw_batch(node: str, seq: int, base_ns: int) -> schema.RawEventBatch:
    # flow time = boot_time_ns + ts_ns: the wall clock when the batch is built, as on a node
    # times unique across nodes too: node-1's are whole microseconds, node-2's half past
    start = time.time_ns() // 1000 * 1000 + (500 if node == NODES[1] else 0)
    events = [
        schema.RawFlowEvent(ts_ns=start - base_ns + i * 1000, saddr=f"10.210.1.{10 + i % 50}",
                            daddr="10.210.2.10", sport=30000 + i, dport=8080, proto=6, tcp_flags=0x02,
                            direction=2, ep_id=1 + i % 7, src_identity=10000, dst_identity=20000,
                            ifindex=4, pkt_len=60)
        for i in range(EVENTS)
    ]
    return schema.RawEventBatch(cluster=CLUSTER, node=node, boot_time_ns=base_ns, seq=seq, events=events)


def key_of(batch: schema.RawEventBatch, ev: schema.RawFlowEvent) -> Key:
    return batch.boot_time_ns + ev.ts_ns, f"{CLUSTER}/{batch.node}"


@pytest.fixture
def flows_service(nats_server, tmp_path: Path, request) -> Iterator[Path]:
    """A data dir pointing the CLI at the server, with a flows service with small rings."""
    extra: dict[str, str] = getattr(request, "param", {})
    data_dir = tmp_path / "data"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=1))
    asyncio.run(ensure_buckets(nats_server.url))
    unset = FLOWS_SETTINGS + (() if "CILIARY_FLOWS_HISTORY_MAX_SCAN" in extra else ("CILIARY_FLOWS_HISTORY_MAX_SCAN",))
    with running_service("flows", nats_server.url, log_path=tmp_path / "flows.log", instance="flows-hist-it",
                         env={config.ENV_CLUSTER: CLUSTER, config.ENV_DATA_DIR: str(data_dir),
                              "CILIARY_FLOWS_RING_CAPACITY": str(RING),
                              "CILIARY_FLOWS_HISTORY_MARGIN": MARGIN_S, **extra},
                         unset=unset):
        yield data_dir


async def _stored(bus: Bus) -> int:
    info = await bus.js.stream_info(schema.STREAM_FLOWS)
    return info.state.messages


async def _publish(url: str) -> tuple[list[Key], list[Key]]:
    """Publish group A, pause, group B (every node); returns the flows' keys in time order
    and in publishing order once the service has seen them all and the stream holds them."""
    bus = await Bus.connect(url, "test-history")
    try:
        await eventually(lambda: flows_counters(bus), 30, "the flows service answering queries")
        base = time.time_ns() - 10 * 10**9
        keys: list[Key] = []
        seq = 0
        for group, count in enumerate(GROUPS):
            if group:
                await asyncio.sleep(PAUSE_S)
            for _ in range(count):
                seq += 1
                for node in NODES:
                    batch = raw_batch(node, seq, base)
                    keys += [key_of(batch, ev) for ev in batch.events]
                    await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node=node), batch)
        expected = sum(GROUPS) * EVENTS * len(NODES)
        assert len(keys) == expected

        async def all_stored() -> bool:
            reply = await flows_counters(bus)
            return reply is not None and reply.seen == expected and await _stored(bus) == sum(GROUPS) * len(NODES)

        await eventually(all_stored, 30, f"{expected} flows seen and stored")
        return sorted(keys), keys
    finally:
        await bus.close()


def _observe(data_dir: Path, *args: str) -> tuple[list[Key], str]:
    result = run_cli("observe", *args, "-o", "json", data_dir=data_dir, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return [(hubble.parse_rfc3339(line["time"]), line["node_name"]) for line in lines], result.stderr


def _stamp(t: int) -> str:
    secs, ns = divmod(t, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


async def _query(url: str, query: schema.FlowQuery) -> tuple[list[Key], schema.FlowQueryReply]:
    bus = await Bus.connect(url, "test-history")
    try:
        chunks = ReplyChunks()
        got: list[Key] = []
        async for flows in query_flows(bus, query, 30, chunks=chunks):
            got += [(hubble.parse_rfc3339(f.time), f.node_name) for f in flows]
        assert chunks.final is not None
        return got, chunks.final
    finally:
        await bus.close()


def test_history_reads_the_stream_beyond_the_rings(flows_service: Path, nats_server) -> None:
    keys, _ = asyncio.run(_publish(nats_server.url))
    total = len(keys)
    in_rings = RING * len(NODES)
    per_group = [n * EVENTS * len(NODES) for n in GROUPS]

    everything, _ = _observe(flows_service, "--all")
    assert everything == keys, "--all: every published flow, in time order, each once"

    # since before the oldest ring flow: from the stream, positioned by time (group A is
    # stored more than the margin earlier, so it is not even read)
    since = keys[per_group[0] + 10]
    ranged, _ = _observe(flows_service, "--since", _stamp(since[0]))
    assert ranged == keys[per_group[0] + 10:]
    got, final = asyncio.run(_query(nats_server.url, schema.FlowQuery(since_ns=since[0])))
    assert got == keys[per_group[0] + 10:]
    assert 0 < final.scanned <= per_group[1], "reading starts at the time, not at the first message"
    assert not final.truncated and final.seen == total and final.capacity == RING

    # filters apply to the stream part as to the rings
    port = 30003
    filtered, _ = _observe(flows_service, "--since", _stamp(keys[0][0]), "--node-name", NODES[0],
                           "--from-port", str(port))
    expected = [k for k in keys if k[1] == f"{CLUSTER}/{NODES[0]}"][port - 30000::EVENTS]
    assert filtered == expected and len(filtered) == sum(GROUPS)

    first, _ = _observe(flows_service, "--first", "50")
    assert first == keys[:50], "--first N: the oldest N, all older than the rings"

    last, _ = _observe(flows_service, "--last", str(in_rings + 400))
    assert last == keys[-(in_rings + 400):], "--last N beyond the rings"
    newest, _ = _observe(flows_service, "--last", "100")
    assert newest == keys[-100:]

    until = keys[per_group[0] - 1]
    upto, _ = _observe(flows_service, "--until", _stamp(until[0]))
    assert upto == keys[:per_group[0]]
    window, _ = _observe(flows_service, "--since", _stamp(keys[100][0]), "--until", _stamp(keys[-100][0]))
    assert window == keys[100:total - 99]

    # the default (the last 20) and queries within the rings never read the stream
    got, final = asyncio.run(_query(nats_server.url, schema.FlowQuery(number=20, rings_only=True)))
    assert got == keys[-20:] and final.scanned == 0
    got, final = asyncio.run(_query(nats_server.url, schema.FlowQuery(since_ns=keys[-100][0])))
    assert got == keys[-100:] and final.scanned == 0


@pytest.mark.parametrize("flows_service", [{"CILIARY_FLOWS_HISTORY_MAX_SCAN": "700"}], indirect=True)
def test_history_scan_is_bounded_and_says_so(flows_service: Path, nats_server) -> None:
    keys, published = asyncio.run(_publish(nats_server.url))
    got, stderr = _observe(flows_service, "--all")
    assert "notice: the answer may be incomplete" in stderr and "700" in stderr
    # the first 700 flows of the stream (in stream order: whole batches of both nodes) and the rings
    rings = {k for node in NODES for k in [k for k in published if k[1] == f"{CLUSTER}/{node}"][-RING:]}
    assert got == sorted(set(published[:700]) | rings)
    _, final = asyncio.run(_query(nats_server.url, schema.FlowQuery()))
    assert final.truncated and final.scanned == 700
