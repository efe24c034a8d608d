"""``ciliary nats rotate-keys`` on a running instance: every NATS user gets a new key, no
process restarts, the old keys are refused afterwards, and the services keep working on
their new keys (an apply afterwards reaches them). The supervisor runs without nodes
(``--nodes 0``): the NATS part of the instance with every control-plane service."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

from ciliary import config, natsauth, natscreds
from ciliary.bus import Bus, BusError

from .conftest import run_cli, supervisor_without_nodes, wait_until


def _status(data_dir: Path) -> dict[str, Any] | None:
    done = run_cli("status", "-o", "json", data_dir=data_dir, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _namespaces_seen_by_identity(status: dict[str, Any]) -> int:
    identity = next(s for s in status["services"] if s["name"] == "identity")
    return int(identity["detail"].get("resources", {}).get("Namespace", 0))


def _accepted(url: str, credential: config.NatsCredential) -> bool:
    async def connect() -> bool:
        try:
            bus = await Bus.connect(url, "rotation-test", allow_reconnect=False, credential=credential)
        except BusError:
            return False
        await bus.close()
        return True

    return asyncio.run(connect())


def test_rotating_the_keys_restarts_nothing_and_retires_the_old_ones(tmp_path: Path) -> None:
    data_dir = tmp_path / "inst"
    with supervisor_without_nodes(data_dir, "--cluster", "t" + secrets.token_hex(4), "--cluster-id", "95"):
        before = wait_until(lambda: (s := _status(data_dir)) is not None and s["healthy"] and s, 60,
                            "the instance healthy")
        pids = {s["instance"]: s["pid"] for s in before["services"]}
        state = config.read_instance(data_dir)
        assert state is not None
        old = {user: natscreds.instance_credential(data_dir, user) for user in (natsauth.ADMIN, natsauth.CLI)}

        done = run_cli("nats", "rotate-keys", "-o", "json", data_dir=data_dir, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(done.stdout)
        assert summary["services_healthy"] is True
        assert set(summary["users"]) >= {natsauth.ADMIN, natsauth.CLI, "identity", "servicelb", "policy"}
        assert "3/3 the old keys are refused" in done.stderr

        new = {user: natscreds.instance_credential(data_dir, user) for user in old}
        for user, credential in old.items():
            assert credential is not None and new[user] is not None
            assert new[user].seed != credential.seed
            assert not _accepted(state.nats_url, credential), f"the old key of {user} is still accepted"
            assert _accepted(state.nats_url, new[user])

        after = wait_until(lambda: (s := _status(data_dir)) is not None and s["healthy"] and s, 30,
                           "every service healthy on its new key")
        assert {s["instance"]: s["pid"] for s in after["services"]} == pids, "a service was restarted"
        seen = _namespaces_seen_by_identity(after)
        applied = run_cli("apply", "-f", "-", data_dir=data_dir,
                          stdin="apiVersion: v1\nkind: Namespace\nmetadata: {name: rotated}\n")
        assert applied.returncode == 0, applied.stderr
        wait_until(lambda: (s := _status(data_dir)) is not None and _namespaces_seen_by_identity(s) == seen + 1,
                   20, "identity, reconnected on its new key, sees the namespace applied afterwards")


def test_rotating_without_an_instance_is_a_clear_error(tmp_path: Path) -> None:
    done = run_cli("nats", "rotate-keys", data_dir=tmp_path / "none")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "error:" in done.stderr
