"""``ciliary up``, ``down`` and ``status``: the embedded instance and its health.

Invariants:
- ``up`` refuses to start a second instance for one data dir; ``up -d`` starts the
  supervisor detached and returns only once every expected service (one node executor
  per node) reports healthy, or stops it again and fails after ``--timeout``.
- ``down`` stops the supervisor, then kills what is left after ``--timeout``; it is not
  an error when nothing runs.
- Health comes from the services themselves (``ciliary.status.gather_health``), never
  from the supervisor's bookkeeping; ``status`` exits 1 while any is missing or unhealthy.
- ``status`` warns (``WARNING map pressure …`` lines, ``map_alerts`` in JSON) for every
  node map at or above 80 % fill, critical from 95 % (``ciliary.mappressure``); a warning
  does not change the exit code.
- ``status`` has ``-o json``; tables are aligned.
- ``up --identity-replicas N`` runs N identity processes (``identity``, ``identity-2``…);
  ``status`` lists each under its instance name.
- ``up --nats-replicas 3`` runs a replicated bus (``ciliary.natscluster``); ``status`` then
  lists each server (from ``instance.json`` and each server's monitoring port) and how many
  streams have every copy current. A lost server does not change the exit code: the bus
  keeps working on a quorum, and the services' health says whether they do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from ciliary import claims, clusters, config, natscluster, output, schema, supervisor
from ciliary.bus import Bus, BusError
from ciliary.cli import common
from ciliary.config import NatsCredential
from ciliary.status import (
    gather_health,
    map_pressure_alerts,
    missing_or_unhealthy,
    resource_source,
    resource_source_line,
)

DEFAULT_SERVICE_CIDR = "10.96.0.0/12"  # servicelb's default (CILIARY_SERVICE_CIDR overrides)


def checked_cluster(args: argparse.Namespace) -> str:
    """Validate ``--cluster``, ``--cluster-id``, ``--nodes`` and ``--pod-cidr``; the pod CIDR
    to use (derived from the cluster id unless given). ``CliError`` naming the flag."""
    error = clusters.sandbox_name_error(args.cluster)
    if error:
        raise common.CliError(f"--cluster: {error}")
    error = clusters.id_error(args.cluster_id)
    if error:
        raise common.CliError(f"--cluster-id: {error}")
    if args.nodes < 1:
        raise common.CliError("--nodes must be at least 1")
    replicas = getattr(args, "nats_replicas", 1)
    error = natscluster.replicas_error(replicas)
    if error:
        raise common.CliError(f"--nats-replicas: {error}")
    if replicas > 1 and getattr(args, "nats_port", 0):
        raise common.CliError("--nats-port: a replicated bus (--nats-replicas > 1) picks a free port per server")
    error = supervisor.identity_replicas_error(getattr(args, "identity_replicas", 1))
    if error:
        raise common.CliError(f"--identity-replicas: {error}")
    derived = not args.pod_cidr
    cidr = args.pod_cidr or os.environ.get("CILIARY_CLUSTER_CIDR") or clusters.default_pod_cidr(args.cluster_id)
    error = clusters.pod_cidr_error(cidr, args.nodes)
    if error:
        raise common.CliError(f"--pod-cidr: {error}")
    service_cidr = os.environ.get("CILIARY_SERVICE_CIDR") or DEFAULT_SERVICE_CIDR
    if clusters.overlap(cidr, service_cidr):
        origin = f"derived from cluster id {args.cluster_id}" if derived else "given"
        raise common.CliError(f"--pod-cidr: pod CIDR {cidr} ({origin}) overlaps the service CIDR "
                              f"{service_cidr}; pass another --pod-cidr")
    return cidr


def cmd_up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir_path
    pod_cidr = checked_cluster(args)
    existing = config.read_instance(data_dir)
    if existing is not None and config.pid_alive(existing.supervisor_pid):
        raise common.CliError(
            f"an instance is already running for {data_dir} (nats {existing.nats_url}); "
            "stop it with: ciliary down"
        )
    data_claim = claims.data_dir_claim(data_dir)
    if claims.is_held(data_claim):
        raise common.CliError(
            f"{data_dir} is still in use by {claims.holder_of(data_claim) or 'another process'}; "
            "its processes must exit before an instance starts on the same store")
    cluster_claim = claims.cluster_claim(args.cluster)
    if claims.is_held(cluster_claim):
        raise common.CliError(
            f"cluster {args.cluster} already runs on this machine: "
            f"{claims.holder_of(cluster_claim) or 'another instance'}; instances on one machine "
            "need distinct --cluster names (their node namespaces are named by cluster)")
    config.remove_instance(data_dir)
    argv = [
        sys.executable, "-m", "ciliary.supervisor", "--data-dir", str(data_dir),
        "--nats-port", str(args.nats_port), "--nodes", str(args.nodes),
        "--cluster", args.cluster, "--cluster-id", str(args.cluster_id),
        "--pod-cidr", pod_cidr, "--mesh-ttl", str(args.mesh_ttl),
        *(["--nats-tls"] if args.nats_tls else []),
        *(["--nats-replicas", str(args.nats_replicas)] if args.nats_replicas > 1 else []),
        *(["--identity-replicas", str(args.identity_replicas)] if args.identity_replicas > 1 else []),
    ]
    if args.kubeconfig:
        kubeconfig = Path(args.kubeconfig).resolve()
        if not kubeconfig.is_file():
            raise common.CliError(f"--kubeconfig {args.kubeconfig}: no such file")
        argv += ["--kubeconfig", str(kubeconfig)]
    if not args.detach:
        print(f"ciliary up: data dir {data_dir}; Ctrl-C stops everything", file=sys.stderr)
        supervisor.main(argv[3:])
        return 0

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    log_path = data_dir / "logs" / "supervisor.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    nodes = [f"node-{i}" for i in range(1, args.nodes + 1)]
    deadline = started + args.timeout
    missing: list[str] = ["nats-server"]
    last_report = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reason = _start_refusal(log_path, log_start)
            raise common.CliError(
                f"{reason} (see {log_path})" if reason else
                 f"the supervisor exited with code {proc.returncode}; see {data_dir / 'logs'}"
            )
        state = config.read_instance(data_dir)
        if state is not None:
            try:
                reports = asyncio.run(_health(state.nats_url, common.cli_credential(data_dir)))
            except BusError:
                reports = []
            missing = missing_or_unhealthy(reports, nodes)
            if not missing:
                elapsed = time.monotonic() - started
                print(f"ciliary is up in {elapsed:.1f}s: nats {state.nats_url}, "
                      f"{len(reports)} services healthy, data dir {data_dir}")
                if state.ui_url:
                    print(f"service map: {state.ui_url}   metrics: {state.metrics_url}")
                return 0
        report = f"waiting for: {', '.join(missing)}"
        if report != last_report and sys.stderr.isatty():
            print(report, file=sys.stderr)
        last_report = report
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    raise common.CliError(
        f"not healthy after {args.timeout:.0f}s (still waiting for {', '.join(missing)}); "
        f"stopped it; logs in {data_dir / 'logs'}"
    )


async def _health(url: str, credential: NatsCredential | None) -> list[schema.HealthReport]:
    bus = await Bus.connect(url, "ciliary-cli", allow_reconnect=False, credential=credential)
    try:
        return await gather_health(bus, timeout=0.5)
    finally:
        await bus.close()


def _start_refusal(log_path: Path, offset: int) -> str:
    """The supervisor's ``cannot start: ...`` line written since ``offset``, or ""."""
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""
    found = [line.split(" ERROR: ", 1)[1] for line in text.splitlines()
             if " ERROR: " in line and "cannot start:" in line]
    return found[-1] if found else ""


def cmd_down(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir_path
    state = config.read_instance(data_dir)
    if state is None or not config.pid_alive(state.supervisor_pid):
        config.remove_instance(data_dir)
        print(f"no ciliary instance is running for {data_dir}")
        return 0
    os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    pids = [state.supervisor_pid] + [p.pid for p in state.processes]
    while time.monotonic() < deadline and any(config.pid_alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if config.pid_alive(p)]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    config.remove_instance(data_dir)
    print(f"ciliary stopped ({len(pids)} processes{', ' + str(len(survivors)) + ' killed' if survivors else ''})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = common.running_instance(args.data_dir_path)
    reports = common.run_with_bus(args, lambda bus: gather_health(bus, timeout=args.timeout))
    now = time.time()
    missing = missing_or_unhealthy(reports, state.nodes)
    alerts = map_pressure_alerts(reports)
    servers, replication = nats_servers_state(state)
    if args.output == "json":
        print(output.to_json({
            "nats_url": state.nats_url,
            "nats_auth": state.nats_auth,
            "nats_tls": state.nats_tls,
            "nats_replicas": state.nats_replicas,
            "nats_servers": servers,
            "replication": replication,
            "cluster": state.cluster,
            "cluster_id": state.cluster_id,
            "data_dir": str(args.data_dir_path),
            "ui_url": state.ui_url,
            "metrics_url": state.metrics_url,
            "healthy": not missing,
            "missing": missing,
            "services": [
                {
                    "name": r.service,
                    "instance": r.instance,
                    "node": r.node,
                    "pid": r.pid,
                    "version": r.version,
                    "healthy": r.healthy,
                    "uptime_seconds": round(now - r.started, 1),
                    "watching": r.watching,
                    "detail": r.detail,
                }
                for r in reports
            ],
            "map_alerts": alerts,
            "resource_source": resource_source(reports),
        }))
        return 0 if not missing else 1
    auth = ("auth: nkey per process" if state.nats_auth else "auth: off") + (", TLS" if state.nats_tls else "")
    print(f"cluster {state.cluster} (id {state.cluster_id})   nats {state.nats_url} ({auth})   "
          f"data dir {args.data_dir_path}")
    if state.ui_url:
        print(f"service map {state.ui_url}   metrics {state.metrics_url}")
    print(resource_source_line(resource_source(reports)))
    if servers:
        print(output.table(["NATS SERVER", "URL", "PID", "STATE", "JETSTREAM"], [
            [s["name"], s["url"], s["pid"] or "-", s["state"], s["role"]] for s in servers]))
        print(replication_line(state.nats_replicas, replication))
    rows = [
        [service_label(r, reports), r.node or "-", r.pid, r.version, "yes" if r.healthy else "NO",
         output.age(now - r.started), _watching(r)]
        for r in reports
    ]
    rows += [[name, "-", "-", "-", "MISSING", "-", ""] for name in missing if not any(
        (f"node/{r.node}" if r.service == "node" else r.service) == name for r in reports)]
    print(output.table(["SERVICE", "NODE", "PID", "VERSION", "HEALTHY", "UPTIME", "WATCHING"], rows))
    for alert in alerts:
        print(f"WARNING map pressure {alert['message']}")
    lost = flows_lost_line(reports)
    if lost:
        print(lost)
    return 0 if not missing else 1


def flows_lost_line(reports: list[schema.HealthReport]) -> str:
    """``flows lost 32 events (bus 6, observer_events_queue 26) …`` when the flows service
    counted losses; "" when it did not (or is not reporting)."""
    for report in reports:
        flows = report.detail.get("flows") if report.service == "flows" else None
        if isinstance(flows, dict) and flows.get("lost"):
            by_source = flows.get("lost_by_source") or {}
            parts = ", ".join(f"{source} {count}" for source, count in sorted(by_source.items()))
            return (f"flows lost {flows['lost']} events{f' ({parts})' if parts else ''}; "
                    f"ciliary observe shows them as EVENTS LOST")
    return ""


def nats_servers_state(state: config.InstanceState) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each server of a replicated bus (``up``: healthz answers 200; ``catching-up``: it
    runs but JetStream is not current yet; ``DOWN``: its process is gone or it does not
    answer) and the replication its monitoring ports report. Empty for a single server."""
    if not state.nats_servers:
        return [], {}
    pids = {p.name: p.pid for p in state.processes}
    jsz: dict[str, dict[str, Any]] = {}
    servers = []
    for server in state.nats_servers:
        pid = pids.get(server.name, 0)
        healthy = supervisor.monitor_ok(f"{server.monitor_url}/healthz")
        answer = _http_json(f"{server.monitor_url}/jsz?streams=true&config=true")
        if answer is not None:
            jsz[server.server_name] = answer
        alive = bool(pid) and config.pid_alive(pid)
        servers.append({"name": server.name, "server_name": server.server_name, "url": server.url,
                        "pid": pid, "state": "up" if healthy else ("catching-up" if alive and answer else "DOWN")})
    replication = natscluster.replication_summary(jsz)
    for entry in servers:
        entry["role"] = ("-" if entry["state"] == "DOWN" else
                         "meta leader" if entry["server_name"] == replication["meta_leader"] else "follower")
    return servers, replication


def replication_line(replicas: int, replication: dict[str, Any]) -> str:
    streams = replication.get("streams") or []
    text = (f"replication: {replication.get('fully_replicated', 0)} of {len(streams)} streams "
            f"with all {replicas} copies current")
    leaderless = sum(1 for s in streams if not s["leader"])
    if leaderless:
        text += f"; {leaderless} electing a leader"
    lagging = sorted({name for s in streams for name in s["behind"]})
    if lagging:
        text += f"; behind: {', '.join(lagging)}"
    return text


def _http_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            answer = json.loads(resp.read())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def service_label(report: schema.HealthReport, reports: list[schema.HealthReport]) -> str:
    """The SERVICE column: the service's name, or its instance's (``identity-2``) when
    several instances of one service run off-node (``--identity-replicas``)."""
    if report.node or sum(1 for r in reports if r.service == report.service and not r.node) < 2:
        return report.service
    return report.instance


def _watching(report: schema.HealthReport) -> str:
    """``Pod=3 Namespace=2`` for each resource kind the service watches."""
    if report.service == "node":
        keys = ("pods", "endpoints", "ipcache", "frontends", "policy_entries")
        text = " ".join(f"{key}={report.detail[key]}" for key in keys if key in report.detail)
        if "map_pressure_max" in report.detail:
            text += f" map-pressure={report.detail['map_pressure_max']:.2%}"
        socket_lb = report.detail.get("socket_lb")
        if isinstance(socket_lb, dict) and socket_lb.get("mode"):
            text += f" socket-lb={socket_lb.get('effective') or socket_lb['mode']}"
        return text
    counts = report.detail.get("resources") or {}
    kinds = [w.split("/", 1)[1] for w in report.watching if w.startswith("resources/")]
    return " ".join(f"{kind}={counts.get(kind, 0)}" for kind in kinds)


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``up``, ``down`` and ``status`` to the ``ciliary`` parser."""
    p = subparsers.add_parser("up", parents=[common_parent], help="start NATS and every service")
    p.add_argument("-d", "--detach", action="store_true", help="return once every service is healthy")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nats-port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--nats-tls", action="store_true",
                   help="TLS on the NATS port, with a certificate authority made for the instance")
    p.add_argument("--nats-replicas", type=int, default=1,
                   help="NATS servers of the bus and copies of every bucket and stream: 1, or 3 "
                        "for a replicated bus that survives the loss of one server")
    p.add_argument("--identity-replicas", type=int, default=1,
                   help="identity service processes allocating concurrently (compare-and-set)")
    p.add_argument("--cluster", default=schema.DEFAULT_CLUSTER_NAME)
    p.add_argument("--cluster-id", type=int, default=schema.DEFAULT_CLUSTER_ID, help="1..255")
    p.add_argument("--pod-cidr", default="", help="pods' IPv4 CIDR, a /24 per node (default 10.<cluster id>.0.0/16)")
    p.add_argument("--mesh-ttl", type=float, default=supervisor.DEFAULT_MESH_TTL,
                   help="seconds a connected cluster's state stays valid without news (ClusterMesh)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for health with -d")
    p.add_argument("--kubeconfig", default="",
                   help="also run the kube bridge: follow this kubeconfig's API server instead of "
                        "(besides) ciliary apply (docs/kubernetes.md)")
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("down", parents=[common_parent], help="stop a detached instance")
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=cmd_down)

    p = subparsers.add_parser("status", parents=[common_parent], help="show every service and its health")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--timeout", type=float, default=1.0)
    p.set_defaults(func=cmd_status)
