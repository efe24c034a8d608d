"""deploy/'s NATS security on real processes: nats-server started with the rendered
configuration, which includes the ``auth.conf`` written by ``python -m ciliary.deploy
credentials`` (laid out as the pod mounts ConfigMap and Secret); the provisioning Job's
command creating the buckets as ``admin``; a service started as its Deployment starts it
(credential copied by the init container's command, a pod name as instance) becoming
ready and answering health; another service's credential refused the service's writes.
Three servers routing with the password of the Secret's ``cluster.conf``; a server
without it refused as a route."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ciliary import config, natsauth, natscreds, schema
from ciliary.bus import Bus, BusError, PermissionDenied
from ciliary.deploy.__main__ import main as deploy_main
from ciliary.deploy.manifests import NATS_MONITOR_PORT
from ciliary.deploy.render import render_files
from ciliary.deploy.values import load_values
from ciliary.status import gather_health
from ciliary.supervisor import free_port, nats_server_binary

from .conftest import REPO, eventually, http_get, service_process, wait_until

POD = "ciliary-identity-6b7f9c8d4-x2k9p"


def _python(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **env})


def _pod_credential(tmp_path: Path, creds: Path, user: str) -> Path:
    """What a pod's init container does: the Secret's file (0440, as the kubelet leaves it
    with fsGroup) copied, 0600, to where the service reads it."""
    secret = tmp_path / "secret" / user
    secret.mkdir(parents=True)
    shutil.copy(creds / f"{user}.json", secret / f"{user}.json")
    (secret / f"{user}.json").chmod(0o440)
    run = tmp_path / "run" / user
    run.mkdir(parents=True)
    done = _python("ciliary.deploy.credinstall", "--user", user, str(secret / f"{user}.json"),
                   str(run / f"{user}.json"), env={})
    assert done.returncode == 0, done.stderr
    return run / f"{user}.json"


async def test_a_service_runs_under_its_mounted_credential_and_another_is_refused(tmp_path: Path, procs) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("nats: {replicas: 1}\n")
    files = render_files(load_values(values.read_text()))
    conf = next(d for d in yaml.safe_load_all(files["20-nats.yaml"])
                if d and d["metadata"]["name"] == "ciliary-nats-config")["data"]["nats.conf"]
    client, monitor = free_port(), free_port()
    conf = (conf.replace("port: 4222\n", f"listen: 127.0.0.1:{client}\n")
                .replace(f"http_port: {NATS_MONITOR_PORT}\n", f"http: 127.0.0.1:{monitor}\n")
                .replace("/data/jetstream", str(tmp_path / "js")))
    assert f"127.0.0.1:{client}" in conf and f"127.0.0.1:{monitor}" in conf
    (tmp_path / "nats").mkdir()
    (tmp_path / "nats" / "nats.conf").write_text(conf)
    creds = tmp_path / "nats-auth"  # the Secret ciliary-nats-auth is mounted beside the config
    assert deploy_main(["credentials", "--values", str(values), "--nodes", "n1", "--out", str(creds)]) == 0
    log = tmp_path / "nats-server.log"
    with open(log, "ab") as out:
        procs.append(subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "nats" / "nats.conf")],
                                      stdout=out, stderr=subprocess.STDOUT,
                                      env={**os.environ, "SERVER_NAME": "ciliary-nats-0"}))
    wait_until(lambda: http_get(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true")[0] == 200, 15, "nats-server")
    url = f"nats://127.0.0.1:{client}"

    with pytest.raises(BusError, match="without credential"):
        await Bus.connect(url, "anonymous", allow_reconnect=False)

    # the provisioning Job, as admin
    provisioned = _python("ciliary.deploy.provision", "--timeout", "20", env={
        config.ENV_NATS_URL: url, config.ENV_NATS_CREDS: str(_pod_credential(tmp_path, creds, natsauth.ADMIN)),
        "CILIARY_JS_REPLICAS": "1"})
    assert provisioned.returncode == 0, provisioned.stderr

    health = free_port()
    identity_log = tmp_path / "identity.log"
    procs.append(service_process("identity", url, log_path=identity_log, instance=POD, env={
        config.ENV_NATS_CREDS: str(_pod_credential(tmp_path, creds, "identity")),
        "CILIARY_JS_REPLICAS": "1", "CILIARY_HEALTH_PORT": str(health), "CILIARY_HEALTH_HOST": "127.0.0.1"}))
    wait_until(lambda: http_get(f"http://127.0.0.1:{health}/readyz")[0] == 200, 30, "identity ready")
    assert json.loads(http_get(f"http://127.0.0.1:{health}/readyz")[1])["service"] == "identity"

    cli = await Bus.connect(url, "test-cli", allow_reconnect=False,
                            credential=natscreds.read_credential(creds / "cli.json"))
    policy = await Bus.connect(url, "test-policy", allow_reconnect=False,
                               credential=natscreds.read_credential(creds / "policy.json"))
    try:
        async def answered() -> list[schema.HealthReport]:  # over NATS, under its pod name
            return [r for r in await gather_health(cli, timeout=0.5) if r.instance == POD and r.healthy]

        await eventually(answered, timeout=10, what="identity answering health under its pod name")
        # the policy service's credential may not write what identity writes
        with pytest.raises(PermissionDenied, match=r"NATS user policy may not publish to \$KV\.identities"):
            await policy.kv_put(schema.BUCKET_IDENTITIES, "id.70000", b"forged")
        with pytest.raises(PermissionDenied, match="resources"):
            await policy.kv_put(schema.BUCKET_RESOURCES, "Namespace._.forged", b"{}")
        assert await cli.kv_get(schema.BUCKET_IDENTITIES, "id.70000") is None
        await policy.kv_put(schema.BUCKET_POLICY, "probe", b"own bucket")  # its own writes land
    finally:
        await policy.close()
        await cli.close()
    text = identity_log.read_text()
    assert "NATS refused" not in text and "Violation" not in text, text[-2000:]


def test_the_servers_route_with_the_password_of_the_secret_and_a_stranger_is_refused(tmp_path: Path, procs) -> None:
    """Three servers as the StatefulSet runs them (here on 127.0.0.2-4 with free ports):
    the rendered configuration with the Secret's ``auth.conf`` and ``cluster.conf`` forms a
    JetStream cluster; a server without the route password is refused as a route."""
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    values = tmp_path / "values.yaml"
    values.write_text(f"nats: {{hostAddresses: [{', '.join(hosts)}]}}\n")
    conf = next(d for d in yaml.safe_load_all(render_files(load_values(values.read_text()))["20-nats.yaml"])
                if d and d["metadata"]["name"] == "ciliary-nats-config")["data"]["nats.conf"]
    client, monitor, route = free_port(), free_port(), free_port()
    auth = tmp_path / "auth"
    assert deploy_main(["credentials", "--values", str(values), "--nodes", "n1", "--out", str(auth)]) == 0
    cluster = (auth / "cluster.conf").read_text()
    assert cluster.count(":6222") == 3
    (auth / "cluster.conf").write_text(cluster.replace(":6222", f":{route}"))
    logs = []
    for i, host in enumerate(hosts):
        server = tmp_path / f"s{i}"
        (server / "nats").mkdir(parents=True)
        shutil.copytree(auth, server / "nats-auth")  # the Secret, mounted beside the config
        lines = conf.replace("/data/jetstream", str(server / "js")).splitlines()
        wired = {"port: 4222": f"listen: {host}:{client}", "http_port: 8222": f"http: {host}:{monitor}",
                 "  port: 6222": f"  listen: {host}:{route}"}
        assert set(wired) <= set(lines)
        (server / "nats" / "nats.conf").write_text("\n".join(wired.get(line, line) for line in lines) + "\n")
        logs.append(server / "nats-server.log")
        with open(logs[-1], "ab") as out:
            procs.append(subprocess.Popen([nats_server_binary(), "-c", str(server / "nats" / "nats.conf")],
                                          stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, "SERVER_NAME": f"ciliary-nats-{i}"}))
    for host in hosts:
        wait_until(lambda host=host: http_get(f"http://{host}:{monitor}/healthz?js-enabled-only=true")[0] == 200,
                   30, f"JetStream of {host}")

    def peers(host: str) -> set[str]:
        status, body = http_get(f"http://{host}:{monitor}/routez")
        return {r.get("remote_name", "") for r in json.loads(body)["routes"]} if status == 200 else set()

    wait_until(lambda: all(peers(h) == {f"ciliary-nats-{j}" for j in range(3)} - {f"ciliary-nats-{i}"}
                           for i, h in enumerate(hosts)), 20, "every server routed to the two others")
    jsz = json.loads(http_get(f"http://{hosts[0]}:{monitor}/jsz")[1])
    assert jsz["meta_cluster"]["cluster_size"] == 3

    assert "Authentication Failure" not in logs[0].read_text(errors="replace")
    # a server that knows the routes but not the password
    stranger = tmp_path / "stranger.conf"
    stranger.write_text("\n".join([
        "server_name: stranger", f"listen: 127.0.0.5:{client}", "cluster {", "  name: ciliary-default",
        f"  listen: 127.0.0.5:{route}", f"  routes: [nats-route://ciliary-route:guessed@{hosts[0]}:{route}]",
        "}", ""]))
    with open(tmp_path / "stranger.log", "ab") as out:
        procs.append(subprocess.Popen([nats_server_binary(), "-c", str(stranger)], stdout=out,
                                      stderr=subprocess.STDOUT))
    wait_until(lambda: "Authentication Failure" in logs[0].read_text(errors="replace"), 15,
               "the stranger's route refused")
    assert "stranger" not in peers(hosts[0])
