"""A data directory keeps its state when its bus changes shape: objects applied on one
nats-server are there, with the same cluster IP, after ``--nats-replicas 3``, and back
again on one server; the store of the previous shape is removed and ``bus.json`` names
the current one. The supervisor runs without nodes (``--nodes 0``): only the NATS part."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ciliary import busmigration, config

from .conftest import run_cli, supervisor_without_nodes, wait_until

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: default, labels: {tier: backend}}
spec:
  selector: {app: payments}
  ports: [{port: 8080}]
"""


@contextmanager
def supervisor(data_dir: Path, cluster: str, replicas: int) -> Iterator[None]:
    with supervisor_without_nodes(data_dir, "--cluster", cluster, "--cluster-id", "96",
                                  "--nats-replicas", str(replicas)):
        wait_until(lambda: _healthy(data_dir), 60, f"the instance healthy on {replicas} server(s)")
        yield


def _healthy(data_dir: Path) -> bool:
    done = run_cli("status", "-o", "json", data_dir=data_dir, timeout=30)
    return done.returncode == 0 and json.loads(done.stdout).get("healthy", False)


def _service(data_dir: Path) -> dict[str, Any] | None:
    done = run_cli("get", "svc", "payments", "-o", "json", data_dir=data_dir, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _cluster_ip(data_dir: Path) -> str | None:
    svc = _service(data_dir)
    return (svc or {}).get("spec", {}).get("clusterIP") or (svc or {}).get("status", {}).get("clusterIP")


def test_state_moves_from_one_server_to_three_and_back(tmp_path: Path) -> None:
    data_dir, cluster = tmp_path / "inst", "t" + secrets.token_hex(4)
    with supervisor(data_dir, cluster, 1):
        applied = run_cli("apply", "-f", "-", data_dir=data_dir, stdin=SERVICE)
        assert applied.returncode == 0, applied.stderr
        address = wait_until(lambda: _cluster_ip(data_dir), 30, "a cluster IP for payments")
    assert json.loads((data_dir / busmigration.MARKER).read_text()) == {"replicas": 1}

    with supervisor(data_dir, cluster, 3):
        state = config.read_instance(data_dir)
        assert state is not None and state.nats_replicas == 3
        svc = _service(data_dir)
        assert svc is not None, "payments carried over to the replicated bus"
        assert svc["metadata"]["labels"] == {"tier": "backend"}
        assert wait_until(lambda: _cluster_ip(data_dir), 30, "payments' cluster IP") == address
        # a change made on the replicated bus is what comes back to one server
        relabelled = SERVICE.replace("tier: backend", "tier: payments")
        assert run_cli("apply", "-f", "-", data_dir=data_dir, stdin=relabelled).returncode == 0
    assert json.loads((data_dir / busmigration.MARKER).read_text()) == {"replicas": 3}
    assert not (data_dir / busmigration.SINGLE_STORE).exists(), "the single server's store was removed"

    with supervisor(data_dir, cluster, 1):
        svc = _service(data_dir)
        assert svc is not None and svc["metadata"]["labels"] == {"tier": "payments"}
        assert wait_until(lambda: _cluster_ip(data_dir), 30, "payments' cluster IP") == address
    assert json.loads((data_dir / busmigration.MARKER).read_text()) == {"replicas": 1}
    assert not any((data_dir / "nats-cluster" / str(i)).exists() for i in (1, 2, 3))


def test_an_unreadable_marker_is_refused_naming_the_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "inst"
    data_dir.mkdir()
    (data_dir / busmigration.MARKER).write_text("{not json")
    refused = run_cli("up", "-d", "--cluster", "t" + secrets.token_hex(4), data_dir=data_dir)
    assert refused.returncode != 0
    assert f"{data_dir / busmigration.MARKER} is unreadable" in refused.stdout + refused.stderr
    assert config.read_instance(data_dir) is None
