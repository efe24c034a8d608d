"""Carrying an instance's state over when its bus changes shape (one nats-server <->
``--nats-replicas N``).

The single server keeps its JetStream store in ``<data-dir>/nats``; a replicated bus keeps
one store per server under ``<data-dir>/nats-cluster/<i>``. The two are different stores, so
``ciliary up --nats-replicas 3`` on a data directory that ran one server would start with no
object, no allocation and no identity of the instance before it. This module moves them.

Invariants:
- ``<data-dir>/bus.json`` (``MARKER``) names the topology whose store holds the instance's
  current state; it is written after every successful start. A data directory without it
  that has a single-server store is taken as a single-server one (instances of before the
  marker existed).
- A migration reads every KV bucket of ``schema.ALL_BUCKETS`` from the previous store (its
  servers started on loopback with the instance's own authorization, on fresh ports, and
  stopped again), and only then touches anything: the new topology's store, if one is left
  from an earlier time, is older than the state being carried and is removed; the new bus
  starts, the entries are written, the marker is updated, and last the previous store is
  removed. A failure anywhere before the marker is written leaves the previous store and
  the marker as they were, so the next ``up`` migrates again from the start.
- Values are copied byte for byte; KV revisions (the objects' resourceVersions) are the new
  store's. Streams (the ``FLOWS`` history) are not carried over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ciliary import atomicfile, config, natscluster, schema
from ciliary.bus import Bus, BusError

log = logging.getLogger(__name__)

MARKER = "bus.json"
SINGLE_STORE = "nats"  # the single server's store directory under the data dir
START_TIMEOUT_S = 30.0

Snapshot = dict[str, dict[str, bytes]]  # bucket -> key -> value


@dataclass(frozen=True)
class BusPlan:
    """What the temporary servers of a previous topology need from the supervisor."""

    data_dir: Path
    cluster: str
    server_binary: str
    free_port: Callable[[], int]
    credential: config.NatsCredential  # the instance's admin, allowed to read every bucket
    tls_cert: Path | None = None
    tls_key: Path | None = None


def recorded_replicas(data_dir: Path) -> int | None:
    """The topology whose store holds the current state: the marker's, else 1 when a
    single-server store exists, else None (a new data directory)."""
    try:
        return int(json.loads((data_dir / MARKER).read_text())["replicas"])
    except FileNotFoundError:
        return 1 if (data_dir / SINGLE_STORE / "jetstream").is_dir() else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RuntimeError(f"cannot start: {data_dir / MARKER} is unreadable ({err}); "
                           f"remove it if this data directory's bus is a single server") from None


def migration_from(data_dir: Path, replicas: int) -> int | None:
    """The replica count to carry the state over from, or None when the store is current."""
    previous = recorded_replicas(data_dir)
    return previous if previous is not None and previous != replicas else None


def record(data_dir: Path, replicas: int) -> None:
    atomicfile.write_atomically(data_dir / MARKER, json.dumps({"replicas": replicas}).encode() + b"\n", 0o644)


def store_dirs(data_dir: Path, replicas: int) -> list[Path]:
    if replicas <= 1:
        return [data_dir / SINGLE_STORE]
    return [data_dir / natscluster.CLUSTER_DIR / str(i) for i in range(1, replicas + 1)]


def remove_stores(data_dir: Path, replicas: int, *, keep: int | None = None) -> None:
    """Removes the stores of the ``replicas`` topology, except those the ``keep`` topology
    uses too (a replicated bus of 3 and one of 5 share the first three directories)."""
    kept = set(store_dirs(data_dir, keep)) if keep is not None else set()
    for path in store_dirs(data_dir, replicas):
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


async def read_previous(plan: BusPlan, replicas: int) -> Snapshot:
    """Every KV bucket's live entries in the store of the ``replicas`` topology (a bucket it
    never had is read as empty)."""
    procs, url = _start_previous(plan, replicas)
    try:
        return await _read_when_ready(plan, url, procs, replicas)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def write(bus: Bus, snapshot: Snapshot) -> int:
    """Writes every entry of ``snapshot`` (the buckets exist); the number written."""
    written = 0
    for bucket, entries in snapshot.items():
        if entries:
            await bus.kv_put_many(bucket, [(key, value, None) for key, value in sorted(entries.items())])
            written += len(entries)
    return written


def _start_previous(plan: BusPlan, replicas: int) -> tuple[list[subprocess.Popen[bytes]], str]:
    logs = plan.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    auth = plan.data_dir / config.NATS_AUTH_FILE
    if replicas <= 1:  # the single server as the supervisor runs it, on a fresh port
        port = plan.free_port()
        path = plan.data_dir / "nats.migration.conf"
        text = natscluster.single_server_config(
            server_name=f"ciliary-{plan.cluster}", port=port, store_dir=plan.data_dir / SINGLE_STORE,
            config_path=path, auth_file=auth, tls_cert=plan.tls_cert, tls_key=plan.tls_key)
        atomicfile.write_atomically(path, text.encode(), 0o600)
        scheme = "tls" if plan.tls_cert else "nats"
        return [_spawn([plan.server_binary, "-c", str(path)], logs / "nats-migration.log")], f"{scheme}://127.0.0.1:{port}"
    servers = natscluster.plan(plan.data_dir, plan.cluster,
                               [(plan.free_port(), plan.free_port(), plan.free_port()) for _ in range(replicas)])
    password = natscluster.route_password()
    procs = []
    for server in servers:
        path = server.config_path.with_name(f"{server.index}.migration.conf")
        text = natscluster.server_config(server, servers, cluster=plan.cluster, password=password,
                                         auth_file=auth, tls_cert=plan.tls_cert, tls_key=plan.tls_key)
        atomicfile.write_atomically(path, text.encode(), 0o600)
        procs.append(_spawn([plan.server_binary, "-c", str(path)], logs / f"nats-migration-{server.index}.log"))
    return procs, natscluster.client_url(servers, tls=plan.tls_cert is not None)


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


async def _read_when_ready(plan: BusPlan, url: str, procs: list[subprocess.Popen[bytes]],
                           replicas: int) -> Snapshot:
    """Reads every bucket once the previous bus answers; a replicated one is retried until
    its JetStream has elected its leaders."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"cannot start: the previous bus's nats-server exited while its state was "
                               f"read; see {plan.data_dir / 'logs'}/nats-migration*.log")
        try:
            bus = await Bus.connect(url, "ciliary-migration", allow_reconnect=False, credential=plan.credential)
        except BusError as err:
            last = err
            await asyncio.sleep(0.2)
            continue
        bus.replicas = replicas
        try:
            await bus.ensure_buckets()  # a bucket the previous store never had reads as empty
            return {bucket: {key: entry.value or b"" for key, entry in (await bus.kv_list(bucket)).items()}
                    for bucket in schema.ALL_BUCKETS}
        except Exception as err:  # noqa: BLE001 - retried until the deadline, then named
            last = err
            await asyncio.sleep(0.5)
        finally:
            await bus.close()
    raise RuntimeError(f"cannot start: the previous bus did not answer within {START_TIMEOUT_S:.0f}s "
                       f"to carry its state over ({last})")
