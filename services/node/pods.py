"""The pod runner: Pods bound to this node become namespaces with running containers.

Invariants:
- Acts as a kubelet would: for each Pod bound to this node (``spec.nodeName``, or the
  default node when unset) it creates the pod's network namespace, calls the CNI plugin
  (``ciliary-cni``) with ADD exactly as a container runtime does, starts every container
  in the namespace, and reports phase, pod IP, readiness and container states into bucket
  ``status``. On delete it stops the containers, calls CNI DEL and removes the namespace,
  then removes the status it reported (``clear_status``; the object is gone, so nothing
  else would, and every service mirroring ``status`` would keep it forever).
- Work is serial per pod and parallel across pods; level-triggered: every pass compares
  the desired pods with the running ones.
- What runs is recorded in ``<state dir>/pods.json``; a restarted executor adopts running
  containers rather than starting them twice, and cleans up pods deleted meanwhile.
- A ``hostNetwork: true`` pod runs in the node's own namespace: no CNI call, no
  endpoint, podIP = the node's InternalIP; removing it never removes that namespace.
- Every container of a cluster pod (hostNetwork or not) runs in the node's cgroup
  (``RunnerConfig.cgroup``) when one is configured, where the socket-level load
  balancer (``socklb``) is attached; pods of the outside world never do.
- Readiness probes run inside the pod's namespace (tcpSocket against 127.0.0.1, exec via
  ``ip netns exec``), so they never depend on the datapath's policy.
- A pod annotated ``sidecar.istio.io/inject: "true"`` gets one more container, the Envoy
  sidecar (``sidecar``), and its pod namespace gets the sidecar's iptables redirection
  after CNI ADD and before any container starts. Such a pod's containers never join the
  node cgroup: socket-level load balancing stays out of sidecar pods whatever its mode,
  so Envoy sees the ClusterIP its app connected to (``sidecar_pods`` counts them);
  ``CILIARY_SIDECAR_SOCKET_LB=1`` puts them in it anyway, to reproduce the bypass.
- Pod namespaces are created and removed through the node's kernel facade
  (``PodNamespaces``, i.e. ``kernel.NodeKernel``); the runner's own blocking work
  (reading ``pods.json``, signalling and reaping containers, probes) runs in worker
  threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ciliary import schema
from ciliary.bus import Bus, BusError, KVEntry, RevisionMismatch
from ciliary.otlpsocket import otlp_socket_path
from ciliary.resources import decode
from services.node import netns, sidecar, world
from services.node.runner import ContainerProcess, ContainerSpec, ContainerState, pod_phase

log = logging.getLogger(__name__)

CNI_IFNAME = "eth0"
# "1": sidecar pods join the node cgroup like any pod (reproduces the socket-LB bypass)
ENV_SIDECAR_SOCKET_LB = "CILIARY_SIDECAR_SOCKET_LB"
PASS_INTERVAL = 0.5
PROBE_INTERVAL = 2.0


@dataclass(frozen=True)
class RunnerConfig:
    cluster: str
    node: str
    default_node: str
    pod_cidr: str
    host_ip: str
    state_dir: Path
    nats_url: str
    cni_bin: str
    nats_creds: str = ""  # NATS credential file the CNI plugin connects with ("" = none)
    cgroup: str = ""  # the node's cgroup v2 directory for containers; "" = none


@dataclass
class RunningPod:
    key: str
    namespace: str
    name: str
    uid: str
    netns: str
    ip: str = ""
    world: bool = False  # runs in the sandbox's outside world, not as a cluster endpoint
    host: bool = False  # hostNetwork: runs in the node's namespace with the node's address
    containers: list[ContainerProcess] = field(default_factory=list)
    probes: list[Any] = field(default_factory=list)
    ready: bool = False
    sidecar: sidecar.SidecarPlan | None = None
    last_probe: float = 0.0
    reported: dict[str, Any] | None = None
    error: str = ""

    @property
    def started(self) -> bool:
        """Wired (CNI ADD done), a world pod or a hostNetwork pod: its containers may run."""
        return bool(self.ip) or self.world or self.host


StatusWriter = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]
StatusClearer = Callable[[str, str, str], Awaitable[None]]  # (namespace, name, reporter)


async def clear_reported_status(bus: Bus, namespace: str, name: str, reporter: str) -> bool:
    """Delete the Pod's entry in bucket ``status`` if ``reporter`` wrote it, by compare-and-
    set on the revision read: a status another node reports now (the pod was re-created
    there) or rewritten meanwhile stays. True when deleted; a bus error is logged."""
    key = f"Pod.{namespace}.{name}"
    try:
        found = await bus.kv_get(schema.BUCKET_STATUS, key)
        if found is None or found.value is None:
            return False
        try:
            record = schema.decode(found.value, schema.StatusRecord)
        except Exception:  # noqa: BLE001 - not a status record: not ours to remove
            return False
        if record.reporter != reporter:
            return False
        await bus.kv_delete(schema.BUCKET_STATUS, key, last_revision=found.revision)
        return True
    except RevisionMismatch:
        return False
    except BusError as err:
        log.warning("status of pod %s/%s not removed: %s", namespace, name, err)
        return False


class PodNamespaces(Protocol):
    """The kernel operations the runner needs (``kernel.NodeKernel``)."""

    async def create_pod_namespace(self, name: str) -> None: ...

    async def remove_pod_namespace(self, name: str) -> None: ...


def netconf(cfg: RunnerConfig) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "ciliary",
        "type": "ciliary-cni",
        "cluster": cfg.cluster,
        "node": cfg.node,
        "ipam": {"type": "host-local", "subnet": cfg.pod_cidr, "dataDir": str(cfg.state_dir / "ipam")},
        "natsUrl": cfg.nats_url,
        **({"natsCreds": cfg.nats_creds} if cfg.nats_creds else {}),
    }


class PodRunner:
    def __init__(self, cfg: RunnerConfig, write_status: StatusWriter,
                 kernel: PodNamespaces | None = None, clear_status: StatusClearer | None = None) -> None:
        self.cfg = cfg
        self.write_status = write_status
        self.clear_status = clear_status
        self._kernel = kernel
        self.desired: dict[str, schema.ResourceRecord] = {}
        self.pods: dict[str, RunningPod] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.state_file = cfg.state_dir / "pods.json"
        # Set by the agent: waits until no service selects a pod IP for new connections.
        self.deregister: Callable[[str], Awaitable[None]] | None = None

    @property
    def kernel(self) -> PodNamespaces:
        if self._kernel is None:
            raise RuntimeError("pod runner without a kernel: it cannot create pod namespaces")
        return self._kernel

    # ------------------------------------------------------------------ inputs

    def bound_here(self, record: schema.ResourceRecord) -> bool:
        if is_world_pod(record):
            return self.cfg.node == self.cfg.default_node
        node = (record.manifest.get("spec") or {}).get("nodeName") or self.cfg.default_node
        return node == self.cfg.node

    def on_pod(self, entry: KVEntry) -> None:
        if entry.deleted or entry.value is None:
            self.desired.pop(entry.key, None)
        else:
            try:
                record = schema.decode(entry.value, schema.ResourceRecord)
            except Exception as err:
                log.warning("ignoring undecodable pod %s: %s", entry.key, err)
                return
            if self.bound_here(record):
                self.desired[entry.key] = record
            else:
                self.desired.pop(entry.key, None)
        self._wake.set()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        await asyncio.to_thread(self._restore)
        while True:
            await self.reconcile()
            try:
                await asyncio.wait_for(self._wake.wait(), PASS_INTERVAL)
            except TimeoutError:
                pass
            self._wake.clear()

    async def reconcile(self) -> None:
        for key, record in list(self.desired.items()):
            running = self.pods.get(key)
            if key in self._busy:
                continue
            if running is None:
                self._spawn(key, self._start(record))
            elif running.uid != record.uid:
                self._spawn(key, self._replace(running, record))
        for key, running in list(self.pods.items()):
            if key not in self.desired and key not in self._busy:
                self._spawn(key, self._stop_deleted(running))
        for key, running in list(self.pods.items()):
            if key not in self._busy:
                await self._tend(running)

    def _spawn(self, key: str, work: Awaitable[None]) -> None:
        self._busy.add(key)

        async def wrapped() -> None:
            try:
                await work
            except Exception:
                log.exception("pod %s", key)
            finally:
                self._busy.discard(key)
                self._wake.set()

        task = asyncio.ensure_future(wrapped())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ start / stop

    def _containers(self, record: schema.ResourceRecord, pns: str,
                    cgroup: str = "") -> tuple[list[ContainerProcess], list[Any]]:
        pod = decode("Pod", record.manifest)
        logs = self.cfg.state_dir / "logs" / f"{record.namespace}_{record.name}"
        procs: list[ContainerProcess] = []
        probes: list[Any] = []
        proxy = None if is_world_pod(record) or is_host_network_pod(record) else self._sidecar_of(record)
        if proxy is not None and os.environ.get(ENV_SIDECAR_SOCKET_LB) != "1":
            cgroup = ""  # socket-LB never applies inside a sidecar pod
        for c in pod.spec.containers:
            argv = tuple(c.command + c.args)
            env = tuple((e.name, e.value) for e in c.env)
            procs.append(ContainerProcess(
                ContainerState(ContainerSpec(c.name, argv, env)), netns=pns,
                restart_policy=pod.spec.restart_policy, log_path=logs / f"{c.name}.log",
                cgroup=cgroup,
            ))
            probes.append(c.readiness_probe)
        if proxy is not None:
            config = sidecar.write_bootstrap(logs.parent.parent / "sidecars" / logs.name, proxy)
            procs.append(ContainerProcess(
                ContainerState(ContainerSpec(sidecar.CONTAINER_NAME, sidecar.container_argv(config))),
                netns=pns, restart_policy="Always", log_path=logs / f"{sidecar.CONTAINER_NAME}.log",
            ))
            probes.append(None)
        return procs, probes

    def _sidecar_of(self, record: schema.ResourceRecord) -> sidecar.SidecarPlan | None:
        return sidecar.plan(record, otlp_socket_path(self.cfg.cluster))

    @property
    def sidecar_pods(self) -> int:
        """Running pods with an Envoy sidecar."""
        return sum(1 for p in self.pods.values() if p.sidecar is not None)

    async def _redirect(self, running: RunningPod) -> str:
        """Install the sidecar's iptables rules in the pod namespace; an error text or ""."""
        assert running.sidecar is not None
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", running.netns, "iptables-restore", "--noflush",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _out, err = await proc.communicate(running.sidecar.iptables.encode())
        return "" if proc.returncode == 0 else err.decode(errors="replace").strip() or "iptables-restore failed"

    async def _start(self, record: schema.ResourceRecord) -> None:
        key = record_key(record)
        if is_world_pod(record):
            await self._start_in_world(record)
            return
        if is_host_network_pod(record):
            await self._start_host_network(record)
            return
        pns = netns.pod_netns(self.cfg.cluster, self.cfg.node, record.uid)
        running = RunningPod(key, record.namespace, record.name, record.uid, pns)
        try:
            running.containers, running.probes = self._containers(record, pns, self.cfg.cgroup)
            running.sidecar = self._sidecar_of(record)
        except Exception as err:
            running.error = f"invalid pod spec: {err}"
            self.pods[key] = running
            return
        self.pods[key] = running
        await self._report(running)
        await self.kernel.create_pod_namespace(pns)
        code, result = await self._cni("ADD", running)
        if code != 0 or result is None:
            running.error = f"CNI ADD failed: {result}"
            log.warning("pod %s: %s", key, running.error)
            await self._report(running)
            await asyncio.sleep(1.0)
            await self._teardown(running)
            self.pods.pop(key, None)  # retried on a later pass
            return
        running.ip = result["ips"][0]["address"].split("/")[0]
        if running.sidecar is not None:
            problem = await self._redirect(running)
            if problem:
                running.error = f"sidecar redirection failed: {problem}"
                log.warning("pod %s: %s", key, running.error)
                running.ip = ""
                await self._report(running)
                await self._teardown(running)
                self.pods.pop(key, None)  # retried on a later pass
                return
        for proc in running.containers:
            proc.poll()
        self._save()
        await self._report(running)
        log.info("pod %s running at %s", key, running.ip)

    async def _start_in_world(self, record: schema.ResourceRecord) -> None:
        """A pod of the outside world: its processes run in the world namespace; it gets
        no endpoint, no pod IP and no identity of its own (the cluster sees it as world)."""
        key = record_key(record)
        running = RunningPod(key, record.namespace, record.name, record.uid,
                             world.world_netns(self.cfg.cluster), world=True)
        if await self._start_without_cni(running, record):
            log.info("pod %s running in the outside world (%s)", key, world.WORLD_CIDR)

    async def _start_host_network(self, record: schema.ResourceRecord) -> None:
        """A ``hostNetwork: true`` pod: its processes run in the node's namespace (and
        cgroup) with the node's address; no CNI call, no endpoint of its own."""
        key = record_key(record)
        running = RunningPod(key, record.namespace, record.name, record.uid,
                             netns.node_netns(self.cfg.cluster, self.cfg.node),
                             ip=self.cfg.host_ip, host=True)
        if await self._start_without_cni(running, record, self.cfg.cgroup):
            log.info("pod %s running in the node's namespace at %s", key, running.ip)

    async def _start_without_cni(self, running: RunningPod, record: schema.ResourceRecord,
                                 cgroup: str = "") -> bool:
        """Start the containers of a pod whose namespace exists already (world, node):
        False (and the pod recorded with its error, no IP) when the spec is invalid."""
        try:
            running.containers, running.probes = self._containers(record, running.netns, cgroup)
        except Exception as err:
            running.ip = ""
            running.error = f"invalid pod spec: {err}"
            self.pods[running.key] = running
            return False
        self.pods[running.key] = running
        for proc in running.containers:
            proc.poll()
        self._save()
        await self._report(running)
        return True

    async def _replace(self, running: RunningPod, record: schema.ResourceRecord) -> None:
        await self._stop(running)
        await self._start(record)

    async def _stop_deleted(self, running: RunningPod) -> None:
        """A deleted pod leaves every service's selection before its containers get SIGTERM
        (as Kubernetes takes the endpoint out first), so no new connection reaches a pod
        that is stopping."""
        if self.deregister is not None and running.ip:
            await self.deregister(running.ip)
        await self._stop(running)
        if self.clear_status is not None:
            await self.clear_status(running.namespace, running.name, f"node/{self.cfg.node}")

    async def _stop(self, running: RunningPod) -> None:
        await asyncio.to_thread(lambda: [p.stop() for p in running.containers])
        await self._teardown(running)
        self.pods.pop(running.key, None)
        self._save()
        log.info("pod %s removed", running.key)

    async def _teardown(self, running: RunningPod) -> None:
        if running.world or running.host:
            return  # the world's and the node's namespaces are not the pod's
        await self._cni("DEL", running)
        await self.kernel.remove_pod_namespace(running.netns)

    async def _cni(self, command: str, running: RunningPod) -> tuple[int, dict[str, Any] | None]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": running.uid,
            "CNI_NETNS": f"/var/run/netns/{running.netns}",
            "CNI_IFNAME": CNI_IFNAME,
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={running.namespace};K8S_POD_NAME={running.name}",
            "CNI_PATH": str(Path(self.cfg.cni_bin).parent),
        }
        proc = await asyncio.create_subprocess_exec(
            self.cfg.cni_bin, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(json.dumps(netconf(self.cfg)).encode())
        try:
            document = json.loads(out) if out.strip() else None
        except json.JSONDecodeError:
            document = {"msg": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}
        return proc.returncode or 0, document

    # ------------------------------------------------------------------ tending

    async def _tend(self, running: RunningPod) -> None:
        changed = False
        for proc in running.containers:
            if running.started and proc.poll():
                changed = True
        now = time.monotonic()
        if running.started and now - running.last_probe >= (PROBE_INTERVAL if running.ready else PASS_INTERVAL):
            running.last_probe = now
            ready = await asyncio.to_thread(self._probe, running)
            if ready != running.ready:
                running.ready = ready
                changed = True
        if changed:
            self._save()
        await self._report(running)

    def _probe(self, running: RunningPod) -> bool:
        if not all(p.state.running for p in running.containers):
            return False
        for probe in running.probes:
            if probe is None:
                continue
            if probe.tcp_socket is not None and isinstance(probe.tcp_socket.port, int):
                port = probe.tcp_socket.port

                def connect(port: int = port) -> bool:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        return True
                    except OSError:
                        return False

                if not netns.run_in_netns(running.netns, connect):
                    return False
            elif probe.exec is not None and probe.exec.command:
                result = subprocess.run(
                    ["ip", "netns", "exec", running.netns, *probe.exec.command],
                    capture_output=True, timeout=max(1, probe.timeout_seconds),
                )
                if result.returncode != 0:
                    return False
        return True

    def status_of(self, running: RunningPod) -> dict[str, Any]:
        states = [p.state for p in running.containers]
        phase = "Pending" if not running.started else pod_phase(states)
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self.cfg.host_ip,
            "conditions": [{"type": "Ready", "status": "True" if running.ready and phase == "Running" else "False"}],
            "containerStatuses": [
                {
                    "name": s.spec.name,
                    "ready": running.ready and s.running,
                    "restartCount": s.restarts,
                    "state": {"running": {}} if s.running else (
                        {"terminated": {"exitCode": s.exit_code}} if s.exit_code is not None else {"waiting": {}}
                    ),
                }
                for s in states
            ],
            "ciliary": {"netns": running.netns, "node": self.cfg.node,
                        **({"outsideWorld": world.WORLD_CIDR} if running.world else {}),
                        **({"hostNetwork": True} if running.host else {}),
                        **({"sidecar": sidecar.CONTAINER_NAME} if running.sidecar is not None else {}),
                        **({"cgroup": self.cfg.cgroup} if self.cfg.cgroup and not running.world and (
                            running.sidecar is None or os.environ.get(ENV_SIDECAR_SOCKET_LB) == "1") else {})},
        }
        if running.ip:
            status["podIP"] = running.ip
            status["podIPs"] = [{"ip": running.ip}]
        if running.error:
            status["message"] = running.error
        return status

    async def _report(self, running: RunningPod) -> None:
        status = self.status_of(running)
        if status == running.reported:
            return
        await self.write_status(running.namespace, running.name, f"node/{self.cfg.node}", status)
        running.reported = status

    # ------------------------------------------------------------------ persistence

    def _save(self) -> None:
        data = {
            key: {
                "namespace": p.namespace, "name": p.name, "uid": p.uid, "netns": p.netns, "ip": p.ip,
                "world": p.world, "host": p.host,
                "containers": [
                    {"name": c.state.spec.name, "pid": c.state.pid, "started_at": c.state.started_at,
                     "restarts": c.state.restarts}
                    for c in p.containers
                ],
            }
            for key, p in self.pods.items() if p.started
        }
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_file)

    def _restore(self) -> None:
        """Adopt pods recorded by an earlier executor run (decided against desired state later)."""
        try:
            data = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        for key, saved in data.items():
            running = RunningPod(key, saved["namespace"], saved["name"], saved["uid"], saved["netns"], saved["ip"],
                                 world=saved.get("world", False), host=saved.get("host", False))
            for c in saved["containers"]:
                proc = ContainerProcess(
                    ContainerState(ContainerSpec(c["name"], ()), restarts=c.get("restarts", 0)),
                    netns=saved["netns"], restart_policy="Never",
                    log_path=self.cfg.state_dir / "logs" / f"{saved['namespace']}_{saved['name']}" / f"{c['name']}.log",
                )
                if not proc.adopt(c["pid"], c["started_at"]):
                    proc.state.pid = 0
                running.containers.append(proc)
            self.pods[key] = running
        log.info("restored %d pods from %s", len(self.pods), self.state_file)

    def adopt_specs(self) -> None:
        """Give adopted pods their container specs once their desired records are known."""
        for key, running in self.pods.items():
            record = self.desired.get(key)
            if record is None or record.uid != running.uid:
                continue
            fresh, probes = self._containers(record, running.netns,
                                             "" if running.world else self.cfg.cgroup)
            running.sidecar = None if running.world or running.host else self._sidecar_of(record)
            for old, new in zip(running.containers, fresh, strict=False):
                new.state.pid = old.state.pid
                new.state.started_at = old.state.started_at
                new.state.restarts = old.state.restarts
            running.containers = fresh
            running.probes = probes

    async def shutdown(self, teardown: bool) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if teardown:
            await asyncio.gather(*(self._stop(p) for p in list(self.pods.values())), return_exceptions=True)


WORLD_ANNOTATION = "sandbox.ciliary.io/outside-world"


def is_world_pod(record: schema.ResourceRecord) -> bool:
    """Pods annotated ``sandbox.ciliary.io/outside-world: "true"`` play the world outside
    the cluster (a payment gateway, an upstream DNS server) inside the sandbox."""
    annotations = (record.manifest.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(WORLD_ANNOTATION, "")).lower() == "true"


def is_host_network_pod(record: schema.ResourceRecord) -> bool:
    """``spec.hostNetwork: true``: the pod shares the node's network namespace."""
    return (record.manifest.get("spec") or {}).get("hostNetwork") is True


def record_key(record: schema.ResourceRecord) -> str:
    return f"{record.kind}.{record.namespace or '_'}.{record.name}"
