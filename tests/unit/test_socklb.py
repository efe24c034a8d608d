"""Socket-level LB: mode parsing, cgroup paths, cflags, the C/Python twins of lib/sock.h,
the container cgroup prologue and hostNetwork pods (no root, no kernel)."""

from __future__ import annotations

import ctypes as ct
import sys
import time
from pathlib import Path

import pytest

from ciliary import schema
from services.node import socklb as S
from services.node.pods import PodRunner, RunnerConfig, RunningPod, is_host_network_pod
from services.node.runner import ContainerProcess, ContainerSpec, ContainerState
from tests.unit.cprog import run_c_program

HYBRID = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
PURE_V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"


# ---- mode --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "mode"), [
    (None, "hostns-only"), ("", "hostns-only"), ("  ", "hostns-only"), ("on", "on"),
    ("OFF", "off"), (" hostns-only ", "hostns-only"),
])
def test_parse_mode(value, mode) -> None:
    assert S.parse_mode(value) == mode


@pytest.mark.parametrize("value", ["yes", "true", "hostns", "1"])
def test_parse_mode_rejects_other_values_naming_the_variable(value) -> None:
    with pytest.raises(S.SockLBError) as err:
        S.parse_mode(value)
    assert "CILIARY_SOCKET_LB" in str(err.value) and repr(value) in str(err.value)
    assert "on, hostns-only, off" in str(err.value)


def test_default_is_hostns_only() -> None:
    assert S.DEFAULT_MODE == S.MODE_HOSTNS_ONLY


# ---- cgroup paths ----------------------------------------------------------------------------


def test_cgroup2_mount_from_proc_mounts() -> None:
    assert S.cgroup2_mount(HYBRID) == "/sys/fs/cgroup/unified"
    assert S.cgroup2_mount(PURE_V2) == "/sys/fs/cgroup"
    assert S.cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n") is None


def test_node_cgroup_is_named_like_the_node_namespace() -> None:
    assert S.node_cgroup("/sys/fs/cgroup/unified", "c1", "node-1") == Path(
        "/sys/fs/cgroup/unified/ciliary-c1-node-1")
    with pytest.raises(ValueError):
        S.node_cgroup("/sys/fs/cgroup", "../x", "node-1")
    with pytest.raises(ValueError):
        S.node_cgroup("/sys/fs/cgroup", "c1", "a/b")


# ---- cflags --------------------------------------------------------------------------------


def test_cflags_carry_mode_cookie_and_sizes() -> None:
    base = ['-DCILIARY_PIN_DIR="/p"', "-DLB_MAP_SIZE=1024"]
    on = S.cflags(base, S.MODE_ON, 0, 4096, 512)
    assert on[:2] == base
    assert "-DSOCK_LB_HOSTNS_ONLY=0" in on and "-DSOCK_REVNAT_MAP_SIZE=4096" in on
    assert "-DSOCK_AFFINITY_MAP_SIZE=512" in on
    host = S.cflags(base, S.MODE_HOSTNS_ONLY, 4099, 4096, 512)
    assert "-DSOCK_LB_HOSTNS_ONLY=1" in host and "-DHOST_NETNS_COOKIE=4099ULL" in host


def test_cflags_refuse_off_and_hostns_only_without_cookie() -> None:
    with pytest.raises(S.SockLBError):
        S.cflags([], S.MODE_OFF, 1, 1, 1)
    with pytest.raises(S.SockLBError, match="cookie"):
        S.cflags([], S.MODE_HOSTNS_ONLY, 0, 1, 1)


# ---- C twins (gcc) ----------------------------------------------------------------------------

COOKIES = [0, 1, 2, 4096, 4097, 0xFFFFFFFF, 1 << 32, 0x123456789ABCDEF0, (1 << 64) - 1]


def test_sock_h_layouts_and_hash_match_the_python_twins(tmp_path: Path) -> None:
    structs = {
        "sock_revnat_key": S.SockRevNatKey, "sock_revnat_value": S.SockRevNatValue,
        "sock_affinity_key": S.SockAffinityKey,
    }
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "sock.h"', "int main(void) {"]
    for name, py in structs.items():
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
        for field, *_ in py._fields_:
            lines.append(f'printf("off {name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    for c in COOKIES:
        lines.append(f'printf("hash {c} %u\\n", sock_cookie_hash({c}ULL));')
        for count in (1, 2, 3, 7):
            lines.append(f'printf("slot {c} {count} %u\\n", sock_slot(12345, {c}ULL, 1, {count}));')
    lines.append('printf("tcpslot %u\\n", sock_slot(12345, 7ULL, 0, 7));')
    lines.append("return 0; }")
    out = run_c_program("\n".join(lines), tmp_path).split("\n")
    got = dict(line.rsplit(" ", 1) for line in out if line)
    for name, py in structs.items():
        assert int(got[f"size {name}"]) == ct.sizeof(py), name
        for field, *_ in py._fields_:
            assert int(got[f"off {name}.{field}"]) == getattr(py, field).offset, f"{name}.{field}"
    for c in COOKIES:
        assert int(got[f"hash {c}"]) == S.sock_cookie_hash(c), c
        for count in (1, 2, 3, 7):
            assert int(got[f"slot {c} {count}"]) == S.sock_slot(12345, c, True, count)
    assert int(got["tcpslot"]) == S.sock_slot(12345, 7, False, 7) == 12345 % 7 + 1


def test_udp_slots_spread_consecutive_cookies() -> None:
    slots = [S.sock_slot(0, 4096 + i, True, 3) for i in range(300)]
    assert all(1 <= s <= 3 for s in slots)
    assert min(slots.count(s) for s in (1, 2, 3)) > 60


# ---- containers join the cgroup ----------------------------------------------------------------


def test_container_writes_its_own_pid_to_the_cgroup_before_exec(tmp_path: Path) -> None:
    """The prologue's pid is the container's pid (``exec``); here a plain directory
    stands in for the cgroup."""
    spec = ContainerSpec("c", (sys.executable, "-c", "import os; print(os.getpid())"))
    proc = ContainerProcess(ContainerState(spec), netns="", restart_policy="Never",
                            log_path=tmp_path / "c.log", cgroup=str(tmp_path))
    assert proc.argv()[:2] == ["sh", "-c"] and proc.argv()[3] == str(tmp_path)
    proc.poll()
    deadline = time.monotonic() + 10
    while proc.state.exit_code is None and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.02)
    assert proc.state.exit_code == 0
    pid = (tmp_path / "cgroup.procs").read_text().strip()
    assert pid == str(proc.state.pid) == (tmp_path / "c.log").read_text().strip()


def test_container_without_cgroup_is_started_directly(tmp_path: Path) -> None:
    proc = ContainerProcess(ContainerState(ContainerSpec("c", ("true",))), netns="ns",
                            restart_policy="Never", log_path=tmp_path / "c.log")
    assert proc.argv() == ["ip", "netns", "exec", "ns", "true"]


def test_container_in_a_missing_cgroup_fails_instead_of_running_outside(tmp_path: Path) -> None:
    proc = ContainerProcess(ContainerState(ContainerSpec("c", ("true",))), netns="",
                            restart_policy="Never", log_path=tmp_path / "c.log",
                            cgroup=str(tmp_path / "gone"))
    proc.poll()
    deadline = time.monotonic() + 10
    while proc.state.exit_code is None and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.02)
    assert proc.state.exit_code not in (None, 0)


# ---- hostNetwork pods ------------------------------------------------------------------------


def _record(spec: dict) -> schema.ResourceRecord:
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "h", "namespace": "default"},
                "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"]}], **spec}}
    return schema.ResourceRecord(kind="Pod", api_version="v1", namespace="default", name="h",
                                 uid="u1", generation=1, created="2024-01-01T00:00:00Z",
                                 manifest=manifest)


def test_is_host_network_pod() -> None:
    assert is_host_network_pod(_record({"hostNetwork": True}))
    assert not is_host_network_pod(_record({}))
    assert not is_host_network_pod(_record({"hostNetwork": False}))


def test_host_network_pod_status_reports_the_node_address_and_cgroup(tmp_path: Path) -> None:
    cfg = RunnerConfig(cluster="c1", node="node-1", default_node="node-1", pod_cidr="10.200.1.0/24",
                       host_ip="172.30.1.1", state_dir=tmp_path, nats_url="nats://x", cni_bin="x",
                       cgroup="/sys/fs/cgroup/unified/ciliary-c1-node-1")
    runner = PodRunner(cfg, write_status=None)  # type: ignore[arg-type]
    procs, _ = runner._containers(_record({"hostNetwork": True}), "ciliary-c1-node-1", cfg.cgroup)
    assert procs[0].cgroup == cfg.cgroup
    running = RunningPod("Pod.default.h", "default", "h", "u1", "ciliary-c1-node-1",
                         ip=cfg.host_ip, host=True, containers=procs)
    status = runner.status_of(running)
    assert status["podIP"] == "172.30.1.1" and status["hostIP"] == "172.30.1.1"
    assert status["ciliary"]["hostNetwork"] is True
    assert status["ciliary"]["cgroup"] == cfg.cgroup
    assert running.started


def test_node_agent_refuses_a_bad_mode_with_a_clear_message(monkeypatch) -> None:
    from types import SimpleNamespace

    from services.node.agent import NodeAgent

    ctx = SimpleNamespace(bus=None, settings=SimpleNamespace(
        cluster="c1", cluster_id=1, node="node-1", nats_url="nats://127.0.0.1:1"))
    monkeypatch.setenv("CILIARY_SOCKET_LB", "sometimes")
    with pytest.raises(SystemExit) as err:
        NodeAgent(ctx)  # type: ignore[arg-type]
    assert str(err.value) == ("node executor node-1: CILIARY_SOCKET_LB='sometimes': "
                              "must be one of on, hostns-only, off")
    monkeypatch.setenv("CILIARY_SOCKET_LB", "on")
    assert NodeAgent(ctx).socket_lb_mode == "on"  # type: ignore[arg-type]
