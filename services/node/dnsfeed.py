"""The DNS-response feed of a node: which ring-buffer events the toFQDNs cache needs.

Pure code over ``RawFlowEvent`` records the executor already built for the flows feed.

Invariants:
- ``dns_responses`` keeps exactly the events of UDP responses from port 53 that were
  forwarded into a local endpoint (trace event, verdict FORWARDED, direction to the
  container) and carry payload bytes; a dropped response never taught the pod an
  address, so it teaches the policy none either.
- ``dns_batch`` returns ``None`` when a batch holds no such event (nothing is published)
  and otherwise a ``RawEventBatch`` with the same node, cluster, boot time and sequence
  number as the flows batch it came from, and no loss count (losses are reported once,
  on the flows subject).
- ``publish`` is the only I/O: a failed publish is logged and counted, never raised (the
  flows feed of the same batch must not suffer from it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ciliary import schema

log = logging.getLogger(__name__)

PROTO_UDP = 17
DNS_PORT = 53
EVENT_TRACE = 1
VERDICT_FORWARDED = 1
DIR_TO_CONTAINER = 1


def is_dns_response(event: schema.RawFlowEvent) -> bool:
    return (
        event.proto == PROTO_UDP
        and event.sport == DNS_PORT
        and event.type == EVENT_TRACE
        and event.verdict == VERDICT_FORWARDED
        and event.direction == DIR_TO_CONTAINER
        and bool(event.payload)
    )


def dns_responses(events: Iterable[schema.RawFlowEvent]) -> list[schema.RawFlowEvent]:
    return [e for e in events if is_dns_response(e)]


def dns_batch(batch: schema.RawEventBatch) -> schema.RawEventBatch | None:
    """The DNS-response part of a flows batch, or None (see module invariants)."""
    events = dns_responses(batch.events)
    if not events:
        return None
    return schema.RawEventBatch(
        cluster=batch.cluster, node=batch.node, events=events, cluster_id=batch.cluster_id,
        boot_time_ns=batch.boot_time_ns, lost=0, seq=batch.seq,
    )


async def publish(bus: Any, batch: schema.RawEventBatch, counters: dict[str, Any]) -> None:
    """Publish the DNS part of ``batch`` on ``fqdn.dns.<cluster>.<node>`` (if any)."""
    dns = dns_batch(batch)
    if dns is None:
        return
    try:
        await bus.publish(schema.SUBJECT_FQDN_DNS.format(cluster=batch.cluster, node=batch.node), dns)
        counters["dns_responses_published"] = counters.get("dns_responses_published", 0) + len(dns.events)
    except Exception as err:  # noqa: BLE001 - a bus hiccup must not stop the event feed
        counters["dns_responses_lost"] = counters.get("dns_responses_lost", 0) + len(dns.events)
        log.warning("publishing %d DNS responses failed: %s", len(dns.events), err)
