"""Change-event topics bound to the buckets they come from, for the services that write them.

| topic | bucket / keys | record | subject |
|---|---|---|---|
| ``identities`` | ``identities`` ``id.>`` | IdentityRecord | ``ciliary.events.identities.<cluster>`` |
| ``endpoints`` | ``ipcache`` (pod entries) | IPCacheRecord | ``ciliary.events.endpoints.<cluster>.<node>`` |
| ``policy`` | ``policy`` ``id.>`` | PolicyMapRecord | ``ciliary.events.policy.<cluster>`` |
| ``services`` | ``services`` ``fe.>`` | LBFrontend | ``ciliary.events.services.<cluster>`` |

Invariants:
- A service starts only the topics of the buckets it writes (one writer per bucket, so
  every change is published once); ``start_change_events`` reports the publisher's
  counters in the health detail under ``events``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ciliary import schema
from ciliary.bus import Bus

from . import payloads, subjects
from .publisher import Build, EventPublisher, SubjectOf


def _bindings(cluster: str) -> dict[str, tuple[str, str, type[Any], Build, SubjectOf]]:
    return {
        subjects.IDENTITIES: (schema.BUCKET_IDENTITIES, f"{schema.IDENTITY_ID_PREFIX}>", schema.IdentityRecord,
                              payloads.identity_event,
                              lambda _o, _n: subjects.subject(subjects.IDENTITIES, cluster)),
        subjects.ENDPOINTS: (schema.BUCKET_IPCACHE, ">", schema.IPCacheRecord, payloads.endpoint_event,
                             lambda o, n: subjects.subject(subjects.ENDPOINTS, cluster,
                                                           payloads.endpoint_node(o, n))),
        subjects.POLICY: (schema.BUCKET_POLICY, f"{schema.POLICY_ID_PREFIX}>", schema.PolicyMapRecord,
                          payloads.policy_event, lambda _o, _n: subjects.subject(subjects.POLICY, cluster)),
        subjects.SERVICES: (schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>", schema.LBFrontend,
                            payloads.service_event,
                            lambda _o, _n: subjects.subject(subjects.SERVICES, cluster)),
    }


async def start_change_events(bus: Bus, cluster: str, tg: asyncio.TaskGroup, topics: tuple[str, ...],
                              detail: dict[str, Any] | None = None) -> EventPublisher:
    """Publish the change events of ``topics`` while they are active."""
    publisher = EventPublisher(bus, cluster, topics)
    await publisher.start()
    bindings = _bindings(cluster)
    for topic in topics:
        bucket, pattern, record_type, build, subject_of = bindings[topic]
        publisher.follow_bucket(tg, topic, bucket, pattern, record_type, build, subject_of)
    if detail is not None:
        detail["events"] = publisher.stats
    return publisher
