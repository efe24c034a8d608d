"""What a bucket watch delivers: ``KVEntry`` and the ``SYNCED`` marker.

Defined apart from the bus so pure modules can take mirrored entries without depending on
NATS; ``ciliary.bus`` produces them and re-exports both names.

Invariants:
- A ``KVEntry`` with ``value`` None is a delete (or purge); ``revision`` is the bucket
  stream's sequence of that write (0 for a delete the watch inferred after a reconnect).
- ``SYNCED`` is a singleton: compare with ``is``.
- ``headers`` are the NATS headers of the write as a watch delivered them: the KV
  operation and, for a write made under a span, the writer's W3C trace context
  (``traceparent``, see ``ciliary.tracing``); a get or an inferred delete has none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec


class Synced:
    """Marker yielded by ``Bus.watch`` once the initial state has been delivered."""

    def __repr__(self) -> str:
        return "SYNCED"


SYNCED = Synced()


class KVEntry(msgspec.Struct, frozen=True):
    """One key of a bucket as seen by a watch or a get."""

    bucket: str
    key: str
    revision: int
    value: bytes | None  # None for a delete/purge
    headers: dict[str, str] = {}

    @property
    def deleted(self) -> bool:
        return self.value is None


__all__ = ["SYNCED", "KVEntry", "Synced"]


def entries_version(tables: Iterable[Mapping[str, KVEntry]]) -> tuple[tuple[int, int], ...]:
    """A value that changes whenever one of ``tables`` (mirrored entries by key) changed:
    per table its size and its newest revision. A put raises the newest revision (revisions
    only grow), a delete lowers the size, so equal versions mean unchanged tables."""
    return tuple((len(entries), max((entry.revision for entry in entries.values()), default=0))
                 for entries in tables)
