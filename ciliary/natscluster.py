"""The replicated bus of an embedded instance: configuration of its NATS servers.

``ciliary up --nats-replicas N`` (N > 1) runs N nats-servers on loopback that form one
NATS cluster with JetStream in cluster mode; this module only computes what they run with.

Invariants:
- Pure: nothing here starts a process or opens a socket. ``plan`` takes the ports it is
  given; ``server_config`` returns text; ``route_password`` is the only source of
  randomness.
- Every server listens on 127.0.0.1 only (client, route and monitoring ports), has a
  unique ``server_name`` (``ciliary-<cluster>-<i>``), its own JetStream store directory
  (``<data-dir>/nats-cluster/<i>``) and its own claim file beside it, so no two servers
  ever share a store; all carry the same cluster name (``ciliary-<cluster>``).
- Every server routes to every other one; routes authenticate with one user and a
  password generated per instance (the configs hold it and are written 0600).
- Clients are authenticated exactly as on the single server: every config includes the
  instance's ``authorization`` block (``nats-auth.conf``, by a path relative to the
  config file, as nats-server resolves includes); with TLS the client port of every
  server presents the instance's certificate.
- ``client_url`` lists every server, comma-separated, in server order: the form
  ``CILIARY_NATS_URL`` and ``instance.json`` carry.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

CLUSTER_DIR = "nats-cluster"  # under the data dir: <i>/ (store), <i>.conf, <i>.lock
ROUTE_USER = "ciliary-route"
MAX_REPLICAS = 5  # JetStream's largest replica count


@dataclass(frozen=True)
class ServerPlan:
    """One server of the replicated bus."""

    index: int  # 1..N
    process: str  # the supervisor's name for it: "nats-server-<i>"
    server_name: str  # NATS server_name, unique in the cluster
    client_port: int
    route_port: int
    monitor_port: int
    store_dir: Path  # JetStream store of this server only
    config_path: Path
    claim_path: Path  # held by the supervisor and this server while it runs

    def client_url(self, *, tls: bool) -> str:
        return f"{'tls' if tls else 'nats'}://127.0.0.1:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"


def replicas_error(replicas: int) -> str:
    """Why ``replicas`` cannot be a replicated bus's size ("" when it can)."""
    if replicas < 1 or replicas > MAX_REPLICAS:
        return f"must be between 1 and {MAX_REPLICAS}, not {replicas}"
    if replicas == 2:
        return "2 servers cannot keep a quorum when one is lost; use 1 or 3"
    return ""


def cluster_name(cluster: str) -> str:
    return f"ciliary-{cluster}"


def plan(data_dir: Path, cluster: str, ports: list[tuple[int, int, int]]) -> list[ServerPlan]:
    """One server per ``(client, route, monitor)`` port triple, numbered from 1."""
    root = data_dir / CLUSTER_DIR
    return [
        ServerPlan(
            index=i, process=f"nats-server-{i}", server_name=f"{cluster_name(cluster)}-{i}",
            client_port=client, route_port=route, monitor_port=monitor,
            store_dir=root / str(i), config_path=root / f"{i}.conf", claim_path=root / f"{i}.lock",
        )
        for i, (client, route, monitor) in enumerate(ports, start=1)
    ]


def client_url(servers: list[ServerPlan], *, tls: bool) -> str:
    return ",".join(s.client_url(tls=tls) for s in servers)


def route_password() -> str:
    return secrets.token_hex(24)


def server_config(server: ServerPlan, servers: list[ServerPlan], *, cluster: str, password: str,
                  auth_file: Path, tls_cert: Path | None = None, tls_key: Path | None = None) -> str:
    """nats-server's configuration file for ``server``, one of ``servers``."""
    include = os.path.relpath(auth_file, server.config_path.parent)
    lines = [
        f"server_name: {server.server_name}",
        f"listen: 127.0.0.1:{server.client_port}",
        f"http: 127.0.0.1:{server.monitor_port}",
        "jetstream {",
        f'  store_dir: "{server.store_dir}"',
        "}",
    ]
    if tls_cert is not None and tls_key is not None:
        lines += ["tls {", f'  cert_file: "{tls_cert}"', f'  key_file: "{tls_key}"', "}"]
    lines += [
        "cluster {",
        f"  name: {cluster_name(cluster)}",
        f"  listen: 127.0.0.1:{server.route_port}",
        f'  authorization {{ user: {ROUTE_USER}, password: "{password}" }}',
        "  routes: [",
        *[f"    nats-route://{ROUTE_USER}:{password}@127.0.0.1:{peer.route_port}"
          for peer in servers if peer.index != server.index],
        "  ]",
        "}",
        f'include "{include}"',
        "",
    ]
    return "\n".join(lines)


def single_server_config(*, server_name: str, port: int, store_dir: Path, config_path: Path, auth_file: Path,
                         tls_cert: Path | None = None, tls_key: Path | None = None) -> str:
    """The configuration file of the single server (no ``--nats-replicas``): everything in
    the file, nothing on the command line, so a reload (``SIGHUP``, e.g. when keys are
    rotated) sees the options it started with."""
    include = os.path.relpath(auth_file, config_path.parent)
    lines = [f"server_name: {server_name}", f"listen: 127.0.0.1:{port}",
             "jetstream {", f'  store_dir: "{store_dir}"', "}"]
    if tls_cert is not None and tls_key is not None:
        lines += ["tls {", f'  cert_file: "{tls_cert}"', f'  key_file: "{tls_key}"', "}"]
    lines += [f'include "{include}"', ""]
    return "\n".join(lines)


def replication_summary(jsz: dict[str, dict]) -> dict:
    """What the servers' ``/jsz?streams=true&config=true`` answers (by server_name; a server
    that did not answer is absent) say about replication: the JetStream meta leader, every
    stream's copies as its leader sees them, and which copies lag. A stream is judged by its
    leader's answer only: a follower does not know whether the other followers are current."""
    meta_leader = ""
    streams: dict[str, dict] = {}
    for server_name, answer in sorted(jsz.items()):
        meta_leader = meta_leader or str((answer.get("meta_cluster") or {}).get("leader") or "")
        for account in answer.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                cluster = stream.get("cluster") or {}
                name = str(stream.get("name", ""))
                copies = int((stream.get("config") or {}).get("num_replicas") or 1)
                if cluster.get("leader") != server_name:
                    streams.setdefault(name, {"name": name, "replicas": copies, "leader": "",
                                              "current": 0, "behind": []})
                    continue
                behind = sorted(str(r.get("name")) for r in cluster.get("replicas") or []
                                if not r.get("current"))
                current = 1 + sum(1 for r in cluster.get("replicas") or [] if r.get("current"))
                streams[name] = {"name": name, "replicas": copies, "leader": server_name,
                                 "current": current, "behind": behind}
    listed = sorted(streams.values(), key=lambda s: s["name"])
    return {
        "meta_leader": meta_leader,
        "streams": listed,
        "fully_replicated": sum(1 for s in listed if s["leader"] and s["current"] >= s["replicas"]),
    }
