"""Pure pieces of the foundation: tables, ages, health aggregation, schema, instance files."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from ciliary import config, output, schema
from ciliary.cli.app import build_parser
from ciliary.status import missing_or_unhealthy
from ciliary.store import kv_key, split_kv_key


def test_table_is_aligned() -> None:
    text = output.table(["NAME", "IP"], [["checkout", "10.0.0.1"], ["a", None]])
    lines = text.splitlines()
    assert lines == ["NAME       IP", "checkout   10.0.0.1", "a"]


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (59, "59s"), (119, "119s"), (120, "2m"), (7199, "119m"), (7200, "2h"), (3 * 86400, "3d")]
)
def test_age(seconds: int, shown: str) -> None:
    assert output.age(seconds) == shown


def _report(service: str, node: str = "", healthy: bool = True) -> schema.HealthReport:
    return schema.HealthReport(service=service, instance=service + node, pid=1, version="0", started=0.0, healthy=healthy, node=node)


def test_missing_or_unhealthy() -> None:
    reports = [_report(s) for s in ("identity", "servicelb", "policy", "flows")]
    reports += [_report("mesh", healthy=False), _report("node", "node-1")]
    assert missing_or_unhealthy(reports, ["node-1", "node-2"]) == ["mesh", "node/node-2"]
    reports.append(_report("mesh"))
    reports.append(_report("node", "node-2"))
    assert missing_or_unhealthy(reports, ["node-1", "node-2"]) == []


def test_kv_keys_round_trip() -> None:
    assert kv_key("Pod", "default", "web.v1") == "Pod.default.web.v1"
    assert split_kv_key("Pod.default.web.v1") == ("Pod", "default", "web.v1")
    assert kv_key("Node", "", "node-1") == "Node._.node-1"
    assert split_kv_key("Node._.node-1") == ("Node", "", "node-1")


def test_schema_round_trip_and_rejects_garbage() -> None:
    record = schema.ResourceRecord(kind="Pod", api_version="v1", namespace="default", name="a", uid="u", generation=1, created="t", manifest={"x": 1})
    assert schema.decode(schema.encode(record), schema.ResourceRecord) == record
    with pytest.raises(msgspec.DecodeError):
        schema.decode(b"\x93\x01", schema.ResourceRecord)
    components = schema.json_schema([schema.ResourceRecord, schema.HealthReport])
    assert "ResourceRecord" in components and "HealthReport" in components


def test_instance_file(tmp_path: Path) -> None:
    assert config.read_instance(tmp_path) is None
    state = config.InstanceState(nats_url="nats://127.0.0.1:1", supervisor_pid=os.getpid(), nodes=["node-1"])
    config.write_instance(tmp_path, state)
    assert config.read_instance(tmp_path) == state
    (tmp_path / config.INSTANCE_FILE).write_text("{not json")
    assert config.read_instance(tmp_path) is None
    config.remove_instance(tmp_path)
    config.remove_instance(tmp_path)


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(config.ENV_DATA_DIR, str(tmp_path / "env"))
    assert config.resolve_data_dir(None) == tmp_path / "env"
    assert config.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv(config.ENV_DATA_DIR)
    assert config.resolve_data_dir(None) == config.default_data_dir()


def test_pid_alive() -> None:
    assert config.pid_alive(os.getpid())
    assert not config.pid_alive(2**22 + 12345)


def test_cli_parser_accepts_the_documented_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["get", "pods", "-A", "-o", "json", "--data-dir", "/x"])
    assert (args.kind, args.all_namespaces, args.output, args.data_dir) == ("pods", True, "json", "/x")
    args = parser.parse_args(["--data-dir", "/y", "up", "-d", "--nodes", "3", "--nats-port", "4333"])
    assert (args.detach, args.nodes, args.nats_port, args.data_dir) == (True, 3, 4333, "/y")
    args = parser.parse_args(["delete", "pod", "a", "b", "-n", "shop"])
    assert (args.kind, args.names, args.namespace) == ("pod", ["a", "b"], "shop")
    with pytest.raises(SystemExit):
        parser.parse_args(["get", "pods", "-o", "xml"])
