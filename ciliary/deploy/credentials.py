"""The NATS users of a Kubernetes installation and the Secrets that carry their credentials.

Invariants:
- ``deploy_users`` is ``natsauth.users`` with one difference: a control-plane service's
  processes are Deployment pods named by Kubernetes, so its user accepts any instance name
  (``*``) where ``ciliary up`` names the one process after the service. Node executors keep
  their per-node users (instance ``node-<node>``): a node executor never writes ``policy``.
- Each pod gets the Secret of exactly its own user: ``secret_name(user)``; all node users
  share Secret ``NODES_SECRET`` (one ``node-<node>.json`` per node: a DaemonSet pod picks
  its node's file by name). nats-server reads its ``authorization`` block from Secret
  ``AUTH_SECRET``. The CLI, observer and remote users get no Secret: they stay with the
  operator.
- NATS routes authenticate with one user and password shared by the servers
  (``cluster_authorization``); an explicitly listed route must carry them in its URL, so
  the route list lives in the Secret too (``CLUSTER_FILE``), never in a ConfigMap.
- Pure: names, users and file texts only; the files are written by the command.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ciliary import natsauth

AUTH_SECRET = "ciliary-nats-auth"
AUTH_FILE = "auth.conf"
CLUSTER_FILE = "cluster.conf"  # included in the cluster block: route authorization and routes
ROUTE_USER = "ciliary-route"
NODES_SECRET = "ciliary-nats-nodes"
# users whose credential is loaded into the cluster: the services and the provisioning Job
IN_CLUSTER = (*natsauth.SERVICES, natsauth.ADMIN)


def deploy_users(cluster: str, nodes: Iterable[str]) -> list[natsauth.User]:
    """Every NATS user of an installation of ``cluster`` on ``nodes``."""
    nodes = list(nodes)
    return [natsauth.service_user(u.name, cluster, "*") if u.name in natsauth.SERVICES else u
            for u in natsauth.users(cluster, nodes)]


def auth_files(replicas: int) -> list[str]:
    """The keys of Secret ``AUTH_SECRET`` a NATS server of ``replicas`` mounts."""
    return [AUTH_FILE, *([CLUSTER_FILE] if replicas > 1 else [])]


def cluster_authorization(password: str, routes: Iterable[str]) -> str:
    """The part of nats-server's ``cluster`` block that holds secrets: what a route must
    present, and the routes (``host:port``) this server connects to with it."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{16,}", password):
        raise ValueError("the route password must be 16 or more URL-safe characters")
    return "\n".join([
        "authorization {",
        f"  user: {ROUTE_USER}",
        f'  password: "{password}"',
        "}",
        "routes: [",
        *[f"  nats-route://{ROUTE_USER}:{password}@{route}" for route in routes],
        "]",
        "",
    ])


def credential_file(user: str) -> str:
    """The file name (and Secret key) of ``user``'s credential."""
    return f"{user}.json"


def secret_name(user: str) -> str:
    """The Secret holding ``user``'s credential (a service or ``admin``)."""
    if user not in IN_CLUSTER:
        raise ValueError(f"user {user!r} has no Secret in the cluster")
    return f"ciliary-nats-{user}"


def node_credential_path(mount: str) -> str:
    """The node executor's credential inside its pod (``$(CILIARY_NODE)`` is expanded by
    Kubernetes from the variable of that name set before it)."""
    return f"{mount}/{natsauth.node_user('$(CILIARY_NODE)')}.json"


def kubectl_commands(out: str, namespace: str, nodes: Iterable[str], replicas: int) -> list[str]:
    """The commands that create (or replace) every Secret from a directory written by
    ``python -m ciliary.deploy credentials``."""
    apply = "--dry-run=client -o yaml | kubectl apply --server-side -f -"
    server_files = " ".join(f"--from-file={out}/{f}" for f in auth_files(replicas))
    lines = [f"kubectl -n {namespace} create secret generic {AUTH_SECRET} {server_files} {apply}"]
    for user in IN_CLUSTER:
        lines.append(f"kubectl -n {namespace} create secret generic {secret_name(user)} "
                     f"--from-file={out}/{credential_file(user)} {apply}")
    node_files = " ".join(f"--from-file={out}/{credential_file(natsauth.node_user(n))}" for n in nodes)
    lines.append(f"kubectl -n {namespace} create secret generic {NODES_SECRET} {node_files} {apply}")
    return lines
