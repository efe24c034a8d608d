"""The node executor's DNS-response feed filter (services/node/dnsfeed.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from ciliary import schema
from ciliary.dnswire import a_record, build_query, build_response
from ciliary.testing import FakeBus
from services.node import dnsfeed

ANSWER = build_response("a.example", 1, [(1, 30, a_record("203.0.113.9"))])


def event(**kw: Any) -> schema.RawFlowEvent:
    base: dict[str, Any] = dict(ts_ns=1, saddr="10.0.0.53", daddr="10.0.0.7", sport=53,
                                dport=40000, proto=17, type=1, verdict=1, direction=1,
                                ep_id=7, payload=ANSWER)
    base.update(kw)
    return schema.RawFlowEvent(**base)


def batch(*events: schema.RawFlowEvent) -> schema.RawEventBatch:
    return schema.RawEventBatch(cluster="c1", node="n1", events=list(events), cluster_id=4,
                                boot_time_ns=99, lost=3, seq=12)


def test_keeps_only_forwarded_responses_into_endpoints() -> None:
    good = event()
    others = [
        event(direction=2),  # leaving the DNS server pod: seen again on the client side
        event(verdict=2, type=2, drop_reason=133),  # dropped: the pod never saw it
        event(verdict=4),  # audit
        event(proto=6),
        event(sport=40000, dport=53, payload=build_query("a.example")),  # the query
        event(payload=b""),
        event(type=2),
    ]
    out = dnsfeed.dns_batch(batch(others[0], good, *others[1:]))
    assert out is not None
    assert out.events == [good]
    assert (out.cluster, out.node, out.cluster_id, out.boot_time_ns, out.seq, out.lost) == (
        "c1", "n1", 4, 99, 12, 0)
    assert dnsfeed.dns_batch(batch(*others)) is None
    assert dnsfeed.dns_batch(batch()) is None


def test_publish_sends_on_the_node_subject_and_never_raises() -> None:
    bus, counters = FakeBus(), {}
    asyncio.run(dnsfeed.publish(bus, batch(event(), event(direction=2)), counters))
    assert [s for s, _ in bus.published] == ["fqdn.dns.c1.n1"]
    assert len(schema.decode(bus.published[0][1], schema.RawEventBatch).events) == 1
    assert counters == {"dns_responses_published": 1}
    asyncio.run(dnsfeed.publish(bus, batch(event(direction=2)), counters))
    assert len(bus.published) == 1
    down: dict[str, Any] = {}
    closed = FakeBus()
    asyncio.run(closed.close())
    asyncio.run(dnsfeed.publish(closed, batch(event()), down))
    assert down == {"dns_responses_lost": 1}
