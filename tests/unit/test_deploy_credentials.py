"""deploy/ and NATS credentials: every pod that talks to NATS mounts the Secret of exactly
its own user and names it with CILIARY_NATS_CREDS; no seed or Secret is in the manifests;
the credential set written by ``python -m ciliary.deploy credentials`` fills exactly the
Secrets the manifests mount; the init container refuses another user's credential."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import msgspec
import pytest
import yaml

from ciliary import config, natsauth, natscreds, schema
from ciliary.deploy import credentials
from ciliary.deploy.__main__ import main as deploy_main
from ciliary.deploy.credinstall import main as credinstall_main
from ciliary.deploy.manifests import CREDS_DIR, NODE_CREDS_MOUNT, SERVICES

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "manifests"
OBJECTS = [d for p in sorted(MANIFESTS.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
NATS_CLIENT_KINDS = ("Deployment", "DaemonSet", "Job")


def _workloads(*kinds: str) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in OBJECTS if o["kind"] in kinds}


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _secret_volumes(spec: dict) -> dict[str, dict]:
    return {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}


def _user_of(name: str) -> str:
    """The NATS user a workload runs as."""
    kind, obj = name.split("/")
    if kind == "Job":
        return natsauth.ADMIN
    return obj.removeprefix("ciliary-")


def test_every_deployment_and_the_job_mount_exactly_their_own_credential() -> None:
    seen = {}
    for name, obj in _workloads("Deployment", "Job").items():
        user = _user_of(name)
        spec = obj["spec"]["template"]["spec"]
        secrets = _secret_volumes(spec)
        (volume, secret), = secrets.items()  # one Secret, its own
        key = credentials.credential_file(user)
        assert secret["secretName"] == credentials.secret_name(user) == f"ciliary-nats-{user}", name
        assert secret["items"] == [{"key": key, "path": key}], name
        creds_dir = next(v for v in spec["volumes"] if v["name"] == "nats-creds")
        assert creds_dir["emptyDir"]["medium"] == "Memory", name  # the seed never reaches a node's disk
        (init,) = spec["initContainers"]
        assert init["command"][:5] == ["python", "-m", "ciliary.deploy.credinstall", "--user", user], name
        (main,) = spec["containers"]
        path = _env(main)[config.ENV_NATS_CREDS]
        assert path == f"{CREDS_DIR}/{key}" == init["command"][-1], name
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert volume not in mounts, name  # the service itself never sees the Secret volume
        assert mounts["nats-creds"]["readOnly"] is True and mounts["nats-creds"]["mountPath"] == CREDS_DIR
        # the init container reads the group-readable Secret as the pod's fsGroup
        assert spec["securityContext"]["fsGroup"] == init["securityContext"]["runAsUser"] == \
            main["securityContext"]["runAsUser"], name
        seen[secret["secretName"]] = name
    assert set(seen) == {credentials.secret_name(u) for u in (*SERVICES, natsauth.ADMIN)}


def test_the_node_executor_reads_its_own_nodes_credential() -> None:
    (ds,) = _workloads("DaemonSet").values()
    spec = ds["spec"]["template"]["spec"]
    assert _secret_volumes(spec) == {"nats-creds": {"secretName": credentials.NODES_SECRET, "defaultMode": 0o400}}
    (container,) = spec["containers"]
    names = [e["name"] for e in container["env"]]
    env = _env(container)
    # Kubernetes expands $(CILIARY_NODE) only from a variable defined before
    assert names.index(config.ENV_NODE) < names.index(config.ENV_NATS_CREDS)
    assert names.index(config.ENV_NODE) < names.index(config.ENV_INSTANCE)
    node = "worker-7"

    def expand(value: str) -> str:
        return value.replace(f"$({config.ENV_NODE})", node)

    assert expand(env[config.ENV_NATS_CREDS]) == f"{NODE_CREDS_MOUNT}/node-{node}.json"
    assert {m["name"]: m.get("readOnly") for m in container["volumeMounts"]}["nats-creds"] is True
    user = next(u for u in credentials.deploy_users("default", [node]) if u.name == natsauth.node_user(node))
    # its instance name is the one its user answers health under
    assert natsauth.may_subscribe(user, schema.SUBJECT_HEALTH.format(instance=expand(env[config.ENV_INSTANCE])))
    # the install-cni init container does not talk to NATS and mounts nothing secret
    assert all(m["name"] != "nats-creds" for m in spec["initContainers"][0]["volumeMounts"])


def test_every_container_configured_for_nats_has_a_credential() -> None:
    for name, obj in _workloads(*NATS_CLIENT_KINDS).items():
        for container in obj["spec"]["template"]["spec"]["containers"]:
            if {"configMapRef": {"name": "ciliary-config"}} in container.get("envFrom", []):
                assert config.ENV_NATS_CREDS in _env(container), (name, container["name"])


def test_nats_includes_the_authorization_from_its_secret() -> None:
    (sts,) = _workloads("StatefulSet").values()
    spec = sts["spec"]["template"]["spec"]
    assert _secret_volumes(spec) == {"auth": {"secretName": credentials.AUTH_SECRET, "defaultMode": 0o440,
                                              "items": [{"key": "auth.conf", "path": "auth.conf"},
                                                        {"key": "cluster.conf", "path": "cluster.conf"}]}}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/nats-auth", "readOnly": True}
    assert mounts["config"]["mountPath"] == "/etc/nats"
    conf = next(o for o in OBJECTS if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "ciliary-nats-config")
    # nats-server resolves an include against the including file's directory
    assert "include ../nats-auth/auth.conf" in conf["data"]["nats.conf"].splitlines()
    assert "  include ../nats-auth/cluster.conf" in conf["data"]["nats.conf"].splitlines()
    assert "authorization" not in conf["data"]["nats.conf"] and "password" not in conf["data"]["nats.conf"]


def test_the_routes_and_their_password_are_written_with_the_credentials(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "creds"
    assert deploy_main(["credentials", "--nodes", "n1", "--out", str(out)]) == 0
    assert f"--from-file={out}/auth.conf --from-file={out}/cluster.conf" in capsys.readouterr().out
    cluster = out / "cluster.conf"
    assert stat.S_IMODE(cluster.stat().st_mode) == 0o600
    text = cluster.read_text()
    (password,) = set(re.findall(r'password: "([^"]+)"', text))
    assert len(password) >= 32
    routes = re.findall(r"nats-route://(\S+)", text)
    assert routes == [f"ciliary-route:{password}@ciliary-nats-{i}.ciliary-nats.ciliary-system.svc:6222"
                      for i in range(3)]
    assert all(password not in p.read_text() for p in MANIFESTS.glob("*.yaml"))
    # a new set, a new password
    assert deploy_main(["credentials", "--nodes", "n1", "--out", str(out)]) == 0
    assert password not in cluster.read_text()
    capsys.readouterr()
    # one server: no routes, no cluster file
    single = tmp_path / "single.yaml"
    single.write_text("nats: {replicas: 1}\n")
    assert deploy_main(["credentials", "--values", str(single), "--nodes", "n1", "--out", str(tmp_path / "one")]) == 0
    assert "cluster.conf" not in capsys.readouterr().out and not (tmp_path / "one" / "cluster.conf").exists()
    with pytest.raises(ValueError, match="route password"):
        credentials.cluster_authorization('x"}', ["h:6222"])


SEED = re.compile(r"\bS[UOA][A-Z2-7]{50,}")
PUBLIC_KEY = re.compile(r"\bU[A-Z2-7]{55}\b")


def test_no_secret_or_seed_is_in_the_manifests() -> None:
    assert not [o for o in OBJECTS if o["kind"] == "Secret"]
    for path in MANIFESTS.glob("*.yaml"):
        text = path.read_text()
        assert not SEED.search(text) and not PUBLIC_KEY.search(text), path
        assert "\"seed\"" not in text and "seed:" not in text, path
    # the pattern would find one
    seed = natscreds.new_seed()
    assert SEED.search(f"x: {seed}") and PUBLIC_KEY.search(natscreds.public_key(seed))


def test_the_credential_set_fills_exactly_the_secrets_the_manifests_mount(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "creds"
    assert deploy_main(["credentials", "--nodes", "n1,n2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    created = dict(re.findall(r"create secret generic (\S+) (.+?) --dry-run", printed))
    mounted = {s["secretName"] for o in _workloads(*NATS_CLIENT_KINDS, "StatefulSet").values()
               for s in _secret_volumes(o["spec"]["template"]["spec"]).values()}
    assert set(created) == mounted
    for secret, sources in created.items():
        files = [Path(f.removeprefix("--from-file=")) for f in sources.split()]
        for file in files:
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        if secret == credentials.NODES_SECRET:
            assert [f.name for f in files] == ["node-n1.json", "node-n2.json"]
        elif secret != credentials.AUTH_SECRET:
            (file,) = files
            assert natscreds.read_credential(file).user == secret.removeprefix("ciliary-nats-")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    # the server knows every user by its public key, never by its seed
    auth = (out / "auth.conf").read_text()
    for file in out.glob("*.json"):
        cred = natscreds.read_credential(file)
        assert natscreds.public_key(cred.seed) in auth and cred.seed not in auth


def test_a_service_user_answers_health_under_any_pod_name() -> None:
    users = {u.name: u for u in credentials.deploy_users("default", ["n1"])}
    pod = "ciliary-identity-6b7f9c8d4-x2k9p"
    assert natsauth.may_subscribe(users["identity"], schema.SUBJECT_HEALTH.format(instance=pod))
    assert natsauth.may_subscribe(users["identity"], f"{schema.SUBJECT_HEALTH_ALL}.identity.{pod}")
    # the embedded table names the one process after its service: a pod name is refused there
    assert not natsauth.may_subscribe(natsauth.service_user("identity", "default"),
                                      schema.SUBJECT_HEALTH.format(instance=pod))
    # only the instance differs from the embedded table: writes stay where they were
    for name in natsauth.SERVICES:
        assert users[name].publish == natsauth.service_user(name, "default").publish, name
    assert not natsauth.may_publish(users["node-n1"], f"$KV.{schema.BUCKET_POLICY}.id.1")
    assert not natsauth.may_publish(users["identity"], f"$KV.{schema.BUCKET_POLICY}.id.1")


@pytest.mark.parametrize("nodes", ["", "a.b", "N1", "n1,*", "n1,>"])
def test_a_bad_node_list_is_refused(nodes: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy_main(["credentials", "--nodes", nodes, "--out", str(tmp_path / "c")]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _secret_file(tmp_path: Path, cred: config.NatsCredential) -> Path:
    src = tmp_path / "secret" / f"{cred.user}.json"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(msgspec.json.encode(cred))
    src.chmod(0o440)  # as the kubelet leaves a Secret file with fsGroup
    return src


def test_the_init_container_installs_the_credential_mode_0600(tmp_path: Path) -> None:
    cred = config.NatsCredential(user="identity", seed=natscreds.new_seed(), inbox_prefix="_INBOX.identity")
    src = _secret_file(tmp_path, cred)
    with pytest.raises(natscreds.CredentialError, match="readable by others"):
        natscreds.read_credential(src)  # why the copy exists
    dst = tmp_path / "identity.json"
    assert credinstall_main(["--user", "identity", str(src), str(dst)]) == 0
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert natscreds.read_credential(dst) == cred


def test_the_init_container_refuses_another_users_credential(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = config.NatsCredential(user="policy", seed=natscreds.new_seed(), inbox_prefix="_INBOX.policy")
    src = _secret_file(tmp_path, policy)
    dst = tmp_path / "identity.json"
    assert credinstall_main(["--user", "identity", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "field user: is 'policy', this pod runs as 'identity'" in err and str(src) in err
    assert not dst.exists() and not list(tmp_path.glob(".*.tmp"))
    bad = _secret_file(tmp_path, config.NatsCredential(user="identity", seed="SUnot-a-seed", inbox_prefix="x"))
    assert credinstall_main(["--user", "identity", str(bad), str(dst)]) == 1
    assert "field seed" in capsys.readouterr().err and not dst.exists()
    assert credinstall_main(["--user", "identity", str(tmp_path / "missing.json"), str(dst)]) == 1
    assert "missing.json" in capsys.readouterr().err
