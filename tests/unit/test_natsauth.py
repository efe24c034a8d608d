"""The permission table: who may write which bucket, publish and subscribe which subject."""

from __future__ import annotations

import pytest

from ciliary import natsauth, schema
from ciliary.events import subjects as events
from ciliary.natsauth import may_publish, may_subscribe, subject_matches

CLUSTER = "c1"
NODES = ["node-1", "node-2"]
USERS = {u.name: u for u in natsauth.users(CLUSTER, NODES)}
NON_ADMIN = {name: u for name, u in USERS.items() if name != natsauth.ADMIN}


def writers(bucket: str, key: str = "any.key") -> set[str]:
    return {name for name, u in NON_ADMIN.items() if may_publish(u, f"$KV.{bucket}.{key}")}


def readers(bucket: str) -> set[str]:
    return {name for name, u in NON_ADMIN.items()
            if may_publish(u, f"$JS.API.CONSUMER.CREATE.KV_{bucket}.x.$KV.{bucket}.>")}


@pytest.mark.parametrize(("pattern", "subject", "matches"), [
    ("a.b", "a.b", True), ("a.*", "a.b", True), ("a.*", "a.b.c", False), ("a.>", "a.b.c", True),
    ("a.>", "a", False), ("a.b", "a.b.c", False), ("a.*.c", "a.x.c", True), (">", "x", True),
    ("$KV.status.Pod.>", "$KV.status.Pod.default.web", True),
    ("$KV.status.Pod.>", "$KV.status.Service.default.web", False),
])
def test_subject_matching_follows_nats(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


def test_every_bucket_has_exactly_its_writers() -> None:
    node_users = {natsauth.node_user(n) for n in NODES}
    assert writers(schema.BUCKET_IDENTITIES) == {"identity"}
    assert writers(schema.BUCKET_IPCACHE) == {"identity"}
    assert writers(schema.BUCKET_SERVICES) == {"servicelb"}
    assert writers(schema.BUCKET_POLICY) == {"policy"}
    assert writers(schema.BUCKET_MESH) == {"mesh"}
    assert writers(schema.BUCKET_MESH_EXPORT) == {"mesh"}
    assert writers(schema.BUCKET_MESH_REMOTES) == {"cli"}
    assert writers(schema.BUCKET_RESOURCES, "Pod.default.web") == {"cli", "kubebridge"}
    # a node executor registers its own Node and nothing else
    assert writers(schema.BUCKET_RESOURCES, "Node._.node-1") == {"cli", "kubebridge", "node-node-1"}
    # statuses: each kind by its owner
    assert writers(schema.BUCKET_STATUS, "Pod.default.web") == node_users | {"kubebridge"}
    assert writers(schema.BUCKET_STATUS, "Service.default.web") == {"servicelb", "kubebridge"}
    assert writers(schema.BUCKET_STATUS, "NetworkPolicy.default.deny") == {"policy", "kubebridge"}
    assert writers(schema.BUCKET_STATUS, "Node._.node-2") == {"node-node-2", "kubebridge"}
    assert writers(schema.BUCKET_ALLOCATIONS, "node-index.3") == node_users | {"servicelb"}
    assert writers(schema.BUCKET_ALLOCATIONS, "clusterip.10_96_0_1") == {"servicelb"}


def test_the_cli_writes_sources_only_and_the_read_only_users_write_nothing() -> None:
    cli = USERS[natsauth.CLI]
    written = {b for b in schema.ALL_BUCKETS if may_publish(cli, f"$KV.{b}.k")}
    assert written == {schema.BUCKET_RESOURCES, schema.BUCKET_MESH_REMOTES}
    for name in (natsauth.OBSERVER, natsauth.REMOTE):
        user = USERS[name]
        assert not any(may_publish(user, f"$KV.{b}.k") for b in schema.ALL_BUCKETS), name
        assert not any(may_publish(user, f"$JS.API.STREAM.{op}.KV_{b}")
                       for b in schema.ALL_BUCKETS for op in ("CREATE", "DELETE", "PURGE", "UPDATE")), name


def test_the_node_executor_cannot_write_policy_nor_speak_for_another_node() -> None:
    node = USERS[natsauth.node_user("node-1")]
    assert not may_publish(node, "$KV.policy.id.42")
    assert may_publish(node, "$JS.API.CONSUMER.CREATE.KV_policy.x.$KV.policy.id.>")  # reads it
    assert may_publish(node, schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-1"))
    assert not may_publish(node, schema.SUBJECT_FLOWS_RAW.format(cluster=CLUSTER, node="node-2"))
    assert not may_subscribe(node, schema.SUBJECT_NODE_DEBUG.format(cluster=CLUSTER, node="node-2"))
    assert not may_publish(node, "$KV.resources.Node._.node-2")


def test_reads_follow_what_each_user_consumes() -> None:
    assert readers(schema.BUCKET_MESH_EXPORT) >= {natsauth.REMOTE, "mesh"}
    assert not any(may_publish(USERS[natsauth.REMOTE], f"$JS.API.CONSUMER.CREATE.KV_{b}")
                   for b in schema.ALL_BUCKETS if b not in natsauth.REMOTE_BUCKETS)
    assert natsauth.OBSERVER not in readers(schema.BUCKET_RESOURCES)
    assert readers(schema.BUCKET_POLICY) == {"policy", "flows", "cli"} | {natsauth.node_user(n) for n in NODES}


def test_no_one_but_admin_reads_another_users_replies() -> None:
    for name, user in NON_ADMIN.items():
        assert may_subscribe(user, f"{user.inbox_prefix}.abc")
        for other in NON_ADMIN.values():
            if other is not user:
                assert not may_subscribe(user, f"{other.inbox_prefix}.abc"), (name, other.name)
        assert not may_subscribe(user, "_INBOX.abc"), name


def _filled(template: str) -> str:
    topic = events.FLOWS if "{node}" in template else events.POLICY  # flows are per node
    return template.format(cluster=CLUSTER, node="node-1", instance="identity", topic=topic)


@pytest.mark.parametrize("name", [n for n in dir(schema) if n.startswith("SUBJECT_") and not n.endswith("_ALL")])
def test_every_subject_has_a_publisher_and_a_subscriber(name: str) -> None:
    subject = _filled(getattr(schema, name))
    assert any(may_publish(u, subject) for u in NON_ADMIN.values()), f"no one may publish {subject}"
    assert any(may_subscribe(u, subject) for u in NON_ADMIN.values()), f"no one may subscribe {subject}"


def test_event_topics_are_published_by_their_service_and_read_by_the_observer() -> None:
    for service, topics in events.SERVICE_TOPICS.items():
        for topic in topics:
            subject = events.subject(topic, CLUSTER)
            assert {n for n, u in NON_ADMIN.items() if may_publish(u, subject)} == {service}
            assert may_subscribe(USERS[natsauth.OBSERVER], subject)
            assert may_subscribe(USERS[service], events.SUBJECT_INTEREST)


def test_the_node_index_prefix_is_the_node_executors() -> None:
    from services.node import addressing

    assert natsauth.NODE_INDEX_PREFIX == addressing.NODE_INDEX_PREFIX


def test_the_server_block_names_public_keys_and_permissions_only() -> None:
    keys = {name: f"U{name.upper():A<55}"[:56] for name in USERS}
    block = natsauth.server_authorization(USERS.values(), keys)
    assert block.count("nkey:") == len(USERS)
    for name, key in keys.items():
        assert key in block, name
    assert '"$KV.policy.>"' in block and "seed" not in block.lower()
