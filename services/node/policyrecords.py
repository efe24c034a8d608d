"""The node executor's view of bucket ``policy``: heads for every identity, full records
only for the identities it enforces.

A relabel or a new peer rewrites the records of many identities (each up to thousands of
entries), and every node executor receives all of them; yet a node writes policy map
entries only for the identities of its own endpoints. The mirror therefore decodes each
value as a ``PolicyMapHead`` (flags, no entries), and ``FullPolicyRecords`` decodes the
full ``PolicyMapRecord`` of a key only when translation asks for it.

Invariants:
- ``FullPolicyRecords[key]`` is the decoding of the mirror's current entry for ``key``; it
  is decoded once per entry (the same object is returned while the entry is unchanged, so
  ``PolicySelection`` tells an unchanged record by identity) and raises ``KeyError`` for
  a key the mirror does not hold or whose full record does not decode (logged once per
  entry: the identity then gets no entries, and its head's enforcement flags drop the
  rest, so a bad payload fails closed).
- ``retain(keys)`` forgets the decoded records of every other key; the view never holds
  more full records than the executor last asked for plus the ones asked since.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import msgspec

from ciliary import schema
from ciliary.bus import KVEntry

log = logging.getLogger(__name__)


class FullPolicyRecords(Mapping[str, schema.PolicyMapRecord]):
    """Full records over a mirror's raw entries (``Mirror.entries``), decoded on demand."""

    def __init__(self, entries: Mapping[str, KVEntry]) -> None:
        self._entries = entries
        self._decoded: dict[str, tuple[KVEntry, schema.PolicyMapRecord | None]] = {}

    def __getitem__(self, key: str) -> schema.PolicyMapRecord:
        entry = self._entries[key]
        held = self._decoded.get(key)
        if held is None or held[0] is not entry:
            try:
                record: schema.PolicyMapRecord | None = schema.decode_policy_map_record(entry.value or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                log.warning("%s/%s: skipping bad payload: %s", schema.BUCKET_POLICY, key, err)
                record = None
            held = (entry, record)
            self._decoded[key] = held
        if held[1] is None:
            raise KeyError(key)
        return held[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def retain(self, keys: Iterable[str]) -> None:
        """Keep the decoded records of ``keys`` only."""
        wanted = set(keys)
        for key in [k for k in self._decoded if k not in wanted]:
            del self._decoded[key]

    def decoded(self) -> int:
        """How many full records are held decoded (health detail ``caches``)."""
        return len(self._decoded)


__all__ = ["FullPolicyRecords"]
