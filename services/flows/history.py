"""Flow history beyond the rings: which part of a query the ``FLOWS`` stream answers,
scanning that part of the stream, and merging it with the rings' answer.

The rings (``store.py``) hold every flow newer than their *horizon*
(``FlowStore.horizon_ns``); older flows exist only in the JetStream stream ``FLOWS``, one
``FlowBatch`` message per raw batch. A query reads the stream only when the rings cannot
answer it: its ``since`` is before the horizon (or unset: ``--all``, ``--first N``,
``--until``), or a ``--last N`` the rings do not fill with flows after the horizon.

Invariants:
- Filter semantics are ``flowfilter.matches`` and the query's ``since <= time <= until``,
  exactly as for the rings; the stream part takes only flows up to the horizon (the
  rings have the later ones), and the merged answer is oldest first (ties: stream before rings,
  then stream order), each flow once by UUID, then the first or last ``number`` of it.
- Stream positions come from server time (when a batch was stored): reading starts
  ``margin`` before ``since`` and stops once a batch was stored later than ``margin``
  plus the largest store delay seen in this scan after the last time still wanted, so
  node clocks that run behind the server's (or a backlog) do not lose flows.
- Work per query is bounded: at most ``max_scan`` flows are decoded from the stream, and
  kept flows are at most ``number`` (or the flows scanned for ``--all``/``--since``); a
  scan stopped by the bound is reported as ``truncated``, never silently shorter.
- Kept stream flows stay msgpack (``msgspec.Raw`` slices of the stored messages, with
  their time and UUID): about a tenth of the memory of decoded ``Flow`` records and no
  work for the cyclic garbage collector. They are decoded when the answer is sent, one
  chunk at a time (``answer_entries`` / ``decode_entries``). Without filters only time
  and UUID are decoded while scanning.
- Everything here is pure except ``read_history``, which only awaits the message batches
  it is given and yields to the event loop after each message, so ingest keeps up.
"""

from __future__ import annotations

import asyncio
import heapq
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import msgspec

from ciliary import flowfilter, schema
from ciliary.hubble import parse_rfc3339

ENV_MAX_SCAN = "CILIARY_FLOWS_HISTORY_MAX_SCAN"  # 0 = queries read the rings only
ENV_MARGIN = "CILIARY_FLOWS_HISTORY_MARGIN"  # seconds
DEFAULT_MAX_SCAN = 200_000
DEFAULT_MARGIN_S = 60.0
PROGRESS_EVERY_S = 1.0  # a progress chunk at most this often (keeps the CLI's timeout fed)


class Message(Protocol):
    """What ``read_history`` needs of a stored message (``ciliary.bus.StreamMessage``)."""

    @property
    def time_ns(self) -> int: ...

    @property
    def data(self) -> bytes: ...


@dataclass(frozen=True)
class HistoryLimits:
    max_scan: int = DEFAULT_MAX_SCAN  # flows decoded from the stream per query
    margin_ns: int = int(DEFAULT_MARGIN_S * 1e9)

    @property
    def enabled(self) -> bool:
        return self.max_scan > 0

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> HistoryLimits:
        """Limits from ``CILIARY_FLOWS_HISTORY_MAX_SCAN``/``_MARGIN``; ValueError names the
        variable whose value is bad."""
        values: dict[str, float] = {}
        for name, default in ((ENV_MAX_SCAN, DEFAULT_MAX_SCAN), (ENV_MARGIN, DEFAULT_MARGIN_S)):
            text = env.get(name, "") or str(default)
            try:
                values[name] = float(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number") from None
            if values[name] < 0:
                raise ValueError(f"{name}={text!r} must not be negative")
        return cls(max_scan=int(values[ENV_MAX_SCAN]), margin_ns=int(values[ENV_MARGIN] * 1e9))


# ---------------------------------------------------------------- planning


def needs_stream(q: schema.FlowQuery, ring: Sequence[tuple[int, schema.Flow]], horizon_ns: int) -> bool:
    """Whether the stream must be read for ``q``, given the rings' answer ``ring``
    ((time, flow), oldest first) and the rings' horizon (0: the rings hold everything)."""
    if horizon_ns <= 0 or q.rings_only:
        return False
    if q.since_ns and q.until_ns and q.until_ns < q.since_ns:
        return False  # an empty range
    if q.since_ns and q.since_ns >= horizon_ns:
        return False
    if q.number and not q.first and len(ring) >= q.number and ring[0][0] >= horizon_ns:
        return False  # the newest N are all after the horizon
    return True


def start_time_ns(since_ns: int, margin_ns: int) -> int:
    """Server time to start reading the stream at (0: from its first message)."""
    if not since_ns:
        return 0
    return max(0, since_ns - margin_ns)


# ---------------------------------------------------------------- scanning


class _RawBatch(msgspec.Struct, forbid_unknown_fields=True):
    """A ``FlowBatch`` with its flows left encoded."""

    flows: list[msgspec.Raw] = []
    position: schema.BatchPosition | None = None


class _FlowKey(msgspec.Struct):
    """The two fields of a ``Flow`` a scan without filters needs."""

    time: str = ""
    uuid: str = ""


_batch_decoder = msgspec.msgpack.Decoder(_RawBatch)
_flow_decoder = msgspec.msgpack.Decoder(schema.Flow)
_key_decoder = msgspec.msgpack.Decoder(_FlowKey)

# (time ns, uuid, the flow: still encoded from the stream, or a ring's Flow)
Entry = tuple[int, str, "msgspec.Raw | schema.Flow"]


class _Clock:
    """Unix ns of RFC 3339 flow times, the date-and-seconds part parsed once per second."""

    def __init__(self) -> None:
        self._secs: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if len(text) < 20 or text[-1] != "Z" or text[19] not in ".Z":
            return self._slow(text)
        head = text[:19]
        secs = self._secs.get(head)
        if secs is None:
            try:
                secs = parse_rfc3339(head + "Z")
            except ValueError:
                return 0
            if len(self._secs) > 4096:
                self._secs.clear()
            self._secs[head] = secs
        frac = text[20:-1]
        if not frac:
            return secs
        if not frac.isdigit() or len(frac) > 9:
            return self._slow(text)
        return secs + int(frac) * 10 ** (9 - len(frac))

    @staticmethod
    def _slow(text: str) -> int:
        try:
            return parse_rfc3339(text)
        except (ValueError, IndexError):
            return 0


class StreamScan:
    """Accumulates the stream part of one query (pure): ``feed`` each stored message in
    stream order; it returns False once nothing later can belong to the answer or the
    scan bound is reached. ``entries()`` is the result, oldest first (``timed()`` decoded)."""

    def __init__(self, q: schema.FlowQuery, horizon_ns: int, limits: HistoryLimits) -> None:
        self.q = q
        # flows after the horizon are the rings'; at it, ties the rings overwrote are here
        self.before_ns = horizon_ns + 1 if horizon_ns > 0 else 0
        self.limits = limits
        self.scanned = 0
        self.undecodable = 0  # messages that are not a FlowBatch
        self.truncated = False
        self.delay_ns = 0  # largest (stored time - newest flow time) of a message so far
        self._order = 0
        self._time = _Clock()
        self._kept: list[tuple[int, int, str, msgspec.Raw]] = []  # (±time, ±order, uuid, flow)
        self._filtered = bool(q.whitelist or q.blacklist)

    def feed(self, data: bytes, stored_ns: int) -> bool:
        try:
            raws = _batch_decoder.decode(data).flows
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.undecodable += 1
            return True
        q, kept, clock = self.q, self._kept, self._time
        number, first, filtered = q.number, q.first, self._filtered
        since, until, before = q.since_ns, q.until_ns, self.before_ns
        room = self.limits.max_scan - self.scanned
        if len(raws) > room:
            raws = raws[:room]
            self.truncated = True
        self.scanned += len(raws)
        t = 0
        for raw in raws:
            try:
                flow: schema.Flow | _FlowKey = (_flow_decoder if filtered else _key_decoder).decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.undecodable += 1
                continue
            t = clock(flow.time)
            if (before and t >= before) or (since and t < since) or (until and t > until):
                continue
            if filtered and not flowfilter.matches(flow, q.whitelist, q.blacklist):  # type: ignore[arg-type]
                continue
            self._order += 1
            if not number:
                kept.append((t, self._order, flow.uuid, raw))
            elif first:  # a max-heap of the oldest N
                item = (-t, -self._order, flow.uuid, raw)
                if len(kept) < number:
                    heapq.heappush(kept, item)
                elif item > kept[0]:
                    heapq.heapreplace(kept, item)
            else:  # a min-heap of the newest N
                item = (t, self._order, flow.uuid, raw)
                if len(kept) < number:
                    heapq.heappush(kept, item)
                elif item > kept[0]:
                    heapq.heapreplace(kept, item)
        if raws and t:
            self.delay_ns = max(self.delay_ns, stored_ns - t)
        if self.truncated or self.scanned >= self.limits.max_scan:
            self.truncated = True
            return False
        return not self.past_end(stored_ns)

    def wanted_before_ns(self) -> int:
        """Only flows older than this can still change the answer (0: no such bound)."""
        bounds = [self.before_ns] if self.before_ns > 0 else []
        if self.q.until_ns:
            bounds.append(self.q.until_ns + 1)
        if self.q.number and self.q.first and len(self._kept) >= self.q.number:
            bounds.append(-self._kept[0][0] + 1)  # after the newest of the oldest N
        return min(bounds) if bounds else 0

    def past_end(self, stored_ns: int) -> bool:
        """Whether a message stored at ``stored_ns`` is past every flow still wanted."""
        end = self.wanted_before_ns()
        return end > 0 and stored_ns > end + self.delay_ns + self.limits.margin_ns

    def entries(self) -> list[Entry]:
        """The kept flows, still encoded, oldest first (stream order for equal times)."""
        if self.q.number and self.q.first:
            items = sorted((-t, -o, u, r) for t, o, u, r in self._kept)
        else:
            items = sorted(self._kept, key=lambda item: (item[0], item[1]))
        return [(t, u, r) for t, _, u, r in items]

    def timed(self) -> list[tuple[int, schema.Flow]]:
        """``entries`` decoded: (time, flow) oldest first."""
        return [(t, f) for (t, _, _), f in zip(self.entries(), decode_entries(self.entries()), strict=True)]


async def read_history(
    batches: AsyncIterator[Sequence[Message]],
    scan: StreamScan,
    progress: Callable[[int], Awaitable[None]] | None = None,
    *,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> None:
    """Feed ``scan`` from ``batches`` (stored messages in stream order) until it has
    enough, yielding to the event loop after every batch and calling ``progress`` with
    the flows scanned so far at most every ``progress_every_s`` seconds. The source is
    closed when reading stops."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    async with aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            for message in batch:
                if not scan.feed(message.data, message.time_ns):
                    return
                await asyncio.sleep(0)  # one message is at most a few ms of work
            if progress is not None and loop.time() - last >= progress_every_s:
                await progress(scan.scanned)
                last = loop.time()


# ---------------------------------------------------------------- merging


def answer_entries(
    stream: Iterable[Entry],
    ring: Iterable[tuple[int, schema.Flow]],
    q: schema.FlowQuery,
) -> list[Entry]:
    """The answer to ``q`` from the stream part (``StreamScan.entries``) and the rings'
    part ((time, flow), oldest first): merged by time, each UUID once, then the first or
    last ``number``; stream flows are still encoded (``decode_entries``)."""
    seen: set[str] = set()
    out: list[Entry] = []
    rings = ((t, f.uuid, f) for t, f in ring)
    for entry in heapq.merge(stream, rings, key=lambda item: item[0]):
        uuid = entry[1]
        if uuid:
            if uuid in seen:
                continue
            seen.add(uuid)
        out.append(entry)
    if q.number > 0:
        return out[:q.number] if q.first else out[-q.number:]
    return out


def decode_entries(entries: Iterable[Entry]) -> list[schema.Flow]:
    """The flows of answer entries (stream ones decoded, ring ones as they are)."""
    return [f if isinstance(f, schema.Flow) else _flow_decoder.decode(f) for _, _, f in entries]


def merge(
    stream: Iterable[tuple[int, schema.Flow]],
    ring: Iterable[tuple[int, schema.Flow]],
    q: schema.FlowQuery,
) -> list[schema.Flow]:
    """``answer_entries`` for decoded flows on both sides, decoded."""
    return decode_entries(answer_entries(((t, f.uuid, f) for t, f in stream), ring, q))
