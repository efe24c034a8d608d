"""deploy/'s shape on real processes: a three-server NATS JetStream cluster (as the
StatefulSet runs it, here on loopback ports), a service configured as the Deployment
configures it (every server in CILIARY_NATS_URL, CILIARY_JS_REPLICAS=3, the HTTP health
port), its buckets created with three copies, its readiness probe following its health
and surviving the loss of one NATS server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ciliary import config, schema
from ciliary.supervisor import free_port, nats_server_binary

from .conftest import http_get, run_cli, service_process, wait_until


def _nats_cluster(tmp_path: Path, procs: list) -> tuple[list[int], list[int], list[subprocess.Popen[bytes]]]:
    clients, routes, monitors = ([free_port() for _ in range(3)] for _ in range(3))
    servers = []
    for i in range(3):
        conf = tmp_path / f"nats-{i}.conf"
        conf.write_text("\n".join([
            f"listen: 127.0.0.1:{clients[i]}", f"http: 127.0.0.1:{monitors[i]}", f"server_name: nats-{i}",
            "jetstream {", f"  store_dir: {tmp_path / f'js-{i}'}", "}",
            "cluster {", "  name: ciliary-test", f"  listen: 127.0.0.1:{routes[i]}",
            "  routes: [", *[f"    nats-route://127.0.0.1:{p}" for p in routes], "  ]", "}", ""]))
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        servers.append(proc)
    for port in monitors:  # JetStream of the cluster is up once every server reports healthy
        wait_until(lambda port=port: http_get(f"http://127.0.0.1:{port}/healthz?js-enabled-only=true")[0] == 200,
                   30, f"nats monitor {port}")
    for port in monitors:  # and its meta leader is elected (streams can be created)
        wait_until(lambda port=port: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 60,
                   f"JetStream cluster current on monitor {port}")
    return clients, monitors, servers


def test_a_service_on_a_three_server_jetstream_cluster_as_deployed(tmp_path: Path, procs) -> None:
    clients, monitors, servers = _nats_cluster(tmp_path, procs)
    health = free_port()
    url = ",".join(f"nats://127.0.0.1:{p}" for p in clients)
    procs.append(service_process("identity", url, log_path=tmp_path / "identity.log", env={
        "CILIARY_JS_REPLICAS": "3", "CILIARY_HEALTH_PORT": str(health), "CILIARY_HEALTH_HOST": "127.0.0.1"}))

    readyz = f"http://127.0.0.1:{health}/readyz"
    try:  # creating R3 buckets waits on the cluster's consensus: slow on a busy machine
        wait_until(lambda: http_get(readyz)[0] == 200, 120, "identity ready")
    except AssertionError as err:
        log = (tmp_path / "identity.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"{err}; identity log ends:\n{log}") from None
    assert json.loads(http_get(readyz)[1])["service"] == "identity"
    assert http_get(f"http://127.0.0.1:{health}/livez")[0] == 200

    streams = json.loads(http_get(f"http://127.0.0.1:{monitors[0]}/jsz?streams=true&config=true")[1])
    replicas = {s["name"]: s["config"]["num_replicas"]
                for account in streams["account_details"] for s in account["stream_detail"]}
    assert {f"KV_{bucket}" for bucket in schema.ALL_BUCKETS} <= set(replicas)
    assert {replicas[f"KV_{bucket}"] for bucket in schema.ALL_BUCKETS} == {3}

    # one server goes away (a StatefulSet pod rolls): the buckets keep a quorum of two,
    # a write through the others lands, and the service (reconnected) sees it
    servers[0].terminate()
    servers[0].wait(timeout=10)
    data_dir = tmp_path / "cli"
    config.write_instance(data_dir, config.InstanceState(nats_url=url, supervisor_pid=os.getpid()))

    def applied() -> bool:
        return run_cli("apply", "-f", "-", data_dir=data_dir, timeout=30,
                       stdin="apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n").returncode == 0

    wait_until(applied, 60, "apply with one NATS server gone")

    def namespaces_seen() -> int:
        status, body = http_get(readyz)
        return json.loads(body)["detail"].get("resources", {}).get("Namespace", 0) if status == 200 else -1

    wait_until(lambda: namespaces_seen() == 1, 60, "identity sees the write after losing one NATS server")
