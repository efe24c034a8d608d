"""Numeric identities and their allocation over a compare-and-set store.

Pure code: no NATS. The service runs it against the ``identities`` bucket through a
``CasStore`` adapter; tests run it against ``MemoryCasStore``.

Numbering is ``ciliary.schema.identity``'s (Cilium ``pkg/identity``): reserved 1..11,
cluster-scoped identities in ``schema.identity_cluster_range(cluster_id)`` (cluster ID in
bits 16-23), local (CIDR) identities ``1 << 24 | n`` with n in 1..0xFFFFFF. Scope
``cluster`` allocates from the cluster range, scope ``cidr`` from the local range.

Allocation invariants (held by compare-and-set alone, never by in-memory locks, so any
number of allocators may share one store):
- ``id.<n>`` is created only if absent; it names exactly one label set while it exists.
- ``labels.<hash>`` is created only after its ``id.<n>`` and deleted before it; it is
  created only if absent, so a label set has at most one committed identity and no two
  ``labels.`` keys name one id.
- An allocator that loses the race for ``labels.<hash>`` deletes its own ``id.<n>``.
- Release is two-phase: a ``labels.`` record with ``refs == 0`` is first marked
  ``unused_since``; only a record that stayed marked for the grace period is deleted,
  with CAS against the marked revision, so a concurrent re-use (which clears the mark)
  wins over the release.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ciliary import schema
from ciliary.schema import identity_cluster_range as cluster_range

from .labels import label_set_hash

# ---------------------------------------------------------------- numbering

SCOPE_RESERVED = "reserved"
SCOPE_CLUSTER = "cluster"
SCOPE_CIDR = "cidr"
SCOPE_REMOTE = "remote"  # a connected cluster's identity, written from bucket ``mesh``


def reserved_labels(identity: int) -> list[str]:
    """Labels of a reserved identity (kube-apiserver also carries remote-node, as in Cilium)."""
    name = schema.RESERVED_IDENTITIES[identity]
    if identity == schema.IDENTITY_KUBE_APISERVER:
        return ["reserved:kube-apiserver", "reserved:remote-node"]
    return [f"reserved:{name}"]


def scope_range(scope: str, cluster_id: int) -> tuple[int, int]:
    """Inclusive ``(min, max)`` of the identities allocated in ``scope``."""
    if scope == SCOPE_CIDR:
        return schema.IDENTITY_LOCAL_MIN, schema.IDENTITY_LOCAL_MAX
    return cluster_range(cluster_id)


# ---------------------------------------------------------------- the store


class Conflict(Exception):
    """Compare-and-set failed: the key exists, is gone, or changed since the revision."""


class CasStore(Protocol):
    """A key-value store with compare-and-set (a JetStream KV bucket, or a dict in tests).

    ``peek`` may answer from a possibly stale local view; ``get`` reads the store.
    """

    def peek(self, key: str) -> tuple[Any, int] | None: ...

    def keys(self, prefix: str) -> list[str]: ...

    def exists(self, key: str) -> bool: ...

    async def get(self, key: str) -> tuple[Any, int] | None: ...

    async def create(self, key: str, value: Any) -> int: ...

    async def update(self, key: str, value: Any, revision: int) -> int: ...

    async def delete(self, key: str, revision: int) -> None: ...


class MemoryCasStore:
    """In-memory ``CasStore``; ``before_op`` lets a test interleave allocators at every op."""

    def __init__(self, before_op: Callable[[str, str], Any] | None = None) -> None:
        self.data: dict[str, tuple[Any, int]] = {}
        self.revision = 0
        self.before_op = before_op
        self.after_write: Callable[[], None] | None = None

    async def _gate(self, op: str, key: str) -> None:
        if self.before_op is not None:
            await self.before_op(op, key)

    def peek(self, key: str) -> tuple[Any, int] | None:
        return self.data.get(key)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.data if k.startswith(prefix)]

    def exists(self, key: str) -> bool:
        return key in self.data

    async def get(self, key: str) -> tuple[Any, int] | None:
        await self._gate("get", key)
        return self.data.get(key)

    def _write(self, key: str, value: Any) -> int:
        self.revision += 1
        self.data[key] = (value, self.revision)
        if self.after_write:
            self.after_write()
        return self.revision

    async def create(self, key: str, value: Any) -> int:
        await self._gate("create", key)
        if key in self.data:
            raise Conflict(key)
        return self._write(key, value)

    async def update(self, key: str, value: Any, revision: int) -> int:
        await self._gate("update", key)
        current = self.data.get(key)
        if current is None or current[1] != revision:
            raise Conflict(key)
        return self._write(key, value)

    async def delete(self, key: str, revision: int) -> None:
        await self._gate("delete", key)
        current = self.data.get(key)
        if current is None or current[1] != revision:
            raise Conflict(key)
        del self.data[key]
        self.revision += 1
        if self.after_write:
            self.after_write()


# ---------------------------------------------------------------- the allocator


class AllocationError(Exception):
    """No identity could be allocated (range exhausted or too much contention)."""


@dataclass
class Usage:
    """What one allocation pass decided for a label set."""

    identity: int
    wrote: bool


class IdentityAllocator:
    """Allocates, reference-counts and releases identities in a ``CasStore``."""

    def __init__(
        self,
        store: CasStore,
        cluster: str,
        cluster_id: int,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        max_attempts: int = 64,
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.cluster_id = cluster_id
        cluster_range(cluster_id)  # validates
        self.rng = rng or random.Random()
        self.clock = clock
        self.max_attempts = max_attempts
        self.conflicts = 0

    # -------------------------------------------------------------- allocate / use

    async def allocate(self, labels: Iterable[str], *, refs: int = 1, scope: str = SCOPE_CLUSTER) -> Usage:
        """The identity of ``labels``, allocating one if needed; records ``refs`` users.

        ``refs > 0`` clears a pending release mark; ``refs == 0`` starts (or keeps) one.
        """
        label_list = sorted(labels)
        lkey = schema.identity_labels_key(label_set_hash(label_list))
        for attempt in range(self.max_attempts):
            current = self.store.peek(lkey) if attempt == 0 else await self.store.get(lkey)
            if current is not None:
                record, revision = current
                if list(record.labels) != label_list:
                    raise AllocationError(f"label hash collision on {lkey}")
                desired = self._usage(record, refs)
                if desired == record:
                    return Usage(record.id, False)
                try:
                    await self.store.update(lkey, desired, revision)
                except Conflict:
                    self.conflicts += 1
                    continue
                return Usage(record.id, True)
            identity = await self._reserve_id(label_list, scope)
            if identity is None:
                continue
            ident, id_revision = identity
            record = schema.IdentityLabelsRecord(
                id=ident, labels=label_list, refs=refs,
                unused_since=0.0 if refs > 0 else self.clock(),
            )
            try:
                await self.store.create(lkey, record)
            except Conflict:
                self.conflicts += 1
                try:  # lost the race for the label set: give our id back
                    await self.store.delete(schema.identity_id_key(ident), id_revision)
                except Conflict:
                    pass
                continue
            return Usage(ident, True)
        raise AllocationError(f"no identity for {label_list} after {self.max_attempts} attempts")

    def held(self, lkey: str, labels: Iterable[str], refs: int) -> int:
        """The identity of ``labels`` (whose ``labels.`` key is ``lkey``) when the store's
        view shows it allocated with exactly this usage, i.e. when `allocate` would return
        it without a write; else 0. Synchronous: the pass skips `allocate` for it."""
        current = self.store.peek(lkey)
        if current is None:
            return 0
        record = current[0]
        if list(record.labels) != list(labels) or self._usage(record, refs) != record:
            return 0
        return record.id

    def _usage(self, record: schema.IdentityLabelsRecord, refs: int) -> schema.IdentityLabelsRecord:
        if refs > 0:
            unused_since = 0.0
        else:
            unused_since = record.unused_since or self.clock()
        if record.refs == refs and record.unused_since == unused_since:
            return record
        return schema.IdentityLabelsRecord(
            id=record.id, labels=list(record.labels), refs=refs, unused_since=unused_since
        )

    async def _reserve_id(self, labels: list[str], scope: str) -> tuple[int, int] | None:
        low, high = scope_range(scope, self.cluster_id)
        candidate = self._pick_free(low, high)
        if candidate is None:
            raise AllocationError(f"identity range {low}..{high} is exhausted")
        record = schema.IdentityRecord(
            id=candidate, labels=labels, scope=scope, cluster=self.cluster,
            cluster_id=self.cluster_id, created=self.clock(),
        )
        try:
            revision = await self.store.create(schema.identity_id_key(candidate), record)
        except Conflict:
            self.conflicts += 1
            return None
        return candidate, revision

    def _pick_free(self, low: int, high: int) -> int | None:
        """A random id of the range that this allocator's view shows free (a hint only)."""
        for _ in range(64):
            candidate = self.rng.randint(low, high)
            if not self.store.exists(schema.identity_id_key(candidate)):
                return candidate
        used = set()
        for key in self.store.keys(schema.IDENTITY_ID_PREFIX):
            try:
                used.add(int(key[len(schema.IDENTITY_ID_PREFIX):]))
            except ValueError:
                continue
        free = [i for i in range(low, high + 1) if i not in used]
        return self.rng.choice(free) if free else None

    # -------------------------------------------------------------- release

    async def release(self, lkey: str, grace: float) -> bool:
        """Mark ``lkey`` unused, or delete it once it stayed unused for ``grace`` seconds.

        Returns True when the identity was deleted. A conflict (someone re-used or
        changed it meanwhile) leaves it alone; the next pass decides again.
        """
        current = self.store.peek(lkey)
        if current is None:
            return False
        record, revision = current
        now = self.clock()
        if record.refs != 0 or not record.unused_since:
            try:
                await self.store.update(lkey, self._usage(record, 0), revision)
            except Conflict:
                self.conflicts += 1
            return False
        if now - record.unused_since < grace:
            return False
        try:
            await self.store.delete(lkey, revision)
        except Conflict:
            self.conflicts += 1
            return False
        id_key = schema.identity_id_key(record.id)
        found = self.store.peek(id_key) or await self.store.get(id_key)
        if found is not None and list(found[0].labels) == list(record.labels):
            try:
                await self.store.delete(id_key, found[1])
            except Conflict:
                self.conflicts += 1
        return True

    async def sweep_orphans(self, min_age: float) -> int:
        """Delete ``id.`` keys no ``labels.`` key names, once older than ``min_age`` seconds.

        They are left behind by an allocator that died between its two creates (or its
        two deletes). ``min_age`` must exceed the time an allocation takes.
        """
        named = set()
        for lkey in self.store.keys(schema.IDENTITY_LABELS_PREFIX):
            entry = self.store.peek(lkey)
            if entry is not None:
                named.add(entry[0].id)
        now = self.clock()
        removed = 0
        for key in self.store.keys(schema.IDENTITY_ID_PREFIX):
            entry = self.store.peek(key)
            if entry is None:
                continue
            record, revision = entry
            if record.scope in (SCOPE_RESERVED, SCOPE_REMOTE) or record.id in named:
                continue
            if now - record.created < min_age:
                continue
            try:
                await self.store.delete(key, revision)
                removed += 1
            except Conflict:
                self.conflicts += 1
        return removed

    async def ensure_reserved(self) -> None:
        """Write the reserved identities (1..11) so ``identity list`` shows them."""
        for ident in schema.RESERVED_IDENTITIES:
            key = schema.identity_id_key(ident)
            if self.store.peek(key) is not None:
                continue
            record = schema.IdentityRecord(
                id=ident, labels=reserved_labels(ident), scope=SCOPE_RESERVED,
                cluster=self.cluster, cluster_id=self.cluster_id,
            )
            try:
                await self.store.create(key, record)
            except Conflict:
                pass
