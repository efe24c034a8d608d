"""Desired BPF map entries, their status, and the reconciler that applies them.

A producer (ipcache, policy, lb, endpoints) calls ``set_desired(owner, entries)``
with everything that owner wants; ``reconcile(ops, now)`` pushes the difference
into the kernel through the narrow ``MapOps`` interface; ``full_resync`` repairs
drift and prunes orphans; ``restore`` reads the pinned maps before the first
reconcile so a restart rewrites nothing that was right.

Invariants:
- The table is keyed by ``(map name, key bytes)``. A row's desired value is the
  value of the owner with the smallest tag among those that claim the key, so
  the table depends only on each owner's latest ``set_desired`` and not on the
  order the calls arrived in. A key no owner claims is desired absent: it stays
  as a pending delete until a delete succeeds (or a dump shows it absent), and
  only then leaves the table.
- Every row carries what the kernel is believed to hold: a value, absent, or
  unknown. A row is ``done`` exactly when that belief is known and equals the
  desired value. Beliefs come only from successful writes and from dumps; a
  failed call makes the belief unknown (a batch may be partly applied). Re-sending
  an unchanged desired state never re-writes a ``done`` row.
- ``reconcile`` only acts on rows that are not done and whose retry time has
  come. Within one pass all upserts run before all deletes (add new before
  removing old, so a replacement never leaves a gap). Upserts keep each owner's
  supplied order, deletes run in the reverse of it; batches group runs of one
  map across owners without reordering any single owner's entries (lb: backend
  slots, then slot 0; shrinking writes slot 0 before extra slots are deleted).
- A failed batch falls back to one call per entry, so one bad entry does not
  block the others. A failed entry is retried after 100 ms, doubling per
  consecutive failure, capped at 60 s (``backoff.ENTRY_CAP``); a new desired value
  retries at once.
- While an owner has an upsert that failed fewer than ``hold_deletes`` times,
  that owner's deletes wait for it (a shrinking service keeps its extra slots
  until slot 0 holds the new count). After that the deletes go ahead anyway, so
  a map that is full (new keys failing) can still free space and progress.
- ``full_resync`` dumps every owned map (and any other map holding desired
  rows), re-queues entries that are missing or hold another value, and deletes
  entries nobody desires — in owned maps only. Maps the datapath writes itself
  (conntrack, metrics) are not owned and are never pruned. Only call it once
  every owner has delivered its desired state, or it prunes what was merely
  not loaded yet.
- ``restore`` only reads: rows whose kernel value already matches become done
  without a write; nothing is deleted. It returns the dumped entries (for re-seeding
  ID allocators) and keeps no copy of them: what stays is the desired table and, per
  owned map, the entries outside it (until a ``set_desired`` claims them or a full
  resync deletes them). ``table_sizes`` reports these sizes.
- Time is whatever clock the caller passes as ``now`` (seconds, monotonic); the
  core (``Reconciler``) never reads a clock, never sleeps and never touches NATS
  or asyncio; only the optional ``ReconcileLoop`` driver does.
- ``set_desired`` copies keys and values; layouts handed back (``EntryStatus``,
  ``owner_entries``) are the table's own and must not be mutated.
- Not thread-safe by design: one thread (or one asyncio task plus the producers
  running on the same event loop) owns a ``Reconciler``. ``ReconcileLoop`` keeps
  to this by calling ``reconcile`` synchronously on the loop.
- ``ReconcileLoop`` never holds the event loop for a whole resync: maps are dumped in a
  thread and learned in chunks (``Resync``), and a kicked change is reconciled in between,
  so one change's latency does not depend on the table's size. ``last_resync`` keeps the
  last resync's duration, its phases and its longest step on the loop.
- ``stats`` reads running totals (O(maps)); ``recount`` re-derives them by walking the
  table and must always agree.
- ``ReconcileLoop`` runs the reconcile a ``kick`` asked for in a ``node map write``
  span, child of the traced change that made the producer kick (``ciliary.tracing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ciliary import tracing
from ciliary.backoff import ENTRY_CAP, backoff_delay
from ciliary.heap import HeapFreezer
from services.node import layouts as L
from services.node.layouts import Layout
from services.node.maps import Entry, MapOps, MapOpsError, dump_as_bytes

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1024
DEFAULT_HOLD_DELETES = 5  # ~1.5 s of retries (0.1 + 0.2 + 0.4 + 0.8)
DEFAULT_NOT_OWNED = frozenset({L.CT, L.METRICS})

RowKey = tuple[str, bytes]


class Status(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    ERROR = "error"


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
"""Kernel belief for a row whose kernel value is not known."""

ORPHAN_OWNER = ""
"""Owner recorded on rows found in the kernel that no owner ever desired."""


def _same(a: bytes | None | _Unknown, b: bytes | None) -> bool:
    return a is not UNKNOWN and a == b


def _key_layout(map_name: str, key: bytes) -> Layout:
    return L.MAPS[map_name][0].from_bytes(key)


def _value_layout(map_name: str, value: bytes | None) -> Layout | None:
    return None if value is None else L.MAPS[map_name][1].from_bytes(value)


@dataclass(slots=True)
class _Row:
    """Keys and values are kept as the bytes the kernel holds (a ctypes layout costs
    several times more memory); layouts are built only for map calls and views."""

    map: str
    key: bytes
    value: bytes | None  # desired; None = desired absent
    kernel: bytes | None | _Unknown  # believed kernel value; None = absent
    owner: str = ORPHAN_OWNER  # winning (or last winning) owner, for ordering
    seq: int = 0  # position in that owner's supplied order
    claims: tuple[str, ...] = ()  # owners that want this key (usually one: a tuple is small)
    status: Status = Status.PENDING
    attempts: int = 0
    last_error: str | None = None
    next_retry: float = 0.0


@dataclass(frozen=True, slots=True)
class EntryStatus:
    """A read-only view of one row of the desired-state table."""

    map: str
    key: Layout
    value: Layout | None  # None: a pending delete
    owner: str
    status: Status
    attempts: int
    last_error: str | None
    next_retry: float


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    upserted: int = 0
    deleted: int = 0
    failed: int = 0
    held: int = 0  # deletes waiting for a failed upsert of the same owner
    batches: int = 0
    next_retry: float | None = None  # earliest time a row will be due; None: all done


@dataclass(frozen=True, slots=True)
class ResyncResult:
    drifted: int  # done rows whose kernel value was missing or different
    orphans: int  # entries in owned maps that nobody desires
    failed_maps: tuple[str, ...]  # maps whose dump failed (not checked this time)
    reconcile: ReconcileResult


@dataclass(frozen=True, slots=True)
class MapStats:
    desired: int  # rows desired present
    entries: int  # entries believed present in the kernel map
    max_entries: int | None
    fill: float | None  # entries / max_entries


@dataclass(frozen=True, slots=True)
class ReconcilerStats:
    pending: int
    done: int
    error: int
    pending_deletes: int
    conflicts: int  # keys claimed by several owners with different values
    total_errors: int  # failed entry operations and failed dumps, ever
    batch_fallbacks: int  # batches that failed and were retried entry by entry
    last_resync: float | None  # ``now`` of the last full resync that dumped every map
    maps: dict[str, MapStats]


class Reconciler:
    """Desired-state table for the pinned BPF maps plus the logic that applies it.

    ``not_owned``: maps written by the datapath itself; never pruned (default
    conntrack and metrics). ``max_entries``: configured map sizes, for fill stats.
    ``batch_size``: most entries per batch call. ``hold_deletes``: failed attempts
    of an owner's upsert during which that owner's deletes wait (0: never wait).
    """

    def __init__(self, *, not_owned: Iterable[str] = DEFAULT_NOT_OWNED,
                 max_entries: Mapping[str, int] | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 hold_deletes: int = DEFAULT_HOLD_DELETES) -> None:
        not_owned = frozenset(not_owned)
        unknown = not_owned - L.MAPS.keys()
        if unknown:
            raise ValueError(f"unknown maps {sorted(unknown)}")
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.owned_maps: frozenset[str] = frozenset(L.MAPS) - not_owned
        self.max_entries: dict[str, int] = dict(max_entries or {})
        self.batch_size = batch_size
        self.hold_deletes = hold_deletes
        self._owners: dict[str, dict[RowKey, tuple[bytes, int]]] = {}  # -> (value, seq)
        self._rows: dict[RowKey, _Row] = {}
        self._dirty: set[RowKey] = set()  # rows not done
        self._observed: dict[str, dict[bytes, bytes]] = {}  # dumped, not in the table
        self._seq = 0
        self._total_errors = 0
        self._batch_fallbacks = 0
        self._last_resync: float | None = None
        # running totals behind ``stats`` (kept by ``_count``; ``recount`` walks the table)
        self._by_status: dict[Status, int] = dict.fromkeys(Status, 0)
        self._desired_by_map: dict[str, int] = {}
        self._present_by_map: dict[str, int] = {}
        self._pending_deletes = 0
        self._shared: set[RowKey] = set()  # rows claimed by more than one owner
        # while a ``Resync`` is under way: rows whose kernel belief changed, or that came or
        # went, since its current dump was taken (the dump is stale for them)
        self._touched: set[RowKey] | None = None

    # ---- desired state ------------------------------------------------------------

    def set_desired(self, owner: str, entries: Iterable[Entry]) -> None:
        """Replace everything ``owner`` wants with ``entries`` (in apply order).

        A key listed twice keeps its first position and its last value. Keys the
        owner no longer lists lose its claim; unclaimed keys become pending deletes.
        """
        if not owner:
            raise ValueError("owner must be a non-empty tag")
        new: dict[RowKey, tuple[bytes, int]] = {}
        for e in entries:
            kt, vt = _layouts_for(e.map)
            if type(e.key) is not kt or type(e.value) is not vt:
                raise ValueError(f"{e.map}: entry must be ({kt.__name__}, {vt.__name__}), "
                                 f"got ({type(e.key).__name__}, {type(e.value).__name__})")
            rk = (e.map, bytes(e.key))
            seq = new[rk][1] if rk in new else self._next_seq()
            new[rk] = (bytes(e.value), seq)
        old = self._owners.pop(owner, {})
        if new:
            self._owners[owner] = new
        for rk in old.keys() - new.keys():
            row = self._rows.get(rk)
            if row is not None:
                row.claims = tuple(o for o in row.claims if o != owner)
                if len(row.claims) < 2:
                    self._shared.discard(rk)
                self._refresh(rk, row)
        for rk in new:
            row = self._rows.get(rk)
            if row is None:
                kernel = self._observed.get(rk[0], {}).pop(rk[1], UNKNOWN)
                row = self._add_row(rk, _Row(rk[0], rk[1], None, kernel))
            if owner not in row.claims:
                row.claims += (owner,)
            if len(row.claims) > 1:
                self._shared.add(rk)
            self._refresh(rk, row)

    def clear_owner(self, owner: str) -> None:
        self.set_desired(owner, ())

    def owners(self) -> list[str]:
        return sorted(self._owners)

    def owner_entries(self, owner: str) -> list[Entry]:
        """What ``owner`` last asked for, in its order (fresh layouts)."""
        mine = sorted(self._owners.get(owner, {}).items(), key=lambda kv: kv[1][1])
        return [Entry(m, _key_layout(m, kb), _value_layout(m, vb)) for (m, kb), (vb, _) in mine]

    def desired_entries(self) -> list[Entry]:
        """The winning desired entries (no pending deletes), sorted by map and key."""
        return [Entry(r.map, _key_layout(r.map, r.key), _value_layout(r.map, r.value))
                for _, r in sorted(self._rows.items()) if r.value is not None]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _refresh(self, rk: RowKey, row: _Row) -> None:
        """Recompute a row's desired value from its claims."""
        if row.claims:
            winner = min(row.claims)
            value, seq = self._owners[winner][rk]
            row.owner, row.seq = winner, seq
            self._want(rk, row, value)
        else:
            self._want(rk, row, None)

    def _want(self, rk: RowKey, row: _Row, value: bytes | None) -> None:
        if _same(row.value, value):
            return  # unchanged: keep status and retry schedule
        self._count_value(row.map, row.value, -1)
        row.value = value
        self._count_value(row.map, value, +1)
        row.attempts, row.last_error, row.next_retry = 0, None, 0.0
        self._settle(rk, row, Status.PENDING)

    def _settle(self, rk: RowKey, row: _Row, otherwise: Status) -> None:
        """Mark ``row`` done if the kernel belief matches, else ``otherwise``; drop
        rows that are desired absent and known absent."""
        if _same(row.kernel, row.value):
            if row.value is None:
                if self._rows.pop(rk, None) is not None:
                    self._count(row, -1)
                    self._shared.discard(rk)
                    if self._touched is not None:
                        self._touched.add(rk)
                self._dirty.discard(rk)
                return
            self._set_status(row, Status.DONE)
            row.attempts, row.last_error, row.next_retry = 0, None, 0.0
            self._dirty.discard(rk)
        else:
            self._set_status(row, otherwise)
            self._dirty.add(rk)

    # ---- running totals (every change of a row's value, kernel belief or status, and
    # every row added or dropped, goes through these) -----------------------------------

    def _add_row(self, rk: RowKey, row: _Row) -> _Row:
        self._rows[rk] = row
        self._count(row, +1)
        if self._touched is not None:
            self._touched.add(rk)
        return row

    def _count(self, row: _Row, sign: int) -> None:
        """Add (+1) or remove (-1) ``row``'s part of the running totals."""
        self._by_status[row.status] += sign
        if row.value is None:
            self._pending_deletes += sign
        else:
            self._desired_by_map[row.map] = self._desired_by_map.get(row.map, 0) + sign
        if row.kernel is not None and row.kernel is not UNKNOWN:
            self._present_by_map[row.map] = self._present_by_map.get(row.map, 0) + sign

    def _count_value(self, map_name: str, value: bytes | None, sign: int) -> None:
        """The part of ``_count`` that depends on a row's desired value (its status and
        kernel belief unchanged)."""
        if value is None:
            self._pending_deletes += sign
        else:
            by_map = self._desired_by_map
            by_map[map_name] = by_map.get(map_name, 0) + sign

    def _count_kernel(self, map_name: str, kernel: bytes | None | _Unknown, sign: int) -> None:
        """The part of ``_count`` that depends on a row's kernel belief."""
        if kernel is not None and kernel is not UNKNOWN:
            present = self._present_by_map
            present[map_name] = present.get(map_name, 0) + sign

    def _set_status(self, row: _Row, status: Status) -> None:
        if row.status is not status:
            self._by_status[row.status] -= 1
            self._by_status[status] += 1
            row.status = status

    def _set_kernel(self, row: _Row, kernel: bytes | None | _Unknown) -> None:
        self._count_kernel(row.map, row.kernel, -1)
        row.kernel = kernel
        self._count_kernel(row.map, kernel, +1)
        if self._touched is not None:
            self._touched.add((row.map, row.key))

    # ---- reconcile ----------------------------------------------------------------

    def reconcile(self, ops: MapOps, now: float) -> ReconcileResult:
        """Apply due rows: upserts (owner order), then deletes (reverse order)."""
        due = [self._rows[rk] for rk in self._dirty if self._rows[rk].next_retry <= now]
        upserts = [r for r in due if r.value is not None]
        deletes = [r for r in due if r.value is None]
        upserted = deleted = failed = batches = 0
        for map_name, rows in _schedule(upserts, reverse=False):
            for chunk in _chunks(rows, self.batch_size):
                batches += 1
                ok, bad = self._run_batch(ops, map_name, chunk, now, delete=False)
                upserted, failed = upserted + ok, failed + bad
        holding = self._holding_owners() if deletes else {}
        held = [r for r in deletes if r.owner in holding]
        for r in held:
            r.next_retry = max(r.next_retry, holding[r.owner])
        if held:
            deletes = [r for r in deletes if r.owner not in holding]
        for map_name, rows in _schedule(deletes, reverse=True):
            for chunk in _chunks(rows, self.batch_size):
                batches += 1
                ok, bad = self._run_batch(ops, map_name, chunk, now, delete=True)
                deleted, failed = deleted + ok, failed + bad
        return ReconcileResult(upserted, deleted, failed, len(held), batches, self.next_retry())

    def _holding_owners(self) -> dict[str, float]:
        """Owners with a recently failed upsert -> when the earliest one is retried."""
        out: dict[str, float] = {}
        for rk in self._dirty:
            r = self._rows[rk]
            if r.value is not None and 0 < r.attempts < self.hold_deletes:
                out[r.owner] = min(out.get(r.owner, r.next_retry), r.next_retry)
        return out

    def unsettled(self, prefix: str = "") -> bool:
        """Whether a row of an owner whose tag starts with ``prefix`` is not done yet (its
        write or delete is still pending or failed). Looks only at the rows not done."""
        return any(self._rows[rk].owner.startswith(prefix) for rk in self._dirty) if prefix else bool(self._dirty)

    def next_retry(self) -> float | None:
        """Earliest time a not-done row is due (0.0: due now); None when all are done."""
        return min((self._rows[rk].next_retry for rk in self._dirty), default=None)

    def _run_batch(self, ops: MapOps, map_name: str, rows: list[_Row], now: float,
                   *, delete: bool) -> tuple[int, int]:
        kt, vt = _layouts_for(map_name)
        try:
            if delete:
                ops.delete_batch(map_name, [kt.from_bytes(r.key) for r in rows])
            else:
                ops.update_batch(map_name, [(kt.from_bytes(r.key), vt.from_bytes(r.value))
                                            for r in rows])
        except MapOpsError as err:
            if len(rows) == 1:
                self._failed(rows[0], err, now)
                return 0, 1
            self._batch_fallbacks += 1
            log.debug("%s: batch of %d failed (%s); retrying one by one",
                      map_name, len(rows), err)
        else:
            for r in rows:
                self._applied(r)
            return len(rows), 0
        ok = bad = 0
        for r in rows:
            try:
                if delete:
                    ops.delete(map_name, kt.from_bytes(r.key))
                else:
                    ops.update(map_name, kt.from_bytes(r.key), vt.from_bytes(r.value))
            except MapOpsError as err:
                self._failed(r, err, now)
                bad += 1
            else:
                self._applied(r)
                ok += 1
        return ok, bad

    def _applied(self, row: _Row) -> None:
        self._set_kernel(row, row.value)
        self._settle((row.map, row.key), row, Status.PENDING)

    def _failed(self, row: _Row, err: Exception, now: float) -> None:
        self._set_kernel(row, UNKNOWN)  # a failed call may have been partly applied
        row.attempts += 1
        self._set_status(row, Status.ERROR)
        row.last_error = str(err)
        row.next_retry = now + backoff_delay(row.attempts, cap=ENTRY_CAP)
        self._dirty.add((row.map, row.key))
        self._total_errors += 1

    # ---- restore and resync -------------------------------------------------------

    def restore(self, ops: MapOps, maps: Iterable[str] | None = None) -> dict[str, dict[Layout, Layout]]:
        """Read the pinned maps (default: every owned map) and learn their contents.

        Writes nothing. Desired rows that already hold their value become done;
        entries outside the table are remembered so a later ``set_desired`` with
        the same value is done without a write. Dumps every map before changing
        any state; a failed dump raises ``MapOpsError`` and changes nothing (call
        again). Returns the dumped entries per map (not kept).
        """
        names = sorted(self.owned_maps if maps is None else set(maps))
        dumps = {m: ops.dump(m) for m in names}
        by_map = self._rows_by_map()
        for m, dumped in dumps.items():
            by_bytes = {bytes(k): bytes(v) for k, v in dumped.items()}
            self._learn(by_map.get(m, []), by_bytes)
            self._observed[m] = {kb: v for kb, v in by_bytes.items() if (m, kb) not in self._rows}
        return {m: dict(d) for m, d in dumps.items()}

    def table_sizes(self) -> dict[str, int]:
        """Rows of the desired table, owners, and dumped entries outside the table."""
        return {"rows": len(self._rows), "owners": len(self._owners),
                "observed": sum(len(d) for d in self._observed.values())}

    def _rows_by_map(self) -> dict[str, list[tuple[RowKey, _Row]]]:
        out: dict[str, list[tuple[RowKey, _Row]]] = {}
        for rk, row in self._rows.items():
            out.setdefault(rk[0], []).append((rk, row))
        return out

    def _learn(self, rows: list[tuple[RowKey, _Row]], by_bytes: Mapping[bytes, bytes]) -> int:
        """Set the kernel belief of ``rows`` (all of one map) from that map's dump (key
        bytes -> value); return how many done rows had drifted (now pending, due at once)."""
        drifted = 0
        for rk, row in rows:
            self._set_kernel(row, by_bytes.get(rk[1]))
            was_done = row.status is Status.DONE
            if was_done and not _same(row.kernel, row.value):
                drifted += 1
                row.next_retry = 0.0
                self._settle(rk, row, Status.PENDING)
            else:
                self._settle(rk, row, row.status)
        return drifted

    def full_resync(self, ops: MapOps, now: float) -> ResyncResult:
        """Dump, repair drift, prune orphans in owned maps, then ``reconcile``."""
        resync = self.begin_resync()
        for _ in resync.prepare():
            pass
        for m in resync.maps:
            resync.dump_starting()
            try:
                dumped = ops.dump(m)
            except MapOpsError as err:
                resync.dump_failed(m, err)
                continue
            for _ in resync.learn(m, dumped):
                pass
        return resync.finish(ops, now)

    def begin_resync(self) -> Resync:
        """A full resync in steps, for a driver that lets other work run between them (see
        ``Resync``). ``full_resync`` is the same steps run back to back."""
        return Resync(self)

    def _track_kernel_changes(self, on: bool) -> None:
        self._touched = set() if on else None

    # ---- inspection ---------------------------------------------------------------

    def status(self, map_name: str, key: Layout) -> EntryStatus | None:
        row = self._rows.get((map_name, bytes(key)))
        return None if row is None else _view(row)

    def entries(self, status: Status | None = None) -> Iterator[EntryStatus]:
        """Every row (sorted by map and key), optionally only those with ``status``."""
        for _, row in sorted(self._rows.items()):
            if status is None or row.status is status:
                yield _view(row)

    def stats(self) -> ReconcilerStats:
        """Counts and fill per map from the running totals: O(maps + keys claimed by several
        owners), not O(rows), so a periodic status report never stalls the loop."""
        present = {m: n for m, n in self._present_by_map.items() if n}
        for m, observed in self._observed.items():
            present[m] = present.get(m, 0) + len(observed)
        desired = {m: n for m, n in self._desired_by_map.items() if n}
        return self._stats(self._by_status, self._pending_deletes, desired, present, self._shared)

    def recount(self) -> ReconcilerStats:
        """``stats`` computed by walking every row (O(rows)); equals ``stats()``."""
        counts = dict.fromkeys(Status, 0)
        desired: dict[str, int] = {}
        present: dict[str, int] = {m: len(o) for m, o in self._observed.items() if o}
        pending_deletes = 0
        for row in self._rows.values():
            counts[row.status] += 1
            if row.value is None:
                pending_deletes += 1
            else:
                desired[row.map] = desired.get(row.map, 0) + 1
            if row.kernel is not None and row.kernel is not UNKNOWN:
                present[row.map] = present.get(row.map, 0) + 1
        shared = [rk for rk, row in self._rows.items() if len(row.claims) > 1]
        return self._stats(counts, pending_deletes, desired, present, shared)

    def _stats(self, counts: Mapping[Status, int], pending_deletes: int,
               desired: Mapping[str, int], present: Mapping[str, int],
               shared: Iterable[RowKey]) -> ReconcilerStats:
        conflicts = 0
        for rk in shared:
            claims = self._rows[rk].claims
            values = {self._owners[o][rk][0] for o in claims}
            conflicts += len(values) > 1
        maps = {}
        for m in sorted(self.owned_maps | desired.keys() | present.keys()):
            n, cap = present.get(m, 0), self.max_entries.get(m)
            maps[m] = MapStats(desired.get(m, 0), n, cap, n / cap if cap else None)
        return ReconcilerStats(
            pending=counts[Status.PENDING], done=counts[Status.DONE], error=counts[Status.ERROR],
            pending_deletes=pending_deletes, conflicts=conflicts,
            total_errors=self._total_errors, batch_fallbacks=self._batch_fallbacks,
            last_resync=self._last_resync, maps=maps)


def _layouts_for(map_name: str) -> tuple[type[Layout], type[Layout]]:
    try:
        return L.MAPS[map_name]
    except KeyError:
        raise ValueError(f"unknown map {map_name!r}") from None


def _view(row: _Row) -> EntryStatus:
    return EntryStatus(row.map, _key_layout(row.map, row.key), _value_layout(row.map, row.value),
                       row.owner, row.status, row.attempts,
                       row.last_error, row.next_retry)


def _chunks(rows: list[_Row], size: int) -> Iterator[list[_Row]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


def _schedule(rows: list[_Row], *, reverse: bool) -> list[tuple[str, list[_Row]]]:
    """Group ``rows`` into per-map batches without reordering any owner's rows.

    Each owner's rows, in supplied order (reversed for deletes), split into runs of
    one map. The next batch is for the map whose head run has waited longest (ties:
    owner tag order) and takes, from every owner whose head run is of that map, that
    run. Orphans (no owner) are deleted in map and key order.
    """
    per_owner: dict[str, list[_Row]] = {}
    for r in rows:
        per_owner.setdefault(r.owner, []).append(r)
    queues: list[deque[tuple[str, list[_Row]]]] = []
    for owner in sorted(per_owner):
        rs = sorted(per_owner[owner], key=lambda r: (r.seq, r.map, r.key))
        if reverse and owner != ORPHAN_OWNER:
            rs.reverse()
        runs: deque[tuple[str, list[_Row]]] = deque()
        for r in rs:
            if runs and runs[-1][0] == r.map:
                runs[-1][1].append(r)
            else:
                runs.append((r.map, [r]))
        queues.append(runs)
    buckets: dict[str, list[deque[tuple[str, list[_Row]]]]] = {}
    first: dict[str, int] = {}  # map -> rank of its oldest head run
    rank = 0

    def enqueue(q: deque[tuple[str, list[_Row]]]) -> None:
        nonlocal rank
        m = q[0][0]
        buckets.setdefault(m, []).append(q)
        first.setdefault(m, rank)
        rank += 1

    for q in queues:
        enqueue(q)
    out: list[tuple[str, list[_Row]]] = []
    while buckets:
        m = min(buckets, key=first.__getitem__)
        batch: list[_Row] = []
        for q in buckets.pop(m):
            batch.extend(q.popleft()[1])
            if q:
                enqueue(q)
        first.pop(m)
        out.append((m, batch))
    return out


# ---- async driver ---------------------------------------------------------------------


class Resync:
    """One full resync of a ``Reconciler`` in steps: ``prepare`` (the table's rows grouped
    by map, in chunks), then per map a dump (which the driver may take in another thread)
    and ``learn`` in chunks; ``finish`` reconciles.

    Between steps the owning loop may call ``set_desired`` and ``reconcile`` as usual. A
    dump is a snapshot: rows whose kernel belief changed, or that were added or dropped,
    after the dump of the map being learned was started are skipped for that map (the table
    knows them better than the dump), so interleaved work is never undone and never
    repeated. Only one ``Resync`` may be under way per reconciler.
    """

    CHUNK = 2048  # rows (or dumped entries) learned per step
    GROUP_CHUNK = 16384  # rows grouped by map per step of ``prepare``

    def __init__(self, rec: Reconciler) -> None:
        self._rec = rec
        # the rows themselves, not (key, row) pairs: at 400,000 rows, new pairs that live
        # through the resync are enough survivors to set off a full collection
        self._snapshot: list[_Row] | None = list(rec._rows.values())
        self._by_map: dict[str, list[_Row]] = {}
        self.maps: list[str] = []  # set by ``prepare``
        self.drifted = self.orphans = 0
        self.failed: list[str] = []
        rec._track_kernel_changes(True)

    def prepare(self) -> Iterator[None]:
        """Group the table's rows (as they were when the resync began) by map, then set
        ``maps``; yields between chunks. Rows dropped meanwhile are skipped when learned;
        rows added meanwhile are not learned from the dumps (their own writes set them)."""
        snapshot, self._snapshot = self._snapshot or [], None
        by_map = self._by_map
        for at in range(0, len(snapshot), self.GROUP_CHUNK):
            for row in snapshot[at:at + self.GROUP_CHUNK]:
                by_map.setdefault(row.map, []).append(row)
            yield
        self.maps = sorted(self._rec.owned_maps | by_map.keys())

    def dump_starting(self) -> None:
        """Call just before each dump: from here on, changes make that dump stale."""
        assert self._rec._touched is not None
        self._rec._touched.clear()

    def dump_failed(self, map_name: str, err: Exception) -> None:
        log.warning("resync: dump %s failed: %s", map_name, err)
        self._rec._total_errors += 1
        self.failed.append(map_name)

    def learn(self, map_name: str, dumped: Mapping[Layout, Layout] | Mapping[bytes, bytes]) -> Iterator[None]:
        """Learn one map's dump (layouts, or ``maps.dump_as_bytes`` of them, which a driver
        may build in the thread that dumped the map); yields between chunks of ``CHUNK``."""
        rec = self._rec
        touched = rec._touched
        assert touched is not None
        first = next(iter(dumped), None)
        by_bytes: Mapping[bytes, bytes] = (
            dumped if first is None or isinstance(first, bytes)  # type: ignore[assignment]
            else dump_as_bytes(dumped))  # type: ignore[arg-type]
        rows = self._by_map.get(map_name, [])
        for at in range(0, len(rows), self.CHUNK):
            live = [(rk, row) for row in rows[at:at + self.CHUNK]
                    if (rk := (row.map, row.key)) not in touched and rec._rows.get(rk) is row]
            self.drifted += rec._learn(live, by_bytes)
            yield
        if map_name not in rec.owned_maps:
            return
        rec._observed.pop(map_name, None)
        # chunk by chunk from the dump itself: a list of every (key, value) pair would be
        # 400,000 live tuples at 50,000 services, enough to set off full collections
        items = iter(by_bytes.items())  # the dump is this resync's own: not changed meanwhile
        while chunk := list(islice(items, self.CHUNK)):
            for kb, v in chunk:
                rk = (map_name, kb)
                if rk not in rec._rows and rk not in touched:
                    row = rec._add_row(rk, _Row(map_name, kb, None, v))
                    rec._settle(rk, row, Status.PENDING)
                    self.orphans += 1
            yield

    def finish(self, ops: MapOps, now: float) -> ResyncResult:
        rec = self._rec
        rec._track_kernel_changes(False)
        result = rec.reconcile(ops, now)
        if not self.failed:
            rec._last_resync = now
        return ResyncResult(self.drifted, self.orphans, tuple(self.failed), result)


class ReconcileLoop:
    """Runs a ``Reconciler`` on the event loop: restore once, then reconcile whenever
    ``kick()`` is called or a retry falls due, and a full resync every
    ``resync_interval`` seconds. Producers call ``set_desired`` then ``kick()`` from
    the same loop. MapOps calls are short syscalls and run inline, which keeps the
    reconciler single-threaded.
    """

    def __init__(self, reconciler: Reconciler, ops: MapOps, *, resync_interval: float = 300.0,
                 clock: Callable[[], float] = time.monotonic,
                 ready: Callable[[], bool] = lambda: True, heap: HeapFreezer | None = None) -> None:
        self.reconciler = reconciler
        self.heap = heap  # the process's long-lived table kept out of the collector's way
        self.ops = ops
        self.resync_interval = resync_interval
        self.clock = clock
        self.ready = ready  # full resync (pruning) only once all owners are loaded
        self.restored = asyncio.Event()
        self._wake = asyncio.Event()
        self._next_resync: float | None = None  # None: first resync one interval after restore
        self.causes = tracing.Causes()  # the traced changes behind the next kicked reconcile
        self._kicked = False
        # the last full resync: its start (Unix time), whole duration and the time spent in
        # each of its phases (ms), for the health detail
        self.last_resync: dict[str, Any] = {}

    def kick(self) -> None:
        """Reconcile soon (call after ``set_desired``)."""
        self._kicked = True
        self.causes.note()
        self._wake.set()

    def request_resync(self) -> None:
        """Full resync as soon as ``ready()`` holds (e.g. once every input has synced)."""
        self._next_resync = 0.0
        self._wake.set()

    async def run(self) -> None:
        attempts = 0
        while True:
            try:
                self.reconciler.restore(self.ops)
                break
            except MapOpsError as err:
                attempts += 1
                delay = backoff_delay(attempts, cap=ENTRY_CAP)
                log.warning("restore failed: %s; retrying in %.1fs", err, delay)
                await asyncio.sleep(delay)
        self.restored.set()
        if self._next_resync is None:
            self._next_resync = self.clock() + self.resync_interval
        while True:
            self._wake.clear()
            now = self.clock()
            if now >= self._next_resync:
                if self.ready():
                    await self._full_resync(now)
                    self._next_resync = now + self.resync_interval
                else:  # inputs not complete: pruning now would delete live entries
                    self._next_resync = now + min(1.0, self.resync_interval)
            due = self._reconcile(now)
            if self.heap is not None:
                self.heap.settled()
                if not self._kicked:  # quiet: a full collection here is off every change's path
                    self.heap.collect_if_due()
            deadline = self._next_resync if due is None else min(due, self._next_resync)
            timeout = max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _full_resync(self, now: float) -> ResyncResult:
        """``full_resync`` without stalling the loop: each map is dumped in a thread and
        learned in chunks; a change kicked meanwhile is reconciled between chunks. Times
        its phases into ``last_resync`` (and logs them when it took over a second)."""
        wall, started = time.time(), time.perf_counter()
        phases = {"begin": 0.0, "dump": 0.0, "learn": 0.0, "finish": 0.0}
        longest_step = 0.0

        def lap(phase: str, since: float) -> float:
            nonlocal longest_step
            at = time.perf_counter()
            phases[phase] += at - since
            longest_step = max(longest_step, at - since) if phase != "dump" else longest_step
            return at

        async def in_steps(phase: str, steps: Iterator[None]) -> None:
            """Run ``steps`` on the loop, timing each; a kicked change goes in between."""
            mark = time.perf_counter()
            for _ in steps:
                lap(phase, mark)
                await asyncio.sleep(0)
                if self._kicked:
                    self._reconcile(self.clock())
                mark = time.perf_counter()
            lap(phase, mark)

        mark = time.perf_counter()
        resync = self.reconciler.begin_resync()
        lap("begin", mark)
        await in_steps("begin", resync.prepare())
        mark = time.perf_counter()
        try:
            for m in resync.maps:
                resync.dump_starting()
                try:
                    dumped = await self._dump_meanwhile_reconciling(m)
                except MapOpsError as err:
                    resync.dump_failed(m, err)
                    continue
                finally:
                    mark = lap("dump", mark)
                await in_steps("learn", resync.learn(m, dumped))
                mark = time.perf_counter()
        finally:
            result = resync.finish(self.ops, now)
            lap("finish", mark)
            whole = time.perf_counter() - started
            self.last_resync = {"start": round(wall, 3), "ms": round(whole * 1000, 1),
                                "longest_step_ms": round(longest_step * 1000, 1),
                                **{f"{k}_ms": round(v * 1000, 1) for k, v in phases.items()}}
            if whole > 1.0:
                log.info("full resync took %.1fs: %s", whole, self.last_resync)
        return result

    async def _dump_meanwhile_reconciling(self, map_name: str) -> dict[bytes, bytes]:
        """Dump ``map_name`` in a thread, as bytes (the ops' own ``dump_bytes`` where it has
        one, the kernel's batch lookup for ``BccMapOps``; else ``maps.dump_as_bytes`` built in
        the thread too: at 200,000 entries that is a quarter of a second the event loop does
        not spend); reconcile whatever is kicked until it returns."""
        raw = getattr(self.ops, "dump_bytes", None)  # MapOps that read bytes directly
        dump = asyncio.ensure_future(asyncio.to_thread(
            (lambda: raw(map_name)) if raw is not None else (lambda: dump_as_bytes(self.ops.dump(map_name)))))
        while not dump.done():
            self._wake.clear()
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({dump, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
            if self._kicked:
                self._reconcile(self.clock())
        return dump.result()

    def _reconcile(self, now: float) -> float | None:
        """One reconcile; after a kick, in a ``node map write`` span joined to the traced
        changes behind it."""
        if not self._kicked:
            return self.reconciler.reconcile(self.ops, now).next_retry
        self._kicked = False
        causes, dropped = self.causes.take()
        if not tracing.wanted(causes):
            return self.reconciler.reconcile(self.ops, now).next_retry
        with tracing.work_span(tracing.SPAN_MAP_WRITE, causes, dropped) as span:
            result = self.reconciler.reconcile(self.ops, now)
            if span.is_recording():
                span.set_attributes({tracing.ATTR_MAP_UPSERTED: result.upserted,
                                     tracing.ATTR_MAP_DELETED: result.deleted,
                                     tracing.ATTR_MAP_FAILED: result.failed,
                                     tracing.ATTR_MAP_BATCHES: result.batches})
            return result.next_retry


__all__ = [
    "DEFAULT_HOLD_DELETES", "DEFAULT_NOT_OWNED", "EntryStatus", "MapStats",
    "ORPHAN_OWNER", "ReconcileLoop", "ReconcileResult", "Reconciler", "ReconcilerStats",
    "ResyncResult", "Status", "UNKNOWN",
]
