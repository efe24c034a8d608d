"""A deleted pod's status goes with it: the node executor that reported it removes it, and
only its own (compare-and-set), never another node's or a newer one."""

from __future__ import annotations

from pathlib import Path

from ciliary import schema
from ciliary.testing import FakeBus
from services.node.pods import PodRunner, RunnerConfig, RunningPod, clear_reported_status

KEY = "Pod.default.web"


async def put_status(bus: FakeBus, reporter: str) -> None:
    await bus.kv_put(schema.BUCKET_STATUS, KEY, schema.StatusRecord(reporter=reporter, status={"phase": "Running"}))


async def test_the_reporter_removes_its_own_status_only() -> None:
    bus = FakeBus()
    await bus.ensure_buckets()
    assert not await clear_reported_status(bus, "default", "web", "node/node-1")  # nothing there
    await put_status(bus, "node/node-2")  # re-created on node-2 meanwhile
    assert not await clear_reported_status(bus, "default", "web", "node/node-1")
    assert await bus.kv_get(schema.BUCKET_STATUS, KEY) is not None
    await put_status(bus, "node/node-1")
    assert await clear_reported_status(bus, "default", "web", "node/node-1")
    assert await bus.kv_get(schema.BUCKET_STATUS, KEY) is None
    await bus.kv_put(schema.BUCKET_STATUS, KEY, b"\xc1")  # not a status record: left alone
    assert not await clear_reported_status(bus, "default", "web", "node/node-1")


async def test_a_status_rewritten_between_read_and_delete_stays(monkeypatch) -> None:
    bus = FakeBus()
    await bus.ensure_buckets()
    await put_status(bus, "node/node-1")
    real_get = bus.kv_get

    async def get_then_rewrite(bucket: str, key: str, **kw):
        found = await real_get(bucket, key, **kw)
        await put_status(bus, "node/node-1")  # the pod came back on this node meanwhile
        return found

    monkeypatch.setattr(bus, "kv_get", get_then_rewrite)
    assert not await clear_reported_status(bus, "default", "web", "node/node-1")
    assert await real_get(schema.BUCKET_STATUS, KEY) is not None


async def test_a_deleted_pod_clears_its_status_and_a_replaced_one_does_not(tmp_path: Path) -> None:
    cfg = RunnerConfig(cluster="c1", node="node-1", default_node="node-1", pod_cidr="10.200.1.0/24",
                       host_ip="172.30.1.1", state_dir=tmp_path, nats_url="nats://x", cni_bin="x")
    cleared: list[tuple[str, str, str]] = []

    async def clear(namespace: str, name: str, reporter: str) -> None:
        cleared.append((namespace, name, reporter))

    runner = PodRunner(cfg, write_status=None, clear_status=clear)  # type: ignore[arg-type]
    pod = RunningPod(KEY, "default", "web", "u1", "ciliary-c1-node-1", ip=cfg.host_ip, host=True)
    runner.pods[KEY] = pod
    await runner._stop(pod)  # the stop half of a replacement: the status will be rewritten
    assert cleared == [] and KEY not in runner.pods
    runner.pods[KEY] = pod
    await runner._stop_deleted(pod)
    assert cleared == [("default", "web", "node/node-1")] and KEY not in runner.pods
