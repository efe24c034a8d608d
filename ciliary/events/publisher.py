"""A service's side of the public event API: leases in, JSON events out.

``EventPublisher(bus, cluster, topics)`` follows lease requests on
``ciliary.events.interest`` and answers them; ``active(topic)`` says whether to publish
now. ``follow_bucket`` turns the changes of a bucket the service writes into change events
while their topic is active.

Invariants:
- ``active`` is one set membership test, or one dictionary lookup and a clock read: the
  flow path calls it per batch and pays nothing more while no one listens.
- A bucket is watched only while its topic is active (setting or lease); the watch is
  cancelled when the last lease ends. The entries the watch delivers before ``SYNCED``
  are the baseline and are not published; every change after it is (a resync after a
  reconnect publishes what changed meanwhile).
- A lease request every publisher answers the same way (``interest.reply`` or, for a bad
  request, ``interest.error_reply`` naming the field); a bad request is logged and
  changes nothing.
- Publishing never raises into the caller: a failed publish is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ciliary import schema
from ciliary.bus import Bus, BusError, Message
from ciliary.kv import SYNCED

from . import interest, payloads, subjects

log = logging.getLogger(__name__)

# (old record, new record, cluster) -> event or None
Build = Callable[[Any, Any, str], "dict[str, Any] | None"]
# (old record, new record) -> the subject of their event
SubjectOf = Callable[[Any, Any], str]


class EventPublisher:
    def __init__(self, bus: Bus, cluster: str, topics: tuple[str, ...],
                 setting: subjects.EventsSetting | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if setting is None:
            setting, problem = subjects.parse_setting(os.environ.get(subjects.ENV_EVENTS, ""))
            if problem:
                log.error("events: %s", problem)
        self.bus = bus
        self.cluster = cluster
        self.topics = topics
        self.setting = setting
        self.always = setting.always & set(topics)
        self.leases = interest.Leases()
        self.clock = clock
        self._started: dict[str, asyncio.Event] = {t: asyncio.Event() for t in topics}
        self.stats: dict[str, Any] = {"published": 0, "failed": 0, "too_large": 0, "leases": 0,
                                      "bad_requests": 0}

    def active(self, topic: str) -> bool:
        if topic in self.always:
            return True
        return self.setting.leases and self.leases.ends.get(topic, 0.0) > self.clock()

    async def start(self) -> None:
        """Follow lease requests (every publisher sees every request: no queue group)."""
        await self.bus.subscribe_raw(subjects.SUBJECT_INTEREST, self._on_interest)

    async def _on_interest(self, msg: Message) -> None:
        try:
            topics, ttl = interest.parse_request(msg.data)
        except interest.InterestError as err:
            self.stats["bad_requests"] += 1
            log.warning("events: %s", err)
            await self._respond(msg, interest.error_reply(err))
            return
        self.stats["leases"] += 1
        if self.setting.leases:
            for topic in self.leases.grant(topics, ttl, self.clock()):
                if topic in self._started:
                    self._started[topic].set()
        await self._respond(msg, interest.reply(topics, ttl))

    async def _respond(self, msg: Message, body: dict[str, Any]) -> None:
        try:
            await msg.respond(payloads.encode(body))
        except BusError as err:
            log.warning("events: cannot answer a lease request: %s", err)

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self.bus.publish(subject, data)
            self.stats["published"] += 1
        except (BusError, OSError) as err:
            self.stats["failed"] += 1
            log.warning("events: publish %s failed: %s", subject, err)

    async def publish_flows(self, flows: list[schema.Flow], cluster: str, node: str) -> None:
        """The flows of one node as JSON-lines messages (call only while ``active(FLOWS)``)."""
        out = payloads.flow_messages(flows, self.bus.max_payload or 1024 * 1024)
        self.stats["too_large"] += out.too_large
        subject = subjects.subject(subjects.FLOWS, cluster, node)
        for data in out.messages:
            await self.publish(subject, data)

    # ------------------------------------------------------------------ leases over time

    async def wait_active(self, topic: str) -> None:
        while not self.active(topic):
            started = self._started[topic]
            started.clear()
            if self.active(topic):
                return
            await started.wait()

    async def wait_inactive(self, topic: str) -> None:
        while self.active(topic):
            if topic in self.always:
                await asyncio.Event().wait()
            await asyncio.sleep(max(0.01, self.leases.end(topic) - self.clock()))

    # ------------------------------------------------------------------ bucket changes

    def follow_bucket(self, tg: asyncio.TaskGroup, topic: str, bucket: str, pattern: str,
                      record_type: type[Any], build: Build, subject_of: SubjectOf) -> None:
        """Publish ``build(old, new)`` on ``subject_of(old, new)`` for every change of
        ``bucket``/``pattern`` while ``topic`` is active."""
        tg.create_task(self._follow_while_active(topic, bucket, pattern, record_type, build, subject_of),
                       name=f"events-{topic}")

    async def _follow_while_active(self, topic: str, bucket: str, pattern: str, record_type: type[Any],
                                   build: Build, subject_of: SubjectOf) -> None:
        while True:
            await self.wait_active(topic)
            log.info("events: publishing %s (bucket %s)", topic, bucket)
            follow = asyncio.create_task(self._follow(bucket, pattern, record_type, build, subject_of))
            try:
                await self.wait_inactive(topic)
            finally:
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await follow
            log.info("events: no interest in %s left, watch of %s stopped", topic, bucket)

    async def _follow(self, bucket: str, pattern: str, record_type: type[Any], build: Build,
                      subject_of: SubjectOf) -> None:
        last: dict[str, Any] = {}
        synced = False
        async for event in self.bus.watch(bucket, pattern):
            if event is SYNCED:
                synced = True
                continue
            new = None
            if not event.deleted and event.value is not None:
                try:
                    new = schema.decode(event.value, record_type)
                except (msgspec.DecodeError, msgspec.ValidationError) as err:
                    log.warning("events: bad %s entry %s: %s", bucket, event.key, err)
            old = last.pop(event.key, None)
            if new is not None:
                last[event.key] = new
            if not synced:
                continue
            body = build(old, new, self.cluster)
            if body is not None:
                await self.publish(subject_of(old, new), payloads.encode(body))
