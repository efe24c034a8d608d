"""NATS authentication against a real nats-server: every user of ``ciliary.natsauth`` can do
what its process needs and is refused the rest, as a clear error; wrong or missing
credentials are refused and logged; services run under their own credential."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from ciliary import config, natsauth, natscreds, natstls, schema
from ciliary.bus import Bus, BusError, PermissionDenied, PutManyError
from ciliary.status import gather_health
from ciliary.supervisor import free_port, nats_server_binary
from tests.integration.conftest import eventually, service_process, stop_processes, wait_listening

CLUSTER = "tauth"
NODES = ["node-1", "node-2"]


@dataclass
class SecuredNats:
    url: str
    creds: dict[str, Path]
    log: Path

    def credential(self, user: str) -> config.NatsCredential:
        return natscreds.read_credential(self.creds[user])

    async def connect(self, user: str) -> Bus:
        return await Bus.connect(self.url, f"test-{user}", allow_reconnect=False,
                                 credential=self.credential(user))


@contextmanager
def running_secured_nats(tmp_path: Path, *, tls: bool = False) -> Iterator[SecuredNats]:
    """nats-server with the authorization block ``ciliary up`` writes (and, with ``tls``,
    the certificates ``up --nats-tls`` makes), buckets provisioned."""
    auth = tmp_path / "nats-auth.conf"
    certs = natstls.write_certificates(tmp_path / "tls") if tls else None
    creds = natscreds.write_instance_credentials(tmp_path / "creds", auth, natsauth.users(CLUSTER, NODES),
                                                 tls_ca=str(certs.ca) if certs else "")
    port = free_port()
    log = tmp_path / "nats-server.log"
    tls_args = ["--tls", "--tlscert", str(certs.cert), "--tlskey", str(certs.key)] if certs else []
    with open(log, "ab") as out:
        proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js",
                                 "-sd", str(tmp_path / "nats"), "-c", str(auth), *tls_args],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_listening(port), log.read_text()
        server = SecuredNats(f"{'tls' if tls else 'nats'}://127.0.0.1:{port}", creds, log)

        async def provision() -> None:
            bus = await server.connect(natsauth.ADMIN)
            try:
                await bus.ensure_buckets()
            finally:
                await bus.close()

        asyncio.run(provision())
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[SecuredNats]:
    with running_secured_nats(tmp_path) as server:
        yield server


@pytest.fixture
async def buses(secured_nats: SecuredNats) -> AsyncIterator[dict[str, Bus]]:
    """One connection per user."""
    opened: dict[str, Bus] = {}
    for user in (natsauth.CLI, "identity", "policy", "servicelb", "mesh", natsauth.OBSERVER,
                 natsauth.REMOTE, natsauth.node_user("node-1")):
        opened[user] = await secured_nats.connect(user)
    yield opened
    for bus in opened.values():
        await bus.close()


def test_credential_files_are_private(secured_nats: SecuredNats, tmp_path: Path) -> None:
    assert stat.S_IMODE((tmp_path / "creds").stat().st_mode) == 0o700
    for path in [*secured_nats.creds.values(), tmp_path / "nats-auth.conf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server_block = (tmp_path / "nats-auth.conf").read_text()
    for user, path in secured_nats.creds.items():  # public keys only
        credential = natscreds.read_credential(path)
        assert credential.seed not in server_block and natscreds.public_key(credential.seed) in server_block, user
    leaked = secured_nats.creds["cli"]
    os.chmod(leaked, 0o644)
    with pytest.raises(natscreds.CredentialError, match="readable by others"):
        natscreds.read_credential(leaked)


async def test_each_user_does_its_job(buses: dict[str, Bus]) -> None:
    node = buses[natsauth.node_user("node-1")]
    # the CLI writes resources; every service reads them
    await buses["cli"].kv_put(schema.BUCKET_RESOURCES, "Namespace._.shop", b"{}")
    for user in ("identity", "policy", "servicelb", "mesh", natsauth.node_user("node-1")):
        assert "Namespace._.shop" in await buses[user].kv_list(schema.BUCKET_RESOURCES), user
    # each service writes its own buckets
    await buses["identity"].kv_put(schema.BUCKET_IDENTITIES, "id.1000", b"x", last_revision=0)
    await buses["policy"].kv_put_many(schema.BUCKET_POLICY, [("id.1000", b"p", None)])
    await buses["servicelb"].kv_put(schema.BUCKET_STATUS, "Service.shop.web", b"s")
    await buses["mesh"].kv_put(schema.BUCKET_MESH_EXPORT, "cluster", b"m")
    await node.kv_put(schema.BUCKET_STATUS, "Pod.shop.web", b"s")
    await node.kv_put(schema.BUCKET_RESOURCES, "Node._.node-1", b"n", last_revision=0)
    # ... and reads what it consumes
    assert (await node.kv_get(schema.BUCKET_POLICY, "id.1000")).value == b"p"
    assert set(await buses[natsauth.REMOTE].kv_list(schema.BUCKET_MESH_EXPORT)) == {"cluster"}
    # requests and replies go through each user's own inbox
    answered = asyncio.Event()

    async def explain(msg) -> None:  # noqa: ANN001 — a bus Message
        await msg.respond(b"ok")
        answered.set()

    await buses["identity"].subscribe_raw(schema.SUBJECT_IDENTITY_EXPLAIN, explain)

    async def asked() -> bool:  # until the subscription has reached the server
        return await buses["cli"].request_many(schema.SUBJECT_IDENTITY_EXPLAIN, b"{}", timeout=0.3) == [b"ok"]

    await eventually(asked, timeout=5, what="the CLI's request answered by identity")
    assert answered.is_set()


async def test_what_a_user_must_not_do_is_refused_clearly(buses: dict[str, Bus]) -> None:
    node = buses[natsauth.node_user("node-1")]
    started = time.monotonic()
    with pytest.raises(PermissionDenied, match=r"NATS user node-node-1 may not publish to \$KV\.policy\.id\.1"):
        await node.kv_put(schema.BUCKET_POLICY, "id.1", b"allow-all")
    assert time.monotonic() - started < 2.0  # refused at once, not after a timeout
    with pytest.raises(PermissionDenied, match="Node._.node-2"):
        await node.kv_put(schema.BUCKET_RESOURCES, "Node._.node-2", b"n")
    with pytest.raises(PermissionDenied):
        await node.kv_delete(schema.BUCKET_IDENTITIES, "id.1000")
    # the CLI writes sources only, one key or many
    with pytest.raises(PermissionDenied, match="identities"):
        await buses["cli"].kv_put(schema.BUCKET_IDENTITIES, "id.1", b"x")
    with pytest.raises(PutManyError) as many:
        await buses["cli"].kv_put_many(schema.BUCKET_POLICY, [(f"id.{i}", b"x", None) for i in range(5)])
    assert all(isinstance(e, PermissionDenied) for e in many.value.failed.values())
    assert not many.value.written
    # the read-only users read only what they are given
    with pytest.raises(BusError, match="permission denied"):
        await buses[natsauth.OBSERVER].kv_list(schema.BUCKET_RESOURCES)
    with pytest.raises(BusError, match="permission denied"):
        await buses[natsauth.REMOTE].kv_get(schema.BUCKET_POLICY, "id.1")
    with pytest.raises(PermissionDenied):
        await buses[natsauth.REMOTE].kv_put(schema.BUCKET_MESH_EXPORT, "cluster", b"forged")
    # nothing refused was stored, and every connection still works
    assert await buses["cli"].kv_list(schema.BUCKET_POLICY) == {}
    assert await buses["cli"].kv_get(schema.BUCKET_RESOURCES, "Node._.node-2") is None
    for user, bus in buses.items():
        assert bus.connected, user
    await node.kv_put(schema.BUCKET_STATUS, "Pod.shop.web", b"after")
    assert node.denials >= 3


async def test_wrong_or_missing_credentials_are_refused_and_logged(secured_nats: SecuredNats) -> None:
    with pytest.raises(BusError, match="refused a connection without credential"):
        await Bus.connect(secured_nats.url, "anonymous", allow_reconnect=False)
    stranger = config.NatsCredential(user="cli", seed=natscreds.new_seed(), inbox_prefix="_INBOX.cli")
    with pytest.raises(BusError, match="refused user cli: authorization violation"):
        await Bus.connect(secured_nats.url, "stranger", allow_reconnect=False, credential=stranger)
    await eventually(lambda: _logged(secured_nats.log, "authentication error"), timeout=5,
                     what="nats-server logging the refused connections")


async def _logged(log: Path, text: str) -> bool:
    return log.read_text(errors="replace").count(text) >= 2


async def test_services_run_under_their_own_credentials(secured_nats: SecuredNats, tmp_path: Path) -> None:
    procs = [service_process(name, secured_nats.url, log_path=tmp_path / f"{name}.log",
                             env={config.ENV_NATS_CREDS: str(secured_nats.creds[name]),
                                  config.ENV_CLUSTER: CLUSTER})
             for name in ("identity", "policy")]
    cli = await secured_nats.connect(natsauth.CLI)
    try:
        async def healthy() -> set[str]:
            reports = await gather_health(cli, timeout=0.5)
            return {r.service for r in reports if r.healthy} >= {"identity", "policy"}

        await eventually(healthy, what="identity and policy healthy under their credentials")
        for name in ("identity", "policy"):
            log = (tmp_path / f"{name}.log").read_text()
            assert "NATS refused" not in log and "Violation" not in log, log[-2000:]
    finally:
        await cli.close()
        await asyncio.to_thread(stop_processes, procs)
    for proc in procs:
        assert proc.returncode == 0


def test_a_service_with_an_unusable_credential_exits_naming_the_file(secured_nats: SecuredNats,
                                                                      tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"user": "identity", "seed": "not-a-seed", "inbox_prefix": "_INBOX.identity"}')
    bad.chmod(0o600)
    proc = service_process("identity", secured_nats.url, log_path=tmp_path / "bad.log",
                           env={config.ENV_NATS_CREDS: str(bad)})
    assert proc.wait(timeout=30) == 1
    log = (tmp_path / "bad.log").read_text()
    assert f"NATS credential {bad}: field seed: not an nkey user seed" in log
    assert "Traceback" not in log


def test_with_tls_only_clients_that_trust_the_instance_ca_connect(tmp_path: Path) -> None:
    with running_secured_nats(tmp_path, tls=True) as server:
        cli = server.credential(natsauth.CLI)
        assert cli.tls_ca == str(tmp_path / "tls" / "ca.pem")
        assert stat.S_IMODE((tmp_path / "tls" / "server-key.pem").stat().st_mode) == 0o600
        assert not (tmp_path / "tls" / "ca-key.pem").exists()  # nothing more can be signed

        async def scenario() -> None:
            bus = await server.connect(natsauth.CLI)
            try:
                await bus.kv_put(schema.BUCKET_RESOURCES, "Namespace._.tls", b"{}")
                assert "Namespace._.tls" in await bus.kv_list(schema.BUCKET_RESOURCES)
            finally:
                await bus.close()
            plain = msgspec.structs.replace(cli, tls_ca="")
            with pytest.raises(BusError):
                await Bus.connect(server.url.replace("tls://", "nats://"), "plain", allow_reconnect=False,
                                  credential=plain, connect_timeout=1.0)
            other_ca = natstls.write_certificates(tmp_path / "other").ca
            with pytest.raises(BusError):
                await Bus.connect(server.url, "untrusting", allow_reconnect=False, connect_timeout=1.0,
                                  credential=msgspec.structs.replace(cli, tls_ca=str(other_ca)))

        asyncio.run(scenario())
