"""The embedded instance as e2e tests drive it: through the public CLI only.

Invariants:
- ``ciliary(...)`` runs ``python -m ciliary.cli`` against one data directory and, unless
  told otherwise, fails the test naming the command and its output when it exits non-zero.
- ``embedded_instance`` brings an instance up (``ciliary up -d``) and always brings it
  down at the end, also when the test failed; then no process of it may run and
  ``leftovers`` of its cluster (namespaces, BPF pins, cgroups) must be empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ciliary import cgroups, config

from .podnet import PIN_ROOT

REPO = Path(__file__).resolve().parents[2]


def ciliary(*args: str, data_dir: Path, check: bool = True, timeout: float = 60,
            stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ciliary.cli", *args], capture_output=True, text=True, input=stdin,
        env={**os.environ, **(env or {}), "CILIARY_DATA_DIR": str(data_dir)}, cwd=REPO, timeout=timeout,
    )
    if check:
        assert result.returncode == 0, f"ciliary {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def pod_connect(data_dir: Path, pod: str, host: str, port: int,
                timeout: float = 2.0) -> subprocess.CompletedProcess[str]:
    """``ciliary exec POD -- python -m ciliary.workload connect HOST PORT``: exit 0 when the
    connection from inside the pod succeeds (never checked here)."""
    return ciliary("exec", pod, "--", sys.executable, "-m", "ciliary.workload", "connect", host, str(port),
                   "--timeout", str(timeout), data_dir=data_dir, check=False)


def cluster_cgroups(cluster: str) -> list[str]:
    """Node cgroups ``ciliary-<cluster>-*`` (socket LB) under any cgroup2 mount."""
    return [str(p) for p in cgroups.cluster_cgroups(cluster)]


def leftovers(cluster: str) -> list[str]:
    """What a cluster left behind: namespaces, its pin directory, cgroups (empty = clean)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [f"netns {line.split()[0]}" for line in listed.splitlines() if line.startswith(f"ciliary-{cluster}-")]
    if Path(PIN_ROOT, cluster).exists():
        left.append(f"pins {PIN_ROOT}/{cluster}")
    return left + [f"cgroup {c}" for c in cluster_cgroups(cluster)]


def pods_ready(data_dir: Path, expected: int) -> dict[str, dict] | None:
    """Status of every Running and Ready pod (with an IP, or in the outside world) by name,
    once there are exactly ``expected`` of them; else None."""
    items = json.loads(ciliary("get", "pods", "-o", "json", data_dir=data_dir).stdout)["items"]
    ready = {
        p["metadata"]["name"]: p["status"] for p in items
        if p.get("status", {}).get("phase") == "Running"
        and (p["status"].get("podIP") or p["status"].get("ciliary", {}).get("outsideWorld"))
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    }
    return ready if len(ready) == expected else None


@contextmanager
def embedded_instance(data_dir: Path, cluster: str, *, nodes: int, cluster_id: int,
                      env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[Path]:
    """``ciliary up -d --nodes N --cluster C --cluster-id I [args]`` for the block, then
    ``down`` and the checks of the module docstring."""
    ciliary("up", "-d", "--nodes", str(nodes), "--cluster", cluster, "--cluster-id", str(cluster_id), *args,
            data_dir=data_dir, env=env, timeout=120)
    try:
        yield data_dir
    finally:
        state = config.read_instance(data_dir)
        ciliary("down", data_dir=data_dir, env=env, check=False, timeout=120)
        if state is not None:
            assert not any(config.pid_alive(p.pid) for p in state.processes), "process left behind"
        left = leftovers(cluster)
        assert not left, f"cluster {cluster} left: {left}"
