"""What the chaos test and ``bench/chaos.py`` share: clients that connect until stopped,
snapshots of the computed buckets and the kernel maps (also pod for pod, for pods created
again), the pids and health of an instance, and the state of a replicated bus.

Invariants:
- Everything here reads an instance through its CLI, its ``instance.json``, its admin
  credential or its servers' loopback monitoring ports; nothing changes it.
- A client runs inside a pod's namespace and prints ``<succeeded> <failed>`` once it gets
  SIGTERM; ``counts`` stops it and returns them.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from ciliary import config, natsauth, natscluster, natscreds, schema
from ciliary.bus import Bus

from .instance import ciliary as cli

# connects until SIGTERM, then prints "<succeeded> <failed>"
CLIENT_UNTIL_STOPPED = """
import errno, json, signal, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
ok = failed = 0
reasons = {}
running = True
def stop(*_):
    global running
    running = False
def fail(reason):
    global failed
    failed += 1
    reasons[reason] = reasons.get(reason, 0) + 1
    if len(reasons) < 20:
        print(time.strftime("%H:%M:%S"), reason, file=sys.stderr, flush=True)
signal.signal(signal.SIGTERM, stop)
while running:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ping\\n")
            if s.recv(100):
                ok += 1
            else:
                fail("closed without an answer")
    except socket.timeout:
        fail("timed out")
    except OSError as err:
        fail(errno.errorcode.get(err.errno, type(err).__name__))
    if pause:
        time.sleep(pause)
print(ok, failed, flush=True)
print(json.dumps(reasons), flush=True)
"""


def pid_of(data_dir: Path, name: str) -> int:
    state = config.read_instance(data_dir)
    assert state is not None
    return next(p.pid for p in state.processes if p.name == name)


# the buckets the services compute (sources and statuses are what users and nodes wrote)
COMPUTED = (schema.BUCKET_IDENTITIES, schema.BUCKET_IPCACHE, schema.BUCKET_SERVICES, schema.BUCKET_POLICY,
            schema.BUCKET_ALLOCATIONS)


def buckets_snapshot(data_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every key and value of the computed buckets, read as the instance's admin."""
    state = config.read_instance(data_dir)
    assert state is not None

    async def read() -> dict[str, dict[str, bytes]]:
        bus = await Bus.connect(state.nats_url, "chaos", allow_reconnect=False,
                                credential=natscreds.instance_credential(data_dir, natsauth.ADMIN))
        try:
            return {b: {k: e.value or b"" for k, e in (await bus.kv_list(b)).items()} for b in COMPUTED}
        finally:
            await bus.close()

    return asyncio.run(read())


def by_pod(maps: dict[str, list]) -> dict[str, list]:
    """``maps`` (a ``maps_snapshot``) with every pod address replaced by the pod's name, no
    endpoint ids and each node's rows sorted: what must hold after pods were created again."""
    names = {r["ipv4"]: r["pod"] for node in maps["endpoints"] for r in node["rows"]}
    text = json.dumps(maps)
    if names:
        pattern = re.compile(r"(?<![\d.])(" + "|".join(re.escape(ip) for ip in names) + r")(?![\d])")
        text = pattern.sub(lambda m: names[m.group(1)], text)
    out = json.loads(text)
    for node in out.get("endpoints", []):  # numbered per node in the order pods were created
        for row in node["rows"]:
            row.pop("endpoint_id", None)
    for nodes in out.values():
        for node in nodes:
            node["rows"] = sorted(node["rows"], key=lambda r: json.dumps(r, sort_keys=True))
    return out


def maps_differ(expected: dict[str, list], found: dict[str, list]) -> dict[str, tuple[list, list]]:
    """The views of two map snapshots that differ (empty when equal); printed as it goes."""
    differ = {view: (expected[view], found.get(view, [])) for view in expected if found.get(view) != expected[view]}
    if differ:
        print(f"maps differ: {json.dumps(differ)[:3000]}")
    return differ


def all_healthy(data_dir: Path) -> bool:
    status = json.loads(cli("status", "-o", "json", data_dir=data_dir, check=False).stdout or "{}")
    return bool(status.get("healthy"))


# one connection, a line and its answer every 20 ms until SIGTERM (or until the connection
# breaks), then prints "<exchanges> <failed>"
ESTABLISHED_UNTIL_STOPPED = """
import signal, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ok = failed = 0
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
with socket.create_connection((host, port), timeout=5) as s:
    reader = s.makefile("rb")
    while running:
        try:
            s.sendall(b"ping\\n")
            if reader.readline():
                ok += 1
            else:
                failed += 1
                break
        except OSError:
            failed += 1
            break
        time.sleep(0.02)
print(ok, failed, flush=True)
"""
SESSION_PORT = 9000


_STARTED: list[subprocess.Popen] = []  # every client and server started here, for stop_leftovers


def _started(proc: subprocess.Popen) -> subprocess.Popen:
    _STARTED.append(proc)
    return proc


def stop_leftovers() -> int:
    """Kill every client or server started here that still runs (a test that failed half
    way never stopped it: it would keep connecting into a namespace that is gone); returns
    how many were left."""
    left = [p for p in _STARTED if p.poll() is None]
    for proc in left:
        proc.kill()
        proc.wait(timeout=10)
    _STARTED.clear()
    return len(left)


def session_server(netns: str) -> subprocess.Popen[bytes]:
    """``ciliary.workload session`` on ``SESSION_PORT`` inside the pod namespace ``netns``:
    answers every line on a connection for as long as it lives."""
    return _started(subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "ciliary.workload", "session",
         "--tcp", str(SESSION_PORT), "--name", "session"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def established(netns: str, host: str) -> subprocess.Popen[str]:
    """One connection from ``netns`` to ``host``'s session server, kept exchanging lines
    until ``counts`` stops it (``exchanges failed``; failed is 1 once it broke)."""
    return _started(subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", ESTABLISHED_UNTIL_STOPPED, host, str(SESSION_PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def client(netns: str, host: str, port: int, timeout: float, pause: float = 0.0) -> subprocess.Popen[str]:
    """Connects in a loop until SIGTERM (``pause`` seconds between attempts); prints ``ok
    failed``. A dropped SYN costs ``timeout`` seconds, so the denied path uses a short one
    to try often."""
    return _started(subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT_UNTIL_STOPPED, host, str(port), str(timeout),
         str(pause)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def counts(proc: subprocess.Popen[str]) -> tuple[int, int]:
    """Stops a client; ``(succeeded, failed)``."""
    ok, failed, _ = counts_and_reasons(proc)
    return ok, failed


def counts_and_reasons(proc: subprocess.Popen[str]) -> tuple[int, int, dict[str, int]]:
    """Stops a client; ``(succeeded, failed, failures by reason)`` (a connect client names
    each failure: ``timed out``, an errno name such as ``ECONNREFUSED``, or ``closed without
    an answer``; an established-connection client gives no reasons)."""
    proc.send_signal(signal.SIGTERM)  # ip netns exec passes it on (it execs the command)
    out, err = proc.communicate(timeout=30)
    lines = out.strip().splitlines()
    assert lines, err
    ok, failed = map(int, lines[0].split())
    reasons = json.loads(lines[1]) if len(lines) > 1 else {}
    return ok, failed, reasons


WIDENED_FROM = "            app: checkout\n      toPorts:"
WIDENED_TO = "            app: checkout\n        - matchLabels:\n            tier: web\n      toPorts:"


def service_pids(data_dir: Path) -> dict[str, int]:
    """Pid of every process of the instance but its nats-servers."""
    state = config.read_instance(data_dir)
    assert state is not None
    return {p.name: p.pid for p in state.processes if not p.name.startswith("nats-server")}


def _jsz(monitor_url: str) -> dict:
    with urllib.request.urlopen(f"{monitor_url}/jsz?streams=true&config=true", timeout=1) as resp:
        return json.loads(resp.read())


def fully_replicated(data_dir: Path) -> bool:
    """Every server of the bus answers and every stream has all its copies current."""
    state = config.read_instance(data_dir)
    assert state is not None
    try:
        answers = {s.server_name: _jsz(s.monitor_url) for s in state.nats_servers}
    except OSError:
        return False
    summary = natscluster.replication_summary(answers)
    return summary["fully_replicated"] == len(summary["streams"]) > 0


def resources_leader(data_dir: Path) -> str:
    """Process name (``nats-server-<i>``) of the server leading the resources bucket."""
    state = config.read_instance(data_dir)
    assert state is not None
    for server in state.nats_servers:
        for account in _jsz(server.monitor_url).get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream["name"] == f"KV_{schema.BUCKET_RESOURCES}" and (stream.get("cluster") or {}).get("leader"):
                    leader = stream["cluster"]["leader"]
                    return next(s.name for s in state.nats_servers if s.server_name == leader)
    raise AssertionError("no leader of the resources bucket")


def identity_pods(count: int, label_sets: int) -> str:
    """``count`` pods over both nodes with ``label_sets`` distinct label sets (one new
    identity each), as one manifest stream."""
    docs = []
    for i in range(count):
        docs.append(json.dumps({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"race-{i}", "namespace": "default",
                         "labels": {"app": "race", "race-set": str(i % label_sets)}},
            "spec": {"nodeName": f"node-{1 + i % 2}", "containers": [{
                "name": "c", "image": "ciliary/workload",
                "command": ["python3", "-m", "ciliary.workload", "serve", "--tcp", "80", "--name", f"race-{i}"]}]},
        }))
    return "\n---\n".join(docs)


def assert_one_identity_per_label_set(data_dir: Path) -> dict[tuple[str, ...], int]:
    """No two ids with one label set, no id with two label sets; label set -> id."""
    stored = buckets_snapshot(data_dir)[schema.BUCKET_IDENTITIES]
    by_id: dict[int, tuple[str, ...]] = {}
    by_labels: dict[tuple[str, ...], int] = {}
    for key, value in stored.items():
        if key.startswith(schema.IDENTITY_ID_PREFIX):
            record = schema.decode(value, schema.IdentityRecord)
            assert record.id not in by_id, f"id {record.id} stored twice"
            by_id[record.id] = tuple(record.labels)
    for key, value in stored.items():
        if key.startswith(schema.IDENTITY_LABELS_PREFIX):
            named = schema.decode(value, schema.IdentityLabelsRecord)
            labels = tuple(named.labels)
            assert labels not in by_labels, f"{labels} has ids {by_labels[labels]} and {named.id}"
            assert by_id.get(named.id) == labels, f"id {named.id}: {by_id.get(named.id)} and {labels}"
            by_labels[labels] = named.id
    return by_labels


def endpoint_identities(data_dir: Path) -> dict[str, int]:
    rows = json.loads(cli("endpoint", "list", "-o", "json", data_dir=data_dir).stdout)
    return {r["pod"]: int(r["identity"]) for node in rows for r in node["rows"]}
