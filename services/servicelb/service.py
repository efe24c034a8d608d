"""Service load-balancing shell: Services + EndpointSlices (+ Pods, Nodes) -> bucket ``services``.

Invariants:
- Level-triggered: the first pass and a periodic resync recompute the whole desired state
  from every mirrored input (`model.compute`, through `incremental.Engine.rebuild`) and
  diff it against what bucket ``services`` holds. In between, the mirrors' listeners
  collect the keys that changed; a pass hands their current values to the engine, which
  recomputes only the Services they touch, and diffs only those rows. A pass takes at most
  ``PASS_CHANGES_MAX`` keys; a larger burst is handled by passes that follow at once, and
  each one's rows are written before the next is computed. Either way only the
  difference is written; a restart re-reads inputs, allocations and output and writes
  nothing when nothing changed.
- Nothing is computed before every input watch (resources Service/EndpointSlice/Pod/Node, mesh,
  status Pod/Node) has delivered its initial state and the allocations and the current
  output have been read.
- Allocations are persisted (KV create = compare-and-set) before any output uses them; a
  lost create re-reads the pool and recomputes everything. Writes go add/update first,
  deletes last, so an update never removes a frontend or backend before its replacement
  exists; values no longer used are released only after the output without them is
  written. Within each of these steps the writes are in flight together (at most
  ``WRITES_IN_FLIGHT``: puts through ``Bus.kv_put_many``, deletes through `in_flight`);
  a step starts when the one before it has been acknowledged.
- Only this service writes bucket ``services``, ``allocations`` keys ``servicelb-*.*`` and
  the ``status`` of Services (cluster IP, node ports, LoadBalancer ingress).
- A deleted Pod stays a terminating, not-serving backend for its grace period
  (`departures`), so its established connections finish while the node executor stops
  it; a pass runs when such a period ends.
- Bad objects and failed writes are logged (each problem once) and retried; they never
  end the service. The problems already logged are remembered up to
  ``CILIARY_SERVICELB_LOGGED_MAX`` (default 1024; the oldest is forgotten first, and
  logged again should it recur); health detail ``caches`` reports that set's size and
  evictions and the sizes of the written rows and statuses. A failed pass or a lost release makes the next pass a whole one.
  Healthy = connected, inputs synced and the last pass succeeded.
- The periodic whole pass (``RESYNC_S``) waits for inputs to be quiet for
  ``RESYNC_QUIET_S`` (a change arriving meanwhile would wait for it), at most until
  ``RESYNC_LATEST_S`` after the last one.
- In its own process (``manage_heap``) the model's large, long-lived state is kept out
  of the cyclic collector's way: after every pass the objects it left are frozen
  (``gc.freeze``, O(1)), so a collection in a later pass never walks the whole heap; a
  whole pass rebuilds with the collector off, then unfreezes and collects once (cyclic
  garbage frozen since the last whole pass is reclaimed there).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from ciliary import schema
from ciliary.bus import BusError, KVEntry, PutManyError, RevisionMismatch
from ciliary.cachestats import BoundedSet, CacheStats, env_cap
from ciliary.events import subjects as events
from ciliary.events.changes import start_change_events
from ciliary.runtime import Context, mirror_kinds
from ciliary.store import kv_key, now_rfc3339
from ciliary.watch import PassLoop, decoder, entries_only
from services.servicelb import allocator, incremental, meshslices, model
from services.servicelb.inputs import InputDecoder
from services.servicelb.settings import config_from_env

log = logging.getLogger(__name__)
ENV_LOGGED_MAX = "CILIARY_SERVICELB_LOGGED_MAX"
DEFAULT_LOGGED_MAX = 1024

WATCHED_KINDS = ("Service", "EndpointSlice", "Pod", "Node")
MESH = "mesh"  # change source: bucket ``mesh`` (connected clusters' global services)
STATUS_KINDS = ("Pod", "Node")
RECONCILE = "servicelb/reconcile"

RESYNC_S = 60.0  # a whole pass this long after the last one ...
RESYNC_QUIET_S = 1.0  # ... once no input changed for this long ...
RESYNC_LATEST_S = 300.0  # ... or at the latest this long after the last one
WRITES_IN_FLIGHT = 128  # unacknowledged KV writes at a time
PASS_CHANGES_MAX = 2048  # changed keys one pass takes; the rest make the next pass due at once
ALLOCATION_ATTEMPTS = 5

T = TypeVar("T")
Change = tuple[str, str]  # (resource kind, or "status/<kind>"; key)


class ServiceLB:
    """The reconciler: mirrored inputs -> allocations, ``services`` rows, Service status."""

    def __init__(self, ctx: Context, cfg: model.Config, *, manage_heap: bool = False) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.manage_heap = manage_heap  # the process is servicelb's own: keep its state out of the collector
        self.alloc = model.Allocations.create(cfg)
        self.engine = incremental.Engine(self.alloc, cfg)
        self.resources: dict[str, dict[str, KVEntry]] = {}
        self.status: dict[str, dict[str, KVEntry]] = {kind: {} for kind in STATUS_KINDS}
        # keys changed since the last pass took them, in arrival order (a dict as an ordered
        # set: a burst split over passes keeps a Service next to the slices applied with it)
        self.changes: dict[Change, None] = {}
        self.written: dict[str, bytes] = {}  # bucket services: key -> value as stored
        self.service_status: dict[str, tuple[int, dict[str, Any]]] = {}  # status key -> (gen, status)
        self.loop = PassLoop("servicelb", self._pass, ready=self.inputs_synced, wake_at=self._wake_at,
                             on_error=self._on_error, on_success=self._on_success)
        self.loaded = False  # allocations and current output read, engine built, since the last failure
        self.resynced = 0.0  # monotonic time of the last whole pass
        self.last_change = 0.0  # monotonic time a mirror last delivered a change
        self.logged = BoundedSet(env_cap(ENV_LOGGED_MAX, DEFAULT_LOGGED_MAX))
        self.caches = CacheStats()
        self.caches.register("logged_problems", lambda: len(self.logged), self.logged.cap,
                             lambda: self.logged.evicted)
        self.caches.register("written_rows", lambda: len(self.written))
        self.caches.register("service_status", lambda: len(self.service_status))
        self.reconciles = 0
        self.decoder = InputDecoder(self._log_once)
        self.mesh: dict[str, schema.MeshService] = {}  # bucket mesh: connected clusters' global services

    # ------------------------------------------------------------------ inputs

    def start(self, tg: asyncio.TaskGroup) -> None:
        self.ctx.declare_watch(RECONCILE)
        mirrors = mirror_kinds(self.ctx, tg, WATCHED_KINDS, self.loop)
        for kind, mirror in mirrors.items():
            mirror.listen(self._collect(kind))
        self.resources = {kind: mirror.entries for kind, mirror in mirrors.items()}
        for kind in STATUS_KINDS:
            mirror = self.ctx.mirror(tg, schema.BUCKET_STATUS, f"{kind}.>", name=f"{schema.BUCKET_STATUS}/{kind}")
            mirror.notify(self.loop).listen(self._collect(f"status/{kind}"))
            self.status[kind] = mirror.entries
        mesh = self.ctx.mirror(tg, schema.BUCKET_MESH, f"{schema.MESH_SERVICE_PREFIX}.>",
                               decode=decoder(schema.MeshService))
        mesh.notify(self.loop).listen(self._collect(MESH))
        self.mesh = mesh.values
        tg.create_task(self.loop.run(), name="servicelb-reconcile")

    def _collect(self, source: str) -> Callable[[Any], None]:
        def collect(entry: KVEntry) -> None:
            self.changes[(source, entry.key)] = None
            self.last_change = time.monotonic()

        return entries_only(collect)

    def inputs_synced(self) -> bool:
        return not (self.ctx.pending_watches - {RECONCILE})

    def _log_once(self, problem: str) -> None:
        if self.logged.add(problem):
            log.warning("%s", problem)

    # ------------------------------------------------------------------ the loop

    def _wake_at(self) -> float | None:
        """The periodic whole pass, or the end of a departing pod's grace period."""
        if not self.loaded:
            return None
        expiry = self.engine.next_expiry()
        resync = self._resync_at()
        return resync if expiry is None else min(resync, expiry)

    def _resync_at(self) -> float:
        """When the next whole pass is due: ``RESYNC_S`` after the last one, postponed
        while inputs keep changing (it would hold their passes up), for at most
        ``RESYNC_LATEST_S``."""
        quiet = max(self.resynced + RESYNC_S, self.last_change + RESYNC_QUIET_S)
        return min(quiet, self.resynced + RESYNC_LATEST_S)

    async def _pass(self) -> bool:
        whole = not self.loaded or time.monotonic() >= self._resync_at()
        if whole:
            await self.load()  # first pass, and periodically: re-read what the buckets hold
            self.loaded = True
            self.resynced = time.monotonic()
        with self._heap(whole):
            await (self.reconcile() if whole else self.reconcile_changes())
        return self.engine.has_work() or bool(self.changes)

    @contextlib.contextmanager
    def _heap(self, whole: bool) -> Iterator[None]:
        """With ``manage_heap``: a whole pass runs with the collector off and collects once
        at its end; what any pass leaves is frozen (``gc.freeze``: later collections skip it)."""
        if not self.manage_heap:
            yield
            return
        if whole:
            gc.disable()
        try:
            yield
        finally:
            if whole:
                gc.enable()
                gc.unfreeze()
                gc.collect()
            gc.freeze()

    def _on_error(self, err: BaseException) -> None:
        self.ctx.detail["last_error"] = str(err)
        self.ctx.declare_watch(RECONCILE)  # unhealthy until a reconcile succeeds
        self.loaded = False

    def _on_success(self) -> None:
        self.ctx.detail.pop("last_error", None)
        self.ctx.watch_synced(RECONCILE)

    async def load(self) -> None:
        """Read the persisted allocations, the current output and the Service statuses."""
        for pool in self.alloc.pools():
            await self._load_pool(pool)
        entries = await self.ctx.bus.kv_list(schema.BUCKET_SERVICES)
        self.written = {k: e.value for k, e in entries.items() if e.value is not None}
        statuses = await self.ctx.bus.kv_list(schema.BUCKET_STATUS, "Service.>")
        self.service_status = {}
        for key, entry in statuses.items():
            record = self.decoder.decode(entry, schema.StatusRecord)
            if record is not None and record.reporter == "servicelb":
                self.service_status[key] = (record.observed_generation, record.status)
        log.log(logging.DEBUG if self.reconciles else logging.INFO, "loaded %s; %d rows in bucket services",
                 ", ".join(f"{len(p.owners)} {p.name}" for p in self.alloc.pools()), len(self.written))

    async def _load_pool(self, pool: allocator.Pool) -> None:
        entries = await self.ctx.bus.kv_list(schema.BUCKET_ALLOCATIONS, f"{pool.name}.>")
        values: dict[int, tuple[str, int]] = {}
        for key, entry in entries.items():
            value = allocator.parse_value(pool, key[len(pool.name) + 1:])
            record = self.decoder.decode(entry, schema.LBAllocation)
            if value is None or record is None:
                self._log_once(f"allocations/{key}: not a {pool.name} allocation; ignored")
                continue
            values[value] = (record.owner, entry.revision)
        pool.load(values)

    # ------------------------------------------------------------------ passes

    async def reconcile(self) -> None:
        """The whole pass: every input decoded, every Service recomputed, every row diffed."""
        started = time.monotonic()
        self.changes.clear()  # what they changed is in the mirrors read now
        inputs = self.decoder.inputs(self.resources, self.status)
        for key, record in self.mesh.items():
            ref = meshslices.slice_ref(key)
            if ref is not None:
                inputs.slices[ref] = meshslices.mesh_slice(record)
        self.engine.load(inputs, started)
        await self._rebuild_and_write(started)

    async def reconcile_changes(self) -> None:
        """A pass over the keys changed since the last one: only the Services they touch."""
        started = time.monotonic()
        changes = self._take_changes()
        for source, key in changes:
            self._feed(source, key)
        delta = self.engine.update(started)
        if not await self._persist_pending():  # lost a race: pools re-read, everything recomputed
            await self._rebuild_and_write(started)
            return
        for problem in delta.problems:
            self._log_once(problem)
        rows: dict[str, bytes | None] = {}
        for key in delta.frontends:
            frontend = self.engine.frontends.get(key)
            rows[key] = None if frontend is None else schema.encode(frontend)
        for key in delta.endpoints:
            endpoints = self.engine.endpoints.get(key)
            rows[key] = None if endpoints is None else schema.encode(endpoints)
        statuses = {kv_key("Service", *ref): self._status_of(ref) for ref in delta.statuses}
        await self._write(rows, statuses, started, delta.recomputed)

    def _take_changes(self) -> list[Change]:
        """The changed keys this pass handles, oldest first: all of them, or the first
        ``PASS_CHANGES_MAX`` of a burst, so a bulk load reaches the node executors in waves
        while servicelb computes the next one (the rest stay for the pass that follows at
        once)."""
        if len(self.changes) <= PASS_CHANGES_MAX:
            taken, self.changes = list(self.changes), {}
            return taken
        taken = list(itertools.islice(self.changes, PASS_CHANGES_MAX))
        for change in taken:
            del self.changes[change]
        return taken

    def _feed(self, source: str, key: str) -> None:
        """Hand the engine what one changed key gives the model now."""
        engine = self.engine
        if source == MESH:  # a connected cluster's global service: one slice
            ref = meshslices.slice_ref(key)
            if ref is not None:
                record = self.mesh.get(key)
                engine.set_slice(ref, None if record is None else meshslices.mesh_slice(record))
            return
        if source.startswith("status/"):
            kind = source.split("/", 1)[1]
            before, now = self.decoder.status(kind, key, self.status[kind].get(key))
            set_status = engine.set_pod_status if kind == "Pod" else engine.set_node_status
            if before is not None and (now is None or now[0] != before[0]):
                set_status(before[0], None)
            if now is not None:
                set_status(*now)
            return
        before, now = self.decoder.resource(source, key, self.resources[source].get(key))
        setter: Callable[..., None] = {"Service": engine.set_service, "EndpointSlice": engine.set_slice,
                                       "Pod": engine.set_pod, "Node": engine.set_node}[source]
        if before is not None and (now is None or now[0] != before[0]):
            setter(before[0], None)
        if now is not None:
            ref, manifest, generation = now
            if source == "Service":
                setter(ref, manifest, generation)
            else:
                setter(ref, manifest)

    def _status_of(self, ref: model.Ref) -> tuple[int, dict[str, Any]] | None:
        part = self.engine.parts.get(ref)
        if part is None or part.svc is None or not part.status:
            return None
        return part.generation, part.status

    async def _rebuild_and_write(self, started: float) -> None:
        for _attempt in range(ALLOCATION_ATTEMPTS):
            desired = self.engine.rebuild()
            if await self._persist_pending():
                break
        else:
            raise BusError("allocation kept conflicting with another writer")
        for problem in desired.problems:
            self._log_once(problem)
        rows: dict[str, bytes | None] = {k: schema.encode(v) for k, v in desired.endpoints.items()}
        rows.update((k, schema.encode(v)) for k, v in desired.frontends.items())
        rows.update((k, None) for k in self.written if k not in rows)
        statuses: dict[str, tuple[int, dict[str, Any]] | None] = {
            kv_key("Service", ns, name): (desired.generations.get((ns, name), 0), status)
            for (ns, name), status in desired.statuses.items()
            if status
        }
        statuses.update((k, None) for k in self.service_status if k not in statuses)
        await self._write(rows, statuses, started, len(desired.parts))

    async def _write(self, rows: dict[str, bytes | None], statuses: dict[str, tuple[int, dict[str, Any]] | None],
                     started: float, recomputed: int) -> None:
        """Write what differs from what the buckets hold (adds and updates first, deletes
        last), then release the values no Service holds."""
        puts = {k: v for k, v in rows.items() if v is not None and self.written.get(k) != v}
        deletes = sorted(k for k, v in rows.items() if v is None and k in self.written)
        await self._put_all(schema.BUCKET_SERVICES, puts, self.written)  # add and update first ...
        await in_flight(deletes, self._delete_row)  # ... remove last
        await self._write_statuses(statuses)
        await self._release_unused()

        self.reconciles += 1
        self.ctx.detail.update(
            frontends=len(self.engine.frontends), backends=self.engine.backends(),
            services=self.engine.services(), problems=len(self.engine.problems()),
            reconciles=self.reconciles, services_recomputed=recomputed,
            last_reconcile_ms=round((time.monotonic() - started) * 1000, 1),
        )
        self.caches.publish(self.ctx.detail)
        if puts or deletes:
            log.info("reconciled: %d rows written, %d removed (%d services recomputed, %d frontends)",
                     len(puts), len(deletes), recomputed, len(self.engine.frontends))

    async def _put_all(self, bucket: str, values: dict[str, T], done: dict[str, T]) -> None:
        """Put every value (many in flight), and each one written into ``done``."""
        if not values:
            return
        written: dict[str, int] = {}
        try:
            written = await self.ctx.bus.kv_put_many(bucket, [(k, v, None) for k, v in values.items()],
                                                     concurrency=WRITES_IN_FLIGHT)
        except PutManyError as err:
            written = err.written
            raise
        finally:
            done.update((k, values[k]) for k in written)

    async def _delete_row(self, key: str) -> None:
        await self.ctx.bus.kv_delete(schema.BUCKET_SERVICES, key)
        del self.written[key]

    async def _persist_pending(self) -> bool:
        """Create every newly allocated value; False (pools re-read) when one was taken."""
        values = {pool.key(value): (pool, value, owner) for pool in self.alloc.pools()
                  for value, owner in sorted(pool.pending.items())}
        if not values:
            return True
        created = now_rfc3339()
        lost: list[allocator.Pool] = []
        try:
            written = await self.ctx.bus.kv_put_many(
                schema.BUCKET_ALLOCATIONS,
                [(key, schema.LBAllocation(owner=owner, created=created), 0) for key, (_, _, owner) in values.items()],
                concurrency=WRITES_IN_FLIGHT)
        except PutManyError as err:
            if not all(isinstance(e, RevisionMismatch) for e in err.failed.values()):
                raise
            written = err.written
            for key in err.failed:
                log.info("%s: lost the race for %s; re-reading", values[key][0].name, key)
                if values[key][0] not in lost:
                    lost.append(values[key][0])
        for key, revision in written.items():
            pool, value, _ = values[key]
            pool.persisted(value, revision)
        for pool in lost:
            await self._load_pool(pool)
        return not lost

    async def _write_statuses(self, statuses: dict[str, tuple[int, dict[str, Any]] | None]) -> None:
        puts = {k: v for k, v in sorted(statuses.items()) if v is not None and self.service_status.get(k) != v}
        deletes = sorted(k for k, v in statuses.items() if v is None and k in self.service_status)
        updated = now_rfc3339()
        records = {key: schema.StatusRecord(reporter="servicelb", observed_generation=generation, status=status,
                                            updated=updated)
                   for key, (generation, status) in puts.items()}
        done: dict[str, schema.StatusRecord] = {}
        try:
            await self._put_all(schema.BUCKET_STATUS, records, done)
        finally:
            self.service_status.update((key, puts[key]) for key in done)

        async def delete(key: str) -> None:
            await self.ctx.bus.kv_delete(schema.BUCKET_STATUS, key)
            del self.service_status[key]

        await in_flight(deletes, delete)

    async def _release_unused(self) -> None:
        lost: list[allocator.Pool] = []

        async def release(item: tuple[allocator.Pool, int]) -> None:
            pool, value = item
            try:
                await self.ctx.bus.kv_delete(schema.BUCKET_ALLOCATIONS, pool.key(value),
                                             last_revision=pool.revisions.get(value))
            except RevisionMismatch:
                if pool not in lost:
                    lost.append(pool)
                return
            log.info("released %s (was %s)", pool.key(value), pool.owners.get(value))
            pool.released(value)

        unused = self.engine.take_unused()
        await in_flight([(pool, value) for pool, values in zip(self.alloc.pools(), unused, strict=True)
                         for value in values], release)
        if lost:  # another writer changed the pool: start over from what the buckets hold
            for pool in lost:
                await self._load_pool(pool)
            self.loaded = False
            self.loop.mark_dirty()


async def in_flight(items: Sequence[T], write: Callable[[T], Awaitable[None]],
                    limit: int = WRITES_IN_FLIGHT) -> None:
    """``write`` every item, at most ``limit`` at a time; once one fails no further item
    starts, and the first failure is raised when the started ones have ended."""
    if len(items) <= 1:
        for item in items:
            await write(item)
        return
    pending = iter(items)
    failures: list[Exception] = []

    async def worker() -> None:
        for item in pending:
            try:
                await write(item)
            except Exception as err:
                failures.append(err)
            if failures:
                return

    await asyncio.gather(*(worker() for _ in range(min(limit, len(items)))))
    if failures:
        raise failures[0]


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    cfg = config_from_env(ctx.settings.cluster, ctx.settings.cluster_id)
    ctx.detail["config"] = {"service_cidr": cfg.service_cidr, "maglev_table_size": cfg.maglev_table_size,
                            "derive_slices": cfg.derive_slices,
                            "node_port_range": f"{cfg.node_port_range[0]}-{cfg.node_port_range[1]}"}
    ServiceLB(ctx, cfg, manage_heap=True).start(tg)
    await start_change_events(ctx.bus, ctx.settings.cluster, tg, events.SERVICE_TOPICS["servicelb"], ctx.detail)
