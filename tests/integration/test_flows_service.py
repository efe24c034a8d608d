"""The real flows service process and the real CLI over a real nats-server: history
answers larger than one NATS message, ``--follow`` over ``FlowBatch`` messages, and the
``FLOWS`` stream."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary import config, hubble, schema
from ciliary.bus import Bus
from tests.integration.conftest import (
    FLOWS_SETTINGS,
    REPO,
    ensure_buckets,
    eventually,
    flows_counters,
    run_cli,
    running_service,
)

CLUSTER = "flowsit"
NODES = ("node-1", "node-2")
BATCHES = 9  # per node: 9 × 512 events > a 4095-flow ring
EVENTS = 512
BOOT_NS = 1_790_000_000 * 10**9


def raw_batch(node: str, seq: int) -> schema.RawEventBatch:
    events = [
        schema.RawFlowEvent(ts_ns=10**9 + (seq * EVENTS + i) * 1000, saddr=f"10.200.1.{10 + i % 50}",
                            daddr=f"10.200.2.{10 + i % 40}", sport=30000 + i, dport=8080, proto=6,
                            tcp_flags=0x02, direction=2, ep_id=1 + i % 7, src_identity=10000 + i % 9,
                            dst_identity=20000 + i % 5, ifindex=4, pkt_len=60)
        for i in range(EVENTS)
    ]
    return schema.RawEventBatch(cluster=CLUSTER, node=node, boot_time_ns=BOOT_NS, seq=seq, events=events)


@pytest.fixture
def flows_service(nats_server, tmp_path: Path) -> Iterator[Path]:
    """A data dir pointing the CLI at the server, with a flows service process running."""
    data_dir = tmp_path / "data"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=1))
    asyncio.run(ensure_buckets(nats_server.url))
    with running_service("flows", nats_server.url, log_path=tmp_path / "flows.log", instance="flows-it",
                         env={config.ENV_CLUSTER: CLUSTER, config.ENV_DATA_DIR: str(data_dir)},
                         unset=FLOWS_SETTINGS + ("CILIARY_FLOWS_RING_CAPACITY",)):
        yield data_dir


async def _publish_all(url: str) -> int:
    """Publish every node's raw batches once the service answers; returns flows expected."""
    bus = await Bus.connect(url, "test-flows")
    try:
        await eventually(lambda: flows_counters(bus), 30, "the flows service answering queries")
        for seq in range(1, BATCHES + 1):
            for node in NODES:
                await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node=node), raw_batch(node, seq))
        expected = BATCHES * EVENTS * len(NODES)

        async def all_seen() -> bool:
            reply = await flows_counters(bus)
            return reply is not None and reply.seen == expected

        await eventually(all_seen, 30, f"{expected} flows seen")
        assert bus.max_payload == 1024 * 1024
        return expected
    finally:
        await bus.close()


def _observe(data_dir: Path, *args: str) -> list[dict]:
    result = run_cli("observe", *args, "-o", "json", data_dir=data_dir, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_history_larger_than_one_message(flows_service: Path, nats_server) -> None:
    asyncio.run(_publish_all(nats_server.url))
    ring = schema.FLOWS_RING_CAPACITY

    last = _observe(flows_service, "--last", str(ring))
    assert len(last) == ring
    wire = sum(len(schema.encode(schema.msgspec.json.decode(json.dumps(line["flow"]), type=schema.Flow)))
               for line in last)
    assert wire > 1024 * 1024, "the answer must not fit one NATS message"
    times = [hubble.parse_rfc3339(line["time"]) for line in last]
    assert times == sorted(times)
    assert len({line["flow"]["uuid"] for line in last}) == ring

    everything = _observe(flows_service, "--all")
    assert len(everything) == BATCHES * EVENTS * len(NODES)  # both rings and the FLOWS stream
    assert {line["node_name"] for line in everything} == {f"{CLUSTER}/{n}" for n in NODES}
    # the newest flows of node-2 are the last ones published
    assert everything[-1]["flow"]["uuid"] == last[-1]["flow"]["uuid"]

    # a time range: every flow of node-1 from the middle of the ring on
    node_1 = [line for line in everything if line["node_name"] == f"{CLUSTER}/node-1"]
    middle = node_1[len(node_1) - ring + ring // 2]
    ranged = _observe(flows_service, "--since", middle["time"], "--node-name", "node-1")
    assert len(ranged) == ring - ring // 2
    assert ranged[0]["flow"]["uuid"] == middle["flow"]["uuid"]


def test_follow_and_stream_carry_flow_batches(flows_service: Path, nats_server) -> None:
    async def scenario() -> tuple[list[str], list[schema.Flow]]:
        bus = await Bus.connect(nats_server.url, "test-flows")
        try:
            await eventually(lambda: flows_counters(bus), 30, "the flows service answering queries")
            env = dict(os.environ, CILIARY_DATA_DIR=str(flows_service))
            follow = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ciliary.cli", "observe", "--follow", "--node-name", "node-2",
                "--from-port", "30003", "-o", "json", cwd=REPO, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
            lines: list[str] = []
            try:
                deadline = time.monotonic() + 30
                # publish until the follower (which subscribes after it starts) prints the flow
                seq = 0
                while not lines and time.monotonic() < deadline:
                    seq += 1
                    for node in NODES:
                        await bus.publish(schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node=node),
                                          raw_batch(node, seq))
                    try:
                        line = await asyncio.wait_for(follow.stdout.readline(), 1.0)  # type: ignore[union-attr]
                    except TimeoutError:
                        continue
                    lines.append(line.decode())
            finally:
                follow.terminate()
                await follow.wait()
            stored = await bus.js.get_last_msg(schema.STREAM_FLOWS,
                                               schema.SUBJECT_FLOWS.format(cluster=CLUSTER, node="node-2"))
            return lines, schema.decode(stored.data, schema.FlowBatch).flows
        finally:
            await bus.close()

    lines, stored = asyncio.run(scenario())
    assert lines, "observe --follow printed nothing"
    flow = json.loads(lines[0])
    assert flow["node_name"] == f"{CLUSTER}/node-2"
    assert flow["flow"]["l4"]["TCP"]["source_port"] == 30003
    # the stream keeps one FlowBatch per raw batch: all flows of that batch, in order
    assert len(stored) == EVENTS
    assert [f.l4.TCP.source_port for f in stored if f.l4 and f.l4.TCP] == [30000 + i for i in range(EVENTS)]
