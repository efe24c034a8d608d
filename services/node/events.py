"""Ring-buffer events → ``RawEventBatch`` messages for ``flows.raw.<cluster>.<node>``.

Invariants:
- One reader thread (``Datapath.ring_reader``) hands batches of kernel events to
  ``EventPump.offer``; the pump converts them to plain records and queues them for the
  event loop without blocking the reader. When the queue is full the batch is counted as
  lost (source "queue"), never silently dropped.
- Losses the kernel reports (ring buffer full) are carried in ``RawEventBatch.lost``.
- Every batch carries its position in this run (``run`` = the pump's start time in unix
  ns, ``seq``, and the running totals ``events_total``/``lost_total``), so a receiver
  counts exactly the events of batches it never got. A batch that could not be published
  is taken back (``unpublished``): its events and losses go into the next batch's ``lost``
  and the totals and ``seq`` continue as if it had never been made.
- Conversion is pure (``to_raw``): addresses become dotted strings, ports host order,
  payloads are cut to their length.
"""

from __future__ import annotations

import asyncio
import time

from ciliary import schema
from services.node import layouts as L

MAX_QUEUED_BATCHES = 256


def boot_time_ns() -> int:
    """Unix time (ns) at CLOCK_MONOTONIC zero: add to ``bpf_ktime_get_ns`` stamps."""
    return time.time_ns() - time.monotonic_ns()


def to_raw(event: L.FlowEvent) -> schema.RawFlowEvent:
    orig = L.ip4_str(event.orig_daddr) if event.orig_daddr else ""
    return schema.RawFlowEvent(
        ts_ns=event.ts_ns,
        saddr=L.ip4_str(event.saddr),
        daddr=L.ip4_str(event.daddr),
        sport=L.port_int(event.sport),
        dport=L.port_int(event.dport),
        src_identity=event.src_identity,
        dst_identity=event.dst_identity,
        ep_id=event.ep_id,
        ifindex=event.ifindex,
        rule_ref=event.rule_ref,
        orig_daddr=orig,
        orig_dport=L.port_int(event.orig_dport) if orig else 0,
        pkt_len=event.pkt_len,
        type=event.type,
        verdict=event.verdict,
        drop_reason=event.drop_reason,
        direction=event.direction,
        proto=event.proto,
        tcp_flags=event.tcp_flags,
        is_reply=bool(event.is_reply),
        ct_state=event.ct_state,
        payload=event.payload_bytes(),
        icmp_type=event.icmp_type,
        icmp_code=event.icmp_code,
        policy_match=event.policy_match,
        flags=event.flags,
    )


class EventPump:
    """Thread-safe hand-off from the ring reader thread to an asyncio publisher."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cluster: str, cluster_id: int, node: str) -> None:
        self.loop = loop
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.node = node
        self.queue: asyncio.Queue[list[schema.RawFlowEvent]] = asyncio.Queue(MAX_QUEUED_BATCHES)
        self.lost_queue = 0
        self.published = 0
        self.seq = 0
        self.run = time.time_ns()
        self.events_total = 0
        self.lost_total = 0
        self.boot_ns = boot_time_ns()
        self.kernel_lost_seen = 0

    def offer(self, events: list[L.FlowEvent]) -> None:
        """Called on the reader thread."""
        raw = [to_raw(e) for e in events]
        self.loop.call_soon_threadsafe(self._enqueue, raw)

    def _enqueue(self, raw: list[schema.RawFlowEvent]) -> None:
        try:
            self.queue.put_nowait(raw)
        except asyncio.QueueFull:
            self.lost_queue += len(raw)

    def batch(self, events: list[schema.RawFlowEvent], kernel_lost_total: int) -> schema.RawEventBatch:
        lost = max(0, kernel_lost_total - self.kernel_lost_seen) + self.lost_queue
        self.kernel_lost_seen = kernel_lost_total
        self.lost_queue = 0
        self.seq += 1
        self.events_total += len(events)
        self.lost_total += lost
        return schema.RawEventBatch(
            cluster=self.cluster, node=self.node, events=events, cluster_id=self.cluster_id,
            boot_time_ns=self.boot_ns, lost=lost, seq=self.seq, run=self.run,
            events_total=self.events_total, lost_total=self.lost_total,
        )

    def unpublished(self, batch: schema.RawEventBatch) -> None:
        """Take back the last ``batch`` (its publish failed): its events and losses are
        reported as lost in the next batch, which takes its sequence number."""
        self.seq -= 1
        self.events_total -= len(batch.events)
        self.lost_total -= batch.lost
        self.lost_queue += len(batch.events) + batch.lost
