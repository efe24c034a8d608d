"""The node executor's mode setting: sandbox by default, host on request, anything else
refused at start naming the variable (the executor never starts half-configured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary.runtime import Context, Settings
from ciliary.testing import FakeBus
from services.node.agent import NodeAgent


def _agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str | None) -> NodeAgent:
    monkeypatch.setenv("CILIARY_NODE_STATE_DIR", str(tmp_path))
    if mode is None:
        monkeypatch.delenv("CILIARY_NODE_MODE", raising=False)
    else:
        monkeypatch.setenv("CILIARY_NODE_MODE", mode)
    ctx = Context(service="node", settings=Settings(nats_url="nats://127.0.0.1:1", cluster="c1", node="n1"),
                  bus=FakeBus())
    return NodeAgent(ctx)


def test_sandbox_is_the_default_and_builds_its_node_namespace(monkeypatch, tmp_path: Path) -> None:
    agent = _agent(monkeypatch, tmp_path, None)
    assert not agent.host_mode and agent.kernel.netns == "ciliary-c1-n1" and "pods" in agent.inputs


def test_host_mode_is_the_namespace_it_runs_in_and_leaves_pods_to_the_runtime(monkeypatch, tmp_path: Path) -> None:
    agent = _agent(monkeypatch, tmp_path, "host")
    assert agent.host_mode and agent.kernel.netns is None and "pods" not in agent.inputs


def test_an_unknown_mode_stops_the_executor_naming_the_variable(monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="CILIARY_NODE_MODE='hots'"):
        _agent(monkeypatch, tmp_path, "hots")
