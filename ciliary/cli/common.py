"""What every ``ciliary`` command shares: the failure type, finding the running
instance, one bus connection per command, and error lines.

Invariants:
- Every command finds its instance through ``--data-dir`` / ``CILIARY_DATA_DIR`` / the
  per-user default (``args.data_dir_path``), and fails with ``CliError`` and a hint when
  none is running.
- A command's bus work runs through ``run_with_bus``: one connection, no reconnects,
  closed when the work is done. Command modules call it as ``common.run_with_bus`` (one
  seam for tests to put a fake bus behind every command).
- A write command may run its bus work through ``run_with_bus_retrying``: after a NATS
  timeout (``store.timed_out``) the work runs again on a fresh connection, with a note on
  stderr, until ``within`` seconds have passed; the work must be safe to repeat.
- A user-facing failure is a ``CliError``: ``main`` prints it as one ``error: <message>``
  line (``print_error``) and exits with code 1 — never a traceback.
- Progress reports (``Progress``) go to stderr only, never stdout, and only when enabled
  (a terminal, or asked for): on a terminal one line rewritten in place and cleared at the
  end, otherwise one line per report.
- This module imports no command module and no service package.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ciliary import config, natsauth, natscreds
from ciliary.bus import Bus, BusError
from ciliary.config import NatsCredential
from ciliary.store import timed_out

REQUEST_TIMEOUT = 5.0  # seconds a command waits for a service's answer
RETRY_PAUSE = 0.5  # seconds between attempts of run_with_bus_retrying


class CliError(Exception):
    """A user-facing failure: printed as ``error: <message>``, exit code 1."""


def print_error(message: str) -> None:
    """One ``error: <message>`` line on stderr."""
    print(f"error: {message}", file=sys.stderr)


def running_instance(data_dir: Path) -> config.InstanceState:
    state = config.read_instance(data_dir)
    if state is None or not config.pid_alive(state.supervisor_pid):
        raise CliError(
            f"no ciliary instance is running for data dir {data_dir}\n"
            f"  start one with: ciliary up -d --data-dir {data_dir}"
        )
    return state


async def _with_bus(data_dir: Path, work: Callable[[Bus], Awaitable[Any]]) -> Any:
    state = running_instance(data_dir)
    try:
        bus = await Bus.connect(state.nats_url, "ciliary-cli", allow_reconnect=False,
                                credential=cli_credential(data_dir))
    except BusError as err:
        raise CliError(f"{err}\n  is the instance healthy? try: ciliary status") from err
    try:
        return await work(bus)
    finally:
        await bus.close()


def cli_credential(data_dir: Path) -> NatsCredential | None:
    """The CLI's NATS credential of the instance in ``data_dir`` (None: no authentication)."""
    try:
        return natscreds.instance_credential(data_dir, natsauth.CLI)
    except natscreds.CredentialError as err:
        raise CliError(str(err)) from None


def run_with_bus(args: argparse.Namespace, work: Callable[[Bus], Awaitable[Any]]) -> Any:
    """``work(bus)`` on a fresh connection to the instance of ``args.data_dir_path``."""
    return asyncio.run(_with_bus(args.data_dir_path, work))


def run_with_bus_retrying(args: argparse.Namespace, work: Callable[[Bus], Awaitable[Any]], *,
                          within: float, what: str) -> Any:
    """``run_with_bus``, repeated after a NATS timeout until ``within`` seconds have passed
    (a replicated bus that lost a server answers again once it elected a new leader)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return run_with_bus(args, work)
        except Exception as err:
            if not timed_out(err) or time.monotonic() + RETRY_PAUSE >= deadline:
                raise
            print(f"{what}: NATS did not answer in time; retrying", file=sys.stderr)
            time.sleep(RETRY_PAUSE)


class Progress:
    """A one-line progress report on ``stream`` (stderr): rewritten in place on a terminal,
    one line per report otherwise; silent unless ``enabled``. Reports closer together
    than ``min_interval`` seconds are skipped unless forced (the last one should be)."""

    def __init__(self, stream: Any, *, enabled: bool, min_interval: float = 0.0) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self.shown = False
        self._last = float("-inf")

    def due(self) -> bool:
        """Whether a report now would be shown (so a caller can skip building it)."""
        return self.enabled and time.monotonic() - self._last >= self.min_interval

    def show(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        self.stream.write(f"\r{text}\x1b[K" if self.tty else text + "\n")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.shown = False


def progress_bar(done: int, total: int, *, width: int = 30) -> str:
    """``[######........]  1,234/5,678`` for ``done`` of ``total``."""
    filled = width if total <= 0 else min(width, width * done // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(f'{total:,}')},}/{total:,}"
