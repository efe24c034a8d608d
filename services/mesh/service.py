"""Mesh service: exports this cluster to the mesh and imports every connected remote.

Watches Services, ServiceExports and ServiceImports in ``resources``, ``identities``
(``id.>``), ``ipcache``, servicelb's frontends (``services`` ``fe.>``), Node status, the
connected remotes (``mesh-remotes``) and its own two outputs. Writes ``mesh-export``
(what remotes read of this cluster) and ``mesh`` (what it imported; the one bucket
identity, servicelb, policy and the node executors consume).

Invariants:
- Single writer of both buckets; level-triggered: every pass recomputes both from the
  mirrors and the followers' views and writes only the difference, so a restart or a
  missed event converges.
- One follower (its own NATS client) per remote in ``mesh-remotes``; a removed remote's
  follower stops and everything it imported goes in the same pass.
- ``mesh-export`` key ``cluster`` carries a heartbeat rewritten every ``ttl / 3`` s; a
  remote whose export was not heard for ``ttl`` (``CILIARY_MESH_TTL``, default 10 s) is
  withdrawn from ``mesh`` (only its status stays, ``connected: false``). The loop wakes
  by itself when the next heartbeat or the next staleness is due.
- Mirrors keep decoded values only (``keep=False``): a remote's 10,000 services are held
  once per view, not also as raw KV entries.
- Health detail: ``remotes``, ``remotes_connected``, ``exported``, ``imported``, and
  ``caches`` (remote followers, rows last written).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any

from ciliary import clusters, config, heap, schema, watch
from ciliary.cachestats import CacheStats
from ciliary.runtime import Context
from ciliary.watch import PassLoop, decoder

from .exports import ExportMemo, export_state, mcs_names
from .imports import LocalCluster, imported_state
from .remote import EXPORT_TYPES, RemoteFollower, decode_by_prefix, decode_export

log = logging.getLogger(__name__)

ENV_MESH_TTL = "CILIARY_MESH_TTL"
ENV_CLUSTER_CIDR = "CILIARY_CLUSTER_CIDR"
DEFAULT_TTL = 10.0
MCS_KINDS = ("ServiceExport", "ServiceImport")

MESH_TYPES: dict[str, type] = {**EXPORT_TYPES, schema.MESH_STATUS_PREFIX: schema.MeshRemoteStatus}


class MeshService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        s = ctx.settings
        pod_cidr = os.environ.get(ENV_CLUSTER_CIDR) or clusters.default_pod_cidr(s.cluster_id)
        self.local = LocalCluster(s.cluster, s.cluster_id, pod_cidr)
        self.ttl = config.env_number(ENV_MESH_TTL, DEFAULT_TTL, minimum=0.5)
        self.loop = PassLoop("mesh", self._pass, ready=lambda: not self.ctx.pending_watches, heap=heap.freezer(),
                             wake_at=self._wake_at)
        self.followers: dict[str, RemoteFollower] = {}
        self.next_beat = 0.0  # monotonic
        self.tg: asyncio.TaskGroup | None = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=watch.RECENT_PASSES)
        self.memo = ExportMemo()
        self.written: dict[str, dict[str, Any]] = {}  # bucket -> key -> the record object last put
        self.caches = CacheStats()  # health detail "caches", refreshed after every pass
        self.caches.register("followers", lambda: len(self.followers))
        self.caches.register("written_rows", lambda: sum(len(rows) for rows in self.written.values()))

    async def start(self, tg: asyncio.TaskGroup) -> None:
        self.tg = tg
        ctx = self.ctx
        res = decoder(schema.ResourceRecord)
        self.services = ctx.mirror(tg, schema.BUCKET_RESOURCES, "Service.>", name="resources/Service",
                                   keep=False, decode=res).notify(self.loop)
        self.mcs = {kind: ctx.mirror(tg, schema.BUCKET_RESOURCES, f"{kind}.>", name=f"resources/{kind}",
                                     keep=False, decode=res).notify(self.loop) for kind in MCS_KINDS}
        self.identities = ctx.mirror(tg, schema.BUCKET_IDENTITIES, f"{schema.IDENTITY_ID_PREFIX}>",
                                     keep=False, decode=decoder(schema.IdentityRecord)).notify(self.loop)
        self.ipcache = ctx.mirror(tg, schema.BUCKET_IPCACHE, keep=False, decode=decoder(schema.IPCacheRecord)).notify(self.loop)
        self.frontends = ctx.mirror(tg, schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>",
                                    keep=False, decode=decoder(schema.LBFrontend)).notify(self.loop)
        self.nodes = ctx.mirror(tg, schema.BUCKET_STATUS, "Node.>", name="status/Node",
                                keep=False, decode=decoder(schema.StatusRecord)).notify(self.loop)
        self.remotes = ctx.mirror(tg, schema.BUCKET_MESH_REMOTES, f"{schema.MESH_REMOTE_PREFIX}.>",
                                  keep=False, decode=decoder(schema.MeshRemote)).notify(self.loop)
        self.exported = ctx.mirror(tg, schema.BUCKET_MESH_EXPORT, keep=False, decode=decode_export)
        self.imported = ctx.mirror(tg, schema.BUCKET_MESH, keep=False, decode=decode_by_prefix(MESH_TYPES))
        ctx.detail.update(remotes=0, remotes_connected=0, exported=0, imported=0, ttl_seconds=self.ttl)
        tg.create_task(self.loop.run(), name="mesh-pass")

    def _wake_at(self) -> float:
        """The next heartbeat, or the moment the next remote goes stale."""
        due = self.next_beat
        now_unix, now = time.time(), time.monotonic()
        for follower in self.followers.values():
            heard = follower.view.heard_at
            if heard:
                due = min(due, now + max(0.0, heard + self.ttl - now_unix) + 0.05)
        return due

    # ---------------------------------------------------------------- the pass

    async def _pass(self) -> bool:
        clock = watch.PassClock()
        await self._follow_remotes()
        resources = [r for r in self.services.values.values() if r.kind == "Service"]
        exported_refs = mcs_names(self.mcs["ServiceExport"].values.values(), "ServiceExport")
        desired_export = export_state(
            self.local.name, self.local.cluster_id, self.identities.values, self.ipcache.values,
            resources, exported_refs, self.frontends.values.values(), self.nodes.values, self.memo)
        if time.monotonic() >= self.next_beat:
            self.next_beat = time.monotonic() + self.ttl / 3
            desired_export[schema.MESH_CLUSTER_KEY] = schema.MeshCluster(
                name=self.local.name, cluster_id=self.local.cluster_id, pod_cidr=self.local.pod_cidr,
                heartbeat=round(time.time(), 3), ttl=self.ttl)
        elif schema.MESH_CLUSTER_KEY in self.exported.values:
            desired_export[schema.MESH_CLUSTER_KEY] = self.exported.values[schema.MESH_CLUSTER_KEY]
        clock.lap("export")
        again = await self._write(schema.BUCKET_MESH_EXPORT, self.exported, desired_export)
        clock.lap("write-export")
        views = {name: f.view for name, f in self.followers.items()}
        imports = mcs_names(self.mcs["ServiceImport"].values.values(), "ServiceImport")
        desired_import = imported_state(self.local, views, time.time(), self.ttl, imports)
        again |= await self._write(schema.BUCKET_MESH, self.imported, desired_import)
        clock.lap("write-import")
        statuses = [v for k, v in desired_import.items() if k.startswith(f"{schema.MESH_STATUS_PREFIX}.")]
        self.ctx.detail.update(remotes=len(statuses), remotes_connected=sum(s.connected for s in statuses),
                               exported=len(desired_export), imported=len(desired_import) - len(statuses))
        clock.report(self.ctx.detail, self.recent)
        self.caches.publish(self.ctx.detail)
        return again

    async def _follow_remotes(self) -> None:
        wanted = {r.name: r for r in self.remotes.values.values()}
        for name in [n for n, f in self.followers.items() if wanted.get(n) != f.config]:
            log.info("mesh: stop following cluster %s", name)
            await self.followers.pop(name).stop()
        for name, remote in wanted.items():
            if name not in self.followers:
                log.info("mesh: following cluster %s at %s", name, remote.nats_url)
                follower = RemoteFollower(remote, self.local.name, self.loop.mark_dirty)
                assert self.tg is not None
                follower.start(self.tg)
                self.followers[name] = follower

    async def _write(self, bucket: str, mirror: Any, desired: dict[str, Any]) -> bool:
        """Put what differs, delete what is not desired; True when a write failed. A record
        that is the very object this writer put last (memoised, unchanged) is not compared."""
        held = mirror.values
        written = self.written.setdefault(bucket, {})
        puts = [(key, record, None) for key, record in desired.items()
                if not (written.get(key) is record and key in held) and held.get(key) != record]
        deletes = [key for key in [*held, *mirror.bad] if key not in desired]
        for key in [k for k in written if k not in desired]:
            del written[key]
        failed = False
        if puts:
            try:
                await self.ctx.bus.kv_put_many(bucket, puts)
                written.update((key, record) for key, record, _ in puts)
            except Exception as err:
                log.warning("%s: %s", bucket, err)
                failed = True
        results = await asyncio.gather(*(self.ctx.bus.kv_delete(bucket, key) for key in deletes),
                                       return_exceptions=True)
        for key, result in zip(deletes, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("%s/%s: delete failed: %s", bucket, key, result)
                failed = True
        return failed


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    await MeshService(ctx).start(tg)
