"""Follow buckets, recompute, write: the watch/loop primitive every service shell uses.

``Mirror`` keeps the live keys of one bucket pattern; ``PassLoop`` runs a service's
"dirty → recompute → write" pass. A service shell declares its mirrors, points them at
its loop and writes only its pass.

Invariants:
- A mirror holds exactly the live keys the bus watch delivered (``entries``; none with
  ``keep=False``, for listeners that keep their own view), and, with a ``decode``, their
  decoded values (``values``; a payload that fails to decode is logged,
  counted in ``bad`` and absent from ``values``). Listeners see every event after the
  mirror applied it, in bus order; ``SYNCED`` is passed to listeners too.
- A mirror is registered with the service's health (``Context.declare_watch``) under its
  name before it starts, and is healthy from its first ``SYNCED`` on.
- A loop runs one pass at a time, only while ``ready()`` holds. ``mark_dirty`` during a
  pass schedules exactly one more. Before a pass it lets events already queued on the
  event loop land (a few scheduler turns, no fixed sleep), so a burst becomes one pass.
- A pass returning True asks for another pass at once; a pass that raises is logged and
  retried after ``backoff_delay`` (base 100 ms, doubling, capped at ``backoff.PASS_CAP``);
  the first success resets the backoff. A loop never dies of a failed pass.
- With a ``heap`` (``ciliary.heap.HeapFreezer``, for a loop that is its process's main
  work) what a successful pass leaves is frozen out of the cyclic collector's walks, and
  the rare full collection runs only when the loop is about to idle.
- ``wake_at()`` (monotonic seconds, or None) wakes the loop without a change: periodic
  audits, expiry of graceful state.
- ``PassClock`` times the parts of one pass for the health detail (``last_pass_ms``,
  ``last_pass``, ``recent_passes``): every service reports its passes in one shape, and
  the same parts land on the pass's span when it records.
- Tracing (``ciliary.tracing``): after the first ``SYNCED``, listeners run with the
  entry's trace context as the current change (the initial state is no change: a
  service that starts does not continue the trace of each key's last writer);
  ``mark_dirty`` notes it, and a pass that something marked runs in a
  ``<loop> pass`` span, child of the first traced change and linked to the others, so
  the writes it makes carry its context to the next hop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from ciliary import backoff, schema, tracing
from ciliary.bus import BusError
from ciliary.heap import HeapFreezer
from ciliary.kv import SYNCED, KVEntry, Synced

log = logging.getLogger(__name__)

T = TypeVar("T")

Listener = Callable[[KVEntry | Synced], None]
DRAIN_TURNS = 16  # most scheduler turns spent letting queued events land before a pass
RECENT_PASSES = 16  # passes kept in a health detail's ``recent_passes``


class WatchSource(Protocol):
    """What a mirror needs of the bus."""

    def watch(self, bucket: str, pattern: str = ">", *, once: bool = False) -> Any: ...


class WatchHealth(Protocol):
    """What a mirror reports to: the service's health context."""

    def declare_watch(self, name: str) -> None: ...

    def watch_synced(self, name: str) -> None: ...


def decoder(type_: type[T]) -> Callable[[KVEntry], T]:
    """A ``decode`` for mirrors: the entry's payload as ``type_`` (raises on a bad one)."""

    def decode(entry: KVEntry) -> T:
        assert entry.value is not None
        return schema.decode(entry.value, type_)

    return decode


class Mirror(Generic[T]):
    """The live keys of ``bucket`` matching ``pattern``, kept current by ``follow``."""

    def __init__(self, bucket: str, pattern: str = ">", *, name: str = "",
                 decode: Callable[[KVEntry], T | None] | None = None, keep: bool = True) -> None:
        self.bucket = bucket
        self.pattern = pattern
        self.name = name or (bucket if pattern == ">" else f"{bucket}/{pattern}")
        self.decode = decode
        self.keep = keep
        self.entries: dict[str, KVEntry] = {}
        self.values: dict[str, T] = {}
        self.bad: set[str] = set()
        self.listeners: list[Listener] = []
        self.synced = False
        self.syncs = 0
        self.events = 0

    def listen(self, listener: Listener) -> Mirror[T]:
        self.listeners.append(listener)
        return self

    def notify(self, loop: PassLoop) -> Mirror[T]:
        """Mark ``loop`` dirty on every event (and every sync)."""
        return self.listen(lambda _event: loop.mark_dirty())

    def apply(self, event: KVEntry | Synced) -> None:
        """Apply one watch event, then tell the listeners."""
        self.events += 1
        if event is SYNCED:
            self.synced = True
            self.syncs += 1
        else:
            assert isinstance(event, KVEntry)
            key = event.key
            if event.deleted:
                self.entries.pop(key, None)
                self.values.pop(key, None)
                self.bad.discard(key)
            else:
                if self.keep:
                    self.entries[key] = event
                if self.decode is not None:
                    self._decode(event)
            if self.synced and tracing.carries_trace(event.headers):
                with tracing.change(event.headers):
                    for listener in self.listeners:
                        listener(event)
                return
        for listener in self.listeners:
            listener(event)

    def _decode(self, entry: KVEntry) -> None:
        try:
            value = self.decode(entry)  # type: ignore[misc]
        except (msgspec.DecodeError, msgspec.ValidationError, AssertionError, ValueError,
                KeyError, TypeError) as err:
            log.warning("%s/%s: skipping bad payload: %s", self.bucket, entry.key, err)
            value = None
        if value is None:
            self.values.pop(entry.key, None)
            self.bad.add(entry.key)
        else:
            self.values[entry.key] = value
            self.bad.discard(entry.key)

    async def follow(self, bus: WatchSource, health: WatchHealth | None = None) -> None:
        """Apply the bucket's watch forever (re-syncs after reconnects are the bus's)."""
        async for event in bus.watch(self.bucket, self.pattern):
            self.apply(event)
            if event is SYNCED and health is not None:
                health.watch_synced(self.name)


class PassLoop:
    """Runs ``run_pass`` whenever something is dirty, one pass at a time. A pass that
    raises is retried after the shared backoff, or after the error's ``retry_after``
    (seconds a remote asked to wait, e.g. an API server's 429) when that is longer."""

    def __init__(
        self,
        name: str,
        run_pass: Callable[[], Awaitable[bool | None]],
        *,
        ready: Callable[[], bool] = lambda: True,
        wake_at: Callable[[], float | None] = lambda: None,
        on_error: Callable[[BaseException], None] | None = None,
        on_success: Callable[[], None] | None = None,
        backoff_cap: float = backoff.PASS_CAP,
        clock: Callable[[], float] = time.monotonic,
        heap: HeapFreezer | None = None,
    ) -> None:
        self.name = name
        self.heap = heap  # in a service's own process: what a pass leaves is long-lived
        self.run_pass = run_pass
        self.ready = ready
        self.wake_at = wake_at
        self.on_error = on_error
        self.on_success = on_success
        self.backoff_cap = backoff_cap
        self.clock = clock
        self.dirty = asyncio.Event()
        self.marks = 0
        self.passes = 0
        self.causes = tracing.Causes()
        self._marks_before = 0  # marks when the previous pass started
        self.failures = 0  # consecutive

    def mark_dirty(self) -> None:
        self.marks += 1
        self.causes.note()
        self.dirty.set()

    async def _wait(self) -> None:
        """Until dirty, or the wake-up time has come."""
        if self.dirty.is_set():
            return
        if self.heap is not None:
            self.heap.collect_if_due()  # idle: the one long pause is off every change's path
        at = self.wake_at()
        if at is None:
            await self.dirty.wait()
            return
        try:
            await asyncio.wait_for(self.dirty.wait(), max(0.0, at - self.clock()))
        except TimeoutError:
            pass

    async def drain(self) -> None:
        """Let events already queued on the event loop land: a few scheduler turns, until
        a turn brings no new mark."""
        quiet = 0
        for _ in range(DRAIN_TURNS):
            before = self.marks
            await asyncio.sleep(0)
            quiet = quiet + 1 if self.marks == before else 0
            if quiet >= 2:
                return

    async def run(self) -> None:
        while True:
            await self._wait()
            if not self.ready():
                # inputs still loading: each sync marks the loop dirty; poll as a fallback
                self.dirty.clear()
                try:
                    await asyncio.wait_for(self.dirty.wait(), 0.05)
                except TimeoutError:
                    pass
                self.dirty.set()
                continue
            await self.drain()
            self.dirty.clear()
            try:
                again = await self._traced_pass()
            except Exception as err:  # NATS down, timeouts, a bug on odd input: retry, never die
                self.failures += 1
                delay = backoff.backoff_delay(self.failures, cap=self.backoff_cap)
                asked = getattr(err, "retry_after", None)  # e.g. an API server's Retry-After
                if isinstance(asked, int | float) and asked > delay:
                    delay = float(asked)
                log.warning("%s: pass failed: %s: %s; retrying in %.1fs", self.name,
                            type(err).__name__, err, delay, exc_info=_unexpected(err))
                if self.on_error is not None:
                    self.on_error(err)
                await asyncio.sleep(delay)
                self.dirty.set()
                continue
            self.passes += 1
            self.failures = 0
            if self.heap is not None:
                self.heap.settled()
            if self.on_success is not None:
                self.on_success()
            if again:
                self.dirty.set()


    async def _traced_pass(self) -> bool | None:
        """``run_pass`` in its span when something marked the loop since the last pass."""
        marks, self._marks_before = self.marks - self._marks_before, self.marks
        causes, dropped = self.causes.take()
        if not marks or not tracing.wanted(causes):
            return await self.run_pass()
        with tracing.pass_span(self.name, causes, dropped, marks) as span:
            again = await self.run_pass()
            if again:
                span.set_attribute(tracing.ATTR_AGAIN, True)
            return again


def _unexpected(err: BaseException) -> bool:
    """Whether a failed pass deserves a traceback (not a bus or OS error)."""
    return not isinstance(err, BusError | OSError)


def entries_only(handler: Callable[[KVEntry], None]) -> Listener:
    """A listener calling ``handler`` for key events only (not ``SYNCED``)."""

    def listener(event: KVEntry | Synced) -> None:
        if event is not SYNCED:
            handler(event)  # type: ignore[arg-type]

    return listener


class PassClock:
    """Wall time of the parts of one pass (a part that recurs adds up), for the health."""

    def __init__(self) -> None:
        self.wall_start = time.time()
        self.start = self.mark = time.perf_counter()
        self.laps: dict[str, float] = {}
        self.at: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.mark
        self.mark = now

    def milestone(self, name: str) -> None:
        """Record under ``<name>_at`` how far into the pass (ms) it is now; not a part."""
        self.at[f"{name}_at"] = time.perf_counter() - self.start

    def total_ms(self) -> float:
        return round((self.mark - self.start) * 1000, 2)

    def laps_ms(self) -> dict[str, float]:
        return {name: round(s * 1000, 2) for name, s in self.laps.items()}

    def milestones_ms(self) -> dict[str, float]:
        return {name: round(s * 1000, 2) for name, s in self.at.items()}

    def report(self, detail: dict[str, Any], recent: deque[dict[str, Any]]) -> None:
        """``last_pass_ms``, ``last_pass`` (its parts) and ``recent_passes`` (the last
        ``RECENT_PASSES``: start as Unix time, total, parts and milestones in ms) in
        `detail`."""
        total, laps = self.total_ms(), self.laps_ms()
        detail["last_pass_ms"] = total
        detail["last_pass"] = laps
        tracing.set_attributes({tracing.ATTR_PART_MS.format(part=part): ms for part, ms in laps.items()})
        recent.append({"start": round(self.wall_start, 4), "ms": total, **laps, **self.milestones_ms()})
        detail["recent_passes"] = list(recent)
