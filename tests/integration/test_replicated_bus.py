"""The replicated bus of ``ciliary up --nats-replicas 3``: three nats-servers on loopback in
one JetStream cluster, every bucket with three copies, every service connected to all of
them. SIGKILL of the server leading the resources bucket: an apply still lands, a service
sees it, the supervisor restarts the server and it catches up.

The supervisor runs without nodes (``--nodes 0``, which only the supervisor accepts), so
this needs no kernel datapath: it is the NATS part of the instance, with every
control-plane service."""

from __future__ import annotations

import json
import os
import secrets
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ciliary import config, schema

from .conftest import run_cli, supervisor_without_nodes, wait_until


def _status(data_dir: Path) -> dict[str, Any] | None:
    done = run_cli("status", "-o", "json", data_dir=data_dir, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _jsz(monitor_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{monitor_url}/jsz?streams=true&config=true", timeout=2) as resp:
        return json.loads(resp.read())


def _streams(monitor_url: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for account in _jsz(monitor_url)["account_details"] for s in account["stream_detail"]}


def _namespaces_seen_by_identity(status: dict[str, Any]) -> int:
    identity = next(s for s in status["services"] if s["name"] == "identity")
    return int(identity["detail"].get("resources", {}).get("Namespace", 0))


@pytest.fixture
def replicated_instance(tmp_path: Path):
    data_dir = tmp_path / "inst"
    state = None
    with supervisor_without_nodes(data_dir, "--cluster", "t" + secrets.token_hex(4), "--cluster-id", "97",
                                  "--nats-replicas", "3"):
        try:
            yield data_dir
        finally:
            state = config.read_instance(data_dir)
    if state is not None:  # every server stopped with the instance
        left = [p.pid for p in state.processes if config.pid_alive(p.pid)]
        assert not left, f"processes outlived ciliary down: {left}"


def test_an_apply_lands_while_one_of_three_servers_is_killed_and_it_catches_up(replicated_instance: Path) -> None:
    data_dir = replicated_instance

    def healthy_and_replicated() -> dict[str, Any] | None:
        status = _status(data_dir)
        if status is None or any(s["state"] != "up" for s in status["nats_servers"]):
            return None
        replication = status["replication"]
        return status if replication["fully_replicated"] == len(replication["streams"]) > 0 else None

    status = wait_until(healthy_and_replicated, 40, "three servers up and every stream fully replicated")
    assert status["nats_replicas"] == 3 and len(status["nats_servers"]) == 3
    assert status["nats_url"].count(",") == 2
    servers = {s["name"]: s for s in status["nats_servers"]}
    state = config.read_instance(data_dir)
    assert state is not None
    monitors = {s.name: s.monitor_url for s in state.nats_servers}
    streams = _streams(monitors["nats-server-1"])
    assert {f"KV_{b}" for b in schema.ALL_BUCKETS} <= set(streams)
    assert {streams[f"KV_{b}"]["config"]["num_replicas"] for b in schema.ALL_BUCKETS} == {3}
    before = _namespaces_seen_by_identity(status)

    # the worst server to lose: the one leading the resources bucket (apply writes there)
    leader_name = streams["KV_resources"]["cluster"]["leader"]
    victim = next(s for s in status["nats_servers"] if s["server_name"] == leader_name)
    os.kill(victim["pid"], signal.SIGKILL)

    def applied() -> bool:
        done = run_cli("apply", "-f", "-", data_dir=data_dir, timeout=30,
                       stdin="apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
        return done.returncode == 0

    wait_until(applied, 30, "apply with the resources bucket's leader killed")
    wait_until(lambda: (s := _status(data_dir)) is not None and _namespaces_seen_by_identity(s) == before + 1,
               20, "identity sees the namespace applied during the outage")

    # the supervisor restarts the server on its own store; it catches up on the write
    after = wait_until(healthy_and_replicated, 40, "the killed server back and every stream current")
    restarted = next(s for s in after["nats_servers"] if s["name"] == victim["name"])
    assert restarted["pid"] != victim["pid"]
    assert restarted["url"] == servers[victim["name"]]["url"]  # same port: clients find it again

    def same_resources_everywhere() -> bool:
        counts = {name: _streams(url)["KV_resources"]["state"]["messages"] for name, url in monitors.items()}
        return len(set(counts.values())) == 1

    wait_until(same_resources_everywhere, 20, "every server holds the same resources")

    table = run_cli("status", data_dir=data_dir, timeout=30)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "nats-server-1" in table.stdout and "nats-server-3" in table.stdout
    assert "with all 3 copies current" in table.stdout


def test_up_refuses_a_bus_of_two_servers(tmp_path: Path) -> None:
    refused = run_cli("up", "-d", "--nats-replicas", "2", "--cluster", "t" + secrets.token_hex(4),
                      data_dir=tmp_path / "inst")
    assert refused.returncode != 0
    assert "--nats-replicas: 2 servers cannot keep a quorum" in refused.stderr
    assert config.read_instance(tmp_path / "inst") is None
