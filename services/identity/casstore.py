"""Compare-and-set access to one of the identity service's output buckets.

``BusCasStore`` is the ``CasStore`` the allocator works against: reads come from the
bucket's watched view (``observe``), writes are KV compare-and-set through the bus.

Invariants:
- The view never goes backwards: an entry older than the one held is ignored, and a key
  this replica deleted stays absent until the watch delivers a newer revision.
- A failed compare-and-set re-reads the key (``refresh``) so a view that missed a change
  heals, then raises ``Conflict`` for the allocator to retry.
- A payload that does not decode is kept as a known-bad key (``bad``): it exists for
  allocation purposes but has no value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec

from ciliary import schema
from ciliary.bus import Bus, BusError, KVEntry, RevisionMismatch

from .allocator import Conflict

log = logging.getLogger(__name__)


class BusCasStore:
    """``CasStore`` over one KV bucket, with the watch mirror as the ``peek`` view."""

    def __init__(self, bus: Bus, bucket: str, decoder: Callable[[str, bytes], Any]) -> None:
        self.bus = bus
        self.bucket = bucket
        self.decoder = decoder
        self.entries: dict[str, tuple[Any, int]] = {}
        self.bad: set[str] = set()
        self.tombstones: dict[str, int] = {}

    # -- mirror
    def observe(self, entry: KVEntry) -> bool:
        """Apply a watched event; True when the view changed (the echo of a write this
        replica made, already in the view, changes nothing)."""
        key = entry.key
        held = self.entries.get(key)
        tombstone = self.tombstones.get(key)
        if tombstone is not None and entry.revision > tombstone:
            del self.tombstones[key]  # the watch has caught up with our delete
        if entry.deleted:
            if held is None or entry.revision == 0 or entry.revision >= held[1]:
                self.entries.pop(key, None)
                present = key in self.bad
                self.bad.discard(key)
                return held is not None or present
            return False
        if held is not None and entry.revision <= held[1]:
            return False  # older, or the very revision held
        if entry.revision <= self.tombstones.get(key, 0):
            return False
        assert entry.value is not None
        try:
            value = self.decoder(key, entry.value)
        except (msgspec.DecodeError, ValueError) as err:
            log.warning("%s/%s: skipping bad payload: %s", self.bucket, key, err)
            self.bad.add(key)
            self.entries.pop(key, None)
            return True
        self.bad.discard(key)
        self.entries[key] = (value, entry.revision)
        return True

    def _wrote(self, key: str, value: Any, revision: int) -> None:
        held = self.entries.get(key)
        if held is None or revision > held[1]:
            self.entries[key] = (value, revision)

    async def refresh(self, key: str) -> None:
        """Re-read ``key`` after a failed CAS, so a view that missed a change heals."""
        try:
            entry = await self.bus.kv_get(self.bucket, key)
        except BusError:
            return
        if entry is None or entry.value is None:
            self.entries.pop(key, None)
            self.bad.discard(key)
        else:
            self.entries.pop(key, None)  # accept the store's revision even if lower than ours
            self.observe(entry)

    async def audit(self) -> int:
        """Add keys the watch never delivered (list the bucket); returns how many were missing."""
        listed = await self.bus.kv_list(self.bucket)
        missing = [entry for key, entry in listed.items() if not self.exists(key)]
        for entry in missing:
            self.observe(entry)
        return len(missing)

    # -- CasStore
    def peek(self, key: str) -> tuple[Any, int] | None:
        return self.entries.get(key)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in (*self.entries, *self.bad) if k.startswith(prefix)]

    def exists(self, key: str) -> bool:
        return key in self.entries or key in self.bad

    async def get(self, key: str) -> tuple[Any, int] | None:
        entry = await self.bus.kv_get(self.bucket, key)
        if entry is None or entry.value is None:
            return None
        try:
            value = self.decoder(key, entry.value)
        except (msgspec.DecodeError, ValueError) as err:
            raise Conflict(f"{key}: bad payload: {err}") from err
        self._wrote(key, value, entry.revision)
        return value, entry.revision

    async def create(self, key: str, value: Any) -> int:
        return await self.update(key, value, 0)

    async def update(self, key: str, value: Any, revision: int) -> int:
        try:
            new = await self.bus.kv_put(self.bucket, key, value, last_revision=revision)
        except RevisionMismatch as err:
            await self.refresh(key)
            raise Conflict(str(err)) from err
        self._wrote(key, value, new)
        return new

    async def delete(self, key: str, revision: int) -> None:
        try:
            await self.bus.kv_delete(self.bucket, key, last_revision=revision)
        except RevisionMismatch as err:
            await self.refresh(key)
            raise Conflict(str(err)) from err
        held = self.entries.get(key)
        if held is not None and held[1] <= revision:
            self.entries.pop(key, None)
        self.tombstones[key] = revision


def decode_identity(key: str, data: bytes) -> Any:
    if key.startswith(schema.IDENTITY_ID_PREFIX):
        return schema.decode(data, schema.IdentityRecord)
    if key.startswith(schema.IDENTITY_LABELS_PREFIX):
        return schema.decode(data, schema.IdentityLabelsRecord)
    raise ValueError(f"unknown key {key!r} in bucket identities")


def decode_ipcache(key: str, data: bytes) -> Any:
    return schema.decode(data, schema.IPCacheRecord)
