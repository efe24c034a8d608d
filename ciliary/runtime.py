"""The process shell every service runs in.

Invariants:
- A service process connects to NATS, ensures the buckets, registers with the NATS
  micro-services API as ``ciliary-<name>`` (ping/info/stats) and answers health requests on
  ``ciliary.health.<instance>`` (and over HTTP when ``CILIARY_HEALTH_PORT`` is set, for
  a kubelet's probes: ``ciliary.healthhttp``); only then does it start its work.
- All work runs in one ``asyncio.TaskGroup``. SIGTERM/SIGINT cancel it; the process then
  deregisters, drains its connection and exits 0 with no task left pending.
- A service is healthy when it is connected and every watch it declared has delivered
  its initial state at least once.
- Every health report carries the process's cyclic-collector pauses under ``gc``
  (``ciliary.heap.GcPauses``: collections, total and longest pause per generation).
- A service exports spans as ``ciliary-<name>`` when the OTel environment names an
  endpoint (``ciliary.telemetry``), and flushes them after its event loop has ended.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ciliary import __version__, config, healthhttp, heap, natscreds, schema, telemetry
from ciliary.bus import DRAIN_TIMEOUT, SYNCED, Bus, BusError, KVEntry, Message, Synced
from ciliary.watch import Mirror, PassLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """Process settings, from the environment the supervisor (or a Deployment) sets."""

    nats_url: str
    cluster: str = schema.DEFAULT_CLUSTER_NAME
    cluster_id: int = schema.DEFAULT_CLUSTER_ID
    node: str = ""
    instance: str = ""
    nats_creds: str = ""  # path of the NATS credential file; "" connects without one

    @classmethod
    def from_env(cls, service: str) -> Settings:
        node = os.environ.get(config.ENV_NODE, "")
        instance = os.environ.get(config.ENV_INSTANCE) or (
            f"{service}-{node}" if node else f"{service}-{os.getpid()}"
        )
        return cls(
            nats_url=os.environ.get(config.ENV_NATS_URL, "nats://127.0.0.1:4222"),
            cluster=os.environ.get(config.ENV_CLUSTER, schema.DEFAULT_CLUSTER_NAME),
            cluster_id=int(os.environ.get(config.ENV_CLUSTER_ID, schema.DEFAULT_CLUSTER_ID)),
            node=node,
            instance=instance,
            nats_creds=os.environ.get(config.ENV_NATS_CREDS, ""),
        )


@dataclass
class Context:
    """What a running service gets: its settings, the bus and a place to report health."""

    service: str
    settings: Settings
    bus: Bus
    started: float = field(default_factory=time.time)
    pending_watches: set[str] = field(default_factory=set)
    detail: dict[str, Any] = field(default_factory=dict)
    gc_pauses: heap.GcPauses | None = None  # the process's collector pauses, reported as ``gc``

    def declare_watch(self, name: str) -> None:
        self.pending_watches.add(name)

    def watch_synced(self, name: str) -> None:
        self.pending_watches.discard(name)

    @property
    def healthy(self) -> bool:
        return self.bus.connected and not self.pending_watches

    def health(self) -> schema.HealthReport:
        return schema.HealthReport(
            service=self.service,
            instance=self.settings.instance,
            pid=os.getpid(),
            version=__version__,
            started=self.started,
            healthy=self.healthy,
            cluster=self.settings.cluster,
            node=self.settings.node,
            watching=list(self.detail.get("watching", [])),
            detail={k: v for k, v in self.detail.items() if k != "watching"}
            | ({"gc": self.gc_pauses.snapshot()} if self.gc_pauses is not None else {}),
        )


    def mirror(
        self,
        tg: asyncio.TaskGroup,
        bucket: str,
        pattern: str = ">",
        *,
        name: str = "",
        decode: Callable[[KVEntry], Any] | None = None,
        keep: bool = True,
    ) -> Mirror[Any]:
        """Start following ``bucket``/``pattern`` into a new ``Mirror``; the service is
        unhealthy until it has synced. Add listeners before the next ``await``."""
        mirror: Mirror[Any] = Mirror(bucket, pattern, name=name, decode=decode, keep=keep)
        self.declare_watch(mirror.name)
        self.detail.setdefault("watching", []).append(mirror.name)
        tg.create_task(mirror.follow(self.bus, self), name=f"watch-{mirror.name}")
        return mirror


Main = Callable[[Context, asyncio.TaskGroup], Awaitable[None]]


def mirror_kinds(
    ctx: Context,
    tg: asyncio.TaskGroup,
    kinds: tuple[str, ...],
    loop: PassLoop | None = None,
) -> dict[str, Mirror[Any]]:
    """One mirror of ``resources`` per kind (named ``resources/<kind>``), each marking
    ``loop`` dirty; counts per kind are reported in the health detail under ``resources``."""
    counts: dict[str, int] = {}
    ctx.detail["resources"] = counts
    mirrors: dict[str, Mirror[Any]] = {}
    for kind in kinds:
        mirror = ctx.mirror(tg, schema.BUCKET_RESOURCES, f"{kind}.>",
                            name=f"{schema.BUCKET_RESOURCES}/{kind}")

        def count(event: KVEntry | Synced, kind: str = kind, mirror: Mirror[Any] = mirror) -> None:
            if event is SYNCED:
                log.info("%s: %d %s objects", ctx.service, len(mirror.entries), kind)
            else:  # a kind that never had an object is not listed
                counts[kind] = len(mirror.entries)

        mirror.listen(count)
        if loop is not None:
            mirror.notify(loop)
        mirrors[kind] = mirror
    return mirrors


async def _serve(service: str, main: Main, settings: Settings) -> None:
    telemetry.setup_tracing(service, settings.cluster, node=settings.node, instance=settings.instance)
    bus = await _connect_with_retry(settings.nats_url, f"ciliary-{service}/{settings.instance}", settings.nats_creds)
    await bus.ensure_buckets()
    ctx = Context(service=service, settings=settings, bus=bus, gc_pauses=heap.manage_process_heap())

    async def on_health(msg: Message) -> None:
        await msg.respond(ctx.health())

    port = healthhttp.health_port()
    http_health = await healthhttp.serve(ctx.health, port) if port else None
    health_subs = [
        await bus.subscribe_raw(schema.SUBJECT_HEALTH.format(instance=settings.instance), on_health),
        await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, on_health),
    ]
    registration = await bus.register_service(
        f"ciliary-{service}",
        version=__version__,
        description=f"ciliary {service} service",
        metadata={
            "pid": str(os.getpid()),
            "instance": settings.instance,
            "cluster": settings.cluster,
            "node": settings.node,
            "health_subject": schema.SUBJECT_HEALTH.format(instance=settings.instance),
        },
        endpoints={"health": (f"ciliary.health.{service}.{settings.instance}",
                              lambda: schema.to_json(ctx.health()))},
    )

    stop = asyncio.Event()
    install_stop_handlers(stop)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(main(ctx, tg), name=f"{service}-main")
            await stop.wait()
            log.info("%s: stopping", service)
            raise _Stop
    except* _Stop:
        pass
    finally:
        if http_health is not None:
            http_health.close()
            await http_health.wait_closed()
        try:  # its subscriptions drain without a bound of their own
            await asyncio.wait_for(registration.stop(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("%s: the service registration did not drain within %ss", service, DRAIN_TIMEOUT)
        for sub in health_subs:
            await sub.unsubscribe()
        await bus.close()
    leaked = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    if leaked:
        raise LeakedTasks(", ".join(sorted(t.get_name() for t in leaked)))


class LeakedTasks(RuntimeError):
    """Tasks still pending after the service stopped: a shutdown bug."""


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop`` — in this process only.

    Plain ``signal.signal`` handlers guarded by the pid are used instead of
    ``loop.add_signal_handler``: libraries that fork helper processes (pyroute2's netns
    code does) would otherwise share asyncio's wake-up fd, and a signal delivered to such
    a child would read as a SIGTERM of the service itself.
    """
    loop = asyncio.get_running_loop()
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() == owner:
            loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


class _Stop(Exception):
    """Raised inside the task group to cancel every task on SIGTERM."""


async def _connect_with_retry(url: str, name: str, credential_path: str = "", attempts: int = 60) -> Bus:
    """Connected as the user of the credential file at ``credential_path`` ("": without
    one), read again before every attempt and on every reconnect (keys may be rotated)."""
    for attempt in range(attempts):
        credential = natscreds.read_credential(credential_path) if credential_path else None
        try:
            return await Bus.connect(url, name, credential=credential, credential_path=credential_path or None)
        except BusError as err:
            if attempt == attempts - 1:
                raise
            log.info("%s; retrying", err)
            await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
    raise AssertionError("unreachable")


def run(service: str, main: Main) -> None:
    """Entry point for ``python -m services.<name>``."""
    logging.basicConfig(
        level=os.environ.get("CILIARY_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = Settings.from_env(service)
    try:
        asyncio.run(_serve(service, main, settings))
    except (BusError, natscreds.CredentialError) as err:
        log.error("%s", err)
        sys.exit(1)
    except LeakedTasks as err:
        log.error("tasks left pending at shutdown: %s", err)
        sys.exit(3)
    finally:
        telemetry.shutdown_tracing()  # the spans of the last passes reach the backend
