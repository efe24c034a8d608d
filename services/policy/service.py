"""Policy service shell: policies × identities → bucket ``policy`` and policy status.

Watches CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, Namespaces and
Pods in ``resources``, the identity service's ``identities`` (``id.<n>`` keys) and
``ipcache`` (pod IP → identity, for named ports), and its own output ``policy``.
Writes ``policy`` (one key per selected local identity) and the status of every policy
object in ``status``; answers ``ciliary policy trace`` on SUBJECT_POLICY_TRACE.

Invariants:
- Level-triggered: each pass recomputes everything from the mirrored inputs (through one
  long-lived `SelectorCache` kept current incrementally) and writes only differences;
  nothing is written before every watch has delivered its initial state.
- Puts precede deletes within a pass (add before remove); writes to ``policy`` are
  compare-and-set against the revision last seen, so a concurrent replica only causes
  another pass.
- Resolution runs in a worker thread; identity changes arriving meanwhile are held and
  applied to the selector cache afterwards (and trigger another pass).
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
import os
from typing import Any

import msgspec

from ciliary import schema
from ciliary.bus import SYNCED, BusError, KVEntry, RevisionMismatch
from ciliary.runtime import Context, mirror_kinds
from ciliary.store import now_rfc3339

from .records import desired_policy_bucket, named_ports_from_pods, plan_writes, status_payload
from .resolve import (
    DEFAULT_MAX_ENTRIES,
    Resolution,
    ResolveOptions,
    policy_selectors,
    resolve_policy,
)
from .rules import POLICY_KINDS, PROTOCOLS, NormPolicy, PolicyKey, normalize
from .selectors import SelectorCache
from .trace import trace

log = logging.getLogger(__name__)

WATCHED_KINDS = (
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "NetworkPolicy",
    "Namespace",
    "Pod",
)
DEBOUNCE = 0.05
QUEUE_GROUP = "ciliary-policy"
ENV_AUDIT = "CILIARY_POLICY_AUDIT_MODE"
ENV_MAX_ENTRIES = "CILIARY_POLICY_MAX_ENTRIES"
ENV_ALL_CLUSTERS = "CILIARY_POLICY_ALL_CLUSTERS"
ENV_ALLOW_LOCALHOST = "CILIARY_POLICY_ALLOW_LOCALHOST"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def options_from_env(cluster: str, cluster_id: int) -> ResolveOptions:
    return ResolveOptions(
        cluster_name=cluster,
        cluster_id=cluster_id,
        max_entries=int(os.environ.get(ENV_MAX_ENTRIES, DEFAULT_MAX_ENTRIES)),
        audit_mode=_flag(ENV_AUDIT),
        local_cluster_only=not _flag(ENV_ALL_CLUSTERS),
        allow_localhost=os.environ.get(ENV_ALLOW_LOCALHOST, "always").lower() != "policy",
    )


def decode_identity(entry: KVEntry) -> tuple[int, frozenset[str]] | None:
    if not entry.key.startswith(schema.IDENTITY_ID_PREFIX) or entry.value is None:
        return None
    try:
        raw = msgspec.msgpack.decode(entry.value)
        return int(raw["id"]), frozenset(str(x) for x in raw.get("labels") or [])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as err:
        log.warning("identities/%s: skipping bad payload: %s", entry.key, err)
        return None


def decode_pod_ip(entry: KVEntry) -> tuple[str, int] | None:
    if entry.value is None:
        return None
    try:
        raw = msgspec.msgpack.decode(entry.value)
        if raw.get("source") != "pod" or not raw.get("pod"):
            return None
        return f"{raw.get('namespace') or 'default'}/{raw['pod']}", int(raw["identity"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        log.warning("ipcache/%s: skipping bad payload: %s", entry.key, err)
        return None


class PolicyService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        s = ctx.settings
        self.options = options_from_env(s.cluster, s.cluster_id)
        self.cache = SelectorCache()
        self.ipcache_pods: dict[str, tuple[str, int]] = {}  # ipcache key -> (pod ref, id)
        self.policy_bucket: dict[str, tuple[int, bytes]] = {}  # key -> (revision, value)
        self.status_written: dict[str, dict[str, Any]] = {}  # status key -> payload
        self.resources: dict[str, dict[str, KVEntry]] = {}
        self.norm: list[NormPolicy] = []
        self.named_ports: dict[int, dict[str, tuple[int, int]]] = {}
        self.last: Resolution | None = None
        self.dirty = asyncio.Event()
        self._decoded: dict[str, tuple[int, NormPolicy | None, int]] = {}
        self._resolving = False
        self._held: list[tuple[dict[int, frozenset[str]], list[int]]] = []
        self.counters = {"passes": 0, "writes": 0, "deletes": 0, "overflow": 0, "conflicts": 0}
        ctx.detail["policy"] = self.counters

    # ---------------------------------------------------------------- wiring

    async def start(self, tg: asyncio.TaskGroup) -> None:
        async def on_change(kind: str, entry: KVEntry) -> None:
            self.dirty.set()

        self.resources = mirror_kinds(self.ctx, tg, WATCHED_KINDS, on_change)
        for bucket, handler in (
            (schema.BUCKET_IDENTITIES, self._on_identity),
            (schema.BUCKET_IPCACHE, self._on_ipcache),
            (schema.BUCKET_POLICY, self._on_policy),
        ):
            tg.create_task(self._follow(bucket, handler), name=f"watch-{bucket}")
        self.ctx.detail.setdefault("watching", []).extend(
            [schema.BUCKET_IDENTITIES, schema.BUCKET_IPCACHE, schema.BUCKET_POLICY]
        )
        await self.ctx.bus.subscribe(schema.SUBJECT_POLICY_TRACE, schema.PolicyTraceRequest,
                                     self._on_trace, queue=QUEUE_GROUP)
        tg.create_task(self._loop(), name="policy-reconcile")

    async def _follow(self, bucket: str, handler: Any) -> None:
        name = bucket
        self.ctx.declare_watch(name)
        async for event in self.ctx.bus.watch(bucket, ">"):
            if event is SYNCED:
                self.ctx.watch_synced(name)
                self.dirty.set()
                continue
            assert isinstance(event, KVEntry)
            handler(event)

    def _on_identity(self, entry: KVEntry) -> None:
        if not entry.key.startswith(schema.IDENTITY_ID_PREFIX):
            return
        try:
            ident = int(entry.key[len(schema.IDENTITY_ID_PREFIX):])
        except ValueError:
            return
        if entry.deleted:
            change: tuple[dict[int, frozenset[str]], list[int]] = ({}, [ident])
        else:
            decoded = decode_identity(entry)
            if decoded is None:
                return
            change = ({decoded[0]: decoded[1]}, [])
        if self._resolving:
            self._held.append(change)  # the cache is in use by the resolver thread
        else:
            self.cache.update(*change)
        self.dirty.set()

    def _on_ipcache(self, entry: KVEntry) -> None:
        old = self.ipcache_pods.pop(entry.key, None)
        new = None if entry.deleted else decode_pod_ip(entry)
        if new is not None:
            self.ipcache_pods[entry.key] = new
        if old != new:
            self.dirty.set()

    def _on_policy(self, entry: KVEntry) -> None:
        if entry.deleted or entry.value is None:
            self.policy_bucket.pop(entry.key, None)
        else:
            self.policy_bucket[entry.key] = (entry.revision, entry.value)

    # ---------------------------------------------------------------- the loop

    async def _loop(self) -> None:
        backoff = 0.1
        while True:
            await self.dirty.wait()
            await asyncio.sleep(DEBOUNCE)
            if self.ctx.pending_watches:
                continue
            self.dirty.clear()
            try:
                await self.reconcile()
                backoff = 0.1
            except RevisionMismatch as err:
                self.counters["conflicts"] += 1
                log.info("policy write conflict (%s); another pass", err)
                self.dirty.set()
            except BusError as err:
                log.warning("policy pass failed: %s; retrying in %.1fs", err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self.dirty.set()

    def _policies(self) -> tuple[list[NormPolicy], dict[PolicyKey, str], dict[PolicyKey, int]]:
        norm: list[NormPolicy] = []
        keys: dict[PolicyKey, str] = {}
        generations: dict[PolicyKey, int] = {}
        for kind in POLICY_KINDS:
            for key, entry in sorted(self.resources.get(kind, {}).items()):
                cached = self._decoded.get(key)
                if cached is None or cached[0] != entry.revision:
                    pol, gen = self._decode_policy(kind, key, entry)
                    cached = (entry.revision, pol, gen)
                    self._decoded[key] = cached
                _, pol, gen = cached
                if pol is None:
                    continue
                norm.append(pol)
                keys[pol.key] = key
                generations[pol.key] = gen
        live = {k for kind in POLICY_KINDS for k in self.resources.get(kind, {})}
        for stale in [k for k in self._decoded if k not in live]:
            del self._decoded[stale]
        return norm, keys, generations

    def _decode_policy(self, kind: str, key: str, entry: KVEntry) -> tuple[NormPolicy | None, int]:
        try:
            assert entry.value is not None
            record = schema.decode(entry.value, schema.ResourceRecord)
        except (msgspec.DecodeError, AssertionError) as err:
            log.warning("resources/%s: skipping bad payload: %s", key, err)
            return None, 0
        pol = normalize(record.manifest, self.options.cluster_name,
                        self.options.local_cluster_only)
        return pol, record.generation

    def _named_ports(self) -> dict[int, dict[str, tuple[int, int]]]:
        pod_identity = dict(self.ipcache_pods.values())
        pods = []
        for entry in self.resources.get("Pod", {}).values():
            try:
                assert entry.value is not None
                record = schema.decode(entry.value, schema.ResourceRecord)
            except (msgspec.DecodeError, AssertionError):
                continue
            pods.append((f"{record.namespace}/{record.name}", record.manifest))
        return named_ports_from_pods(pods, pod_identity)

    async def reconcile(self) -> None:
        self.counters["passes"] += 1
        norm, status_keys, generations = self._policies()
        self.norm = norm
        self.named_ports = self._named_ports()
        res = await self._resolve(norm)
        self.last = res
        self.counters["overflow"] = res.counters["overflow"]
        self.ctx.detail["identities_with_policy"] = res.counters["identities"]
        self.ctx.detail["entries"] = res.counters["entries"]
        current = {k: v for k, (_, v) in self.policy_bucket.items()}
        desired = desired_policy_bucket(res, self.options.cluster_name, self.options.cluster_id,
                                        status_keys, current)
        plan = plan_writes(current, desired)
        for key, value in plan.puts:
            rev = self.policy_bucket.get(key, (0, b""))[0]
            new_rev = await self.ctx.bus.kv_put(schema.BUCKET_POLICY, key, value,
                                                last_revision=rev)
            self.policy_bucket[key] = (new_rev, value)
            self.counters["writes"] += 1
        for key in plan.deletes:
            rev = self.policy_bucket[key][0]
            await self.ctx.bus.kv_delete(schema.BUCKET_POLICY, key, last_revision=rev)
            self.policy_bucket.pop(key, None)
            self.counters["deletes"] += 1
        await self._write_statuses(res, status_keys, generations)

    async def _resolve(self, norm: list[NormPolicy]) -> Resolution:
        """Resolve in a worker thread (it can take seconds on big clusters) while identity
        changes are held back, so the selector cache is only touched by one thread."""
        self._resolving = True
        try:
            return await asyncio.to_thread(self._resolve_sync, norm, self.named_ports)
        finally:
            self._resolving = False
            for change in self._held:
                self.cache.update(*change)
            self._held.clear()

    def _resolve_sync(self, norm: list[NormPolicy],
                      named: dict[int, dict[str, tuple[int, int]]]) -> Resolution:
        res = resolve_policy(norm, {}, named, self.options, cache=self.cache)
        self.cache.retain(policy_selectors(norm))
        return res

    async def _write_statuses(self, res: Resolution, status_keys: dict[PolicyKey, str],
                              generations: dict[PolicyKey, int]) -> None:
        reporter = f"policy/{self.ctx.settings.instance}"
        wanted: dict[str, tuple[dict[str, Any], int]] = {}
        for pkey, st in res.statuses.items():
            key = status_keys.get(pkey)
            if key is not None:
                wanted[key] = (status_payload(st), generations.get(pkey, 0))
        for key, (payload, gen) in sorted(wanted.items()):
            if self.status_written.get(key) == payload:
                continue
            record = schema.StatusRecord(reporter=reporter, observed_generation=gen,
                                         status=payload, updated=now_rfc3339())
            await self.ctx.bus.kv_put(schema.BUCKET_STATUS, key, record)
            self.status_written[key] = payload
        for key in sorted(k for k in self.status_written if k not in wanted):
            await self.ctx.bus.kv_delete(schema.BUCKET_STATUS, key)
            del self.status_written[key]

    # ---------------------------------------------------------------- trace

    def answer_trace(self, req: schema.PolicyTraceRequest) -> schema.PolicyTraceReply:
        proto = PROTOCOLS.get(req.proto.upper())
        if proto is None:
            return schema.PolicyTraceReply(ok=False, error=f"unknown protocol {req.proto!r}")
        to: Any = req.to_cidr if req.to_cidr else req.to_labels
        to_identity = req.to_identity
        if not to_identity and not req.to_cidr:
            wanted = frozenset(req.to_labels)
            to_identity = next((i for i, v in sorted(self.cache.identities.items())
                                if v.labels == wanted), 0)
        named = self.named_ports.get(to_identity, {})
        every: dict[str, set[tuple[int, int]]] = {}
        for ports in self.named_ports.values():
            for name, value in ports.items():
                every.setdefault(name, set()).add(value)
        t = trace(req.from_labels, to, req.port, proto, self.norm,
                  from_identity=req.from_identity or None,
                  to_identity=None if req.to_cidr else (to_identity or None),
                  named_ports=named, all_named_ports=every, options=self.options)

        def step(d: Any) -> schema.PolicyTraceStep:
            return schema.PolicyTraceStep(direction=d.direction, verdict=d.verdict,
                                          reason=d.reason, rules=[str(r) for r in d.rules],
                                          audit=d.audit)

        return schema.PolicyTraceReply(verdict=t.verdict, egress=step(t.egress),
                                       ingress=step(t.ingress))

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
