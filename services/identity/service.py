"""Identity service shell: labels -> numeric identities, and every IP -> identity (ipcache).

Watches Pods, Namespaces, Nodes and the policy kinds in ``resources``, Pod and Node status
in ``status``, the identities and pod IPs of connected clusters in ``mesh`` (written to
``identities`` as scope ``remote`` and to ``ipcache`` as that cluster's, below local
pods), and its own outputs ``identities`` and ``ipcache``. Writes ``identities``
(through ``IdentityAllocator``) and ``ipcache``. A policy change calls for a pass only
when the CIDRs or toFQDNs selectors it names changed.

Invariants:
- Level-triggered: a pass derives the desired state from the mirrored buckets and writes
  only the difference, so a restarted replica (or one that missed events) converges;
  nothing is written before every watch has delivered its initial state. A pass costs
  what changed: pods are re-derived only when touched, only the label sets whose pod
  count changed (or whose ``labels.`` key another writer changed) are allocated again, the
  desired ipcache is kept by deltas (``IpcacheIndex``), and only keys whose winner or whose
  watched value changed are compared. A full pass compares every key, allocates every
  label set in use and scans every label set for release: the first, one
  after a pass that failed a write, conflicted or raised, one after a watch sync or a
  healing audit, and one per sweep period, so whatever a delta missed is repaired within
  ``min(gc_interval, orphan_age / 2)``.
- Any number of replicas may run: every write is a compare-and-set against the revision
  this replica saw; a conflict only schedules another pass.
- Passes are serial (``ciliary.watch.PassLoop``: a burst of changes becomes one pass); within a pass, writes to different keys run in
  parallel (bounded), each key is written at most once. A label set the view already
  shows allocated with its current usage costs neither a write nor a task. Order within
  a pass: allocations, then ``ipcache``, then releases and the orphan sweep (housekeeping
  never delays a relabelled pod's new identity reaching the ipcache). The orphan sweep
  runs at most every ``min(gc_interval, orphan_age / 2)`` seconds; passes come at
  least every ``gc_interval``, so an orphan older than ``orphan_age`` goes within about
  two ``gc_interval``s.
- An ipcache key changes owner with one put that replaces its value; it is deleted only
  when no source claims it any more.
- Health detail: ``identities`` and ``label_sets`` (counted on full passes, when a key
  came or went, and at least every ``COUNT_INTERVAL`` otherwise), ``last_pass_ms``, ``last_pass`` (its parts: inputs, allocate,
  ipcache, housekeeping) and ``recent_passes`` (the last ``watch.RECENT_PASSES``, each with
  its start as Unix time), and ``caches`` (sizes of its long-lived tables: the toFQDNs name
  cache against its cap, delete tombstones, held label sets, pods; ``ciliary.cachestats``).
- Bad payloads in any bucket are logged and skipped; requests for ``explain``/``report``
  are answered by one replica (queue group).
- toFQDNs: every replica hears the DNS responses the node executors publish on
  ``fqdn.dns.<cluster>.<node>`` and keeps its own name cache (``fqdn.FQDNAddressCache``) of the
  names a policy's ``toFQDNs`` selects. Each cached address joins the policy CIDRs as a
  host prefix whose identity labels are the CIDR labels plus ``fqdn:<selector>`` for
  every matching selector; an expired address leaves the set and its identity goes the
  way of any unused CIDR identity. The cache is not persisted: a restarted replica
  learns addresses again from the next lookups.

Settings (environment): ``CILIARY_IDENTITY_LABELS`` (Cilium ``labels`` option syntax,
space separated), ``CILIARY_IDENTITY_GC_GRACE`` (seconds an unused identity is kept,
default 900), ``CILIARY_IDENTITY_ORPHAN_AGE`` (seconds before an ``id.`` key no label set
names is removed, default 60), ``CILIARY_FQDN_MIN_TTL`` (seconds a DNS answer is kept at
least, default 3600), ``CILIARY_FQDN_MAX_ENTRIES`` (name cache bound, default 50000).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ciliary import heap, schema, watch
from ciliary.bus import BusError, KVEntry, Synced
from ciliary.cachestats import CacheStats
from ciliary.events import subjects as events
from ciliary.events.changes import start_change_events
from ciliary.runtime import Context, mirror_kinds
from ciliary.watch import PassLoop, decoder

from . import fqdn
from .allocator import (
    SCOPE_CIDR,
    SCOPE_CLUSTER,
    SCOPE_REMOTE,
    AllocationError,
    Conflict,
    IdentityAllocator,
    cluster_range,
)
from .casstore import BusCasStore, decode_identity, decode_ipcache
from .inputs import POLICY_KINDS, IdentityInputs
from .ipcache_index import IpcacheIndex
from .labels import cidr_labels, explain, label_set_hash
from .report import cardinality_report
from .settings import ENV_LABELS, IdentityConfig, label_filter

log = logging.getLogger(__name__)

WATCHED_KINDS = ("Pod", "Namespace", "Node", *POLICY_KINDS)
PARALLEL_WRITES = 64
AUDIT_INTERVAL = 300.0  # seconds between full listings of the output buckets
COUNT_INTERVAL = 10.0  # seconds between counts of identities and label sets (health detail)
QUEUE_GROUP = "identity"


async def _gather(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` that lets every write finish before raising the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class IdentityService:
    def __init__(self, ctx: Context, config: IdentityConfig) -> None:
        self.ctx = ctx
        self.config = config
        self.cluster = ctx.settings.cluster
        self.cluster_id = ctx.settings.cluster_id
        self.filter, self.pattern_errors = label_filter(config.labels)
        self.identities = BusCasStore(ctx.bus, schema.BUCKET_IDENTITIES, decode_identity)
        self.ipcache = BusCasStore(ctx.bus, schema.BUCKET_IPCACHE, decode_ipcache)
        self.allocator = IdentityAllocator(self.identities, self.cluster, self.cluster_id)
        self.inputs = IdentityInputs(self.filter, self.cluster)
        self.loop = PassLoop("identity", self._pass, ready=lambda: not self.ctx.pending_watches, heap=heap.freezer(),
                             wake_at=lambda: time.monotonic() + self._wait_limit())
        self.reserved_ensured = False
        # the label sets in use (pods' and CIDRs'), with their labels. keys both ways
        self._lkeys: dict[tuple[str, ...], str] = {}
        self._lkey_sets: dict[str, tuple[str, ...]] = {}
        self._cidr_sets: set[tuple[str, ...]] = set()  # the CIDRs' label sets, last pass
        self._labels_news: set[str] = set()  # labels. keys another writer changed
        self._held: dict[tuple[str, ...], tuple[Any, int, int]] = {}  # -> (view entry, refs, id)
        self.next_audit = 0.0
        self.next_sweep = 0.0
        self._next_count = 0.0  # health detail identities / label_sets: when counted again,
        self._counted_size = -1  # and the number of keys when last counted
        self._index: IpcacheIndex | None = None  # the desired ipcache, kept across passes
        self._pod_ids: dict[tuple[str, ...], int] = {}  # pod label set -> identity, last pass
        self._full_due = True  # a watch (re)synced or an audit healed the view
        self._last_pass_ok = False  # the previous pass failed, raised, or there was none
        self._ipcache_news: set[str] = set()  # ipcache keys whose view changed since the last pass
        self._mesh_changed = True
        self.recent_passes: deque[dict[str, Any]] = deque(maxlen=watch.RECENT_PASSES)
        self.passes = 0
        self.names = fqdn.FQDNAddressCache(min_ttl=config.fqdn_min_ttl, max_entries=config.fqdn_max_entries)
        self.fqdn_matcher = fqdn.SelectorMatcher()
        self.caches = CacheStats()  # health detail "caches", refreshed after every pass
        self.caches.register("fqdn_names", lambda: self.names.size, config.fqdn_max_entries,
                             lambda: self.names.evicted)
        self.caches.register("identity_tombstones", lambda: len(self.identities.tombstones))
        self.caches.register("ipcache_tombstones", lambda: len(self.ipcache.tombstones))
        self.caches.register("held_label_sets", lambda: len(self._held))
        self.caches.register("pods", lambda: self.inputs.endpoints)

    # ---------------------------------------------------------------- wiring

    async def start(self, tg: asyncio.TaskGroup) -> None:
        mirrors = mirror_kinds(self.ctx, tg, WATCHED_KINDS)
        self.inputs.resources = {kind: mirror.entries for kind, mirror in mirrors.items()}
        for kind, mirror in mirrors.items():
            if kind in POLICY_KINDS:  # only their CIDRs and toFQDNs selectors matter
                mirror.listen(lambda event, kind=kind: self._on_policy(kind, event))
                continue
            if kind == "Pod":
                mirror.listen(self._touch_pod)
            elif kind == "Namespace":
                mirror.listen(lambda _event: self.inputs.touch_all())
            mirror.notify(self.loop)
        for kind in ("Pod", "Node"):
            status = self.ctx.mirror(
                tg, schema.BUCKET_STATUS, f"{kind}.>", name=f"{schema.BUCKET_STATUS}/{kind}",
            )
            if kind == "Pod":
                status.listen(self._touch_pod)
            self.inputs.status[kind] = status.notify(self.loop).entries
        self.mesh_ids = self.ctx.mirror(tg, schema.BUCKET_MESH, f"{schema.MESH_IDENTITY_PREFIX}.>",
                                        decode=decoder(schema.IdentityRecord)).listen(self._on_mesh)
        self.mesh_ipcache = self.ctx.mirror(tg, schema.BUCKET_MESH, f"{schema.MESH_IPCACHE_PREFIX}.>",
                                            decode=decoder(schema.IPCacheRecord)).listen(self._on_mesh)
        for store in (self.identities, self.ipcache):
            self.ctx.mirror(tg, store.bucket, keep=False).listen(
                lambda event, store=store: self._on_output(store, event))
        await self.ctx.bus.subscribe(schema.SUBJECT_IDENTITY_EXPLAIN, schema.IdentityExplainRequest,
                                     self._answer(self.explain, schema.IdentityExplainReply), queue=QUEUE_GROUP)
        await self.ctx.bus.subscribe(schema.SUBJECT_IDENTITY_REPORT, schema.IdentityReportRequest,
                                     self._answer(self.report, schema.IdentityReportReply), queue=QUEUE_GROUP)
        await self.ctx.bus.subscribe(schema.SUBJECT_FQDN_DNS.format(cluster=self.cluster, node="*"),
                                     schema.RawEventBatch, self._on_dns)
        self.ctx.detail.update(identities=0, label_sets=0, ipcache=0, endpoints=0, passes=0)
        for error in self.pattern_errors:
            log.error("%s=%r: %s; the pattern is ignored", ENV_LABELS, self.config.labels, error)
        if self.pattern_errors:
            self.ctx.detail["label_pattern_errors"] = self.pattern_errors
        tg.create_task(self.loop.run(), name="identity-reconcile")

    def _on_output(self, store: BusCasStore, event: KVEntry | Synced) -> None:
        """A pass for news in an output bucket (another replica's write, a sync); the echo
        of this replica's own write is already in the view and needs none."""
        if not isinstance(event, KVEntry):
            self._full_due = True
            self.loop.mark_dirty()
        elif store.observe(event):
            if store is self.ipcache:
                self._ipcache_news.add(event.key)
            elif event.key.startswith(schema.IDENTITY_ID_PREFIX):
                self._mesh_changed = True  # another writer's id.: check the remote ones again
            else:
                self._labels_news.add(event.key)
            self.loop.mark_dirty()

    def _on_mesh(self, _event: KVEntry | Synced) -> None:
        self._mesh_changed = True
        self.loop.mark_dirty()

    def _touch_pod(self, event: KVEntry | Synced) -> None:
        if isinstance(event, KVEntry):
            self.inputs.touch_pod(event.key)
        else:
            self.inputs.touch_all()

    def _on_policy(self, kind: str, event: KVEntry | Synced) -> None:
        if not isinstance(event, KVEntry) or self.inputs.on_policy(kind, event):
            self.loop.mark_dirty()  # a sync, or a change of the policy's CIDRs / toFQDNs

    async def _on_dns(self, batch: schema.RawEventBatch, _msg: Any) -> None:
        """DNS responses seen by a node: learn the addresses of names a toFQDNs selects."""
        try:
            self.inputs.fqdn_selectors(self.fqdn_matcher)
            if not self.fqdn_matcher.selectors:
                return
            now = time.monotonic()
            added = 0
            for event in batch.events:
                added += self.names.ingest(event.payload, now, self.fqdn_matcher.wanted)
        except Exception:  # odd input must not cost the subscription
            log.exception("fqdn.dns batch from %s/%s skipped", batch.cluster, batch.node)
            return
        if added:
            self.loop.mark_dirty()

    def compute_fqdn(self) -> dict[str, tuple[str, ...]]:
        """Host prefix -> ``fqdn:`` labels of the addresses the name cache holds now."""
        self.names.expire(time.monotonic())
        self.inputs.fqdn_selectors(self.fqdn_matcher)
        return fqdn.fqdn_prefixes(self.names, self.fqdn_matcher)

    def _wait_limit(self) -> float:
        """Seconds until the next pass at the latest: GC, or the next name cache expiry."""
        limit = self.config.gc_interval
        expiry = self.names.next_expiry
        if expiry is not None:
            limit = min(limit, max(0.0, expiry - time.monotonic()) + 0.01)
        return limit

    def _answer(self, fn: Callable[[Any], Any], error: type) -> Callable[[Any, Any], Awaitable[None]]:
        async def handler(request: Any, msg: Any) -> None:
            try:
                reply = fn(request)
            except Exception as err:  # a bad request must not kill the subscription
                log.exception("identity request failed")
                reply = error(ok=False, error=f"{type(err).__name__}: {err}")
            if msg.reply:
                await msg.respond(schema.encode(reply))
        return handler

    # ---------------------------------------------------------------- the loop

    async def _pass(self) -> bool:
        """Reserved identities once, the periodic audit when due, then one reconcile."""
        if not self.reserved_ensured:
            await self.allocator.ensure_reserved()
            self.reserved_ensured = True
        if time.monotonic() >= self.next_audit:  # first pass: the watched view may be incomplete
            self.next_audit = time.monotonic() + AUDIT_INTERVAL
            await self.audit()
        return await self.reconcile()

    async def audit(self) -> None:
        """Heal the output mirrors from a full listing (a watch may miss initial keys)."""
        for store in (self.identities, self.ipcache):
            missing = await store.audit()
            if missing:
                self._full_due = True
                log.warning("%s: %d keys were missing from the watched view; added", store.bucket, missing)

    async def reconcile(self) -> bool:
        """One pass; True when another pass is needed (conflicts, failed writes).

        A full pass (the first, one after a pass that failed, conflicted or raised, after a
        sync or an audit that healed the view, and one per sweep period) compares every ``ipcache`` key and scans every label set for
        release; the others compare only the keys whose winner may have changed or whose
        view changed, and release only the label sets that fell out of use."""
        started = time.monotonic()
        laps = watch.PassClock()
        self.passes += 1
        full = self._full_due or not self._last_pass_ok or started >= self.next_sweep
        self._full_due = False
        self._last_pass_ok = False  # until this pass ends without a failure (it may raise)
        conflicts_before = self.allocator.conflicts
        # ipcache as it was *before* reading the inputs: a write another replica made from
        # newer inputs meanwhile has a newer revision, so our CAS fails instead of undoing it
        ipcache_view = dict(self.ipcache.entries)
        ipcache_bad = set(self.ipcache.bad)
        ipcache_news, self._ipcache_news = self._ipcache_news, set()
        mesh_changed, self._mesh_changed = self._mesh_changed, False
        self.inputs.update_pods()
        changed_pods = set(self.inputs.changed)
        refs = self.inputs.label_refs
        set_changes = self.inputs.take_label_changes()
        labels_news, self._labels_news = self._labels_news, set()
        cidr_refs = self.inputs.compute_cidrs()
        fqdn_labels = self.compute_fqdn()
        laps.lap("inputs")
        for prefix in fqdn_labels:
            cidr_refs[prefix] = cidr_refs.get(prefix, 0) + 1

        def prefix_labels(prefix: str) -> tuple[str, ...]:
            extra = fqdn_labels.get(prefix)
            return cidr_labels(prefix) if not extra else tuple(sorted((*cidr_labels(prefix), *extra)))

        sem = asyncio.Semaphore(PARALLEL_WRITES)
        failed = 0

        async def allocate(labels: Iterable[str], count: int, scope: str) -> int:
            nonlocal failed
            async with sem:
                try:
                    return (await self.allocator.allocate(labels, refs=count, scope=scope)).identity
                except AllocationError as err:
                    log.warning("allocation for %s failed: %s", list(labels), err)
                    failed += 1
                    return 0

        # the pod label sets to allocate: all on a full pass; else those whose pod count
        # changed, or whose labels. key another writer changed
        if full:
            pod_sets = list(refs)
        else:
            news = {found for lkey in labels_news if (found := self._lkey_sets.get(lkey)) is not None}
            pod_sets = [labels for labels in set_changes | news if labels in refs]
        cidrs = sorted(cidr_refs)
        jobs = [(labels, refs[labels], SCOPE_CLUSTER) for labels in pod_sets]
        jobs += [(prefix_labels(prefix), cidr_refs[prefix], SCOPE_CIDR) for prefix in cidrs]
        cidr_sets = {labels for labels, _, _ in jobs[len(pod_sets):]}
        gone = self._track_label_sets(full, refs, jobs, cidr_sets, set_changes)
        # label sets already allocated with this usage need no write: no task for them
        results = self._held_now(jobs)
        slow = [n for n, ident in enumerate(results) if not ident]
        for n, ident in zip(slow, await _gather(*(allocate(*jobs[n]) for n in slow)), strict=True):
            results[n] = ident
        laps.lap("allocate")
        previous_ids = self._pod_ids
        pod_ids = {} if full else dict(previous_ids)
        for labels in gone:
            pod_ids.pop(labels, None)
        for labels, ident in zip(pod_sets, results[: len(pod_sets)], strict=True):
            if ident:
                pod_ids[labels] = ident
            else:
                pod_ids.pop(labels, None)
        moved = {labels for labels in (*pod_sets, *gone) if pod_ids.get(labels) != previous_ids.get(labels)}
        cidr_ids = {p: ident for p, ident in zip(cidrs, results[len(pod_sets):], strict=True) if ident}

        # ipcache, before the housekeeping below: a relabelled pod's new identity is what
        # its peers wait for
        if full or mesh_changed:
            failed += await self._write_remote_identities(sem)
        index = self._ipcache_index(full, changed_pods, pod_ids, moved)
        index.set_nodes(self.inputs.compute_nodes())
        index.set_cidrs(cidr_ids)
        if full or mesh_changed:
            index.set_remote(self._remote_ipcache())
        touched = index.take_touched()
        desired = index.desired
        candidates: Iterable[str] = (
            [*desired, *(k for k in ipcache_view if k not in desired), *(k for k in ipcache_bad if k not in desired)]
            if full else touched | ipcache_news)
        writes = []
        for key in candidates:
            record = desired.get(key)
            held = ipcache_view.get(key)
            if record is not None:
                if held is None or held[0] != record:
                    writes.append(self._put_ipcache(sem, key, record, held[1] if held else 0))
            elif (held is not None or key in ipcache_bad) and not failed:  # an allocation failed: keep what we have
                writes.append(self._delete_ipcache(sem, key, held[1] if held else None))
        outcomes = await _gather(*writes)
        failed += outcomes.count(False)
        laps.lap("ipcache")

        # release what no pod or policy uses any more
        unused = (self.identities.keys(schema.IDENTITY_LABELS_PREFIX) if full else gone.values())

        async def release(lkey: str) -> None:
            async with sem:
                await self.allocator.release(lkey, self.config.gc_grace)

        await _gather(*(
            release(lkey) for lkey in unused
            if lkey not in self._lkey_sets and self.identities.peek(lkey) is not None
        ))
        if full:  # a full scan of both key spaces
            self.next_sweep = time.monotonic() + min(self.config.gc_interval, self.config.orphan_age / 2)
            await self.allocator.sweep_orphans(self.config.orphan_age)
        laps.lap("housekeeping")

        self._report(full, len(desired), time.monotonic() - started)
        laps.report(self.ctx.detail, self.recent_passes)
        conflicted = self.allocator.conflicts != conflicts_before
        self._last_pass_ok = not (failed or conflicted)
        return bool(failed or conflicted)

    def _ipcache_index(self, full: bool, changed: set[str], pod_ids: dict[tuple[str, ...], int],
                       moved: set[tuple[str, ...]]) -> IpcacheIndex:
        """The desired ipcache with this pass's pods: on a full pass every pod claims again;
        else only the pods re-derived, or whose label set's identity changed (`moved`)."""
        self._pod_ids = pod_ids
        if self._index is None:
            self._index = IpcacheIndex(self.cluster, self.cluster_id)
        index = self._index
        if full:  # every pod claims again (a no-op for the unchanged ones)
            for pod in self.inputs.pods:
                index.set_pod(pod.key, pod, pod_ids.get(pod.labels, 0))
            for key in [key for key in index.pod_keys() if self.inputs.pod(key) is None]:
                index.set_pod(key, None, 0)
            return index
        for labels in moved:
            changed.update(index.pods_with(labels))
        for key in changed:
            pod = self.inputs.pod(key)
            index.set_pod(key, pod, pod_ids.get(pod.labels, 0) if pod is not None else 0)
        return index

    def _held_now(self, jobs: list[tuple[tuple[str, ...], int, str]]) -> list[int]:
        """Per job, its identity if the view shows it allocated with this usage, else 0.
        A label set whose view entry (the very object) and usage are those last checked
        is not checked again."""
        results = []
        for labels, count, _ in jobs:
            lkey = self._lkeys[labels]
            entry = self.identities.peek(lkey)
            memo = self._held.get(labels)
            if memo is not None and memo[0] is entry and memo[1] == count:
                ident = memo[2]
            else:
                ident = self.allocator.held(lkey, labels, count)
            if ident:
                self._held[labels] = (entry, count, ident)
            else:
                self._held.pop(labels, None)
            results.append(ident)
        return results

    def _track_label_sets(self, full: bool, refs: dict[tuple[str, ...], int],
                          jobs: list[tuple[tuple[str, ...], int, str]], cidr_sets: set[tuple[str, ...]],
                          set_changes: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
        """Bring the label sets in use (pods' and CIDRs', with their ``labels.`` keys) up
        to date; returns the ones that fell out of use since the last pass, with their
        keys. A full pass rebuilds the table from `refs` and `cidr_sets`."""
        known = self._lkeys
        if full:
            in_use = set(refs) | cidr_sets
            left = [labels for labels in known if labels not in in_use]
        else:
            left = {labels for labels in (*set_changes, *self._cidr_sets)
                    if labels in known and labels not in refs and labels not in cidr_sets}
        gone = {labels: known.pop(labels) for labels in left}
        for labels, lkey in gone.items():
            self._lkey_sets.pop(lkey, None)
            self._held.pop(labels, None)
        for labels, _, _ in jobs:
            if labels not in known:
                lkey = schema.identity_labels_key(label_set_hash(labels))
                known[labels] = lkey
                self._lkey_sets[lkey] = labels
        self._cidr_sets = cidr_sets
        return gone

    def _remote_ipcache(self) -> list[schema.IPCacheRecord]:
        """Pod entries of connected clusters whose identity is known here."""
        known = {record.id for record in self.mesh_ids.values.values()}
        return [r for r in self.mesh_ipcache.values.values()
                if r.identity in known and r.cluster_id != self.cluster_id]

    async def _write_remote_identities(self, sem: asyncio.Semaphore) -> int:
        """``id.<n>`` of every connected cluster's identity (scope ``remote``: the remote's
        labels, cluster name and id, never in this cluster's range); the ones no longer in
        bucket ``mesh`` go. Returns the number of failed writes."""
        desired = {}
        for record in self.mesh_ids.values.values():
            if schema.identity_cluster_id(record.id) in (0, self.cluster_id):
                continue  # never shadow this cluster's identities
            desired[schema.identity_id_key(record.id)] = schema.IdentityRecord(
                id=record.id, labels=record.labels, scope=SCOPE_REMOTE, cluster=record.cluster,
                cluster_id=record.cluster_id, created=record.created)
        failed = 0

        async def write(key: str, record: schema.IdentityRecord | None) -> None:
            nonlocal failed
            held = self.identities.peek(key)
            async with sem:
                try:
                    if record is None:
                        if held is not None:
                            await self.identities.delete(key, held[1])
                    elif held is None:
                        await self.identities.create(key, record)
                    else:
                        await self.identities.update(key, record, held[1])
                except (Conflict, BusError) as err:
                    log.warning("remote identity %s: %s", key, err)
                    failed += 1

        jobs = [write(key, record) for key, record in desired.items()
                if (held := self.identities.peek(key)) is None or held[0] != record]
        for key in self.identities.keys(schema.IDENTITY_ID_PREFIX):
            held = self.identities.peek(key)
            if held is not None and held[0].scope == SCOPE_REMOTE and key not in desired:
                jobs.append(write(key, None))
        await _gather(*jobs)
        return failed

    async def _put_ipcache(self, sem: asyncio.Semaphore, key: str, record: schema.IPCacheRecord, revision: int) -> bool:
        async with sem:
            try:
                await self.ipcache.update(key, record, revision)
            except Conflict:
                return False
            except BusError as err:
                log.warning("ipcache %s: %s", key, err)
                return False
        return True

    async def _delete_ipcache(self, sem: asyncio.Semaphore, key: str, revision: int | None) -> bool:
        async with sem:
            try:
                if revision is None:  # a bad payload: we own the bucket, replace it by nothing
                    await self.ctx.bus.kv_delete(schema.BUCKET_IPCACHE, key)
                    self.ipcache.bad.discard(key)
                else:
                    await self.ipcache.delete(key, revision)
            except Conflict:
                return False
            except BusError as err:
                log.warning("ipcache %s: %s", key, err)
                return False
        return True

    def _report(self, full: bool, ipcache_entries: int, seconds: float) -> None:
        now = time.monotonic()
        size = len(self.identities.entries) + len(self.identities.bad)
        # counting scans every key: only when a key came or went, or after a while
        if full or size != self._counted_size or now >= self._next_count:
            self._next_count, self._counted_size = now + COUNT_INTERVAL, size
            ids = label_sets = 0
            for key in (*self.identities.entries, *self.identities.bad):
                if key.startswith(schema.IDENTITY_ID_PREFIX):
                    ids += 1
                elif key.startswith(schema.IDENTITY_LABELS_PREFIX):
                    label_sets += 1
            self.ctx.detail["identities"] = ids
            self.ctx.detail["label_sets"] = label_sets
        self.ctx.detail["ipcache"] = ipcache_entries
        self.ctx.detail["endpoints"] = self.inputs.endpoints
        self.ctx.detail["passes"] = self.passes
        self.ctx.detail["last_pass_ms"] = round(seconds * 1000, 1)
        self.ctx.detail["fqdn_cache"] = self.names.size
        self.ctx.detail["fqdn_selectors"] = len(self.fqdn_matcher.selectors)
        if self.names.evicted:
            self.ctx.detail["fqdn_evicted"] = self.names.evicted
        self.caches.publish(self.ctx.detail)

    # ---------------------------------------------------------------- requests

    def explain(self, request: schema.IdentityExplainRequest) -> schema.IdentityExplainReply:
        namespaces = self.inputs.namespace_labels()
        namespace = request.namespace or "default"
        labels = dict(request.labels)
        service_account = request.service_account or "default"
        if request.pod:
            source = self.inputs.pod_source(namespace, request.pod)
            if source is None:
                return schema.IdentityExplainReply(ok=False, error=f"pod {namespace}/{request.pod} not found",
                                                   namespace=namespace, pod=request.pod)
            labels, service_account = source
        ns_labels = namespaces.get(namespace, (0, {}))[1]
        verdicts = explain(self.filter, labels, namespace, ns_labels, service_account, self.cluster)
        kept = sorted(str(v.label) for v in verdicts if v.kept)
        held = self.identities.peek(schema.identity_labels_key(label_set_hash(kept)))
        return schema.IdentityExplainReply(
            namespace=namespace, pod=request.pod,
            verdicts=[schema.LabelVerdict(label=str(v.label), origin=v.origin, kept=v.kept,
                                          rule=v.rule, reason=v.reason) for v in verdicts],
            identity_labels=kept, identity=held[0].id if held else 0,
        )

    def report(self, request: schema.IdentityReportRequest) -> schema.IdentityReportReply:
        pods = self.inputs.pods or self.inputs.compute_pods()
        low, high = cluster_range(self.cluster_id)
        allocated = sum(
            1 for key in self.identities.keys(schema.IDENTITY_ID_PREFIX)
            if (held := self.identities.peek(key)) is not None and held[0].scope == SCOPE_CLUSTER
        )
        return cardinality_report(
            [p.labels for p in pods], cluster=self.cluster, cluster_id=self.cluster_id,
            allocated=allocated, limit=high - low + 1, top=max(1, request.top),
            min_pods=max(1, request.min_pods),
        )


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    service = IdentityService(ctx, IdentityConfig.from_env())
    log.info("identity: cluster %s (id %d), label patterns %r, gc grace %.1fs",
             service.cluster, service.cluster_id, service.config.labels, service.config.gc_grace)
    await service.start(tg)
    await start_change_events(ctx.bus, ctx.settings.cluster, tg, events.SERVICE_TOPICS["identity"],
                              ctx.detail)

