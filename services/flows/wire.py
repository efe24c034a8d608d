"""Flows on the wire: batches and chunked query replies that fit one bus message (pure).

Invariants:
- ``flow_batches`` encodes flows as ``FlowBatch`` messages, as few as possible (one when
  it fits), each within ``limit`` bytes, keeping the flows' order and each carrying the
  raw batch's position (when split, every part carries it); a single flow larger
  than ``limit`` cannot be sent and is returned in ``too_large`` (the caller counts it).
- ``reply_chunks`` encodes a query answer as ``FlowQueryReply`` chunks 0, 1, … in order,
  each within ``limit`` bytes; every chunk but the last has ``more`` set and the last one
  carries the counters. An answer with no flows is one chunk. If a single flow cannot
  fit, the answer is one ``ok=False`` chunk saying so.
- Sizes are measured by encoding, never estimated: a chunk is split in halves until it fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ciliary import schema

REPLY_MARGIN = 256  # bytes kept free in a reply chunk for chunk number, flags and counters
REPLY_CHUNK_FLOWS = 512  # flows per reply chunk before splitting by size


@dataclass
class Batches:
    messages: list[bytes] = field(default_factory=list)
    too_large: int = 0  # flows that do not fit one message on their own


def _fit(flows: Sequence[schema.Flow], limit: int, out: list[tuple[Sequence[schema.Flow], bytes]],
         position: schema.BatchPosition | None = None) -> int:
    """Append (flows, FlowBatch bytes) parts within ``limit``; returns flows that cannot fit."""
    data = schema.encode(schema.FlowBatch(flows=list(flows), position=position))
    if len(data) <= limit:
        out.append((flows, data))
        return 0
    if len(flows) == 1:
        return 1
    mid = len(flows) // 2
    return _fit(flows[:mid], limit, out, position) + _fit(flows[mid:], limit, out, position)


def flow_batches(flows: Sequence[schema.Flow], limit: int,
                 position: schema.BatchPosition | None = None) -> Batches:
    """``FlowBatch`` payloads for ``flows`` (see the module invariants), each carrying
    ``position`` (the raw batch's place in its executor run)."""
    parts: list[tuple[Sequence[schema.Flow], bytes]] = []
    too_large = _fit(flows, limit, parts, position) if flows else 0
    return Batches([data for _, data in parts], too_large)


def reply_chunks(
    flows: Sequence[schema.Flow], limit: int, *, seen: int = 0, capacity: int = 0, lost: int = 0,
    chunk_flows: int = REPLY_CHUNK_FLOWS, first_chunk: int = 0, scanned: int = 0,
    truncated: bool = False, notice: str = "", final: bool = True,
    lost_events: Sequence[schema.LostEvent] = (),
) -> list[bytes]:
    """``FlowQueryReply`` chunks for an answer (see the module invariants), numbered from
    ``first_chunk`` (after chunks already sent); the history counters (``scanned``,
    ``truncated``, ``notice``) and ``lost_events`` go into the last chunk with the others. Without ``final``
    these are the chunks of one part of an answer that continues: all have ``more`` set."""
    room = max(1, limit - REPLY_MARGIN)
    parts: list[Sequence[schema.Flow]] = []
    for start in range(0, len(flows), max(1, chunk_flows)):
        fitted: list[tuple[Sequence[schema.Flow], bytes]] = []
        if _fit(flows[start:start + chunk_flows], room, fitted):
            return [schema.encode(schema.FlowQueryReply(
                ok=False, seen=seen, capacity=capacity, lost=lost, chunk=first_chunk,
                error=f"a flow does not fit the bus's maximum message size ({limit} bytes)"))]
        parts += [p for p, _ in fitted]
    if not parts:
        parts = [[]]
    last = len(parts) if not final else len(parts) - 1
    return [
        schema.encode(schema.FlowQueryReply(flows=list(part), chunk=first_chunk + i, more=True))
        if i < last else
        schema.encode(schema.FlowQueryReply(flows=list(part), chunk=first_chunk + i, seen=seen,
                                            capacity=capacity, lost=lost, scanned=scanned,
                                            truncated=truncated, notice=notice,
                                            lost_events=list(lost_events)))
        for i, part in enumerate(parts)
    ]
