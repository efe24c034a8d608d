"""Who may publish and subscribe what on the bus: the one permission table.

Invariants:
- Pure: no I/O, no key generation. ``users`` lists every NATS user of an instance with its
  subject permissions; ``server_authorization`` renders them as the ``authorization`` block
  of a nats-server configuration, each user known only by its nkey public key.
- A user may do only what is listed for it (NATS denies everything else): each service
  writes only its own buckets and keys and subscribes only to what it consumes; ``cli``
  writes the sources only (buckets ``resources`` and ``mesh-remotes``); a node executor
  never writes ``policy``; ``observer`` reads flows, events and health; ``remote`` reads
  what another cluster's mesh imports (``REMOTE_BUCKETS``, the export bucket); ``admin``
  (the supervisor provisioning buckets) may do anything.
- A service that publishes a topic of the event API (``ciliary.events``) may publish
  exactly that topic's subjects and answers lease requests.
- Reading a bucket is the JetStream API calls a watch and a get make on that bucket's
  stream (consumer create/info/delete, direct and message get, flow-control replies);
  writing a key is publishing to ``$KV.<bucket>.<key>``. Every user may look up any
  bucket's stream info (every process checks that the buckets exist at start).
- Every user receives replies only on its own inbox prefix (``_INBOX.<user>.``), so no user
  reads another's replies; publishing to ``_INBOX.>`` (answering a request) is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from ciliary import schema
from ciliary.events import subjects as events
from ciliary.resources.kinds import CLUSTER_SCOPE

INBOX_ROOT = "_INBOX"
JS_API = "$JS.API"

ADMIN = "admin"
CLI = "cli"
OBSERVER = "observer"
REMOTE = "remote"
SERVICES = ("identity", "servicelb", "policy", "flows", "mesh", "kubebridge")

# What another cluster's mesh reads of this one: its export (pod identities and addresses,
# shared global services, nodes), nothing else.
REMOTE_BUCKETS = (schema.BUCKET_MESH_EXPORT,)
# Key prefix of the node-index allocations in bucket ``allocations`` (held equal to the
# node executor's ``addressing.NODE_INDEX_PREFIX`` by a unit test).
NODE_INDEX_PREFIX = "node-index"
POLICY_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy")


@dataclass(frozen=True)
class User:
    """A NATS user of an instance and the subjects it may publish and subscribe to."""

    name: str
    role: str  # what it is: "service identity", "node executor node-1", "ciliary CLI", ...
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.name)


def inbox_prefix(user: str) -> str:
    return f"{INBOX_ROOT}.{user}"


def node_user(node: str) -> str:
    return f"node-{node}"


# ---------------------------------------------------------------- building blocks


def kv_read(bucket: str) -> tuple[str, ...]:
    """Publish permissions to watch, list and get ``bucket``."""
    stream = f"KV_{bucket}"
    return (
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"$JS.FC.{stream}.>",
    )


def kv_write(bucket: str, *keys: str) -> tuple[str, ...]:
    """Publish permissions to put and delete ``keys`` (NATS wildcards) of ``bucket``."""
    return tuple(f"$KV.{bucket}.{key}" for key in (keys or (">",)))


def stream_read(stream: str) -> tuple[str, ...]:
    """Publish permissions to read a stream through an ephemeral pull consumer, and its
    last message on a subject."""
    return (
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
    )


def stream_manage(stream: str) -> tuple[str, ...]:
    return tuple(f"{JS_API}.STREAM.{op}.{stream}" for op in ("INFO", "CREATE", "UPDATE"))


def bucket_lookup() -> tuple[str, ...]:
    """Every process checks at start that the buckets exist (stream info, no content)."""
    return (f"{JS_API}.INFO", *(f"{JS_API}.STREAM.INFO.KV_{b}" for b in schema.ALL_BUCKETS))


def health_requests() -> tuple[str, ...]:
    return (schema.SUBJECT_HEALTH_ALL, schema.SUBJECT_HEALTH.format(instance=">"), "$SRV.>")


def _service(user: str, service: str, role: str, instance: str, *, publish: Iterable[str],
             subscribe: Iterable[str], cluster: str = "") -> User:
    """A process of ``service`` named ``instance``: answers health and micro-service pings,
    replies to requests, publishes its topics of the event API."""
    registered = f"ciliary-{service}"
    topics = events.publish_patterns(service, cluster)
    return User(
        name=user,
        role=role,
        publish=_unique((*bucket_lookup(), f"{INBOX_ROOT}.>", *publish, *topics)),
        subscribe=_unique((
            *((events.SUBJECT_INTEREST,) if topics else ()),
            inbox_prefix(user) + ".>",
            schema.SUBJECT_HEALTH_ALL,
            schema.SUBJECT_HEALTH.format(instance=instance),
            f"{schema.SUBJECT_HEALTH_ALL}.{service}.{instance}",
            "$SRV.*", f"$SRV.*.{registered}", f"$SRV.*.{registered}.*",
            *subscribe,
        )),
    )


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _reads(*buckets: str) -> tuple[str, ...]:
    return tuple(p for bucket in buckets for p in kv_read(bucket))


# ---------------------------------------------------------------- the table


def service_user(service: str, cluster: str, instance: str = "") -> User:
    """The user of control-plane service ``service`` whose processes are named ``instance``
    (default: the service's name, as ``ciliary up`` names them; ``*`` for any)."""
    b = schema
    instance = instance or service
    if service == "identity":
        return _service(service, service, "identity service", instance, cluster=cluster, publish=(
            *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_IDENTITIES, b.BUCKET_IPCACHE,
                    b.BUCKET_MESH),
            *kv_write(b.BUCKET_IDENTITIES), *kv_write(b.BUCKET_IPCACHE),
        ), subscribe=(
            b.SUBJECT_IDENTITY_EXPLAIN, b.SUBJECT_IDENTITY_REPORT,
            b.SUBJECT_FQDN_DNS.format(cluster=cluster, node="*"),
        ))
    if service == "servicelb":
        return _service(service, service, "servicelb service", instance, cluster=cluster, publish=(
            *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_SERVICES, b.BUCKET_ALLOCATIONS,
                    b.BUCKET_MESH),
            *kv_write(b.BUCKET_SERVICES), *kv_write(b.BUCKET_STATUS, "Service.>"),
            *kv_write(b.BUCKET_ALLOCATIONS),
        ), subscribe=())
    if service == "policy":
        return _service(service, service, "policy service", instance, cluster=cluster, publish=(
            *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_IDENTITIES, b.BUCKET_IPCACHE,
                    b.BUCKET_POLICY),
            *kv_write(b.BUCKET_POLICY), *kv_write(b.BUCKET_STATUS, *(f"{k}.>" for k in POLICY_KINDS)),
        ), subscribe=(b.SUBJECT_POLICY_TRACE,))
    if service == "flows":
        return _service(service, service, "flows service", instance, cluster=cluster, publish=(
            *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_IDENTITIES, b.BUCKET_IPCACHE,
                    b.BUCKET_SERVICES, b.BUCKET_POLICY),
            *stream_manage(b.STREAM_FLOWS), *stream_read(b.STREAM_FLOWS), b.SUBJECT_FLOWS_ALL,
            b.SUBJECT_HEALTH_ALL,  # the service map shows every service's health
        ), subscribe=(b.SUBJECT_FLOWS_RAW_ALL, b.SUBJECT_FLOWS_QUERY, b.SUBJECT_FLOWS_METRICS,
                     b.SUBJECT_L7_QUERY))
    if service == "mesh":
        return _service(service, service, "mesh service", instance, cluster=cluster, publish=(
            *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_IDENTITIES, b.BUCKET_IPCACHE,
                    b.BUCKET_SERVICES, b.BUCKET_MESH_REMOTES, b.BUCKET_MESH_EXPORT, b.BUCKET_MESH),
            *kv_write(b.BUCKET_MESH_EXPORT), *kv_write(b.BUCKET_MESH),
        ), subscribe=())
    if service == "kubebridge":
        return _service(service, service, "Kubernetes bridge", instance, cluster=cluster, publish=(
            *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_IPCACHE),
            *kv_write(b.BUCKET_RESOURCES),
            # removes the status of an object deleted in Kubernetes (a delete, like a put,
            # is a publish to the key's subject)
            *kv_write(b.BUCKET_STATUS),
        ), subscribe=())
    raise ValueError(f"unknown service {service!r}")


def node_executor_user(cluster: str, node: str) -> User:
    """The user of the node executor of ``node`` (and of the CNI plugin it runs)."""
    b = schema
    own = {"cluster": cluster, "node": node}
    return _service(node_user(node), "node", f"node executor {node}", f"node-{node}", publish=(
        *_reads(b.BUCKET_RESOURCES, b.BUCKET_STATUS, b.BUCKET_IPCACHE, b.BUCKET_SERVICES,
                b.BUCKET_POLICY, b.BUCKET_ALLOCATIONS, b.BUCKET_MESH),
        *kv_write(b.BUCKET_STATUS, "Pod.>", f"Node.{CLUSTER_SCOPE}.{node}"),
        *kv_write(b.BUCKET_RESOURCES, f"Node.{CLUSTER_SCOPE}.{node}"),  # its own registration
        *kv_write(b.BUCKET_ALLOCATIONS, f"{NODE_INDEX_PREFIX}.>"),
        b.SUBJECT_FLOWS_RAW.format(**own), b.SUBJECT_FQDN_DNS.format(**own),
        b.SUBJECT_NODE_ENDPOINT.format(**own),  # the CNI plugin registering an endpoint
    ), subscribe=(b.SUBJECT_NODE_ENDPOINT.format(**own), b.SUBJECT_NODE_DEBUG.format(**own)))


def cli_user(cluster: str) -> User:
    """The CLI: reads everything, writes ``resources`` and the connected clusters
    (``clustermesh connect``) only, asks every service."""
    b = schema
    return User(CLI, "ciliary CLI", publish=_unique((
        *bucket_lookup(), *_reads(*b.ALL_BUCKETS), *kv_write(b.BUCKET_RESOURCES),
        *kv_write(b.BUCKET_MESH_REMOTES), events.SUBJECT_INTEREST,
        f"{JS_API}.STREAM.CREATE.KV_{b.BUCKET_RESOURCES}",  # apply on a fresh bus
        f"{JS_API}.STREAM.INFO.{b.STREAM_FLOWS}",
        *health_requests(), f"{INBOX_ROOT}.>",
        b.SUBJECT_IDENTITY_EXPLAIN, b.SUBJECT_IDENTITY_REPORT, b.SUBJECT_POLICY_TRACE,
        b.SUBJECT_FLOWS_QUERY, b.SUBJECT_FLOWS_METRICS, b.SUBJECT_L7_QUERY,
        b.SUBJECT_NODE_DEBUG.format(cluster=cluster, node="*"),
    )), subscribe=(inbox_prefix(CLI) + ".>", b.SUBJECT_FLOWS_ALL, events.SUBJECT_ALL))


def observer_user() -> User:
    """Read-only: flows (live and queried), the event API and health."""
    b = schema
    return User(OBSERVER, "read-only observer of flows, events and health", publish=_unique((
        *health_requests(), b.SUBJECT_FLOWS_QUERY, b.SUBJECT_FLOWS_METRICS, b.SUBJECT_L7_QUERY,
        events.SUBJECT_INTEREST,
        f"{INBOX_ROOT}.>",
    )), subscribe=(inbox_prefix(OBSERVER) + ".>", b.SUBJECT_FLOWS_ALL, events.SUBJECT_ALL))


def remote_user() -> User:
    """Read-only: what another cluster's mesh imports (``REMOTE_BUCKETS``)."""
    return User(REMOTE, "read-only mesh peer", publish=_unique((
        *bucket_lookup(), *_reads(*REMOTE_BUCKETS),
    )), subscribe=(inbox_prefix(REMOTE) + ".>",))


def admin_user() -> User:
    return User(ADMIN, "instance administrator (bucket provisioning)", publish=(">",),
                subscribe=(">",))


def users(cluster: str, nodes: Iterable[str]) -> list[User]:
    """Every user of an instance of ``cluster`` with ``nodes``, admin first."""
    return [
        admin_user(), cli_user(cluster), observer_user(), remote_user(),
        *(service_user(name, cluster) for name in SERVICES),
        *(node_executor_user(cluster, node) for node in nodes),
    ]


# ---------------------------------------------------------------- checks and rendering


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, a final ``>`` one or more."""
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def may_publish(user: User, subject: str) -> bool:
    return any(subject_matches(p, subject) for p in user.publish)


def may_subscribe(user: User, subject: str) -> bool:
    return any(subject_matches(p, subject) for p in user.subscribe)


def _quoted(items: Iterable[str]) -> str:
    return "[" + ", ".join(msgspec.json.encode(i).decode() for i in items) + "]"


def server_authorization(instance_users: Iterable[User],
                         public_keys: Mapping[str, str | Sequence[str]]) -> str:
    """The ``authorization`` block of nats-server's configuration: each user by its nkey
    public key (``public_keys[user.name]``) with its permissions. A user given several
    keys (while its keys are rotated) is accepted under each, with the same permissions."""
    lines = ["authorization {", "  users = ["]
    for user in instance_users:
        keys = public_keys[user.name]
        for key in [keys] if isinstance(keys, str) else keys:
            lines.append(f"    # {user.name}: {user.role}")
            lines.append(f"    {{nkey: {key}, permissions: {{")
            lines.append(f"      publish: {{allow: {_quoted(user.publish)}}}")
            lines.append(f"      subscribe: {{allow: {_quoted(user.subscribe)}}}")
            lines.append("    }}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)
