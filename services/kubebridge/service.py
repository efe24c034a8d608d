"""Kube bridge service shell: a Kubernetes API server → bucket ``resources``.

Follows Namespaces, Nodes, Pods, Services, EndpointSlices, NetworkPolicies, CNPs and CCNPs
(one `Reflector` each: list + watch) and keeps bucket ``resources`` equal to them, the
records exactly as ``ciliary apply`` writes them (``translate``). Writes back CNP/CCNP
status and Events for rejected policies (``statusback``).

Invariants:
- Only the holder of the Lease writes (`LeaderElector.is_leader`, checked before every
  write batch), to bucket ``resources`` and to the API server alike; the others follow
  and stay ready to take over. A pass is level-triggered: desired (every reflector's
  accepted records) against the bucket as mirrored, so a new leader, a relist after 410
  or a restart writes only what differs.
- Writes are compare-and-set against the revision last seen. A record the bridge did not
  write (``apply``, a node's self-registration) is overwritten when the API server has
  the object, and never deleted; a record it wrote is deleted when its kind has been
  listed and the object is gone. Deleting an object also deletes its status.
- An echo of the bridge's own write that is older than a revision it already holds is
  ignored, so a burst of writes is never written twice.
- The service is healthy when its buckets are mirrored and every kind has been listed
  once (``kube/<Kind>`` watches). Health detail: ``apiserver`` (URL), ``leader``,
  ``lease_holder``, per-kind reflector counters, write counters.
- Stopping while leading releases the Lease, so a standby takes over at its next round.

Settings: ``services.kubebridge.settings`` (``CILIARY_KUBECONFIG``, ``CILIARY_KUBE_*``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import aiohttp

from ciliary import schema
from ciliary.bus import SYNCED, BusError, KVEntry, PutManyError, RevisionMismatch, Synced
from ciliary.runtime import Context
from ciliary.store import now_rfc3339
from ciliary.watch import PassLoop

from .client import ApiError, KubeClient
from .kinds import BY_KIND, CILIUM_POLICY_KINDS, POLICY_KINDS, WATCHED_KINDS, WatchedKind
from .leader import LeaderElector
from .reflector import Reflector
from .settings import BridgeSettings, settings_from_env
from .statusback import (
    cnp_status,
    enforcing_nodes,
    event_body,
    event_key,
    status_patch,
    with_timestamps,
)
from .translate import ObjectRef, owned_by_bridge

log = logging.getLogger(__name__)

WRITE_BATCH = 1024  # puts per kv_put_many; leadership is checked before each batch
CONNECT_RETRY = 5.0
REPORT_INTERVAL = 0.5  # seconds between refreshes of the health detail's counters


def _kind_of(key: str) -> str:
    return key.split(".", 1)[0]


class KubeBridge:
    def __init__(self, ctx: Context, settings: BridgeSettings, client: KubeClient) -> None:
        self.ctx = ctx
        self.settings = settings
        self.client = client
        self.reflectors = {k.kind: Reflector(client, k, settings, self._on_kube_change)
                           for k in WATCHED_KINDS}
        self.elector = LeaderElector(client, settings, on_change=self._on_leadership)
        self.bucket: dict[str, tuple[int, bytes, bool]] = {}  # key -> revision, value, owned
        self.policy_status: dict[str, tuple[dict[str, Any], int]] = {}  # key -> payload, gen
        self.ipcache_pods: dict[str, tuple[int, str]] = {}  # ipcache key -> identity, node
        self.status_written: dict[str, dict[str, Any]] = {}  # policy key -> content
        self.events_sent: set[tuple[str, ...]] = set()
        self.loop = PassLoop("kubebridge", self.reconcile,
                             ready=lambda: not ctx.pending_watches, on_error=self._on_error)
        self.status_loop = PassLoop("kubebridge-status", self.write_back,
                                    ready=lambda: not ctx.pending_watches)
        self.counters = {"passes": 0, "puts": 0, "deletes": 0, "conflicts": 0,
                         "status_writes": 0, "events": 0}
        ctx.detail.update({"apiserver": client.host, "leader": False, "lease_holder": "",
                           "lease": f"{settings.lease_namespace}/{settings.lease_name}",
                           "writes": self.counters, "lease_counters": self.elector.counters,
                           "kinds": {}})

    # ---------------------------------------------------------------- wiring

    async def start(self, tg: asyncio.TaskGroup) -> None:
        for wk in WATCHED_KINDS:
            self.ctx.declare_watch(f"kube/{wk.kind}")
            self.ctx.mirror(tg, schema.BUCKET_RESOURCES, f"{wk.kind}.>", keep=False,
                            name=f"{schema.BUCKET_RESOURCES}/{wk.kind}").listen(self._on_resource)
        for kind in CILIUM_POLICY_KINDS:
            self.ctx.mirror(tg, schema.BUCKET_STATUS, f"{kind}.>", keep=False,
                            name=f"{schema.BUCKET_STATUS}/{kind}").listen(self._on_status)
        self.ctx.mirror(tg, schema.BUCKET_IPCACHE, keep=False).listen(self._on_ipcache)
        for name, reflector in self.reflectors.items():
            tg.create_task(reflector.run(), name=f"kube-{name}")
        tg.create_task(self._lead(), name="kube-lease")
        tg.create_task(self._report(), name="kube-report")
        tg.create_task(self.loop.run(), name="kubebridge-reconcile")
        tg.create_task(self.status_loop.run(), name="kubebridge-status")

    async def _lead(self) -> None:
        try:
            await self.elector.run()
        except asyncio.CancelledError:
            await self.elector.release()
            await self.client.close()
            raise

    async def _report(self) -> None:
        """Keep the health detail's per-kind counters and leadership current."""
        while True:
            self.ctx.detail["kinds"] = {k: r.detail() for k, r in self.reflectors.items()}
            self.ctx.detail["leader"] = self.elector.is_leader()
            self.ctx.detail["lease_holder"] = self.elector.holder
            await asyncio.sleep(REPORT_INTERVAL)

    def _on_kube_change(self, kind: WatchedKind) -> None:
        reflector = self.reflectors[kind.kind]
        if reflector.synced:
            self.ctx.watch_synced(f"kube/{kind.kind}")
        self.ctx.detail["kinds"][kind.kind] = reflector.detail()
        self.loop.mark_dirty()
        if kind.kind in POLICY_KINDS:
            self.status_loop.mark_dirty()

    def _on_leadership(self) -> None:
        self.ctx.detail["leader"] = self.elector.is_leader()
        self.ctx.detail["lease_holder"] = self.elector.holder
        self.loop.mark_dirty()
        self.status_loop.mark_dirty()

    def _on_error(self, err: BaseException) -> None:
        if isinstance(err, RevisionMismatch | PutManyError):
            self.counters["conflicts"] += 1

    def _on_resource(self, event: KVEntry | Synced) -> None:
        if event is SYNCED:
            self.loop.mark_dirty()
            return
        assert isinstance(event, KVEntry)
        held = self.bucket.get(event.key)
        if held is not None and event.revision < held[0]:
            return  # the echo of a write older than one already recorded
        if event.deleted or event.value is None:
            self.bucket.pop(event.key, None)
        else:
            self.bucket[event.key] = (event.revision, event.value, owned_by_bridge(event.value))
        self.loop.mark_dirty()

    def _on_status(self, event: KVEntry | Synced) -> None:
        if event is SYNCED:
            self.status_loop.mark_dirty()
            return
        assert isinstance(event, KVEntry)
        if event.deleted or event.value is None:
            self.policy_status.pop(event.key, None)
        else:
            try:
                record = schema.decode(event.value, schema.StatusRecord)
            except Exception as err:  # a foreign writer: skip it, never stop following
                log.warning("status/%s: skipping bad payload: %s", event.key, err)
                return
            self.policy_status[event.key] = (record.status, record.observed_generation)
        self.status_loop.mark_dirty()

    def _on_ipcache(self, event: KVEntry | Synced) -> None:
        if event is SYNCED:
            self.status_loop.mark_dirty()
            return
        assert isinstance(event, KVEntry)
        old = self.ipcache_pods.pop(event.key, None)
        if not event.deleted and event.value is not None:
            try:
                record = schema.decode(event.value, schema.IPCacheRecord)
            except Exception:  # a foreign writer: skip it
                return
            if record.source == "pod" and record.node:
                self.ipcache_pods[event.key] = (record.identity, record.node)
        if old != self.ipcache_pods.get(event.key):
            self.status_loop.mark_dirty()

    # ---------------------------------------------------------------- resources

    def plan(self) -> tuple[list[tuple[str, bytes, int]], list[tuple[str, int]]]:
        """Puts (key, record, revision to compare against) and deletes (key, revision)
        that make the bucket equal to what the API server holds."""
        desired: dict[str, bytes] = {}
        for reflector in self.reflectors.values():
            desired.update(reflector.accepted)
        puts = []
        for key, data in desired.items():
            held = self.bucket.get(key)
            if held is None:
                puts.append((key, data, 0))
            elif held[1] != data:
                puts.append((key, data, held[0]))
        deletes = [(key, revision) for key, (revision, _, owned) in self.bucket.items()
                   if owned and key not in desired
                   and (reflector := self.reflectors.get(_kind_of(key))) is not None
                   and reflector.synced]
        puts.sort()
        deletes.sort()
        return puts, deletes

    async def reconcile(self) -> None:
        if not self.elector.is_leader():
            return
        self.counters["passes"] += 1
        puts, deletes = self.plan()
        for start in range(0, len(puts), WRITE_BATCH):
            if not self.elector.is_leader():
                return
            batch = puts[start:start + WRITE_BATCH]
            try:
                written = await self.ctx.bus.kv_put_many(schema.BUCKET_RESOURCES, batch)
            except PutManyError as err:
                self._record_puts(batch, err.written)
                raise
            self._record_puts(batch, written)
        for key, revision in deletes:
            if not self.elector.is_leader():
                return
            await self.ctx.bus.kv_delete(schema.BUCKET_RESOURCES, key, last_revision=revision)
            self.bucket.pop(key, None)
            self.counters["deletes"] += 1
            try:
                await self.ctx.bus.kv_delete(schema.BUCKET_STATUS, key)
            except BusError as err:
                log.info("status/%s: not deleted: %s", key, err)

    def _record_puts(self, batch: list[tuple[str, bytes, int]], written: dict[str, int]) -> None:
        for key, data, _ in batch:
            revision = written.get(key)
            if revision is not None:
                self.bucket[key] = (revision, data, True)
                self.counters["puts"] += 1

    # ---------------------------------------------------------------- write-back

    async def write_back(self) -> None:
        """CNP/CCNP status and Events for rejected or failing policies (leader only)."""
        if not self.elector.is_leader():
            return
        now = now_rfc3339()
        pod_nodes: dict[int, set[str]] = {}
        for identity, node in self.ipcache_pods.values():
            pod_nodes.setdefault(identity, set()).add(node)
        live: set[str] = set()
        for kind in POLICY_KINDS:
            reflector = self.reflectors[kind]
            for key, item in list(reflector.latest.items()):
                live.add(key)
                rejected = reflector.rejected.get(key)
                found = self.policy_status.get(key)
                if rejected is not None:
                    await self._event(item.ref, "PolicyRejected", rejected.problem, now)
                elif found is not None and found[0].get("state") == "error" and (
                        found[1] == item.ref.generation or not item.ref.generation):
                    await self._event(item.ref, "PolicyError", str(found[0].get("error")), now)
                if kind not in CILIUM_POLICY_KINDS:
                    continue
                content = cnp_status(
                    found[0] if found else None, found[1] if found else 0,
                    enforcing_nodes(list((found[0] if found else {}).get("selected_identities")
                                         or []), pod_nodes),
                    rejected.problem if rejected else "")
                if self.status_written.get(key) == content:
                    continue
                patch = status_patch(self.status_written.get(key),
                                     with_timestamps(content, now))
                path = BY_KIND[kind].object_path(item.ref.namespace, item.ref.name, status=True)
                try:
                    await self.client.request("PATCH", path, body=patch,
                                              content_type="application/merge-patch+json")
                except ApiError as err:
                    if err.status == 404:
                        continue  # deleted meanwhile
                    raise
                self.status_written[key] = content
                self.counters["status_writes"] += 1
        for gone in [k for k in self.status_written if k not in live]:
            del self.status_written[gone]
        live_refs = {(k.split(".", 2)[0], *k.split(".", 2)[1:]) for k in live}
        self.events_sent = {e for e in self.events_sent
                            if (e[0], e[1] or "_", e[2]) in live_refs}

    async def _event(self, ref: ObjectRef, reason: str, message: str, now: str) -> None:
        key = event_key(ref, reason)
        if key in self.events_sent:
            return
        body = event_body(ref, reason, message, now=now, instance=self.settings.identity)
        await self.client.request("POST", f"/api/v1/namespaces/{ref.namespace or 'default'}/events",
                                  body=body)
        self.events_sent.add(key)
        self.counters["events"] += 1


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    settings = settings_from_env(os.environ, ctx.settings.cluster, ctx.settings.instance)
    for problem in settings.problems:
        log.error("kubebridge: %s", problem)
    while True:
        try:
            client = await KubeClient.connect(settings)
            break
        except (OSError, ValueError, TypeError, KeyError, aiohttp.ClientError) as err:
            where = settings.kubeconfig or "the in-cluster service account"
            log.error("kubebridge: cannot configure the API client from %s: %s: %s", where,
                      type(err).__name__, err)
            ctx.detail["error"] = f"{where}: {type(err).__name__}: {err}"
            ctx.declare_watch("kube/config")
            await asyncio.sleep(CONNECT_RETRY)
    ctx.watch_synced("kube/config")
    ctx.detail.pop("error", None)
    log.info("kubebridge: following %s as %s", client.host, settings.identity)
    await KubeBridge(ctx, settings, client).start(tg)
