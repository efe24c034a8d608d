"""Whole processes: ``up -d`` / ``status`` / ``down``, service restarts, NATS restarts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

from ciliary import config, schema
from ciliary.bus import Bus
from ciliary.resources import load_manifests
from ciliary.status import gather_health
from ciliary.store import ResourceStore
from tests.integration.conftest import REPO, run_cli, service_process

SHOP = REPO / "examples" / "shop"


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_up_status_down_leaves_nothing_behind(tmp_path: Path) -> None:
    data_dir = tmp_path / "inst"
    started = time.monotonic()
    up = run_cli("up", "-d", "--nodes", "2", data_dir=data_dir)
    elapsed = time.monotonic() - started
    assert up.returncode == 0, up.stdout + up.stderr
    print(f"up -d until healthy: {elapsed:.2f}s")
    try:
        state = config.read_instance(data_dir)
        assert state is not None
        port = int(state.nats_url.rsplit(":", 1)[1])
        assert _port_open(port)

        status = run_cli("status", "-o", "json", data_dir=data_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["healthy"] is True
        names = sorted((s["name"], s["node"]) for s in report["services"])
        assert names == sorted(
            [(n, "") for n in ("identity", "servicelb", "policy", "flows", "mesh")]
            + [("node", "node-1"), ("node", "node-2")]
        )
        for svc in report["services"]:
            assert svc["healthy"] is True and svc["pid"] > 0 and svc["uptime_seconds"] >= 0
        table = run_cli("status", data_dir=data_dir)
        assert table.returncode == 0 and "SERVICE" in table.stdout and "node-2" in table.stdout

        # node executors registered themselves
        nodes = json.loads(run_cli("get", "nodes", "-o", "json", data_dir=data_dir).stdout)
        assert [n["metadata"]["name"] for n in nodes["items"]] == ["node-1", "node-2"]

        second = run_cli("up", "-d", data_dir=data_dir)
        assert second.returncode == 1 and "already running" in second.stderr

        pids = [state.supervisor_pid] + [p.pid for p in state.processes]
    finally:
        down = run_cli("down", data_dir=data_dir)
    assert down.returncode == 0, down.stderr
    assert not any(config.pid_alive(pid) for pid in pids)
    assert not _port_open(port)
    assert config.read_instance(data_dir) is None
    after = run_cli("status", data_dir=data_dir)
    assert after.returncode == 1 and "no ciliary instance" in after.stderr


def test_supervisor_restarts_a_crashed_service(tmp_path: Path) -> None:
    data_dir = tmp_path / "inst"
    assert run_cli("up", "-d", data_dir=data_dir).returncode == 0
    try:
        state = config.read_instance(data_dir)
        assert state is not None
        policy_pid = next(p.pid for p in state.processes if p.name == "policy")
        os.kill(policy_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = json.loads(run_cli("status", "-o", "json", data_dir=data_dir).stdout or "{}")
            policy = [s for s in status.get("services", []) if s["name"] == "policy"]
            if policy and policy[0]["pid"] != policy_pid and policy[0]["healthy"]:
                break
            time.sleep(0.3)
        else:
            raise AssertionError("policy service was not restarted")
    finally:
        assert run_cli("down", data_dir=data_dir).returncode == 0


async def _health_of(url: str, service: str) -> schema.HealthReport | None:
    bus = await Bus.connect(url, "test")
    try:
        for report in await gather_health(bus, timeout=0.5):
            if report.service == service:
                return report
        return None
    finally:
        await bus.close()


async def _wait_resources(url: str, service: str, expected: dict[str, int], timeout: float = 20) -> schema.HealthReport:
    deadline = time.monotonic() + timeout
    report = None
    while time.monotonic() < deadline:
        report = await _health_of(url, service)
        if report and report.healthy and report.detail.get("resources") == expected:
            return report
        await asyncio.sleep(0.2)
    raise AssertionError(f"{service} did not converge to {expected}: {report}")


async def test_service_restarted_mid_stream_converges(nats_server, tmp_path: Path) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    await bus.ensure_buckets()
    store = ResourceStore(bus)
    proc = service_process("servicelb", nats_server.url, log_path=tmp_path / "svc.log")
    try:
        await store.apply(load_manifests([str(SHOP / "20-services.yaml")]))
        await _wait_resources(nats_server.url, "servicelb", {"Service": 3})
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # changes while the service is down: one removed, pods added
        await store.delete("Service", "default", "frontend")
        await store.apply(load_manifests([str(SHOP / "10-workloads.yaml")]))
        proc = service_process("servicelb", nats_server.url, log_path=tmp_path / "svc.log")
        await _wait_resources(nats_server.url, "servicelb", {"Service": 2, "Pod": 3})
        # and it keeps following live changes
        await store.delete("Pod", "default", "checkout")
        await _wait_resources(nats_server.url, "servicelb", {"Service": 2, "Pod": 2})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, (tmp_path / "svc.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        await bus.close()


async def test_nats_restart_keeps_every_resource(nats_server) -> None:
    bus = await Bus.connect(nats_server.url, "test")
    await bus.ensure_buckets()
    resources = load_manifests([str(SHOP)])
    await ResourceStore(bus).apply(resources)
    before = {(o.record.kind, o.record.name, o.revision) for kind in ("Pod", "Service", "CiliumNetworkPolicy", "NetworkPolicy") for o in await ResourceStore(bus).list(kind, None)}
    await bus.close()
    nats_server.stop()
    nats_server.start()
    bus = await Bus.connect(nats_server.url, "test")
    try:
        after = {(o.record.kind, o.record.name, o.revision) for kind in ("Pod", "Service", "CiliumNetworkPolicy", "NetworkPolicy") for o in await ResourceStore(bus).list(kind, None)}
    finally:
        await bus.close()
    assert after == before and len(after) == len(resources)


def test_foreground_up_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    import subprocess
    import sys

    data_dir = tmp_path / "fg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ciliary.cli", "up", "--data-dir", str(data_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            state = config.read_instance(data_dir)
            if state is not None and len(state.processes) == 7:
                status = run_cli("status", "-o", "json", data_dir=data_dir)
                if status.returncode == 0:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("foreground instance did not become healthy")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not any(config.pid_alive(p.pid) for p in state.processes)
        assert config.read_instance(data_dir) is None
    finally:
        if proc.poll() is None:
            proc.kill()
