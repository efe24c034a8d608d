"""A restart in the middle of a burst loses nothing.

One ``ciliary apply -f`` of ``SERVICES`` selector-less Services, each with a manual
EndpointSlice of three unrouted 10.208.x.x backends (never probed: no packet is sent). While
the node's lb maps are still filling, SIGKILL servicelb or the node executor; the supervisor
restarts it, and the maps must converge to exactly the applied Services and backends: no
frontend missing, none extra, every slot list complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ciliary import config

from .instance import REPO, ciliary, embedded_instance
from .podnet import wait_for

SERVICES = 2000
NAMESPACE = "burst"
PORT = 80
TARGET_PORT = 8080


def service_ip(i: int) -> str:
    return f"10.96.{100 + i // 250}.{i % 250 + 1}"


def backend_ips(i: int) -> list[str]:
    base = 3 * i
    return [f"10.208.{(base + k) // 250}.{(base + k) % 250 + 1}" for k in range(3)]


def manifests(n: int) -> str:
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n"]
    for i in range(n):
        name = f"svc-{i:05d}"
        docs.append(f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n"
                    f"spec:\n  clusterIP: {service_ip(i)}\n  ports:\n"
                    f"  - {{name: http, port: {PORT}, protocol: TCP}}\n")
        endpoints = "".join(f"- addresses: [{ip}]\n" for ip in backend_ips(i))
        docs.append(f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n"
                    f"  namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: {name}}}\n"
                    f"addressType: IPv4\nports:\n- {{name: http, port: {TARGET_PORT}, protocol: TCP}}\n"
                    f"endpoints:\n{endpoints}")
    return "---\n".join(docs)


def expected(n: int) -> dict[str, list[str]]:
    return {f"{service_ip(i)}:{PORT}/TCP": sorted(f"{ip}:{TARGET_PORT}" for ip in backend_ips(i))
            for i in range(n)}


def kernel_frontends(data_dir: Path) -> dict[str, list[str]]:
    """Frontend -> slot backends of node-1's lb4 maps (``ciliary bpf lb list``)."""
    result = ciliary("bpf", "lb", "list", "-o", "json", data_dir=data_dir, check=False, timeout=60)
    if result.returncode != 0:
        return {}
    nodes = json.loads(result.stdout)
    rows = next((node["rows"] for node in nodes if node.get("node", "").endswith("node-1")),
                nodes[0]["rows"] if nodes else [])
    return {row["frontend"].upper(): sorted(row["backends"]) for row in rows}


def pid_of(data_dir: Path, process: str) -> int:
    state = config.read_instance(data_dir)
    assert state is not None, "no instance recorded"
    return next(p.pid for p in state.processes if p.name == process)


@pytest.mark.parametrize("victim", ["servicelb", "node/node-1"])
def test_kill_during_a_burst_converges_to_the_applied_state(tmp_path: Path, cluster_name: str,
                                                            victim: str) -> None:
    with embedded_instance(tmp_path / "instance", cluster_name, nodes=1, cluster_id=31) as data_dir:
        path = tmp_path / "burst.yaml"
        path.write_text(manifests(SERVICES))
        want = expected(SERVICES)
        apply = subprocess.Popen(
            [sys.executable, "-m", "ciliary.cli", "apply", "-f", str(path)],
            env={**os.environ, "CILIARY_DATA_DIR": str(data_dir)}, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # the burst is reaching the kernel: some frontends are there, not all of them
            partial = wait_for(lambda: 0 < len(kernel_frontends(data_dir)) < SERVICES or None, 120,
                               "the first frontends of the burst in the kernel", interval=0.05)
            assert partial
            killed = pid_of(data_dir, victim)
            os.kill(killed, signal.SIGKILL)
            out, _ = apply.communicate(timeout=300)
            assert apply.returncode == 0, out
        finally:
            if apply.poll() is None:
                apply.kill()
                apply.wait()
        wait_for(lambda: pid_of(data_dir, victim) != killed or None, 60, f"{victim} restarted")
        deadline = time.monotonic() + 300
        got: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            got = kernel_frontends(data_dir)
            if got == want:
                break
            time.sleep(1.0)
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(fe for fe in set(want) & set(got) if want[fe] != got[fe])
        assert not (missing or extra or wrong), (
            f"after killing {victim}: {len(missing)} frontends missing (e.g. {missing[:3]}), "
            f"{len(extra)} extra (e.g. {extra[:3]}), {len(wrong)} with other backends (e.g. {wrong[:3]})")
