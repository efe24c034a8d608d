"""``IpcacheIndex``: the desired ipcache kept by deltas equals ``desired_ipcache`` from
scratch after every step of seeded random histories, and reports every key whose winner
changed."""

from __future__ import annotations

import random

import pytest

from ciliary import schema
from services.identity.ipcache_index import IpcacheIndex
from services.identity.model import PodInfo, desired_ipcache

CLUSTER, CLUSTER_ID = "c1", 1
IPS = [f"10.0.0.{n}/32" for n in range(1, 7)]  # few addresses: claims collide often
LABEL_SETS = [("k8s:app=a",), ("k8s:app=b",), ("k8s:app=c",)]


def random_pod(rng: random.Random, key: str) -> PodInfo | None:
    if rng.random() < 0.15:
        return None
    ip = rng.choice(IPS + [""])
    return PodInfo(key, "default", key.rsplit(".", 1)[-1], rng.choice(["n1", "n2"]), rng.choice(LABEL_SETS),
                   ip, (rng.randint(0, 1), rng.randint(1, 50), key))


def remote(rng: random.Random) -> list[schema.IPCacheRecord]:
    return [schema.IPCacheRecord(prefix=rng.choice(IPS), identity=rng.randint(300, 310), source="pod",
                                 cluster=name, cluster_id=cid, pod=f"r{n}")
            for n, (name, cid) in enumerate(rng.sample([("east", 2), ("west", 3), ("north", 4)], rng.randint(0, 3)))]


@pytest.mark.parametrize("seed", range(40))
def test_index_equals_from_scratch_after_every_step(seed: int) -> None:
    rng = random.Random(seed)
    index = IpcacheIndex(CLUSTER, CLUSTER_ID)
    pods: dict[str, PodInfo] = {}
    ids: dict[tuple[str, ...], int] = {}
    nodes: dict[str, list[str]] = {}
    cidrs: dict[str, int] = {}
    remotes: list[schema.IPCacheRecord] = []
    before = dict(index.desired)
    for _step in range(60):
        changed: set[str] = set()
        for _ in range(rng.randint(0, 3)):  # pods come, go, move, change label set or IP
            key = f"Pod.default.p{rng.randint(0, 7)}"
            new = random_pod(rng, key)
            if new is None:
                pods.pop(key, None)
            else:
                pods[key] = new
            changed.add(key)
        if rng.random() < 0.3:  # a label set gets another identity, or loses it
            labels = rng.choice(LABEL_SETS)
            old_id = ids.get(labels)
            if rng.random() < 0.2:
                ids.pop(labels, None)
            else:
                ids[labels] = rng.randint(256, 260)
            if ids.get(labels) != old_id:
                changed.update(index.pods_with(labels))
        if rng.random() < 0.2:
            nodes = {name: rng.sample(IPS, rng.randint(0, 2)) for name in rng.sample(["n1", "n2"], rng.randint(0, 2))}
        if rng.random() < 0.2:
            cidrs = {prefix: rng.randint(1 << 24 | 1, 1 << 24 | 4) for prefix in rng.sample(IPS, rng.randint(0, 3))}
        if rng.random() < 0.2:
            remotes = remote(rng)
        for key in changed:
            info = pods.get(key)
            index.set_pod(key, info, ids.get(info.labels, 0) if info is not None else 0)
        index.set_nodes(nodes)
        index.set_cidrs(cidrs)
        index.set_remote(remotes)
        touched = index.take_touched()
        expected = desired_ipcache(list(pods.values()), ids, nodes, cidrs, CLUSTER, CLUSTER_ID, remotes)
        assert index.desired == expected
        moved = {k for k in {*before, *expected} if before.get(k) != expected.get(k)}
        assert moved <= touched, "a key whose winner changed was not reported"
        before = dict(expected)


def test_unchanged_inputs_touch_nothing_and_keep_record_objects() -> None:
    index = IpcacheIndex(CLUSTER, CLUSTER_ID)
    pod = PodInfo("Pod.default.a", "default", "a", "n1", ("k8s:app=a",), "10.0.0.1/32", (1, 5, "Pod.default.a"))
    index.set_pod(pod.key, pod, 256)
    index.set_nodes({"n1": ["10.0.1.1/32"]})
    index.set_cidrs({"192.0.2.0/24": 1 << 24 | 1})
    assert index.take_touched() == {"0.0.0.0_0", "10.0.0.1_32", "10.0.1.1_32", "192.0.2.0_24"}
    record = index.desired["10.0.0.1_32"]
    index.set_pod(pod.key, pod, 256)
    index.set_nodes({"n1": ["10.0.1.1/32"]})
    index.set_cidrs({"192.0.2.0/24": 1 << 24 | 1})
    index.set_remote([])
    assert index.take_touched() == set()
    assert index.desired["10.0.0.1_32"] is record
    # the label set gets another identity: its pod claims again, only its key is touched
    index.set_pod(pod.key, pod, 257)
    assert index.take_touched() == {"10.0.0.1_32"} and index.desired["10.0.0.1_32"].identity == 257
    index.set_pod(pod.key, None, 0)
    assert index.take_touched() == {"10.0.0.1_32"} and "10.0.0.1_32" not in index.desired
    assert list(index.pods_with(pod.labels)) == []
