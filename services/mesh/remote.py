"""Following one remote cluster: a NATS client of its own on the remote's server.

Invariants:
- One follower per configured remote, one connection each: a remote that is slow, down
  or misconfigured affects only its own view. The follower reads the remote's
  ``mesh-export`` bucket and nothing else (``remote_connect_options`` is the one place
  that decides how the connection authenticates).
- ``view.entries`` holds the remote's live export (decoded; an entry that does not
  decode is left out and counted among the errors), ``view.heard_at`` the unix time of
  the last event or sync heard, ``view.reachable`` whether its server answers now.
- A follower never raises: a remote that cannot be reached is retried with backoff
  (100 ms doubling to ``RECONNECT_CAP``), the error kept in ``view.errors``; ``on_change`` is
  called after every change of the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ciliary import backoff, natscreds, schema
from ciliary.bus import Bus, BusError, KVEntry, Synced
from ciliary.watch import Mirror

from .imports import RemoteView

log = logging.getLogger(__name__)

REACHABILITY_CHECK = 0.5  # seconds between looks at the connection state
RECONNECT_CAP = 2.0  # longest wait between attempts to reach a remote

EXPORT_TYPES: dict[str, type] = {
    schema.MESH_CLUSTER_KEY: schema.MeshCluster,
    schema.MESH_IDENTITY_PREFIX: schema.IdentityRecord,
    schema.MESH_IPCACHE_PREFIX: schema.IPCacheRecord,
    schema.MESH_SERVICE_PREFIX: schema.MeshService,
    schema.MESH_NODE_PREFIX: schema.MeshNode,
}


def decode_by_prefix(types: dict[str, type]) -> Callable[[KVEntry], Any]:
    """A decoder of entries typed by their key's prefix (``types``); ValueError for an
    unknown prefix."""
    def decode(entry: KVEntry) -> Any:
        assert entry.value is not None
        type_ = types.get(entry.key.split(".", 1)[0])
        if type_ is None:
            raise ValueError(f"unknown key {entry.key!r}")
        return schema.decode(entry.value, type_)
    return decode


decode_export = decode_by_prefix(EXPORT_TYPES)


def remote_connect_options(remote: schema.MeshRemote) -> dict[str, Any]:
    """Keyword arguments for ``Bus.connect`` to ``remote``: its read-only credential
    (``remote.credentials``, the remote's ``remote`` NATS user) when one was given; a
    credential that cannot be read is a ``BusError`` naming the file."""
    if not remote.credentials:
        return {}
    try:  # the file is read again on every reconnect: the remote may rotate its keys
        return {"credential": natscreds.read_credential(remote.credentials), "credential_path": remote.credentials}
    except natscreds.CredentialError as err:
        raise BusError(str(err)) from None


class RemoteFollower:
    def __init__(self, remote: schema.MeshRemote, local_cluster: str, on_change: Callable[[], None]) -> None:
        self.view = RemoteView(config=remote)
        self.local_cluster = local_cluster
        self.on_change = on_change
        self.task: asyncio.Task[None] | None = None

    @property
    def config(self) -> schema.MeshRemote:
        return self.view.config

    def start(self, tg: asyncio.TaskGroup) -> None:
        self.task = tg.create_task(self.run(), name=f"mesh-follow-{self.config.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def run(self) -> None:
        failures = 0
        remote = self.config
        while True:
            try:
                options = remote_connect_options(remote)
                bus = await Bus.connect(remote.nats_url, f"ciliary-mesh-{self.local_cluster}-follows-{remote.name}",
                                        **options)
            except BusError as err:
                failures += 1
                self._set(reachable=False, errors=[f"cannot reach cluster {remote.name}: {err}"])
                await asyncio.sleep(backoff.backoff_delay(failures, cap=RECONNECT_CAP))
                continue
            failures = 0
            try:
                await self._follow(bus)
            finally:
                await bus.close()

    async def _follow(self, bus: Bus) -> None:
        mirror: Mirror[Any] = Mirror(schema.BUCKET_MESH_EXPORT, ">", name=f"{self.config.name}/export",
                                     decode=decode_export, keep=False)
        self.view.entries = mirror.values
        self.view.synced = False
        self._set(reachable=True, errors=[])

        def heard(event: KVEntry | Synced) -> None:
            if isinstance(event, Synced):
                self.view.synced = True
            self.view.heard_at = time.time()
            if mirror.bad:
                self.view.errors = [f"{len(mirror.bad)} export entries of {self.config.name} do not decode"]
            self.on_change()

        mirror.listen(heard)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(mirror.follow(bus), name=f"watch-{mirror.name}")
            while True:
                await asyncio.sleep(REACHABILITY_CHECK)
                if bus.connected != self.view.reachable:
                    errors = [] if bus.connected else [f"connection to cluster {self.config.name} lost"]
                    self._set(reachable=bus.connected, errors=errors)

    def _set(self, *, reachable: bool, errors: list[str]) -> None:
        changed = reachable != self.view.reachable or errors != self.view.errors
        self.view.reachable = reachable
        self.view.errors = errors
        if changed:
            self.on_change()
