"""Container processes: restart policies, backoff, phases, adoption (no namespaces)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from services.node.runner import (
    ContainerProcess,
    ContainerSpec,
    ContainerState,
    pod_phase,
    should_restart,
)


@pytest.mark.parametrize(
    ("policy", "code", "restart"),
    [("Always", 0, True), ("Always", 1, True), ("OnFailure", 0, False), ("OnFailure", 2, True), ("Never", 0, False), ("Never", 1, False)],
)
def test_should_restart(policy: str, code: int, restart: bool) -> None:
    assert should_restart(policy, code) is restart


def _container(tmp_path: Path, code: str, policy: str) -> ContainerProcess:
    spec = ContainerSpec("c", (sys.executable, "-c", code))
    return ContainerProcess(ContainerState(spec), netns="", restart_policy=policy, log_path=tmp_path / "c.log")


def _run_until(proc: ContainerProcess, cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not reached: {proc.state}")


def test_never_policy_finishes_with_phase(tmp_path: Path) -> None:
    ok = _container(tmp_path, "print('hi')", "Never")
    assert pod_phase([ok.state]) == "Pending"
    _run_until(ok, lambda: ok.state.finished)
    assert ok.state.exit_code == 0 and ok.state.restarts == 0
    assert pod_phase([ok.state]) == "Succeeded"
    assert "hi" in (tmp_path / "c.log").read_text()
    bad = _container(tmp_path, "import sys; sys.exit(3)", "Never")
    _run_until(bad, lambda: bad.state.finished)
    assert pod_phase([ok.state, bad.state]) == "Failed"


def test_always_restarts_with_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.node.runner.BACKOFF_START", 0.05)
    proc = _container(tmp_path, "pass", "Always")
    proc.state.backoff = 0.05
    _run_until(proc, lambda: proc.state.restarts >= 3)
    assert pod_phase([proc.state]) == "Running"
    assert proc.state.backoff >= 0.05 * 2**3 * 0.99  # doubled on every exit


def test_stop_kills_the_session_and_adoption(tmp_path: Path) -> None:
    proc = _container(tmp_path, "import time; time.sleep(60)", "Always")
    proc.poll()
    pid = proc.state.pid
    assert proc.state.running
    # a fresh executor adopts the running process instead of starting another
    again = _container(tmp_path, "import time; time.sleep(60)", "Always")
    assert again.adopt(pid, proc.state.started_at)
    assert again.poll() is False and again.state.pid == pid
    again.stop(grace=2)
    proc.proc.wait(timeout=5)
    assert not again.adopt(pid, 0)
