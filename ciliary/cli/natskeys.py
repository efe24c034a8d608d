"""``ciliary nats rotate-keys``: a fresh nkey for every NATS user of a running instance,
without restarting anything.

Invariants:
- The file steps are ``ciliary.natsrotate`` (overlap → hand out → retire); after each
  authorization change every nats-server of the instance reloads its configuration
  (``SIGHUP``) and the command waits until each server shows the change: after the
  overlap every server accepts the new admin key, after the retirement every server
  refuses the old one. Then it waits until every service reports healthy again (each
  reconnects with the key its credential file now holds).
- A step that does not take effect within ``STEP_TIMEOUT_S`` stops the command with an
  error naming the step and the server; the files written so far stay consistent (the
  accepted keys always include the ones the credential files hold), so running the
  command again finishes the rotation.
- Progress goes to stderr; stdout is the summary (a table, or ``-o json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ciliary import config, natsauth, natscreds, natsrotate, status
from ciliary.bus import Bus, BusError
from ciliary.cli import common
from ciliary.config import NatsCredential
from ciliary.output import table

STEP_TIMEOUT_S = 20.0


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``nats rotate-keys`` to the ``ciliary`` parser."""
    nats = subparsers.add_parser("nats", parents=[common_parent], help="the instance's NATS bus")
    sub = nats.add_subparsers(dest="nats_command", required=True, parser_class=type(nats))
    p = sub.add_parser("rotate-keys", parents=[common_parent],
                       help="give every NATS user a fresh nkey while the instance runs")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_rotate_keys)


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir_path
    state = common.running_instance(data_dir)
    if not state.nats_auth:
        raise common.CliError("the instance runs without NATS authentication: it has no keys to rotate")
    creds_dir, auth_file = data_dir / config.NATS_CREDS_DIR, data_dir / config.NATS_AUTH_FILE
    servers = _servers(state)
    started = time.monotonic()
    rotation = natsrotate.plan(creds_dir, natsauth.users(state.cluster, state.nodes))
    old_admin = natscreds.instance_credential(data_dir, natsauth.ADMIN)
    _progress(f"rotating the keys of {len(rotation.users)} NATS users on {len(servers)} server(s)")

    natsrotate.overlap(rotation, auth_file)
    _reload(servers)
    new_admin = rotation.new[natsauth.ADMIN]
    asyncio.run(_until_each(servers, new_admin, accepted=True, step="accept the new keys"))
    _progress("1/3 every server accepts the old and the new keys")

    natsrotate.hand_out(rotation, creds_dir)
    _progress("2/3 every credential file holds its new key")

    natsrotate.retire(rotation, auth_file)
    _reload(servers)
    if old_admin is not None:
        asyncio.run(_until_each(servers, old_admin, accepted=False, step="refuse the old keys"))
    _progress("3/3 the old keys are refused; waiting for every service to reconnect")
    healthy = asyncio.run(_until_healthy(state.nats_url, new_admin, state.nodes))
    summary = {
        "users": [u.name for u in rotation.users],
        "servers": [name for name, _, _ in servers],
        "services_healthy": healthy,
        "seconds": round(time.monotonic() - started, 2),
    }
    if args.output == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(table(["USERS ROTATED", "SERVERS", "SERVICES HEALTHY", "SECONDS"],
                    [[len(summary["users"]), len(servers), healthy, summary["seconds"]]]))
    return 0


def _servers(state: config.InstanceState) -> list[tuple[str, int, str]]:
    """(process name, pid, client URL) of every nats-server of the instance."""
    urls = {s.name: s.url for s in state.nats_servers}
    found = [(p.name, p.pid, urls.get(p.name, state.nats_url)) for p in state.processes
             if p.name == "nats-server" or p.name.startswith("nats-server-")]
    if not found:
        raise common.CliError("the instance records no nats-server process")
    return found


def _reload(servers: list[tuple[str, int, str]]) -> None:
    for name, pid, _ in servers:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise common.CliError(f"{name} (pid {pid}) is not running; try again once "
                                  f"`ciliary status` shows it up") from None


async def _accepts(url: str, credential: NatsCredential) -> bool:
    try:
        bus = await Bus.connect(url, "ciliary-rotate-keys", allow_reconnect=False, connect_timeout=1.0,
                                credential=credential)
    except BusError:
        return False
    await bus.close()
    return True


async def _until_each(servers: list[tuple[str, int, str]], credential: NatsCredential, *, accepted: bool,
                      step: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    for name, _, url in servers:
        while await _accepts(url, credential) != accepted:
            if time.monotonic() > deadline:
                raise common.CliError(f"{name} did not {step} within {STEP_TIMEOUT_S:.0f}s after reloading "
                                      f"its configuration; run `ciliary nats rotate-keys` again")
            await asyncio.sleep(0.1)


async def _until_healthy(url: str, credential: NatsCredential, nodes: list[str]) -> bool:
    """Whether every service reported healthy within ``STEP_TIMEOUT_S``."""
    bus = await Bus.connect(url, "ciliary-rotate-keys", allow_reconnect=False, credential=credential)
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not status.missing_or_unhealthy(await status.gather_health(bus), nodes):
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await bus.close()


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
