"""Events published while the flows service is down are counted, never silently missing:
the real flows service over a real nats-server, SIGKILLed and restarted between the
batches of node executors (published here as a node publishes them)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

from ciliary import config, schema
from ciliary.bus import Bus
from tests.integration.conftest import (
    FLOWS_SETTINGS,
    ensure_buckets,
    eventually,
    flows_counters,
    run_cli,
    service_process,
)

CLUSTER = "flowsloss"
BOOT_NS = 1_790_000_000 * 10**9
RUN = 1_790_000_100 * 10**9


class Executor:
    """The batches one node executor run publishes: ``seq`` and running totals."""

    def __init__(self, node: str, run: int = RUN) -> None:
        self.node, self.run, self.seq, self.events_total, self.lost_total = node, run, 0, 0, 0
        self.subject = schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node=node)

    def batch(self, events: int, lost: int = 0) -> schema.RawEventBatch:
        self.seq += 1
        self.events_total += events
        self.lost_total += lost
        raws = [schema.RawFlowEvent(ts_ns=10**9 + (self.run // 10**6) + self.events_total * 1000 + i,
                                    saddr="10.210.1.5", daddr="10.210.2.7", sport=31000 + i, dport=80,
                                    proto=6, tcp_flags=0x02, direction=2, ep_id=3, ifindex=4, pkt_len=60)
                for i in range(events)]
        return schema.RawEventBatch(cluster=CLUSTER, node=self.node, events=raws, lost=lost,
                                    boot_time_ns=BOOT_NS, seq=self.seq, run=self.run,
                                    events_total=self.events_total, lost_total=self.lost_total)


def lost_by_source(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        if line.startswith("hubble_lost_events_total{"):
            labels, _, value = line.rpartition(" ")
            out[labels.split('source="')[1].split('"')[0]] = int(float(value))
    return out


async def _metrics(bus: Bus) -> dict[str, int]:
    reply = await bus.request(schema.SUBJECT_FLOWS_METRICS, schema.FlowMetricsRequest(),
                              schema.FlowMetricsReply, timeout=5)
    return lost_by_source(reply.text)


async def _seen(bus: Bus, count: int) -> None:
    async def check() -> bool:
        reply = await flows_counters(bus)
        return reply is not None and reply.seen == count

    await eventually(check, 30, f"{count} flows seen")


async def _stored(bus: Bus, node: str, seq: int) -> None:
    """Wait until the FLOWS stream holds the position of ``node``'s batch ``seq``."""
    subject = schema.SUBJECT_FLOWS.format(cluster=CLUSTER, node=node)

    async def check() -> bool:
        msg = await bus.stream_last_message(schema.STREAM_FLOWS, subject)
        return msg is not None and (schema.decode(msg.data, schema.FlowBatch).position or
                                    schema.BatchPosition()).seq == seq

    await eventually(check, 30, f"{node}'s batch {seq} stored")


def test_flows_published_during_an_outage_are_counted(nats_server, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config.write_instance(data_dir, config.InstanceState(nats_url=nats_server.url, supervisor_pid=1))
    asyncio.run(ensure_buckets(nats_server.url))
    log = tmp_path / "flows.log"

    def start() -> subprocess.Popen[bytes]:
        return service_process("flows", nats_server.url, log_path=log, instance="flows-loss",
                               env={config.ENV_CLUSTER: CLUSTER, config.ENV_DATA_DIR: str(data_dir)},
                               unset=FLOWS_SETTINGS)

    one, two = Executor("node-1"), Executor("node-2")

    async def before_outage() -> dict[str, int]:
        bus = await Bus.connect(nats_server.url, "test-flows-loss")
        try:
            await eventually(lambda: flows_counters(bus), 30, "the flows service answering queries")
            for batch in (one.batch(4), one.batch(5), two.batch(3)):
                await bus.publish(one.subject if batch.node == "node-1" else two.subject, batch)
            one.batch(7)  # dropped on the way while the service runs: a bus loss
            await bus.publish(one.subject, one.batch(2))
            await _seen(bus, 14)
            await _stored(bus, "node-1", 4)
            await _stored(bus, "node-2", 1)
            return await _metrics(bus)
        finally:
            await bus.close()

    async def during_outage() -> None:
        bus = await Bus.connect(nats_server.url, "test-flows-loss")
        try:
            for batch in (one.batch(10), one.batch(11, lost=3), two.batch(5)):
                await bus.publish(one.subject if batch.node == "node-1" else two.subject, batch)
        finally:
            await bus.close()

    async def after_restart() -> tuple[dict[str, int], int]:
        bus = await Bus.connect(nats_server.url, "test-flows-loss")
        try:
            await eventually(lambda: flows_counters(bus), 30, "the restarted flows service answering")
            await bus.publish(one.subject, one.batch(2))
            await bus.publish(two.subject, two.batch(1))
            restarted = Executor("node-2", run=RUN + 60 * 10**9)  # node-2's executor restarts
            restarted.batch(6)  # its first batch is dropped on the way
            await bus.publish(two.subject, restarted.batch(2))
            await _seen(bus, 5)
            return await _metrics(bus), 5
        finally:
            await bus.close()

    proc = start()
    try:
        first = asyncio.run(before_outage())
        assert first.get("bus") == 7 and first.get("observer_events_queue", 0) == 0, first
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        asyncio.run(during_outage())
        proc = start()
        after, _ = asyncio.run(after_restart())
        # the outage: node-1's 10 + 11 events and the 3 its ring buffer lost, node-2's 5
        assert after == {"observer_events_queue": 26, "perf_event_ring_buffer": 3, "bus": 6}, after

        result = run_cli("observe", "--all", "-o", "json", data_dir=data_dir, timeout=60)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        flows = [line for line in lines if "flow" in line]
        losses = sorted((line["node_name"], line["lost_events"]["source"], line["lost_events"]["num_events_lost"])
                        for line in lines if "lost_events" in line)
        assert losses == [(f"{CLUSTER}/node-1", "OBSERVER_EVENTS_QUEUE", "21"),
                          (f"{CLUSTER}/node-1", "PERF_EVENT_RING_BUFFER", "3"),
                          (f"{CLUSTER}/node-2", "BUS", "6"),
                          (f"{CLUSTER}/node-2", "OBSERVER_EVENTS_QUEUE", "5")], losses
        # every event was either stored (before the outage: from the FLOWS stream) or counted
        published = one.events_total + two.events_total + 8
        assert len(flows) == 14 + 5 and published == len(flows) + 7 + 26 + 6

        compact = run_cli("observe", "--all", "--node-name", "node-1", data_dir=data_dir, timeout=60)
        assert "EVENTS LOST: OBSERVER_EVENTS_QUEUE CPU(0) 21" in compact.stdout.splitlines(), compact.stdout
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=10) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
