"""The replicated bus's server configurations, its planning in the supervisor and the
replication summary ``ciliary status`` prints."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

from ciliary import config, natscluster
from ciliary.cli import app
from ciliary.cli.instance import nats_servers_state, replication_line
from ciliary.supervisor import Supervisor, is_nats_server

PORTS = [(4001, 6001, 8001), (4002, 6002, 8002), (4003, 6003, 8003)]


def _configs(tmp_path: Path, **tls: Path) -> tuple[list[natscluster.ServerPlan], list[str]]:
    servers = natscluster.plan(tmp_path, "east", PORTS)
    texts = [natscluster.server_config(s, servers, cluster="east", password="pw0123",
                                       auth_file=tmp_path / config.NATS_AUTH_FILE, **tls)
             for s in servers]
    return servers, texts


def test_each_server_has_its_own_name_ports_store_and_claim(tmp_path: Path) -> None:
    servers, texts = _configs(tmp_path)
    assert [s.process for s in servers] == ["nats-server-1", "nats-server-2", "nats-server-3"]
    assert len({s.server_name for s in servers}) == 3
    assert len({s.store_dir for s in servers}) == 3
    assert len({s.claim_path for s in servers}) == 3
    for server, text in zip(servers, texts, strict=True):
        assert f"server_name: {server.server_name}" in text
        assert f"listen: 127.0.0.1:{server.client_port}" in text
        assert f"http: 127.0.0.1:{server.monitor_port}" in text
        assert f'store_dir: "{server.store_dir}"' in text
        assert f"listen: 127.0.0.1:{server.route_port}" in text
        assert "name: ciliary-east" in text  # one cluster name for all
        assert not re.search(r"\b0\.0\.0\.0\b", text)  # loopback only


def test_every_server_routes_to_every_other_with_the_route_password(tmp_path: Path) -> None:
    servers, texts = _configs(tmp_path)
    for server, text in zip(servers, texts, strict=True):
        routes = re.findall(r"nats-route://([^:]+):([^@]+)@127\.0\.0\.1:(\d+)", text)
        assert {int(port) for _, _, port in routes} == {s.route_port for s in servers} - {server.route_port}
        assert {(user, password) for user, password, _ in routes} == {(natscluster.ROUTE_USER, "pw0123")}
        assert f'authorization {{ user: {natscluster.ROUTE_USER}, password: "pw0123" }}' in text


def test_every_server_includes_the_instances_client_authorization(tmp_path: Path) -> None:
    servers, texts = _configs(tmp_path)
    for server, text in zip(servers, texts, strict=True):
        (included,) = re.findall(r'^include "([^"]+)"$', text, re.MULTILINE)
        assert (server.config_path.parent / included).resolve() == (tmp_path / config.NATS_AUTH_FILE).resolve()
        assert "tls {" not in text


def test_tls_puts_the_instance_certificate_on_every_client_port(tmp_path: Path) -> None:
    _, texts = _configs(tmp_path, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")
    for text in texts:
        assert f'cert_file: "{tmp_path / "server.pem"}"' in text
        assert f'key_file: "{tmp_path / "server.key"}"' in text


def test_the_client_url_lists_every_server_in_order(tmp_path: Path) -> None:
    servers = natscluster.plan(tmp_path, "east", PORTS)
    assert natscluster.client_url(servers, tls=False) == \
        "nats://127.0.0.1:4001,nats://127.0.0.1:4002,nats://127.0.0.1:4003"
    assert natscluster.client_url(servers, tls=True).split(",")[2] == "tls://127.0.0.1:4003"


@pytest.mark.parametrize(("replicas", "error"), [
    (1, ""), (3, ""), (5, ""), (0, "between 1 and 5"), (6, "between 1 and 5"), (2, "quorum"),
])
def test_replica_counts(replicas: int, error: str) -> None:
    assert (error in natscluster.replicas_error(replicas)) if error else natscluster.replicas_error(replicas) == ""


def test_route_passwords_are_fresh() -> None:
    assert natscluster.route_password() != natscluster.route_password()


def test_the_supervisor_plans_three_servers_and_hands_every_child_all_of_them(tmp_path: Path) -> None:
    supervisor = Supervisor(data_dir=tmp_path, nodes=1, cluster="east", nats_replicas=3)
    supervisor._plan_nats()
    supervisor._plan_children()
    nats = [c for c in supervisor.children if is_nats_server(c.name)]
    assert [c.name for c in nats] == ["nats-server-1", "nats-server-2", "nats-server-3"]
    for child, server in zip(nats, supervisor.nats_servers, strict=True):
        assert child.argv[1:] == ["-c", str(server.config_path)]
    services = [c for c in supervisor.children if not is_nats_server(c.name)]
    assert {c.name for c in services} >= {"identity", "policy", "node/node-1"}
    for child in services:
        assert child.env[config.ENV_NATS_URL].count(",") == 2
        assert child.env[config.ENV_JS_REPLICAS] == "3"


def test_a_single_server_keeps_its_name_and_one_copy(tmp_path: Path) -> None:
    supervisor = Supervisor(data_dir=tmp_path, nodes=1, nats_port=4222)
    supervisor._plan_nats()
    supervisor._plan_children()
    assert [c.name for c in supervisor.children if is_nats_server(c.name)] == ["nats-server"]
    identity = next(c for c in supervisor.children if c.name == "identity")
    assert identity.env[config.ENV_NATS_URL] == "nats://127.0.0.1:4222"
    assert identity.env[config.ENV_JS_REPLICAS] == "1"


def test_each_server_holds_only_its_own_store_claim(tmp_path: Path) -> None:
    supervisor = Supervisor(data_dir=tmp_path, nodes=0, cluster="c" + secrets.token_hex(3),
                            nats_replicas=3)
    supervisor._plan_nats()
    supervisor.claim()
    try:
        supervisor._plan()
        by_name = {c.name: set(c.keep_fds) for c in supervisor.children}
        stores = supervisor.store_claims
        assert set(stores) == {"nats-server-1", "nats-server-2", "nats-server-3"}
        for name, fd in stores.items():
            assert fd in by_name[name]
            assert not ({*stores.values()} - {fd}) & by_name[name]
        assert not set(stores.values()) & by_name["identity"]
        assert set(supervisor.claims) <= by_name["identity"]
    finally:
        for fd in (*supervisor.claims, *supervisor.store_claims.values()):
            os.close(fd)


def _jsz(leader_of: dict[str, str], current: dict[str, list[str]], me: str) -> dict:
    """A /jsz answer of server ``me``; streams it leads list their other copies."""
    details = []
    for stream, leader in leader_of.items():
        others = [n for n in ("s1", "s2", "s3") if n != leader]
        details.append({"name": stream, "config": {"num_replicas": 3}, "cluster": {
            "leader": leader,
            "replicas": [{"name": n, "current": n in current.get(stream, others) if me == leader else False}
                         for n in others]}})
    return {"meta_cluster": {"leader": "s2"}, "account_details": [{"stream_detail": details}]}


def test_the_replication_summary_trusts_each_streams_leader_only() -> None:
    leaders = {"KV_resources": "s1", "KV_policy": "s3"}
    current = {"KV_policy": ["s2"]}  # s1 lags behind on KV_policy
    answers = {me: _jsz(leaders, current, me) for me in ("s1", "s2", "s3")}
    summary = natscluster.replication_summary(answers)
    assert summary["meta_leader"] == "s2"
    assert summary["fully_replicated"] == 1
    by_name = {s["name"]: s for s in summary["streams"]}
    assert by_name["KV_resources"]["current"] == 3 and by_name["KV_resources"]["behind"] == []
    assert by_name["KV_policy"]["current"] == 2 and by_name["KV_policy"]["behind"] == ["s1"]


def test_a_stream_whose_leader_did_not_answer_is_not_counted_replicated() -> None:
    leaders = {"KV_resources": "s1"}
    answers = {me: _jsz(leaders, {}, me) for me in ("s2", "s3")}  # s1 is down
    summary = natscluster.replication_summary(answers)
    assert summary["fully_replicated"] == 0
    assert summary["streams"][0]["leader"] == ""


@pytest.mark.parametrize(("args", "words"), [
    (["--nats-replicas", "2"], "--nats-replicas: 2 servers cannot keep a quorum"),
    (["--nats-replicas", "0"], "--nats-replicas: must be between 1 and 5, not 0"),
    (["--nats-replicas", "7"], "--nats-replicas: must be between 1 and 5, not 7"),
    (["--nats-replicas", "3", "--nats-port", "4222"], "--nats-port: a replicated bus"),
])
def test_up_refuses_a_bus_it_cannot_run_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                        words: str) -> None:
    monkeypatch.delenv("CILIARY_CLUSTER_CIDR", raising=False)
    monkeypatch.delenv("CILIARY_SERVICE_CIDR", raising=False)
    with pytest.raises(SystemExit) as done:
        app.main(["up", "-d", "--data-dir", str(tmp_path / "data"), "--cluster", "east", *args])
    err = capsys.readouterr().err
    assert done.value.code == 1 and words in err, err
    assert "Traceback" not in err and not (tmp_path / "data").exists()


def test_the_replication_line_names_what_is_not_current() -> None:
    summary = {"fully_replicated": 1, "streams": [
        {"name": "KV_a", "replicas": 3, "leader": "s1", "current": 3, "behind": []},
        {"name": "KV_b", "replicas": 3, "leader": "s2", "current": 2, "behind": ["s3"]},
        {"name": "KV_c", "replicas": 3, "leader": "", "current": 0, "behind": []},
    ]}
    assert replication_line(3, summary) == \
        "replication: 1 of 3 streams with all 3 copies current; 1 electing a leader; behind: s3"


def test_a_single_server_instance_has_no_server_table() -> None:
    state = config.InstanceState(nats_url="nats://127.0.0.1:4222", supervisor_pid=1)
    assert nats_servers_state(state) == ([], {})
