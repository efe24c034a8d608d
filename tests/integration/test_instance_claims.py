"""One instance per store and per cluster name; a killed supervisor leaves no orphan."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

from ciliary import claims, config
from tests.integration.conftest import run_cli


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(config.pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if config.pid_alive(p)]


def test_a_cluster_name_runs_once_per_machine(tmp_path: Path) -> None:
    cluster = "c" + secrets.token_hex(3)
    first, second = tmp_path / "first", tmp_path / "second"
    up = run_cli("up", "-d", "--nodes", "1", "--cluster", cluster, "--cluster-id", "41", data_dir=first)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        refused = run_cli("up", "-d", "--nodes", "1", "--cluster", cluster, "--cluster-id", "42",
                          data_dir=second)
        assert refused.returncode != 0
        assert f"cluster {cluster} already runs on this machine" in refused.stderr
        assert str(first) in refused.stderr  # names the instance holding it
        assert config.read_instance(second) is None  # nothing was started for it
    finally:
        assert run_cli("down", data_dir=first).returncode == 0
    assert not claims.is_held(claims.cluster_claim(cluster))


def test_a_killed_supervisor_takes_every_child_with_it(tmp_path: Path) -> None:
    cluster = "c" + secrets.token_hex(3)
    data_dir = tmp_path / "inst"
    up = run_cli("up", "-d", "--nodes", "1", "--cluster", cluster, "--cluster-id", "43", data_dir=data_dir)
    assert up.returncode == 0, up.stdout + up.stderr
    state = config.read_instance(data_dir)
    assert state is not None
    children = [p.pid for p in state.processes]
    try:
        os.kill(state.supervisor_pid, signal.SIGKILL)
        left = _wait_gone(children, 30)
        assert not left, f"children outlived their supervisor: {left}"
        assert not claims.is_held(claims.data_dir_claim(data_dir))  # the store is free again
        again = run_cli("up", "-d", "--nodes", "1", "--cluster", cluster, "--cluster-id", "43",
                        data_dir=data_dir)
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        for pid in _wait_gone(children, 0):
            os.kill(pid, signal.SIGKILL)
        assert run_cli("down", data_dir=data_dir).returncode == 0


def test_a_store_held_by_a_running_process_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "inst"
    fd = claims.take(claims.data_dir_claim(data_dir), "a nats-server left running (pid 4242)")
    try:
        refused = run_cli("up", "-d", "--nodes", "1", "--cluster", "c" + secrets.token_hex(3),
                          data_dir=data_dir)
        assert refused.returncode != 0
        assert "still in use by a nats-server left running (pid 4242)" in refused.stderr
    finally:
        os.close(fd)
