"""Policy service shell: policies × identities → bucket ``policy`` and policy status.

Watches CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, Namespaces and
Pods in ``resources``, the identity service's ``identities`` (``id.<n>`` keys) and
``ipcache`` (pod IP → identity, for named ports), and its own output ``policy``.
Writes ``policy`` (one key per local identity; an open record for one nothing selects) and the status of every policy
object in ``status``; answers ``ciliary policy trace`` on SUBJECT_POLICY_TRACE. A pass is
due when a policy, an identity or the ipcache's pod identities changed, or a Pod's named
container ports; a Pod's labels reach resolution only as its new identity.

Invariants:
- Level-triggered: each pass hands the long-lived `PolicyEngine` what changed since the
  last pass (identity deltas, the policy set, the named-port table), which re-resolves only
  what those changes affect; only the records of identities whose policy changed are
  re-encoded, and only differences are written. Nothing is written before every watch has
  delivered its initial state.
- Puts precede deletes within a pass (add before remove); puts (and then deletes) to
  different keys run in parallel, at most ``PARALLEL_WRITES`` in flight. The records of
  identities resolved in full (a relabelled pod's new identity, the subjects of a changed
  policy) are encoded and put first, before the engine works out the subjects that only
  gained or lost a peer (`PolicyEngine.begin` / `finish`); those follow. Writes to
  ``policy`` are compare-and-set against the revision last seen, so a concurrent replica
  only causes another pass. A policy's status is re-encoded only when the engine made
  a new status for it, and written only when its payload changed.
- Health detail ``last_pass_ms`` is the wall time of the last pass, ``last_pass`` its
  parts (inputs, resolve, encode, write, status) and ``recent_passes`` the same for the
  last ``watch.RECENT_PASSES`` passes, each with its start (Unix time) and
  ``first_write_at`` (ms into the pass when the first records were written); ``caches`` the
  sizes of its long-lived tables (selectors, identities, policy rows, statuses).
- One pass at a time touches the engine. A pass whose changes involve at most
  ``SMALL_PASS`` identities (identity changes, plus what the rules of every added,
  updated or deleted policy select) with an unchanged named-port table resolves on the
  event loop; any other (the first pass, big policy changes) in a worker thread, so the
  loop keeps answering health and trace meanwhile. Identity changes are queued on the
  event loop and handed over at the start of a pass (changes arriving during a pass
  trigger another one). Trace requests use the service's own identity mirror.
- The engine sees each identity's labels plus, for pod identities with an address inside
  some NetworkPolicy ipBlock, one ``podip:<address>`` label per address of its pods
  (`PodAddressLabels`), recomputed when the ipcache's pods or the set of ipBlocks changed;
  traces see the same labels.
- Identity and ipcache payloads are decoded leniently (only ``id``/``labels`` and
  ``identity``/``source``/``namespace``/``pod`` are read); bad payloads are skipped.

Settings (environment): ``CILIARY_POLICY_AUDIT_MODE`` (``true``: agent-wide audit mode),
``CILIARY_POLICY_MAX_ENTRIES`` (per-identity entry limit, default 16384),
``CILIARY_POLICY_ALL_CLUSTERS`` (``true``: peer selectors span every cluster, Cilium's
``policy-default-local-cluster=false``), ``CILIARY_POLICY_ALLOW_LOCALHOST`` (``always``,
the default, or ``policy``: Cilium's ``allow-localhost``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from ciliary import heap, schema, watch
from ciliary.bus import SYNCED, KVEntry, RevisionMismatch, Synced
from ciliary.cachestats import CacheStats
from ciliary.events import subjects as events
from ciliary.events.changes import start_change_events
from ciliary.runtime import Context, mirror_kinds
from ciliary.store import now_rfc3339
from ciliary.watch import PassLoop, entries_only

from .incremental import PolicyEngine, Step
from .inputs import PolicyInputs, decode_identity, decode_ipcache_prefix, decode_pod_ip
from .podaddresses import PodAddressLabels, ipblock_networks
from .records import (
    BucketValues,
    WritePlan,
    plan_writes,
    puts_among,
    status_payload,
    update_desired,
)
from .resolve import PolicyStatus, Resolution, is_local
from .rules import POLICY_KINDS, NormPolicy, PolicyKey
from .selectors import IdentityView
from .settings import options_from_env
from .trace_request import TraceView, answer_trace

log = logging.getLogger(__name__)

WATCHED_KINDS = (
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "NetworkPolicy",
    "Namespace",
    "Pod",
)
QUEUE_GROUP = "ciliary-policy"
PARALLEL_WRITES = 64
SMALL_PASS = 32  # subjects / identity changes a pass resolves on the event loop


async def bounded_gather(writes: list[Coroutine[Any, Any, None]]) -> None:
    """Run `writes` with at most PARALLEL_WRITES in flight; every one finishes before the
    first error is raised."""
    sem = asyncio.Semaphore(PARALLEL_WRITES)

    async def bounded(write: Coroutine[Any, Any, None]) -> None:
        async with sem:
            await write

    results = await asyncio.gather(*(bounded(w) for w in writes), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class PolicyService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.options = options_from_env(s.cluster, s.cluster_id)
        self.engine = PolicyEngine(self.options)
        self.identities: dict[int, IdentityView] = {}  # the event loop's mirror (trace)
        self.identity_labels: dict[int, frozenset[str]] = {}  # as the identity service wrote
        self.pod_address_labels = PodAddressLabels()
        self._addresses_dirty = True  # the ipcache's pods changed since the last pass
        self._blocks: tuple[tuple[int, ...], tuple[Any, ...]] = ((), ())  # policies -> ipBlocks
        self.desired: dict[str, bytes] = {}  # bucket policy as it should be (encoded)
        self.local_ids: set[int] = set()  # local identities handed to the engine: one record each
        self._joined_or_left: set[int] = set()  # identities the last `_begin` added or removed
        self.ipcache_pods: dict[str, tuple[str, int]] = {}  # ipcache key -> (pod ref, id)
        self.ipcache_prefixes: dict[str, tuple[str, int]] = {}  # ipcache key -> (prefix, id)
        self.policy_bucket: dict[str, tuple[int, bytes]] = {}  # key -> (revision, value)
        self.current = BucketValues(self.policy_bucket)  # the same, values only
        self.status_written: dict[str, dict[str, Any]] = {}  # status key -> payload
        self.status_source: dict[str, PolicyStatus] = {}  # status key -> what it was made of
        self._status_keys_swept: dict[PolicyKey, str] | None = None  # policy set last swept
        self.inputs = PolicyInputs(self.options)
        self.norm: list[NormPolicy] = []
        self.named_ports: dict[int, dict[str, tuple[int, int]]] = {}
        self.caches = CacheStats()  # health detail "caches", refreshed after every pass
        self.caches.register("selectors", lambda: self.engine.cache.size())
        self.caches.register("identities", lambda: len(self.identities))
        self.caches.register("policy_rows", lambda: len(self.policy_bucket))
        self.caches.register("statuses", lambda: len(self.status_written))
        self.last: Resolution | None = None
        self.loop = PassLoop("policy", self.reconcile, ready=lambda: not self.ctx.pending_watches, heap=heap.freezer(),
                             on_error=self._on_pass_error)
        self.dirty = self.loop.dirty  # set: a pass is due
        self._pending: list[tuple[dict[int, frozenset[str]], list[int]]] = []
        self._applied: tuple[list[NormPolicy], Any] | None = None  # last pass: policies, ports
        self.recent_passes: deque[dict[str, Any]] = deque(maxlen=watch.RECENT_PASSES)
        self.counters = {"passes": 0, "writes": 0, "deletes": 0, "overflow": 0, "conflicts": 0}
        ctx.detail["policy"] = self.counters

    # ---------------------------------------------------------------- wiring

    async def start(self, tg: asyncio.TaskGroup) -> None:
        mirrors = mirror_kinds(self.ctx, tg, WATCHED_KINDS)
        self.inputs.resources = {kind: m.entries for kind, m in mirrors.items()}
        for kind in POLICY_KINDS:
            mirrors[kind].notify(self.loop)
        # a Pod matters only through its named ports; a Namespace not at all (namespace
        # labels reach resolution through the identities)
        mirrors["Pod"].listen(entries_only(self._on_pod)).listen(self._on_sync)
        mirrors["Namespace"].listen(self._on_sync)
        for bucket, handler in (
            (schema.BUCKET_IDENTITIES, self._on_identity),
            (schema.BUCKET_IPCACHE, self._on_ipcache),
            (schema.BUCKET_POLICY, self._on_policy),
        ):
            self.ctx.mirror(tg, bucket).listen(entries_only(handler)).listen(self._on_sync)
        await self.ctx.bus.subscribe(schema.SUBJECT_POLICY_TRACE, schema.PolicyTraceRequest,
                                     self._on_trace, queue=QUEUE_GROUP)
        tg.create_task(self.loop.run(), name="policy-reconcile")

    def _on_sync(self, event: KVEntry | Synced) -> None:
        if event is SYNCED:
            self.loop.mark_dirty()

    def _on_pod(self, entry: KVEntry) -> None:
        if self.inputs.on_pod(entry):
            self.loop.mark_dirty()

    def _on_pass_error(self, err: BaseException) -> None:
        if isinstance(err, RevisionMismatch):
            self.counters["conflicts"] += 1

    def _on_identity(self, entry: KVEntry) -> None:
        if not entry.key.startswith(schema.IDENTITY_ID_PREFIX):
            return
        try:
            ident = int(entry.key[len(schema.IDENTITY_ID_PREFIX):])
        except ValueError:
            return
        if entry.deleted:
            change: tuple[dict[int, frozenset[str]], list[int]] = ({}, [ident])
            self.identities.pop(ident, None)
            self.identity_labels.pop(ident, None)
        else:
            decoded = decode_identity(entry)
            if decoded is None:
                return
            change = ({decoded[0]: decoded[1]}, [])
            self.identity_labels[decoded[0]] = decoded[1]
            extra = self.pod_address_labels.extra(decoded[0])
            self.identities[decoded[0]] = IdentityView(decoded[0], decoded[1] | extra)
        self._pending.append(change)  # handed to the engine by the next pass
        self.loop.mark_dirty()

    def _on_ipcache(self, entry: KVEntry) -> None:
        prefix = None if entry.deleted else decode_ipcache_prefix(entry)
        if prefix is None:
            self.ipcache_prefixes.pop(entry.key, None)
        else:
            self.ipcache_prefixes[entry.key] = prefix
        old = self.ipcache_pods.pop(entry.key, None)
        new = None if entry.deleted else decode_pod_ip(entry)
        if new is not None:
            self.ipcache_pods[entry.key] = new
        if old != new:
            self._addresses_dirty = True
            self.loop.mark_dirty()

    def _on_policy(self, entry: KVEntry) -> None:
        if entry.deleted or entry.value is None:
            self.policy_bucket.pop(entry.key, None)
            return
        value = entry.value
        held = self.policy_bucket.get(entry.key)
        if held is not None and held[1] == value:
            value = held[1]  # the echo of our own write: keep the object desired holds, so
            # each pass's comparison of every key with the desired value is by identity
        self.policy_bucket[entry.key] = (entry.revision, value)

    # ---------------------------------------------------------------- the pass

    async def reconcile(self) -> None:
        self.counters["passes"] += 1
        clock = watch.PassClock()
        norm, status_keys, generations = self.inputs.policies()
        self.norm = norm
        self.named_ports = self.inputs.named_ports(self.ipcache_pods.values())
        clock.lap("inputs")
        # first the records of identities resolved in full (a relabelled pod's new
        # identity, the subjects of a changed policy), written before the engine works
        # out which other subjects only gained or lost a peer's entries; those next; every
        # delete after every put
        step, small = await self._begin(norm)
        clock.lap("resolve")
        first = set(step.changed) | self._joined_or_left
        first_keys = self._encode(step.resolution, first, status_keys)
        clock.lap("encode")
        try:
            await self._write_policy(WritePlan(puts_among(self.current, self.desired, first_keys), []))
            clock.lap("write")
            clock.milestone("first_write")
        finally:  # the engine's step completes and every change reaches `desired` even if
            # a write failed: the next pass compares and writes what is still missing
            step = await self._run(small, self.engine.finish, step)
            clock.lap("resolve")
            self._encode(step.resolution, step.changed - first, status_keys)
            clock.lap("encode")
        res = step.resolution
        self.last = res
        self.counters["overflow"] = res.counters["overflow"]
        self.ctx.detail["identities_with_policy"] = res.counters["identities"]
        self.ctx.detail["entries"] = res.counters["entries"]
        self.caches.publish(self.ctx.detail)
        plan = self._plan()
        await self._write_policy(WritePlan(plan.puts, []))
        await self._write_policy(WritePlan([], plan.deletes))
        clock.lap("write")
        await self._write_statuses(res, status_keys, generations)
        clock.lap("status")
        clock.report(self.ctx.detail, self.recent_passes)

    def _encode(self, res: Resolution, identities: set[int],
                status_keys: dict[PolicyKey, str]) -> set[str]:
        """Bring `desired` up to date for `identities` (see `update_desired`); returns
        the keys recomputed."""
        return update_desired(self.desired, res, identities, self.options.cluster_name,
                              self.options.cluster_id, status_keys, self.current, self.local_ids)

    def _plan(self) -> WritePlan:
        return plan_writes(self.current, self.desired)

    async def _run(self, small: bool, fn: Callable[..., Step], *args: Any) -> Step:
        return fn(*args) if small else await asyncio.to_thread(fn, *args)

    async def _resolve(self, norm: list[NormPolicy]) -> Step:
        """`PolicyEngine.apply` on the changes since the last pass (see `_begin`)."""
        step, small = await self._begin(norm)
        return await self._run(small, self.engine.finish, step)

    async def _begin(self, norm: list[NormPolicy]) -> tuple[Step, bool]:
        """Hand the changes since the last pass to the engine (`PolicyEngine.begin`): on
        the event loop when they are small (`_small`), else in a worker thread (a full
        resolve can take seconds on big clusters). One pass at a time touches the engine.
        Returns the step and whether its `finish` is to run on the loop too."""
        pending, self._pending = self._pending, []
        added: dict[int, frozenset[str]] = {}
        removed: set[int] = set()
        for adds, dels in pending:  # in order: the last change of an identity wins
            for ident in dels:
                added.pop(ident, None)
                removed.add(ident)
            for ident, labels in adds.items():
                removed.discard(ident)
                added[ident] = labels
        for ident in self._pod_address_changes(norm) | set(added):
            labels = self.identity_labels.get(ident)
            if labels is not None and ident not in removed:
                extra = self.pod_address_labels.extra(ident)
                added[ident] = labels | extra
                self.identities[ident] = IdentityView(ident, labels | extra)
        self.local_ids -= removed
        self.local_ids |= {i for i in added if is_local(i, self.options.cluster_id)}
        self._joined_or_left = set(added) | removed
        small = self._small(norm, len(added) + len(removed))
        policies_now = norm if self._applied is None or norm is not self._applied[0] else None
        ports_now = self.named_ports if self._applied is None or self.named_ports is not self._applied[1] else None
        self._applied = (norm, self.named_ports)
        step = await self._run(small, self.engine.begin, policies_now, added, sorted(removed), ports_now)
        return step, small

    def _pod_address_changes(self, norm: list[NormPolicy]) -> set[int]:
        """The identities whose ``podip:`` labels changed since the last pass (see
        `PodAddressLabels`): recomputed when the ipcache's pods or the ipBlocks changed."""
        ids = self._blocks[0] if self._applied is not None and norm is self._applied[0] else tuple(id(p) for p in norm)
        if ids != self._blocks[0]:
            blocks = ipblock_networks(norm)
            if blocks != self._blocks[1]:
                self._addresses_dirty = True
            self._blocks = (ids, blocks)
        if not self._addresses_dirty:
            return set()
        self._addresses_dirty = False
        addresses = {self.ipcache_prefixes[key][0]: ident
                     for key, (_, ident) in self.ipcache_pods.items()
                     if key in self.ipcache_prefixes}
        return self.pod_address_labels.update(addresses, self._blocks[1])

    def _small(self, norm: list[NormPolicy], identity_changes: int) -> bool:
        """Whether this pass's changes are few enough to resolve without the thread hop:
        at most SMALL_PASS subjects or identities involved (each changed policy counts
        the identities its rules select now), the named-port table unchanged."""
        if self._applied is None or self.named_ports is not self._applied[1]:
            return False
        if norm is self._applied[0]:  # the policies are unchanged
            return identity_changes <= SMALL_PASS
        before = {id(p): p for p in self._applied[0]}
        now = {id(p) for p in norm}
        changed = [p for p in norm if id(p) not in before]  # new objects: new or updated
        changed += [p for i, p in before.items() if i not in now]  # old versions, deleted
        involved = identity_changes + len(changed)
        for pol in changed:
            for rule in pol.rules:
                if involved > SMALL_PASS:
                    return False
                involved += len(self.engine.cache.members(rule.subject))
        return involved <= SMALL_PASS

    async def _write_policy(self, plan: WritePlan) -> None:
        """Every put (in parallel, at most PARALLEL_WRITES in flight), then every delete."""
        async def put(key: str, value: bytes) -> None:
            rev = self.policy_bucket.get(key, (0, b""))[0]
            new_rev = await self.ctx.bus.kv_put(schema.BUCKET_POLICY, key, value,
                                                last_revision=rev)
            self.policy_bucket[key] = (new_rev, value)
            self.counters["writes"] += 1

        async def delete(key: str) -> None:
            rev = self.policy_bucket[key][0]
            await self.ctx.bus.kv_delete(schema.BUCKET_POLICY, key, last_revision=rev)
            self.policy_bucket.pop(key, None)
            self.counters["deletes"] += 1

        await bounded_gather([put(k, v) for k, v in plan.puts])
        await bounded_gather([delete(k) for k in plan.deletes])

    async def _write_statuses(self, res: Resolution, status_keys: dict[PolicyKey, str],
                              generations: dict[PolicyKey, int]) -> None:
        """The status of every policy whose payload changed; a status object the engine
        kept from the previous pass has the payload already written. Statuses of policies
        that went are deleted when the policy set changed (a new ``status_keys``)."""
        reporter = f"policy/{self.ctx.settings.instance}"
        changed = []
        for pkey, st in res.statuses.items():
            key = status_keys.get(pkey)
            if key is not None and self.status_source.get(key) is not st:
                changed.append((key, st, generations.get(pkey, 0)))

        async def put(key: str, st: PolicyStatus, gen: int) -> None:
            payload = status_payload(st)
            if self.status_written.get(key) != payload:
                record = schema.StatusRecord(reporter=reporter, observed_generation=gen,
                                             status=payload, updated=now_rfc3339())
                await self.ctx.bus.kv_put(schema.BUCKET_STATUS, key, record)
                self.status_written[key] = payload
            self.status_source[key] = st

        async def delete(key: str) -> None:
            await self.ctx.bus.kv_delete(schema.BUCKET_STATUS, key)
            del self.status_written[key]
            self.status_source.pop(key, None)

        await bounded_gather([put(key, st, gen) for key, st, gen in sorted(changed, key=lambda c: c[0])])
        if status_keys is self._status_keys_swept:
            return
        wanted = {key for pkey, key in status_keys.items() if pkey in res.statuses}
        await bounded_gather([delete(key) for key in sorted(self.status_written) if key not in wanted])
        self._status_keys_swept = status_keys  # only once every delete went through

    # ---------------------------------------------------------------- trace

    def answer_trace(self, req: schema.PolicyTraceRequest) -> schema.PolicyTraceReply:
        return answer_trace(req, TraceView(self.norm, self.named_ports, self.identities,
                                           self.ipcache_prefixes, self.options))

    async def _on_trace(self, req: schema.PolicyTraceRequest, msg: Any) -> None:
        try:
            reply = self.answer_trace(req)
        except Exception as err:  # a bad request must not kill the subscription
            log.exception("policy trace failed")
            reply = schema.PolicyTraceReply(ok=False, error=f"{type(err).__name__}: {err}")
        if msg.reply:
            await msg.respond(schema.encode(reply))


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    await PolicyService(ctx).start(tg)
    await start_change_events(ctx.bus, ctx.settings.cluster, tg, events.SERVICE_TOPICS["policy"], ctx.detail)
