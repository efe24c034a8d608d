"""Chaos under traffic: on a 2-node instance, SIGKILL in turn each control-plane service and
nats-server while a client keeps connecting across a service VIP and another keeps trying a
path policy denies. Nothing allowed fails, nothing denied passes, every part comes back
healthy, the kernel maps and computed buckets end as they began, a policy applied while
the policy service is out is enforced once it is back, and an apply afterwards too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ciliary import config, natsauth, natscreds, schema
from ciliary.bus import Bus

from .instance import ciliary as cli
from .instance import pods_ready
from .podnet import wait_for
from .test_stack import (  # noqa: F401
    SHOP,
    cluster_ip,
    connect,
    maps_snapshot,
    policy_in_force,
    stack,
)

VICTIMS = ("identity", "servicelb", "policy", "flows", "mesh", "nats-server")
# connects until SIGTERM, then prints "<succeeded> <failed>"
CLIENT_UNTIL_STOPPED = """
import signal, socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
while running:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"ping\\n")
            if s.recv(100):
                ok += 1
            else:
                failed += 1
    except OSError:
        failed += 1
print(ok, failed, flush=True)
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


def all_healthy(data_dir: Path) -> bool:
    status = json.loads(cli("status", "-o", "json", data_dir=data_dir, check=False).stdout or "{}")
    return bool(status.get("healthy"))


def client(netns: str, host: str, port: int, timeout: float) -> subprocess.Popen[str]:
    """Connects in a loop until SIGTERM; prints ``ok failed``. A dropped SYN costs
    ``timeout`` seconds, so the denied path uses a short one to try often."""
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT_UNTIL_STOPPED, host,
                             str(port), str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def counts(proc: subprocess.Popen[str]) -> tuple[int, int]:
    proc.send_signal(signal.SIGTERM)  # ip netns exec passes it on (it execs the command)
    out, err = proc.communicate(timeout=30)
    assert out.strip(), err
    ok, failed = map(int, out.split())
    return ok, failed


def test_killing_each_part_under_traffic_drops_nothing(stack: tuple[Path, str]) -> None:  # noqa: F811
    data_dir, _ = stack
    cli("apply", "-f", str(SHOP / "10-workloads.yaml"), "-f", str(SHOP / "20-services.yaml"),
        "-f", str(SHOP / "30-policies.yaml"), data_dir=data_dir)
    pods = wait_for(lambda: pods_ready(data_dir, 3), 60, "three ready pods")
    vip = wait_for(lambda: cluster_ip(data_dir, "payments"), 20, "a cluster IP")
    wait_for(lambda: policy_in_force(data_dir), 30, "payments ingress policy in the datapath")
    wait_for(lambda: connect(data_dir, "checkout", vip, 8080).returncode == 0, 20, "checkout -> payments")
    assert connect(data_dir, "frontend", vip, 8080, timeout=1.5).returncode != 0
    before = maps_snapshot(data_dir)
    stored = buckets_snapshot(data_dir)
    assert all(stored[b] for b in (schema.BUCKET_IDENTITIES, schema.BUCKET_SERVICES, schema.BUCKET_POLICY))

    allowed = client(pods["checkout"]["ciliary"]["netns"], vip, 8080, timeout=2.0)
    denied = client(pods["frontend"]["ciliary"]["netns"], vip, 8080, timeout=0.25)
    time.sleep(1.0)
    for victim in VICTIMS:
        pid = pid_of(data_dir, victim)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda victim=victim, pid=pid: pid_of(data_dir, victim) != pid, 30, f"{victim} restarted")
        wait_for(lambda: all_healthy(data_dir), 60, f"every service healthy after {victim} was killed")
    time.sleep(1.0)
    ok, failed = counts(allowed)
    passed, refused = counts(denied)
    print(f"allowed path: {ok} connections, {failed} failed; denied path: {passed} passed, {refused} refused")
    assert failed == 0 and ok > 100, (ok, failed)
    assert passed == 0 and refused > 10, (passed, refused)

    # every part converged back to what it held before
    wait_for(lambda: maps_snapshot(data_dir) == before, 30, "kernel maps as before the kills")
    after = buckets_snapshot(data_dir)
    for bucket in COMPUTED:  # same keys, same values: nothing lost, nothing allocated twice
        assert after[bucket] == stored[bucket], (bucket, set(after[bucket]) ^ set(stored[bucket]))
    print("items compared: " + ", ".join(f"{b} {len(stored[b])}" for b in COMPUTED))

    # a policy applied while the policy service is out is enforced once it is back
    policies = (SHOP / "30-policies.yaml").read_text()
    widened = policies.replace(
        "            app: checkout\n      toPorts:",
        "            app: checkout\n        - matchLabels:\n            tier: web\n      toPorts:", 1)
    assert widened != policies
    policy_pid = pid_of(data_dir, "policy")
    os.kill(policy_pid, signal.SIGSTOP)  # out, but not exited: the supervisor waits
    try:
        cli("apply", "-f", "-", data_dir=data_dir, stdin=widened)
        time.sleep(2.0)
        assert connect(data_dir, "frontend", vip, 8080, timeout=1).returncode != 0, "enforced with policy out"
    finally:
        os.kill(policy_pid, signal.SIGKILL)
    wait_for(lambda: pid_of(data_dir, "policy") != policy_pid, 30, "policy restarted")
    wait_for(lambda: connect(data_dir, "frontend", vip, 8080, timeout=1).returncode == 0, 30,
             "frontend -> payments once the policy applied during the outage is enforced")
    # and an apply afterwards too: the original policy closes the path again
    cli("apply", "-f", "-", data_dir=data_dir, stdin=policies)
    wait_for(lambda: connect(data_dir, "frontend", vip, 8080, timeout=1).returncode != 0, 30,
             "frontend -> payments denied again")
