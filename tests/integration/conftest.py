"""Integration fixtures: a real nats-server with JetStream on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ciliary.supervisor import free_port, nats_server_binary

REPO = Path(__file__).resolve().parents[2]


def require_root(what: str) -> None:
    """Skip a test that needs root (``what`` says for what) when not root; under CI=true
    that is a failure, never a skip."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"needs root for {what} (CI=true: not skipping)")
    pytest.skip(f"needs root for {what}")


def wait_listening(port: int, timeout: float = 10) -> bool:
    """True once something accepts connections on ``127.0.0.1:port``; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class NatsServer:
    port: int
    store_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_listening(self.port):
            raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(port=free_port(), store_dir=tmp_path / "nats")
    server.start()
    yield server
    server.stop()


def run_cli(*args: str, data_dir: Path, stdin: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real ``ciliary`` CLI as a user would."""
    env = dict(os.environ, CILIARY_DATA_DIR=str(data_dir))
    return subprocess.run(
        [sys.executable, "-m", "ciliary.cli", *args], input=stdin, capture_output=True,
        text=True, env=env, timeout=timeout, cwd=REPO,
    )


def service_process(name: str, nats_url: str, *, node: str = "", log_path: Path, instance: str = "",
                    env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """``python -m services.<name>`` against ``nats_url``, output appended to ``log_path``;
    ``env`` adds to (and ``unset`` removes from) this process's environment."""
    full = dict(os.environ, CILIARY_NATS_URL=nats_url,
                CILIARY_INSTANCE=instance or (f"{name}-{node}" if node else name))
    if node:
        full["CILIARY_NODE"] = node
    full.update(env or {})
    for key in unset:
        full.pop(key, None)
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, then wait (kill after 10 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; stopped at the end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_processes(started)


# Flows service settings a developer's shell may carry that would change what a test sees.
FLOWS_SETTINGS = ("CILIARY_FLOWS_METRICS_PORT", "CILIARY_FLOWS_UI_PORT", "CILIARY_FLOWS_EXPORT_FILE")


async def flows_counters(bus: Any) -> Any:
    """The flows service's counters (a query that matches nothing, rings only), or None
    while it does not answer."""
    from ciliary import schema

    try:
        return await bus.request(schema.SUBJECT_FLOWS_QUERY,
                                 schema.FlowQuery(whitelist=[schema.FlowFilter(uuid=["none"])], rings_only=True),
                                 schema.FlowQueryReply, timeout=1.0)
    except Exception:
        return None


@contextmanager
def running_service(name: str, nats_url: str, *, log_path: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A service process for the block; on exit it must stop cleanly (exit 0) on SIGTERM."""
    proc = service_process(name, nats_url, log_path=log_path, **kwargs)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            assert proc.wait(timeout=10) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


async def ensure_buckets(url: str) -> None:
    from ciliary.bus import Bus

    bus = await Bus.connect(url, "test-setup")
    try:
        await bus.ensure_buckets()
    finally:
        await bus.close()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "") -> Any:
    """Await ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")


@contextmanager
def supervisor_without_nodes(data_dir: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m ciliary.supervisor --data-dir DIR --nodes 0 ARGS`` (the NATS part of an
    instance with every control-plane service, no kernel datapath) in its own session,
    logging to ``logs/supervisor.log``; on exit ``ciliary down`` (which must succeed) and
    the supervisor gone."""
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(data_dir / "logs" / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ciliary.supervisor", "--data-dir", str(data_dir), "--nodes", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    try:
        yield proc
    finally:
        down = run_cli("down", data_dir=data_dir)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert down.returncode == 0, down.stdout + down.stderr


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``predicate`` until it returns something truthy (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET (an HTTP error's too); ``(0, b"")`` while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""
