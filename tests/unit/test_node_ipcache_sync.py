"""The node executor's ipcache: one reconciler owner per prefix, so a change of one
``ipcache`` key replaces one row; after any sequence of per-key changes and re-syncs the
desired ipcache map equals the translation of the whole bucket."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ciliary import schema
from ciliary.runtime import Context, Settings
from ciliary.testing import FakeBus
from services.node import layouts as L
from services.node import translate as T
from services.node.agent import NodeAgent


def record(prefix: str, identity: int, source: str = "pod", node: str = "") -> schema.IPCacheRecord:
    return schema.IPCacheRecord(prefix=prefix, identity=identity, source=source, cluster="c1",
                                cluster_id=1, node=node)


def ipcache_rows(agent: NodeAgent) -> list[tuple[bytes, bytes]]:
    return sorted((bytes(e.key), bytes(e.value)) for e in agent.reconciler.desired_entries() if e.map == L.IPCACHE)


def expected_rows(bucket: dict[str, schema.IPCacheRecord]) -> list[tuple[bytes, bytes]]:
    return sorted((bytes(e.key), bytes(e.value)) for e in T.ipcache_entries(bucket.values(), "n1"))


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> NodeAgent:
    monkeypatch.setenv("CILIARY_NODE_STATE_DIR", str(tmp_path))
    ctx = Context(service="node", settings=Settings(nats_url="nats://127.0.0.1:1", cluster="c1", node="n1"),
                  bus=FakeBus())
    return NodeAgent(ctx)


def test_one_key_changes_one_owner_and_resyncs_drop_what_went(agent: NodeAgent) -> None:
    bucket = {schema.ipcache_key(r.prefix): r for r in (
        record("10.0.0.1/32", 300), record("fd00::1/128", 300), record("192.168.1.1/32", 6, "node", "n1"))}
    agent.ipcache = bucket
    agent._sync_ipcache(None)
    assert ipcache_rows(agent) == expected_rows(bucket) and len(ipcache_rows(agent)) == 2
    assert agent.ctx.detail["ipcache"] == 2
    before = dict(agent.reconciler._owners)  # noqa: SLF001 - the owners' own tables
    bucket["10.0.0.1_32"] = record("10.0.0.1/32", 301)
    agent._sync_ipcache("10.0.0.1_32")
    assert ipcache_rows(agent) == expected_rows(bucket)
    changed = {o for o in agent.reconciler._owners if agent.reconciler._owners[o] is not before.get(o)}
    assert changed == {T.ipcache_owner("10.0.0.1_32")}
    del bucket["192.168.1.1_32"]
    agent._sync_ipcache(None)  # a re-sync after the key went
    assert ipcache_rows(agent) == expected_rows(bucket) and agent.ctx.detail["ipcache"] == 1


@pytest.mark.parametrize("seed", range(5))
def test_any_sequence_of_changes_equals_the_whole_bucket_translated(agent: NodeAgent, seed: int) -> None:
    rng = random.Random(seed)
    bucket: dict[str, schema.IPCacheRecord] = {}
    agent.ipcache = bucket
    agent._sync_ipcache(None)
    for _ in range(200):
        prefix = f"10.0.{rng.randint(0, 3)}.{rng.randint(1, 5)}/32"
        key = schema.ipcache_key(prefix)
        if rng.random() < 0.3:
            bucket.pop(key, None)
        else:
            bucket[key] = record(prefix, rng.randint(256, 260), rng.choice(["pod", "node"]), rng.choice(["n1", "n2"]))
        if rng.random() < 0.05:
            agent._sync_ipcache(None)
        else:
            agent._sync_ipcache(key)
        assert ipcache_rows(agent) == expected_rows(bucket)
