"""Per-node flow rings and Hubble-style queries."""

from __future__ import annotations

import msgspec
import pytest

from ciliary import schema
from ciliary.hubble import flow_time_ns, rfc3339_nano
from services.flows.store import FlowRing, FlowStore
from tests.unit.test_flows_scenario import scenario_flows

FLOWS = scenario_flows()


def flow_at(i: int, node: str = "default/node-1", verdict: str = "FORWARDED") -> schema.Flow:
    return schema.Flow(time=rfc3339_nano(1_000_000_000 * (1000 + i)), uuid=f"u{i}", node_name=node,
                       verdict=verdict)


def test_default_capacity_is_hubbles() -> None:
    assert FlowRing().capacity == 4095 == schema.FLOWS_RING_CAPACITY


def test_ring_overwrites_oldest() -> None:
    ring = FlowRing(3)
    for i in range(5):
        ring.add(flow_at(i))
    assert [f.uuid for _, f in ring] == ["u2", "u3", "u4"]
    assert ring.written == 5 and ring.overwritten == 2 and len(ring) == 3
    with pytest.raises(ValueError):
        FlowRing(0)


def test_store_rings_per_node_and_capacity() -> None:
    store = FlowStore(capacity=2)
    for i in range(4):
        store.add(flow_at(i, node="c/a"))
    store.add(flow_at(10, node="c/b"))
    assert len(store) == 3 and store.seen == 5
    assert set(store.rings) == {"c/a", "c/b"}


def test_query_merges_nodes_in_time_order() -> None:
    store = FlowStore()
    for i in (1, 3, 5):
        store.add(flow_at(i, node="c/a"))
    for i in (2, 4):
        store.add(flow_at(i, node="c/b"))
    assert [f.uuid for f in store.query(schema.FlowQuery())] == ["u1", "u2", "u3", "u4", "u5"]


def test_last_and_first_n() -> None:
    store = FlowStore()
    store.extend(flow_at(i) for i in range(10))
    assert [f.uuid for f in store.query(schema.FlowQuery(number=3))] == ["u7", "u8", "u9"]
    assert [f.uuid for f in store.query(schema.FlowQuery(number=3, first=True))] == ["u0", "u1", "u2"]
    assert len(store.query(schema.FlowQuery(number=100))) == 10


def test_since_until() -> None:
    store = FlowStore()
    store.extend(flow_at(i) for i in range(10))
    since = flow_time_ns(flow_at(3))
    until = flow_time_ns(flow_at(6))
    got = store.query(schema.FlowQuery(since_ns=since, until_ns=until))
    assert [f.uuid for f in got] == ["u3", "u4", "u5", "u6"]
    got = store.query(schema.FlowQuery(since_ns=since, number=2))
    assert [f.uuid for f in got] == ["u8", "u9"]


def test_filters_then_number() -> None:
    store = FlowStore()
    store.extend(flow_at(i, verdict="DROPPED" if i % 2 else "FORWARDED") for i in range(10))
    q = schema.FlowQuery(whitelist=[schema.FlowFilter(verdict=["DROPPED"])], number=2)
    assert [f.uuid for f in store.query(q)] == ["u7", "u9"]
    q = schema.FlowQuery(blacklist=[schema.FlowFilter(verdict=["DROPPED"])], number=2, first=True)
    assert [f.uuid for f in store.query(q)] == ["u0", "u2"]


def test_scenario_query_round_trips_over_the_wire() -> None:
    store = FlowStore()
    store.extend(FLOWS)
    q = schema.FlowQuery(whitelist=[schema.FlowFilter(verdict=["DROPPED"])], number=20)
    q = msgspec.msgpack.decode(schema.encode(q), type=schema.FlowQuery)
    got = store.query(q)
    assert len(got) == 7 and all(f.verdict == "DROPPED" for f in got)


def test_export_jsonl_with_filters_and_rotation(tmp_path) -> None:
    import json

    from services.flows.export import ExportConfig, write_lines

    cfg = ExportConfig.from_env({
        "CILIARY_FLOWS_EXPORT_FILE": str(tmp_path / "flows.jsonl"),
        "CILIARY_FLOWS_EXPORT_MAX_MB": str(4000 / 1024 / 1024),
        "CILIARY_FLOWS_EXPORT_BACKUPS": "2",
        "CILIARY_FLOWS_EXPORT_DENYLIST": '[{"verdict":["DROPPED"]}]',
    })
    assert cfg is not None
    lines = cfg.lines(FLOWS)
    assert len(lines) == 22  # 7 dropped flows denied
    for _ in range(3):
        write_lines(cfg, lines)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    for name in files:
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 4000 or text.count("\n") == 1
        for line in text.splitlines():
            assert set(json.loads(line)) == {"flow", "node_name", "time"}
    assert ExportConfig.from_env({}) is None


def test_add_batch_is_add_in_order() -> None:
    one, many = FlowStore(capacity=4), FlowStore(capacity=4)
    flows = [flow_at(i) for i in range(6)]
    for f in flows:
        one.add(f)
    many.add_batch("default/node-1", [flow_time_ns(f) for f in flows[:2]], flows[:2])
    many.add_batch("default/node-1", [flow_time_ns(f) for f in flows[2:]], flows[2:])
    assert list(many.rings["default/node-1"]) == list(one.rings["default/node-1"])
    assert (many.seen, many.rings["default/node-1"].overwritten) == (6, 2)
