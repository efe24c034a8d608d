"""Events of a node that never reached the flows service, counted exactly (pure).

Each sequenced ``RawEventBatch`` carries its executor run (``run``, the run's start time in
unix ns), its ``seq`` and the run's running totals ``events_total`` and ``lost_total``.
The ledger keeps, per ``<cluster>/<node>``, the position of the last batch it accounted
and compares each new batch with it.

Invariants:
- Same run, next batches missing: the events of the missing batches are
  ``events_total - len(events) - last.events_total`` and the ring-buffer losses they
  reported ``lost_total - lost - last.lost_total``; both exact, never negative.
- A newer run (larger ``run``): the events of the new run before this batch are missing
  (``events_total - len(events)``); what the old run published after the last position
  cannot be known and is not counted. A batch of an older run than the position (a
  stale executor still publishing) or of the same run with ``seq`` not past the position
  (a duplicate, or a late one) counts nothing and leaves the position as it is.
- No position for a node (first batch since the service started and nothing restored):
  nothing is counted; the batch becomes the position. Counting never guesses upwards.
- A position restored from storage (``restore``; the ``FLOWS`` stream's last message of
  the node after a restart) makes the next gap of that node an outage loss
  (``LOST_OUTAGE``); gaps seen while the service ran are bus losses (``LOST_BUS``).
- Batches of executors that do not send totals (``run`` 0) fall back to the ``seq`` gap:
  one event per missing batch (a lower bound), a ``seq`` that does not grow is a restart.
  ``seq`` 0 is never accounted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ciliary import schema

from .metrics import LOST_BUS, LOST_OUTAGE


@dataclass(frozen=True)
class Gap:
    """What is missing before one batch: events and ring-buffer losses of batches that
    never arrived, counted under ``source``."""

    source: str = LOST_BUS
    events: int = 0
    ring_lost: int = 0
    batches: int = 0  # batches missing, when the run is the same (else 0: unknown)


NO_GAP = Gap()


def position_of(batch: schema.RawEventBatch) -> schema.BatchPosition:
    return schema.BatchPosition(run=batch.run, seq=batch.seq, events_total=batch.events_total,
                                lost_total=batch.lost_total)


class LossLedger:
    """Per node, the last accounted position and the gap before each new batch."""

    def __init__(self) -> None:
        self.positions: dict[str, schema.BatchPosition] = {}
        self.restored: set[str] = set()  # nodes whose position came from storage, no batch since
        self.known: set[str] = set()  # nodes this ledger has seen or been told about

    def needs_restore(self, key: str) -> bool:
        """Whether the position of ``key`` should be looked up before its first batch."""
        return key not in self.known

    def restore(self, key: str, position: schema.BatchPosition | None) -> None:
        """The position stored before this service started (``None``: none stored)."""
        self.known.add(key)
        if position is None or position.run <= 0 or position.seq <= 0 or key in self.positions:
            return
        self.positions[key] = position
        self.restored.add(key)

    def account(self, key: str, batch: schema.RawEventBatch) -> Gap:
        """The gap before ``batch`` (of node ``key``); moves the node's position to it."""
        self.known.add(key)
        if batch.seq <= 0:
            return NO_GAP
        if batch.run <= 0:
            return self._legacy(key, batch.seq)
        last = self.positions.get(key)
        source = LOST_OUTAGE if key in self.restored else LOST_BUS
        if last is None or last.run <= 0:
            self._advance(key, batch)
            return NO_GAP
        if batch.run < last.run or (batch.run == last.run and batch.seq <= last.seq):
            return NO_GAP
        self._advance(key, batch)
        if batch.run > last.run:  # a new run: what it sent before this batch is missing
            gap = Gap(source, max(0, batch.events_total - len(batch.events)),
                      max(0, batch.lost_total - batch.lost))
        else:
            gap = Gap(source, max(0, batch.events_total - len(batch.events) - last.events_total),
                      max(0, batch.lost_total - batch.lost - last.lost_total), batch.seq - last.seq - 1)
        return gap if gap.events or gap.ring_lost or gap.batches else NO_GAP

    def _advance(self, key: str, batch: schema.RawEventBatch) -> None:
        self.positions[key] = position_of(batch)
        self.restored.discard(key)

    def _legacy(self, key: str, seq: int) -> Gap:
        last = self.positions.get(key)
        self.positions[key] = schema.BatchPosition(seq=seq)
        self.restored.discard(key)
        if last is None or last.run > 0 or seq <= last.seq:
            return NO_GAP
        return Gap(LOST_BUS, seq - last.seq - 1, 0, seq - last.seq - 1)
