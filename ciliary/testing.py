"""``FakeBus``: the ``ciliary.bus.Bus`` interface over in-memory state, for unit tests of
service logic.

A ``FakeBus`` is a ``Bus`` (a subclass overriding every method that would touch NATS), so
it goes wherever a ``Bus`` goes; ``kv_list``, ``kv_get_record`` and the typed
``subscribe`` are the real ``Bus`` code running over the fake's ``watch``, ``kv_get`` and
``subscribe_raw``. ``tests/integration/test_fakebus_parity.py`` runs one sequence of
operations against a real nats-server and against this fake and asserts the same results.

Invariants (each as the real bus behaves):
- KV: every bucket is a stream with its own sequence; a write (put or delete) takes the
  next sequence as its revision. A bucket holds the last write per key, a delete leaving
  a delete marker. ``kv_put(last_revision=0)`` creates (succeeds on an absent or deleted
  key), ``last_revision=N`` succeeds only when the key's last write (marker included) has
  revision N, else ``RevisionMismatch``; ``kv_delete`` likewise (0: the key was never
  written). The buckets of ``schema.ALL_BUCKETS`` exist from the start; using another
  one before ``ensure_buckets`` raises ``BusError`` (a watch without ``once`` waits for
  the bucket, as the real one retries).
- ``watch`` yields the live keys matching the pattern in revision order, then ``SYNCED``,
  then every later write to a matching key in revision order, exactly once (deletes as
  entries with ``value=None``, also for keys the watch never saw). Entries carry the
  headers the real server stores (``KV-Operation: DEL`` on deletes, the compare-and-set
  header on CAS writes, trace context when there is one); ``kv_get`` entries carry none.
- Patterns and subjects match as in NATS: tokens separated by ``.``, ``*`` one token,
  ``>`` one or more trailing tokens.
- Messaging: a publish reaches every matching plain subscription and one member (round
  robin) of each matching queue group. Requests to a subject nobody subscribes fail at
  once (``BusError``, ``NoReply`` for ``request_stream``); ``request_many`` then waits
  out its timeout and returns ``[]``. A payload over ``max_payload`` (1 MiB unless set)
  raises ``BusError``.
- Streams (``ensure_stream``) store every publish on their subjects with a sequence and
  a time (microsecond resolution); ``max_age_s`` is enforced, ``max_bytes`` roughly (the
  server's per-message overhead is estimated).

Ordering and timing:
- Nothing runs inside the caller's call stack. A handler runs on its subscription's own
  task, a watch event reaches the consumer through its queue, so a handler or watcher
  never observes the state "during" the publish/write that caused it.
- Each subscription handles its messages one at a time, in publish order; different
  subscriptions run concurrently with no order among them.
- Every KV call (``kv_get``, ``kv_put``, ``kv_delete``) and the start of a watch is one
  scheduling point, like the network round trip it stands for; the write is applied
  after that point and is visible to ``kv_get`` as soon as the call returns. ``publish``
  is not a scheduling point (nats buffers it).
- A handler that raises is logged and recorded in ``handler_errors``; the subscription
  keeps going, as with the real client.
- After ``close`` every operation raises ``BusError`` (a bus that is down).

Test helpers (not part of ``Bus``): ``put``/``delete`` write synchronously to seed state
(not logged); ``log`` (alias ``ops``) lists every successful ``kv_put``/``kv_delete`` as
``("put"|"delete", bucket, key)``; ``data`` (alias ``kv``) is a snapshot ``bucket -> key ->
(revision, value)`` of the live keys; ``published`` lists every ``(subject, data)`` sent,
requests and replies included; ``services`` holds the current ``register_service``
registrations. Not modelled: reconnects (``reconnects`` stays 0), KV history beyond the
last write, ``$SRV`` discovery subjects; there is no NATS connection behind it (reaching
for one raises). Known difference: any call on a closed fake raises ``BusError``, where
the real connection's own error would come through.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from ciliary import schema, telemetry
from ciliary.bus import (
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    KV_OPERATION,
    NO_RESPONDERS_STATUS,
    SYNCED,
    BucketMissing,
    Bus,
    BusError,
    KVEntry,
    Message,
    Registration,
    RevisionMismatch,
    StreamMessage,
    Subscription,
    Synced,
)
from ciliary.natsauth import subject_matches  # NATS wildcard rules, one implementation

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # nats-server's default
STREAM_MESSAGE_OVERHEAD = 22  # bytes a stored message costs beyond subject and payload (estimate)
QUEUE_GROUP_SERVICE = "q"  # the queue group micro-service endpoints join


class _Bucket:
    """One KV bucket: its sequence and the last write per key (delete markers included)."""

    def __init__(self) -> None:
        self.seq = 0
        self.last: dict[str, KVEntry] = {}


class _Watch:
    def __init__(self, bucket: str, pattern: str) -> None:
        self.bucket = bucket
        self.pattern = pattern
        self.queue: asyncio.Queue[KVEntry] = asyncio.Queue()


class _Stream:
    def __init__(self, subjects: list[str], max_bytes: int, max_age_s: float) -> None:
        self.subjects = subjects
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.seq = 0
        self.messages: collections.deque[StreamMessage] = collections.deque()
        self.size = 0

    def store(self, subject: str, data: bytes) -> None:
        self.seq += 1
        now = time.time_ns() // 1000 * 1000
        self.messages.append(StreamMessage(self.seq, now, subject, data))
        self.size += _stored_size(subject, data)
        self.discard(now)

    def discard(self, now_ns: int) -> None:
        """Drop what the stream's limits no longer allow, oldest first."""
        while self.messages and (
            (self.max_age_s > 0 and now_ns - self.messages[0].time_ns > self.max_age_s * 1e9)
            or (self.max_bytes > 0 and self.size > self.max_bytes)
        ):
            old = self.messages.popleft()
            self.size -= _stored_size(old.subject, old.data)


def _stored_size(subject: str, data: bytes) -> int:
    return STREAM_MESSAGE_OVERHEAD + len(subject) + len(data)


class FakeSubscription(Subscription):
    """A subscription of a ``FakeBus``: its messages wait in ``pending`` for its task."""

    def __init__(self, bus: FakeBus, subject: str, queue: str,
                 handler: Callable[[Message], Awaitable[None]]) -> None:
        self._bus = bus
        self.subject = subject
        self.queue = queue
        self.handler = handler
        self.pending: collections.deque[Message] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    async def unsubscribe(self) -> None:
        self._bus._drop(self)


class FakeRegistration(Registration):
    """A ``register_service`` registration of a ``FakeBus``; ``stop`` removes it."""

    def __init__(self, bus: FakeBus, name: str, subscriptions: list[FakeSubscription]) -> None:
        self._bus = bus
        self.name = name
        self.subscriptions = subscriptions

    async def stop(self) -> None:
        for sub in self.subscriptions:
            await sub.unsubscribe()
        if self._bus.services.get(self.name, {}).get("registration") is self:
            del self._bus.services[self.name]


class FakeBus(Bus):
    """An in-memory ``Bus``; see the module docstring for what it promises."""

    def __init__(self, buckets: Iterable[str] = schema.ALL_BUCKETS, *, name: str = "fake",
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.name = name
        self.reconnects = 0
        self.closing = False
        self._connected = True
        self._max_payload = max_payload
        self._buckets: dict[str, _Bucket] = {bucket: _Bucket() for bucket in buckets}
        self._watches: list[_Watch] = []
        self._subs: list[FakeSubscription] = []
        self._queue_turns: dict[str, int] = {}
        self._streams: dict[str, _Stream] = {}
        self._inboxes = itertools.count(1)
        self.log: list[tuple[str, str, str]] = []
        self.ops = self.log
        self.published: list[tuple[str, bytes]] = []
        self.handler_errors: list[Exception] = []
        self.services: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def nc(self) -> Any:  # type: ignore[override]
        raise AttributeError("FakeBus has no NATS connection: use the Bus methods")

    @property
    def js(self) -> Any:  # type: ignore[override]
        raise AttributeError("FakeBus has no JetStream context: use the Bus methods")

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        self._connected = value

    async def close(self) -> None:
        self.closing = True
        self._connected = False
        for sub in list(self._subs):
            self._drop(sub)

    # ------------------------------------------------------------------ provisioning

    async def ensure_buckets(self, buckets: tuple[str, ...] = schema.ALL_BUCKETS) -> None:
        for bucket in buckets:
            self._buckets.setdefault(bucket, _Bucket())

    async def ensure_stream(
        self, name: str, subjects: list[str], *, max_bytes: int, max_age_s: float
    ) -> None:
        stream = self._streams.get(name)
        if stream is None:
            self._streams[name] = _Stream(list(subjects), max_bytes, max_age_s)
        else:
            stream.subjects, stream.max_bytes, stream.max_age_s = list(subjects), max_bytes, max_age_s
            stream.discard(time.time_ns())

    # ------------------------------------------------------------------ test helpers

    @property
    def data(self) -> dict[str, dict[str, tuple[int, bytes]]]:
        """A snapshot of every bucket's live keys: ``bucket -> key -> (revision, value)``."""
        return {
            name: {key: (entry.revision, entry.value) for key, entry in sorted(bucket.last.items())
                   if entry.value is not None}
            for name, bucket in self._buckets.items()
        }

    @property
    def kv(self) -> dict[str, dict[str, tuple[int, bytes]]]:
        return self.data

    def put(self, bucket: str, key: str, record: Any, *, revision: int | None = None) -> int:
        """Write ``record`` now (creating the bucket if needed), unconditionally and
        unlogged; ``revision`` makes the bucket's sequence jump to it (it must be ahead)."""
        data = record if isinstance(record, bytes) else schema.encode(record)
        return self._write(bucket, key, data, {}, revision)

    def delete(self, bucket: str, key: str) -> int:
        """Delete ``key`` now (a delete marker watchers see), unconditionally and unlogged."""
        return self._write(bucket, key, None, {KV_OPERATION: "DEL"})

    # ------------------------------------------------------------------ streams

    async def stream_last_seq(self, name: str) -> int:
        stream = self._stream(name)
        return stream.seq if stream.messages else 0

    async def stream_last_message(self, name: str, subject: str) -> StreamMessage | None:
        stream = self._streams.get(name)
        if stream is None:
            return None
        return next((m for m in reversed(stream.messages) if m.subject == subject), None)

    async def read_stream(
        self,
        name: str,
        subject: str = ">",
        *,
        start_time_ns: int = 0,
        start_seq: int = 0,
        end_seq: int = 0,
        batch: int = 16,
        fetch_timeout: float = 2.0,
    ) -> AsyncIterator[list[StreamMessage]]:
        last = end_seq or await self.stream_last_seq(name)
        stream = self._stream(name)
        if last == 0 or (start_seq and start_seq > last):
            return
        after = start_seq - 1 if start_seq else 0
        while True:
            out: list[StreamMessage] = []
            for msg in stream.messages:
                if msg.seq <= after:
                    continue
                if msg.seq > last or len(out) == batch:
                    break
                if start_seq or msg.time_ns >= start_time_ns:
                    if subject_matches(subject, msg.subject):
                        out.append(msg)
            if not out:
                return
            after = out[-1].seq
            yield out
            await asyncio.sleep(0)

    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            raise BusError(f"stream {name}: stream not found")
        return stream

    # ------------------------------------------------------------------ KV

    async def kv_get(self, bucket: str, key: str, *, deleted: bool = False) -> KVEntry | None:
        await asyncio.sleep(0)
        self._check_open()
        state = self._buckets.get(bucket)
        if state is None:
            raise BucketMissing(f"KV bucket {bucket!r} does not exist")
        entry = state.last.get(key)
        if entry is None:
            return None
        if entry.value is None:
            return KVEntry(bucket, key, entry.revision, None) if deleted else None
        return KVEntry(bucket, key, entry.revision, entry.value)

    async def kv_put(
        self, bucket: str, key: str, record: Any, *, last_revision: int | None = None
    ) -> int:
        data = record if isinstance(record, bytes) else schema.encode(record)
        headers = telemetry.inject_headers()
        await asyncio.sleep(0)
        self._check_open()
        state = self._writable(bucket)
        if last_revision is not None:
            current = state.last.get(key)
            current_revision = current.revision if current is not None else 0
            if last_revision == 0 and current is not None and current.deleted:
                last_revision = current_revision  # creating over a delete marker
            if current_revision != last_revision:
                raise RevisionMismatch(f"{bucket}/{key}: revision changed")
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last_revision)
        revision = self._write(bucket, key, data, headers)
        self.log.append(("put", bucket, key))
        return revision

    async def kv_delete(self, bucket: str, key: str, *, last_revision: int | None = None) -> None:
        headers = telemetry.inject_headers({KV_OPERATION: "DEL"})
        await asyncio.sleep(0)
        self._check_open()
        state = self._writable(bucket)
        if last_revision is not None:
            current = state.last.get(key)
            if (current.revision if current is not None else 0) != last_revision:
                raise RevisionMismatch(f"{bucket}/{key}: revision changed")
            headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last_revision)
        self._write(bucket, key, None, headers)
        self.log.append(("delete", bucket, key))

    async def watch(
        self, bucket: str, pattern: str = ">", *, once: bool = False
    ) -> AsyncIterator[KVEntry | Synced]:
        await asyncio.sleep(0)
        self._check_open()
        while bucket not in self._buckets:
            if once:
                raise BusError(f"watch {bucket}: stream not found")
            log.warning("watch %s: stream not found; retrying", bucket)
            await asyncio.sleep(0.5)
        state = self._buckets[bucket]
        watch = None if once else _Watch(bucket, pattern)
        if watch is not None:
            self._watches.append(watch)
        try:
            initial = sorted((entry for key, entry in state.last.items()
                              if entry.value is not None and subject_matches(pattern, key)),
                             key=lambda entry: entry.revision)
            for entry in initial:
                yield entry
            yield SYNCED
            if watch is None:
                return
            while True:
                yield await watch.queue.get()
        finally:
            if watch is not None:
                self._watches.remove(watch)

    def _writable(self, bucket: str) -> _Bucket:
        state = self._buckets.get(bucket)
        if state is None:
            raise BucketMissing(f"KV bucket {bucket!r} does not exist")
        return state

    def _write(self, bucket: str, key: str, value: bytes | None, headers: dict[str, str],
               revision: int | None = None) -> int:
        state = self._buckets.setdefault(bucket, _Bucket())
        if revision is not None and revision <= state.seq:
            raise ValueError(f"revision {revision} is not ahead of {bucket}'s {state.seq}")
        state.seq = revision if revision is not None else state.seq + 1
        entry = KVEntry(bucket, key, state.seq, value, headers)
        state.last[key] = entry
        for watch in self._watches:
            if watch.bucket == bucket and subject_matches(watch.pattern, key):
                watch.queue.put_nowait(entry)
        return state.seq

    # ------------------------------------------------------------------ messaging

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._max_payload = value

    async def publish(self, subject: str, record: Any, *, reply: str = "") -> None:
        data = record if isinstance(record, bytes) else schema.encode(record)
        self._send(subject, data, reply)

    async def subscribe_raw(
        self,
        subject: str,
        handler: Callable[[Message], Awaitable[None]],
        *,
        queue: str = "",
    ) -> Subscription:
        self._check_open()
        sub = FakeSubscription(self, subject, queue, handler)
        self._subs.append(sub)
        return sub

    async def request(self, subject: str, record: Any, type_: type[T], *, timeout: float = 2.0) -> T:
        data = record if isinstance(record, bytes) else schema.encode(record)
        self._check_open()
        if not self._has_interest(subject):
            raise BusError(f"no answer on {subject}")
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_reply(msg: Message) -> None:
            if not answer.done():
                answer.set_result(msg.data)

        inbox = self._new_inbox()
        sub = await self.subscribe_raw(inbox, on_reply)
        try:
            self._send(subject, data, inbox)
            try:
                reply = await asyncio.wait_for(answer, timeout)
            except TimeoutError as err:
                raise BusError(f"no answer on {subject}") from err
        finally:
            await sub.unsubscribe()
        return schema.decode(reply, type_)

    async def register_service(
        self,
        name: str,
        *,
        version: str,
        description: str,
        metadata: dict[str, str],
        endpoints: dict[str, tuple[str, Callable[[], bytes]]],
    ) -> Registration:
        subs: list[FakeSubscription] = []
        for subject, answer in endpoints.values():

            async def on_request(msg: Message, answer: Callable[[], bytes] = answer) -> None:
                await msg.respond(answer())

            sub = await self.subscribe_raw(subject, on_request, queue=QUEUE_GROUP_SERVICE)
            assert isinstance(sub, FakeSubscription)
            subs.append(sub)
        registration = FakeRegistration(self, name, subs)
        self.services[name] = {
            "version": version, "description": description, "metadata": dict(metadata),
            "endpoints": {endpoint: subject for endpoint, (subject, _) in endpoints.items()},
            "registration": registration,
        }
        return registration

    def _check_open(self) -> None:
        if self.closing:
            raise BusError(f"{self.name}: the bus is closed")

    def _new_inbox(self) -> str:
        return f"_INBOX.{self.name}.{next(self._inboxes)}"

    def _has_interest(self, subject: str) -> bool:
        return any(subject_matches(sub.subject, subject) for sub in self._subs)

    def _send(self, subject: str, data: bytes, reply: str) -> None:
        """Store and deliver one message: every plain subscription, one per queue group; a
        request nobody listens to gets the server's "no responders" notice on its inbox."""
        self._check_open()
        if len(data) > self._max_payload:
            raise BusError(f"{subject}: {len(data)} bytes exceed the maximum payload "
                           f"({self._max_payload})")
        self.published.append((subject, data))
        for stream in self._streams.values():
            if any(subject_matches(pattern, subject) for pattern in stream.subjects):
                stream.store(subject, data)
        delivered = self._route(Message(self, subject, data, reply, telemetry.inject_headers() or None))
        if reply and not delivered:
            self._route(Message(self, reply, b"", "", {"Status": NO_RESPONDERS_STATUS}))

    def _route(self, message: Message) -> bool:
        """Hand ``message`` to its subscribers; whether anyone took it."""
        groups: dict[str, list[FakeSubscription]] = {}
        delivered = False
        for sub in self._subs:
            if not subject_matches(sub.subject, message.subject):
                continue
            delivered = True
            if sub.queue:
                groups.setdefault(sub.queue, []).append(sub)
            else:
                self._deliver(sub, message)
        for queue, members in groups.items():
            turn = self._queue_turns.get(queue, 0)
            self._queue_turns[queue] = turn + 1
            self._deliver(members[turn % len(members)], message)
        return delivered

    def _deliver(self, sub: FakeSubscription, message: Message) -> None:
        sub.pending.append(message)
        if sub.task is None or sub.task.done():
            sub.task = asyncio.get_running_loop().create_task(
                self._pump(sub), name=f"fakebus-sub-{sub.subject}")

    async def _pump(self, sub: FakeSubscription) -> None:
        """Run ``sub``'s handler on its pending messages, one at a time, in order."""
        while sub.pending and not sub.closed:
            message = sub.pending.popleft()
            token = telemetry.attach_context(message.headers) if message.headers else None
            try:
                await sub.handler(message)
            except Exception as err:  # the real client reports it and keeps the subscription
                log.exception("handler for %s failed", message.subject)
                self.handler_errors.append(err)
            finally:
                if token is not None:
                    telemetry.detach_context(token)

    def _drop(self, sub: FakeSubscription) -> None:
        sub.closed = True
        sub.pending.clear()
        if sub in self._subs:
            self._subs.remove(sub)
        task = sub.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
