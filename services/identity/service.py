"""Identity service shell: labels -> numeric identities, and every IP -> identity (ipcache).

Watches Pods, Namespaces, Nodes and the policy kinds in ``resources``, Pod and Node status
in ``status``, and its own outputs ``identities`` and ``ipcache``. Writes ``identities``
(through ``IdentityAllocator``) and ``ipcache``.

Invariants:
- Level-triggered: every pass recomputes the desired state from the mirrored buckets and
  writes only the difference, so a restarted replica (or one that missed events)
  converges; nothing is written before every watch has delivered its initial state.
- Any number of replicas may run: every write is a compare-and-set against the revision
  this replica saw; a conflict only schedules another pass.
- Passes are debounced and serial; within a pass, writes to different keys run in
  parallel (bounded), each key is written at most once.
- An ipcache key changes owner with one put that replaces its value; it is deleted only
  when no source claims it any more.
- Bad payloads in any bucket are logged and skipped; requests for ``explain``/``report``
  are answered by one replica (queue group).
- toFQDNs: every replica hears the DNS responses the node executors publish on
  ``fqdn.dns.<cluster>.<node>`` and keeps its own name cache (``fqdn.NameCache``) of the
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
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from ciliary import config, schema
from ciliary.bus import Bus, BusError, KVEntry, RevisionMismatch
from ciliary.runtime import Context, mirror_kinds
from ciliary.watch import PassLoop, entries_only

from . import fqdn
from .allocator import (
    SCOPE_CIDR,
    SCOPE_CLUSTER,
    AllocationError,
    Conflict,
    IdentityAllocator,
    cluster_range,
)
from .labels import LabelFilter, LabelPattern, PatternError, cidr_labels, explain, label_set_hash
from .model import PodInfo, desired_ipcache, label_refs, node_addresses, pod_info, policy_cidrs
from .report import cardinality_report

log = logging.getLogger(__name__)

POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
WATCHED_KINDS = ("Pod", "Namespace", "Node", *POLICY_KINDS)
ENV_LABELS = "CILIARY_IDENTITY_LABELS"
ENV_GC_GRACE = "CILIARY_IDENTITY_GC_GRACE"
ENV_ORPHAN_AGE = "CILIARY_IDENTITY_ORPHAN_AGE"
DEFAULT_GC_GRACE = 15 * 60.0  # Cilium's identity GC interval
DEFAULT_ORPHAN_AGE = 60.0
PARALLEL_WRITES = 64
AUDIT_INTERVAL = 300.0  # seconds between full listings of the output buckets
QUEUE_GROUP = "identity"


@dataclass(frozen=True)
class IdentityConfig:
    labels: str = ""
    gc_grace: float = DEFAULT_GC_GRACE
    orphan_age: float = DEFAULT_ORPHAN_AGE
    fqdn_min_ttl: float = fqdn.DEFAULT_MIN_TTL
    fqdn_max_entries: int = fqdn.DEFAULT_MAX_ENTRIES

    @classmethod
    def from_env(cls) -> IdentityConfig:
        return cls(
            labels=os.environ.get(ENV_LABELS, ""),
            gc_grace=config.env_number(ENV_GC_GRACE, DEFAULT_GC_GRACE, minimum=0),
            orphan_age=config.env_number(ENV_ORPHAN_AGE, DEFAULT_ORPHAN_AGE, minimum=0),
            fqdn_min_ttl=config.env_number(fqdn.ENV_MIN_TTL, fqdn.DEFAULT_MIN_TTL, minimum=0),
            fqdn_max_entries=int(config.env_number(fqdn.ENV_MAX_ENTRIES, fqdn.DEFAULT_MAX_ENTRIES,
                                                   integer=True, minimum=1)),
        )

    @property
    def gc_interval(self) -> float:
        return min(30.0, max(0.2, self.gc_grace / 4))


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
    def observe(self, entry: KVEntry) -> None:
        key = entry.key
        held = self.entries.get(key)
        tombstone = self.tombstones.get(key)
        if tombstone is not None and entry.revision > tombstone:
            del self.tombstones[key]  # the watch has caught up with our delete
        if entry.deleted:
            if held is None or entry.revision == 0 or entry.revision >= held[1]:
                self.entries.pop(key, None)
                self.bad.discard(key)
            return
        if held is not None and entry.revision < held[1]:
            return
        if entry.revision <= self.tombstones.get(key, 0):
            return
        assert entry.value is not None
        try:
            value = self.decoder(key, entry.value)
        except (msgspec.DecodeError, ValueError) as err:
            log.warning("%s/%s: skipping bad payload: %s", self.bucket, key, err)
            self.bad.add(key)
            self.entries.pop(key, None)
            return
        self.bad.discard(key)
        self.entries[key] = (value, entry.revision)

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


def label_filter(config: str) -> tuple[LabelFilter, list[str]]:
    """The filter for ``CILIARY_IDENTITY_LABELS``; invalid patterns are reported and skipped."""
    good, errors = [], []
    for text in config.split():
        try:
            LabelPattern.parse(text)
        except PatternError as err:
            errors.append(str(err))
            continue
        good.append(text)
    return LabelFilter.from_config(good), errors


async def _gather(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` that lets every write finish before raising the first error."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def decode_identity(key: str, data: bytes) -> Any:
    if key.startswith(schema.IDENTITY_ID_PREFIX):
        return schema.decode(data, schema.IdentityRecord)
    if key.startswith(schema.IDENTITY_LABELS_PREFIX):
        return schema.decode(data, schema.IdentityLabelsRecord)
    raise ValueError(f"unknown key {key!r} in bucket identities")


def decode_ipcache(key: str, data: bytes) -> Any:
    return schema.decode(data, schema.IPCacheRecord)


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
        self.resources: dict[str, dict[str, KVEntry]] = {}
        self.status: dict[str, dict[str, KVEntry]] = {"Pod": {}, "Node": {}}
        self.loop = PassLoop("identity", self._pass, ready=lambda: not self.ctx.pending_watches,
                             wake_at=lambda: time.monotonic() + self._wait_limit())
        self.reserved_ensured = False
        self.next_audit = 0.0
        self.passes = 0
        self._decoded: dict[str, tuple[int, Any]] = {}
        self._pods: dict[str, tuple[tuple[int, int, int], PodInfo | None]] = {}
        self._ns_versions: dict[str, int] = {}
        self.pods: list[PodInfo] = []
        self.names = fqdn.NameCache(min_ttl=config.fqdn_min_ttl, max_entries=config.fqdn_max_entries)
        self.fqdn_matcher = fqdn.SelectorMatcher()
        self._fqdn_policies: tuple[tuple[str, int], ...] = ()

    # ---------------------------------------------------------------- wiring

    async def start(self, tg: asyncio.TaskGroup) -> None:
        self.resources = {kind: mirror.entries for kind, mirror in
                          mirror_kinds(self.ctx, tg, WATCHED_KINDS, self.loop).items()}
        for kind in ("Pod", "Node"):
            self.status[kind] = self.ctx.mirror(
                tg, schema.BUCKET_STATUS, f"{kind}.>", name=f"{schema.BUCKET_STATUS}/{kind}",
            ).notify(self.loop).entries
        for store in (self.identities, self.ipcache):
            self.ctx.mirror(tg, store.bucket, keep=False).listen(
                entries_only(store.observe)).notify(self.loop)
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

    async def _on_dns(self, batch: schema.RawEventBatch, _msg: Any) -> None:
        """DNS responses seen by a node: learn the addresses of names a toFQDNs selects."""
        try:
            self.fqdn_selectors()
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

    def fqdn_selectors(self) -> frozenset[fqdn.FQDNSelector]:
        """The toFQDNs selectors of every policy (recomputed when a policy changed)."""
        version = tuple(sorted(
            (key, entry.revision) for kind in POLICY_KINDS
            for key, entry in self.resources.get(kind, {}).items()
        ))
        if version != self._fqdn_policies:
            found: set[fqdn.FQDNSelector] = set()
            for kind in POLICY_KINDS:
                for entry in list(self.resources.get(kind, {}).values()):
                    record = self._record(entry)
                    if record is not None:
                        found |= fqdn.policy_selectors(kind, record.manifest)
            self.fqdn_matcher.set_selectors(found)
            self._fqdn_policies = version
        return self.fqdn_matcher.selectors

    def compute_fqdn(self) -> dict[str, tuple[str, ...]]:
        """Host prefix -> ``fqdn:`` labels of the addresses the name cache holds now."""
        self.names.expire(time.monotonic())
        self.fqdn_selectors()
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
                log.warning("%s: %d keys were missing from the watched view; added", store.bucket, missing)

    def _record(self, entry: KVEntry) -> schema.ResourceRecord | None:
        cached = self._decoded.get(entry.key)
        if cached is not None and cached[0] == entry.revision:
            return cached[1]
        try:
            assert entry.value is not None
            record = schema.decode(entry.value, schema.ResourceRecord)
        except (msgspec.DecodeError, AssertionError) as err:
            log.warning("resources/%s: skipping bad payload: %s", entry.key, err)
            record = None
        self._decoded[entry.key] = (entry.revision, record)
        return record

    def _status(self, kind: str, key: str) -> tuple[dict[str, Any] | None, int]:
        entry = self.status[kind].get(key)
        if entry is None or entry.value is None:
            return None, 0
        cached = self._decoded.get("status:" + key)
        if cached is not None and cached[0] == entry.revision:
            return cached[1], entry.revision
        try:
            status = schema.decode(entry.value, schema.StatusRecord).status
        except msgspec.DecodeError as err:
            log.warning("status/%s: skipping bad payload: %s", key, err)
            status = None
        self._decoded["status:" + key] = (entry.revision, status)
        return status, entry.revision

    def namespace_labels(self) -> dict[str, tuple[int, dict[str, str]]]:
        out: dict[str, tuple[int, dict[str, str]]] = {}
        for entry in list(self.resources.get("Namespace", {}).values()):
            record = self._record(entry)
            if record is None:
                continue
            labels = (record.manifest.get("metadata") or {}).get("labels") or {}
            out[record.name] = (entry.revision, {str(k): str(v) for k, v in labels.items()})
        return out

    def compute_pods(self) -> list[PodInfo]:
        namespaces = self.namespace_labels()
        pods: list[PodInfo] = []
        seen = set()
        for key, entry in list(self.resources.get("Pod", {}).items()):
            seen.add(key)
            status, status_rev = self._status("Pod", key)
            ns = key.split(".", 2)[1]
            ns_rev, ns_labels = namespaces.get(ns, (0, {}))
            version = (entry.revision, status_rev, ns_rev)
            cached = self._pods.get(key)
            if cached is not None and cached[0] == version:
                if cached[1] is not None:
                    pods.append(cached[1])
                continue
            record = self._record(entry)
            info = None
            if record is not None:
                try:
                    info = pod_info(self.filter, self.cluster, key, record.manifest, entry.revision,
                                    ns_labels, status, status_rev)
                except (AttributeError, TypeError, ValueError) as err:
                    log.warning("resources/%s: cannot derive identity: %s", key, err)
            self._pods[key] = (version, info)
            if info is not None:
                pods.append(info)
        for key in set(self._pods) - seen:
            del self._pods[key]
        if len(self._decoded) > 2 * (len(self._pods) + 64):
            live = self._live_keys()
            for key in [k for k in self._decoded if k.split(":", 1)[-1] not in live]:
                self._decoded.pop(key, None)
        self.pods = pods
        return pods

    def _live_keys(self) -> set[str]:
        live = set()
        for kind_state in self.resources.values():
            live.update(kind_state)
        for kind_state in self.status.values():
            live.update(kind_state)
        return live

    def compute_cidrs(self) -> dict[str, int]:
        refs: dict[str, int] = {}
        for kind in POLICY_KINDS:
            for entry in list(self.resources.get(kind, {}).values()):
                record = self._record(entry)
                if record is None:
                    continue
                for prefix in policy_cidrs(kind, record.manifest):
                    refs[prefix] = refs.get(prefix, 0) + 1
        return refs

    def compute_nodes(self) -> dict[str, list[str]]:
        nodes: dict[str, list[str]] = {}
        for key, entry in list(self.resources.get("Node", {}).items()):
            record = self._record(entry)
            if record is None:
                continue
            status, _ = self._status("Node", key)
            prefixes = node_addresses(record.manifest, status)
            if prefixes:
                nodes[record.name] = prefixes
        return nodes

    async def reconcile(self) -> bool:
        """One pass; True when another pass is needed (conflicts, failed writes)."""
        started = time.monotonic()
        self.passes += 1
        conflicts_before = self.allocator.conflicts
        # ipcache as it was *before* reading the inputs: a write another replica made from
        # newer inputs meanwhile has a newer revision, so our CAS fails instead of undoing it
        ipcache_view = dict(self.ipcache.entries)
        ipcache_bad = set(self.ipcache.bad)
        pods = self.compute_pods()
        refs = label_refs(pods)
        cidr_refs = self.compute_cidrs()
        fqdn_labels = self.compute_fqdn()
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

        pod_sets = list(refs)
        cidrs = sorted(cidr_refs)
        results = await _gather(
            *(allocate(labels, refs[labels], SCOPE_CLUSTER) for labels in pod_sets),
            *(allocate(prefix_labels(prefix), cidr_refs[prefix], SCOPE_CIDR) for prefix in cidrs),
        )
        pod_ids = {labels: ident for labels, ident in zip(pod_sets, results[: len(pod_sets)], strict=True) if ident}
        cidr_ids = {p: ident for p, ident in zip(cidrs, results[len(pod_sets):], strict=True) if ident}

        # release what no pod or policy uses any more
        wanted = {schema.identity_labels_key(label_set_hash(labels)) for labels in pod_sets}
        wanted |= {schema.identity_labels_key(label_set_hash(prefix_labels(p))) for p in cidrs}
        async def release(lkey: str) -> None:
            async with sem:
                await self.allocator.release(lkey, self.config.gc_grace)

        await _gather(*(
            release(lkey) for lkey in self.identities.keys(schema.IDENTITY_LABELS_PREFIX)
            if lkey not in wanted and self.identities.peek(lkey) is not None
        ))
        await self.allocator.sweep_orphans(self.config.orphan_age)

        # ipcache
        desired = desired_ipcache(pods, pod_ids, self.compute_nodes(), cidr_ids,
                                  self.cluster, self.cluster_id)
        writes = []
        for key, record in desired.items():
            held = ipcache_view.get(key)
            if held is None or held[0] != record:
                writes.append(self._put_ipcache(sem, key, record, held[1] if held else 0))
        for key in [*ipcache_view, *ipcache_bad]:
            if key not in desired and not failed:  # an allocation failed: keep what we have
                held = ipcache_view.get(key)
                writes.append(self._delete_ipcache(sem, key, held[1] if held else None))
        outcomes = await _gather(*writes)
        failed += outcomes.count(False)

        self._report(len(desired), time.monotonic() - started)
        conflicted = self.allocator.conflicts != conflicts_before
        return bool(failed or conflicted)

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

    def _report(self, ipcache_entries: int, seconds: float) -> None:
        ids = self.identities.keys(schema.IDENTITY_ID_PREFIX)
        self.ctx.detail["identities"] = len(ids)
        self.ctx.detail["label_sets"] = len(self.identities.keys(schema.IDENTITY_LABELS_PREFIX))
        self.ctx.detail["ipcache"] = ipcache_entries
        self.ctx.detail["endpoints"] = len(self.pods)
        self.ctx.detail["passes"] = self.passes
        self.ctx.detail["last_pass_ms"] = round(seconds * 1000, 1)
        self.ctx.detail["fqdn_cache"] = self.names.size
        self.ctx.detail["fqdn_selectors"] = len(self.fqdn_matcher.selectors)
        if self.names.evicted:
            self.ctx.detail["fqdn_evicted"] = self.names.evicted

    # ---------------------------------------------------------------- requests

    def explain(self, request: schema.IdentityExplainRequest) -> schema.IdentityExplainReply:
        namespaces = self.namespace_labels()
        namespace = request.namespace or "default"
        labels = dict(request.labels)
        service_account = request.service_account or "default"
        if request.pod:
            key = f"Pod.{namespace}.{request.pod}"
            entry = self.resources.get("Pod", {}).get(key)
            record = self._record(entry) if entry is not None else None
            if record is None:
                return schema.IdentityExplainReply(ok=False, error=f"pod {namespace}/{request.pod} not found",
                                                   namespace=namespace, pod=request.pod)
            meta = record.manifest.get("metadata") or {}
            spec = record.manifest.get("spec") or {}
            labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
            service_account = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
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
        pods = self.pods or self.compute_pods()
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

