"""Where an instance lives and how processes find it.

Invariants:
- An instance is identified by its data directory. ``--data-dir`` wins, then
  ``CILIARY_DATA_DIR``, then the per-user default (``$XDG_STATE_HOME/ciliary`` or
  ``~/.local/state/ciliary``).
- ``instance.json`` in the data directory exists exactly while a supervisor runs for it;
  it records the NATS URL (every server, comma-separated, for a replicated bus) and the
  process ids, and is the only way the CLI finds a
  running instance.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from ciliary import schema

ENV_DATA_DIR = "CILIARY_DATA_DIR"
ENV_NATS_URL = "CILIARY_NATS_URL"
ENV_CLUSTER = "CILIARY_CLUSTER"
ENV_CLUSTER_ID = "CILIARY_CLUSTER_ID"
ENV_NODE = "CILIARY_NODE"
ENV_INSTANCE = "CILIARY_INSTANCE"
ENV_JS_REPLICAS = "CILIARY_JS_REPLICAS"
ENV_NATS_CREDS = "CILIARY_NATS_CREDS"  # path of this process's NATS credential file
INSTANCE_FILE = "instance.json"
NATS_CREDS_DIR = "nats-creds"  # one <user>.json per NATS user, mode 0600, directory 0700
NATS_AUTH_FILE = "nats-auth.conf"  # nats-server's authorization block, mode 0600
NATS_TLS_DIR = "nats-tls"  # CA and server certificate with ``up --nats-tls`` (directory 0700)


class ProcessInfo(msgspec.Struct, frozen=True):
    name: str  # e.g. "identity", "node/node-1", "nats-server"
    pid: int


class NatsServerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One server of a replicated bus (``ciliary up --nats-replicas N``)."""

    name: str  # the process name in ``processes``: "nats-server-1"
    server_name: str  # NATS server_name: "ciliary-<cluster>-1"
    url: str  # client URL
    monitor_url: str  # nats-server's HTTP monitoring endpoint


class InstanceState(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ciliary up`` records in ``<data-dir>/instance.json``."""

    nats_url: str
    supervisor_pid: int
    cluster: str = schema.DEFAULT_CLUSTER_NAME
    cluster_id: int = schema.DEFAULT_CLUSTER_ID
    nodes: list[str] = []
    processes: list[ProcessInfo] = []
    started: float = 0.0
    log_dir: str = ""
    ui_url: str = ""  # service map page of the flows service
    metrics_url: str = ""  # Prometheus endpoint of the flows service
    nats_auth: bool = False  # every connection authenticates with its own nkey credential
    nats_tls: bool = False  # connections are TLS (``up --nats-tls``)
    nats_replicas: int = 1  # servers of the bus, and copies of every bucket and stream
    nats_servers: list[NatsServerInfo] = []  # with nats_replicas > 1; nats_url lists them all


class NatsCredential(msgspec.Struct, frozen=True, kw_only=True):
    """A NATS user's credential file (``<data-dir>/nats-creds/<user>.json``, mode 0600;
    written by ``ciliary.natscreds``)."""

    user: str
    seed: str  # nkey seed of a NATS user ("SU...")
    inbox_prefix: str  # where this user receives replies
    tls_ca: str = ""  # the CA file that signed the server's certificate ("" = plain TCP)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ciliary"


def resolve_data_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser().resolve()
    return default_data_dir()


def instance_path(data_dir: Path) -> Path:
    return data_dir / INSTANCE_FILE


def read_instance(data_dir: Path) -> InstanceState | None:
    """The recorded instance, or None when none was recorded (or the record is unreadable)."""
    try:
        return msgspec.json.decode(instance_path(data_dir).read_bytes(), type=InstanceState)
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def write_instance(data_dir: Path, state: InstanceState) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = instance_path(data_dir).with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(state)))
    tmp.replace(instance_path(data_dir))


def nats_credential_path(data_dir: Path, user: str) -> Path:
    """Where ``ciliary up`` keeps the NATS credential of ``user``."""
    return data_dir / NATS_CREDS_DIR / f"{user}.json"


def remove_instance(data_dir: Path) -> None:
    instance_path(data_dir).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def env_number(name: str, default: float, *, integer: bool = False, minimum: float | None = None,
               env: dict[str, str] | None = None) -> float:
    """A numeric setting from the environment. Unset or empty gives ``default``; a value
    that is not a number (or an integer when ``integer``), or is below ``minimum``, is
    logged as an error naming the variable and ``default`` is used: a bad setting never
    stops a service."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value: float = int(raw) if integer else float(raw)
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum:g}")
    except ValueError as err:
        reason = str(err) if str(err).startswith("must") else f"not {'an integer' if integer else 'a number'}"
        logging.getLogger("ciliary.config").error("%s=%r: %s; using %s", name, raw, reason, default)
        return default
    return value


def js_replicas(env: dict[str, str] | None = None) -> int:
    """Copies of each JetStream bucket and stream a process creates: 1 for the embedded
    single server, 3 against the NATS cluster of deploy/ (``CILIARY_JS_REPLICAS``)."""
    return int(min(env_number(ENV_JS_REPLICAS, 1, integer=True, minimum=1, env=env), 5))
