"""Service load-balancing shell: Services + EndpointSlices (+ Pods, Nodes) -> bucket ``services``.

Invariants:
- Level-triggered: every reconcile recomputes the whole desired state from the mirrored
  inputs (`model.compute`), diffs it against what bucket ``services`` holds and writes only
  the difference; a restart re-reads inputs, allocations and output and writes nothing
  when nothing changed.
- Nothing is computed before every input watch (resources Service/EndpointSlice/Pod/Node,
  status Pod/Node) has delivered its initial state and the allocations and the current
  output have been read.
- Allocations are persisted (KV create = compare-and-set) before any output uses them; a
  lost create re-reads the pools and recomputes. Writes go add/update first, deletes
  last, so an update never removes a frontend or backend before its replacement exists;
  values no longer used are released only after the output without them is written.
- Only this service writes bucket ``services``, ``allocations`` keys ``servicelb-*.*`` and
  the ``status`` of Services (cluster IP, node ports, LoadBalancer ingress).
- A deleted Pod stays a terminating, not-serving backend for its grace period
  (`departures`), so its established connections finish while the node executor stops
  it; a reconcile runs when such a period ends.
- Bad objects and failed writes are logged (each problem once) and retried; they never
  end the service. Healthy = connected, inputs synced and the last reconcile succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from ciliary import schema
from ciliary.bus import BusError, KVEntry, RevisionMismatch
from ciliary.runtime import Context, mirror_kinds
from ciliary.store import kv_key, now_rfc3339
from ciliary.watch import PassLoop
from services.servicelb import allocator, departures, model
from services.servicelb.inputs import InputDecoder
from services.servicelb.settings import config_from_env

log = logging.getLogger(__name__)

WATCHED_KINDS = ("Service", "EndpointSlice", "Pod", "Node")
STATUS_KINDS = ("Pod", "Node")
RECONCILE = "servicelb/reconcile"

RESYNC_S = 60.0


class ServiceLB:
    """The reconciler: mirrored inputs -> allocations, ``services`` rows, Service status."""

    def __init__(self, ctx: Context, cfg: model.Config) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.alloc = model.Allocations.create(cfg)
        self.resources: dict[str, dict[str, KVEntry]] = {}
        self.status: dict[str, dict[str, KVEntry]] = {kind: {} for kind in STATUS_KINDS}
        self.written: dict[str, bytes] = {}  # bucket services: key -> value as stored
        self.service_status: dict[str, tuple[int, dict[str, Any]]] = {}  # status key -> (gen, status)
        self.loop = PassLoop("servicelb", self._pass, ready=self.inputs_synced, wake_at=self._wake_at,
                             on_error=self._on_error, on_success=self._on_success)
        self.loaded = False  # allocations and current output read since the last failure
        self.resync_at = 0.0
        self.logged: set[str] = set()
        self.reconciles = 0
        self.departures = departures.Departures()
        self.departures_expire: float | None = None  # monotonic time the next departed pod ends
        self.decoder = InputDecoder(self._log_once)

    # ------------------------------------------------------------------ inputs

    def start(self, tg: asyncio.TaskGroup) -> None:
        self.ctx.declare_watch(RECONCILE)
        mirrors = mirror_kinds(self.ctx, tg, WATCHED_KINDS, self.loop)
        self.resources = {kind: mirror.entries for kind, mirror in mirrors.items()}
        for kind in STATUS_KINDS:
            self.status[kind] = self.ctx.mirror(
                tg, schema.BUCKET_STATUS, f"{kind}.>", name=f"{schema.BUCKET_STATUS}/{kind}",
            ).notify(self.loop).entries
        tg.create_task(self.loop.run(), name="servicelb-reconcile")

    def inputs_synced(self) -> bool:
        return not (self.ctx.pending_watches - {RECONCILE})

    def _log_once(self, problem: str) -> None:
        if problem not in self.logged:
            self.logged.add(problem)
            log.warning("%s", problem)

    # ------------------------------------------------------------------ the loop

    def _wake_at(self) -> float | None:
        """The periodic full resync, or the end of a departing pod's grace period."""
        if not self.loaded:
            return None
        return min(self.resync_at, self.departures_expire or self.resync_at)

    async def _pass(self) -> None:
        if not self.loaded or time.monotonic() >= self.resync_at:
            await self.load()  # first pass, and periodically: re-read what the buckets hold
            self.loaded = True
            self.resync_at = time.monotonic() + RESYNC_S
        await self.reconcile()

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

    async def reconcile(self) -> None:
        started = time.monotonic()
        inputs = self.decoder.inputs(self.resources, self.status)
        self.departures_expire = self.departures.apply(inputs, started)
        for _attempt in range(5):
            desired = model.compute(inputs, self.alloc, self.cfg)
            _keep_bad_services(inputs, desired, self.alloc)
            if await self._persist_pending():
                break
        else:
            raise BusError("allocation kept conflicting with another writer")
        for problem in desired.problems:
            self._log_once(problem)

        rows: dict[str, bytes] = {k: schema.encode(v) for k, v in desired.endpoints.items()}
        rows.update((k, schema.encode(v)) for k, v in desired.frontends.items())
        puts = [k for k, v in rows.items() if self.written.get(k) != v]
        deletes = sorted(k for k in self.written if k not in rows)
        for key in puts:  # add and update first ...
            await self.ctx.bus.kv_put(schema.BUCKET_SERVICES, key, rows[key])
            self.written[key] = rows[key]
        for key in deletes:  # ... remove last
            await self.ctx.bus.kv_delete(schema.BUCKET_SERVICES, key)
            del self.written[key]
        await self._write_statuses(desired)
        await self._release_unused()

        self.reconciles += 1
        backends = {b.id for fe in desired.frontends.values() for b in fe.backends}
        self.ctx.detail.update(
            frontends=len(desired.frontends), backends=len(backends),
            services=len(desired.generations), problems=len(desired.problems),
            reconciles=self.reconciles,
            last_reconcile_ms=round((time.monotonic() - started) * 1000, 1),
        )
        if puts or deletes:
            log.info("reconciled: %d rows written, %d removed (%d frontends, %d backends)",
                     len(puts), len(deletes), len(desired.frontends), len(backends))

    async def _persist_pending(self) -> bool:
        """Create every newly allocated value; False (pool re-read) when one was taken."""
        for pool in self.alloc.pools():
            for value, owner in sorted(pool.pending.items()):
                try:
                    revision = await self.ctx.bus.kv_put(
                        schema.BUCKET_ALLOCATIONS, pool.key(value),
                        schema.LBAllocation(owner=owner, created=now_rfc3339()), last_revision=0)
                except RevisionMismatch:
                    log.info("%s: lost the race for %s; re-reading", pool.name, pool.key(value))
                    await self._load_pool(pool)
                    return False
                pool.persisted(value, revision)
        return True

    async def _write_statuses(self, desired: model.Desired) -> None:
        wanted: dict[str, tuple[int, dict[str, Any]]] = {
            kv_key("Service", ns, name): (desired.generations.get((ns, name), 0), status)
            for (ns, name), status in desired.statuses.items()
            if status
        }
        for key, (generation, status) in sorted(wanted.items()):
            if self.service_status.get(key) == (generation, status):
                continue
            await self.ctx.bus.kv_put(schema.BUCKET_STATUS, key, schema.StatusRecord(
                reporter="servicelb", observed_generation=generation, status=status,
                updated=now_rfc3339()))
            self.service_status[key] = (generation, status)
        for key in sorted(set(self.service_status) - set(wanted)):
            await self.ctx.bus.kv_delete(schema.BUCKET_STATUS, key)
            del self.service_status[key]

    async def _release_unused(self) -> None:
        for pool in self.alloc.pools():
            for value in pool.unused():
                revision = pool.revisions.get(value)
                try:
                    await self.ctx.bus.kv_delete(schema.BUCKET_ALLOCATIONS, pool.key(value),
                                                 last_revision=revision)
                except RevisionMismatch:
                    await self._load_pool(pool)
                    self.loop.mark_dirty()
                    return
                log.info("released %s (was %s)", pool.key(value), pool.owners.get(value))
                pool.released(value)


def _keep_bad_services(inputs: model.Inputs, desired: model.Desired, alloc: model.Allocations) -> None:
    """A Service that exists but failed to decode keeps its cluster IP and node ports."""
    for ns, name in _bad(inputs.services, desired.generations):
        owner = f"{ns}/{name}"
        alloc.cluster_ip.lookup(owner)
        for node_owner in [o for o in alloc.node_port.by_owner if o.startswith(owner + ":")]:
            alloc.node_port.lookup(node_owner)


def _bad(services: dict[model.Ref, Any], decoded: dict[model.Ref, int]) -> Iterable[model.Ref]:
    return [ref for ref in services if ref not in decoded]


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    cfg = config_from_env(ctx.settings.cluster, ctx.settings.cluster_id)
    ctx.detail["config"] = {"service_cidr": cfg.service_cidr, "maglev_table_size": cfg.maglev_table_size,
                            "derive_slices": cfg.derive_slices,
                            "node_port_range": f"{cfg.node_port_range[0]}-{cfg.node_port_range[1]}"}
    ServiceLB(ctx, cfg).start(tg)
