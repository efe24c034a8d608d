"""Chaos under traffic: on a 2-node instance, SIGKILL in turn each control-plane service,
nats-server and a node executor while a client keeps connecting across a service VIP and
another keeps trying a path policy denies. Nothing allowed fails, nothing denied passes,
every part comes back healthy, the kernel maps and computed buckets end as they began, a
policy applied while the policy service is out is enforced once it is back, and an apply
afterwards too. Then the supervisor itself is killed: its children go with it, the next
``ciliary up`` brings the same pods, identities, services and maps back and traffic resumes.

An established connection (frontend to a session server in checkout) lives through every
kill but the supervisor's.

On a replicated bus (``--nats-replicas 3``) with two identity replicas: one server is
killed under the clients and restarted, then another is kept down while a changed policy
is applied; nothing allowed fails, no service restarts, the applied policy is enforced,
every computed bucket ends as it began; and one identity replica killed while pods are
created leaves every label set with exactly one identity and every pod with its own."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ciliary import config, schema

from .chaos import (
    COMPUTED,
    SESSION_PORT,
    WIDENED_FROM,
    WIDENED_TO,
    all_healthy,
    assert_one_identity_per_label_set,
    buckets_snapshot,
    by_pod,
    client,
    counts,
    counts_and_reasons,
    endpoint_identities,
    established,
    fully_replicated,
    identity_pods,
    maps_differ,
    pid_of,
    resources_leader,
    service_pids,
    session_server,
    stop_leftovers,
)
from .instance import ciliary as cli
from .instance import embedded_instance, pods_ready
from .podnet import wait_for
from .test_stack import (  # noqa: F401
    SHOP,
    cluster_ip,
    connect,
    maps_snapshot,
    policy_in_force,
    stack,
)

VICTIMS = ("identity", "servicelb", "policy", "flows", "mesh", "nats-server", "node/node-1")


@pytest.fixture(autouse=True)
def no_client_left() -> Iterator[None]:
    """A test that fails half way leaves its clients running: they go with the test."""
    yield
    stop_leftovers()


def test_killing_each_part_under_traffic_drops_nothing(stack: tuple[Path, str]) -> None:  # noqa: F811
    data_dir, cluster = stack
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

    # an established flow too: frontend holds one connection to a session server in checkout
    server = session_server(pods["checkout"]["ciliary"]["netns"])
    try:
        wait_for(lambda: connect(data_dir, "frontend", pods["checkout"]["podIP"], SESSION_PORT).returncode == 0,
                 20, "frontend -> checkout's session server")
        held = established(pods["frontend"]["ciliary"]["netns"], pods["checkout"]["podIP"])
        allowed = client(pods["checkout"]["ciliary"]["netns"], vip, 8080, timeout=2.0)
        denied = client(pods["frontend"]["ciliary"]["netns"], vip, 8080, timeout=0.25)
        time.sleep(1.0)
        for victim in VICTIMS:
            pid = pid_of(data_dir, victim)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda victim=victim, pid=pid: pid_of(data_dir, victim) != pid, 30, f"{victim} restarted")
            wait_for(lambda: all_healthy(data_dir), 60, f"every service healthy after {victim} was killed")
        time.sleep(1.0)
        exchanges, broken = counts(held)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"established flow: {exchanges} exchanges, {'broken' if broken else 'never broken'}")
    assert broken == 0 and exchanges > 100, (exchanges, broken)
    ok, failed, reasons = counts_and_reasons(allowed)
    passed, refused = counts(denied)
    print(f"allowed path: {ok} connections, {failed} failed; denied path: {passed} passed, {refused} refused")
    assert failed == 0 and ok > 100, (ok, failed, reasons)
    assert passed == 0 and refused > 10, (passed, refused)
    # the flows published while the flows service was down are counted, not silently missing
    lost = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in cli("metrics", data_dir=data_dir).stdout.splitlines()
            if line.startswith("hubble_lost_events_total{")}
    print(f"lost events counted: {lost}")
    assert lost.get("observer_events_queue", 0) > 0, lost

    # every part converged back to what it held before
    wait_for(lambda: maps_snapshot(data_dir) == before, 30, "kernel maps as before the kills")
    after = buckets_snapshot(data_dir)
    for bucket in COMPUTED:  # same keys, same values: nothing lost, nothing allocated twice
        assert after[bucket] == stored[bucket], (bucket, set(after[bucket]) ^ set(stored[bucket]))
    print("items compared: " + ", ".join(f"{b} {len(stored[b])}" for b in COMPUTED))

    # a policy applied while the policy service is out is enforced once it is back
    policies = (SHOP / "30-policies.yaml").read_text()
    widened = policies.replace(WIDENED_FROM, WIDENED_TO, 1)
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

    # the supervisor killed: every child goes with it, and the next `up` brings back the same
    # pods, identities, services and maps from the store; traffic resumes
    state = config.read_instance(data_dir)
    assert state is not None
    os.kill(state.supervisor_pid, signal.SIGKILL)
    wait_for(lambda: not any(config.pid_alive(p.pid) for p in state.processes), 30,
             "every child of the killed supervisor exited")
    cli("up", "-d", "--nodes", "2", "--cluster", cluster, "--cluster-id", "7", data_dir=data_dir, timeout=120)
    wait_for(lambda: pods_ready(data_dir, 3), 60, "the three pods ready again")
    wait_for(lambda: connect(data_dir, "checkout", vip, 8080).returncode == 0, 30, "checkout -> payments again")
    # the pods were created again (new addresses, new backend ids): equal pod for pod
    wait_for(lambda: not maps_differ(by_pod(before), by_pod(maps_snapshot(data_dir))), 60,
             "kernel maps as before the supervisor was killed, pod for pod")
    after = buckets_snapshot(data_dir)
    for bucket in (schema.BUCKET_IDENTITIES, schema.BUCKET_POLICY):
        assert after[bucket] == stored[bucket], (bucket, set(after[bucket]) ^ set(stored[bucket]))
    assert connect(data_dir, "frontend", vip, 8080, timeout=1).returncode != 0


def ipcache_identity(data_dir: Path, node: str, prefix: str) -> int | None:
    """The identity ``node``'s kernel ipcache holds for ``prefix``."""
    views = json.loads(cli("bpf", "ipcache", "list", "-o", "json", data_dir=data_dir).stdout)
    rows = [r for view in views if view["node"] == node for r in view["rows"] if r["prefix"] == prefix]
    return rows[0]["identity"] if rows else None


def test_a_relabelled_pod_keeps_its_policy_until_the_new_one_is_resolved(
        stack: tuple[Path, str]) -> None:  # noqa: F811
    """payments moves to a new label set (a new identity the same policy selects) while the
    policy service is out: its endpoint keeps the old identity and its policy, so frontend
    stays denied, instead of the new identity running without a policy record."""
    data_dir, _ = stack
    cli("apply", "-f", str(SHOP / "10-workloads.yaml"), "-f", str(SHOP / "30-policies.yaml"), data_dir=data_dir)
    pods = wait_for(lambda: pods_ready(data_dir, 3), 60, "three ready pods")
    payments = pods["payments"]["podIP"]
    wait_for(lambda: policy_in_force(data_dir), 30, "payments ingress policy in the datapath")
    wait_for(lambda: connect(data_dir, "checkout", payments, 8080).returncode == 0, 20, "checkout -> payments")
    assert connect(data_dir, "frontend", payments, 8080, timeout=1.5).returncode != 0
    old = endpoint_identities(data_dir)["default/payments"]
    manifest = next(doc for doc in (SHOP / "10-workloads.yaml").read_text().split("\n---\n")
                    if "name: payments" in doc)
    relabelled = manifest.replace('    pci: "true"\n', '    pci: "true"\n    release: canary\n', 1)
    assert relabelled != manifest

    policy_pid = pid_of(data_dir, "policy")
    os.kill(policy_pid, signal.SIGSTOP)  # out, but not exited: the supervisor waits
    try:
        cli("apply", "-f", "-", data_dir=data_dir, stdin=relabelled)
        new = wait_for(lambda: (i := ipcache_identity(data_dir, "node-2", f"{payments}/32")) != old and i,
                       30, "payments' new identity in node-2's ipcache")
        time.sleep(1.0)  # the executor has seen the ipcache change: the endpoint would have moved by now
        assert connect(data_dir, "frontend", payments, 8080, timeout=1).returncode != 0, \
            "frontend -> payments passed while the new identity's policy was not resolved"
        assert endpoint_identities(data_dir)["default/payments"] == old, "endpoint moved to an unresolved identity"
        assert connect(data_dir, "checkout", payments, 8080).returncode == 0
    finally:
        os.kill(policy_pid, signal.SIGKILL)
    wait_for(lambda: pid_of(data_dir, "policy") != policy_pid, 30, "policy restarted")
    wait_for(lambda: endpoint_identities(data_dir)["default/payments"] == new, 30,
             "payments' endpoint on its new identity once its policy is resolved")
    assert policy_in_force(data_dir)
    assert connect(data_dir, "frontend", payments, 8080, timeout=1).returncode != 0
    assert connect(data_dir, "checkout", payments, 8080).returncode == 0


# ---------------------------------------------------------------- replicated bus

def test_replicated_bus_and_identity_replicas_under_traffic(tmp_path: Path, cluster_name: str) -> None:
    args = ("--nats-replicas", "3", "--identity-replicas", "2")
    with embedded_instance(tmp_path / "instance", cluster_name, nodes=2, cluster_id=27, args=args) as data_dir:
        status = json.loads(cli("status", "-o", "json", data_dir=data_dir).stdout)
        assert sorted(s["instance"] for s in status["services"] if s["name"] == "identity") == [
            "identity", "identity-2"]
        policies = (SHOP / "30-policies.yaml").read_text()
        widened = policies.replace(WIDENED_FROM, WIDENED_TO, 1)
        assert widened != policies
        cli("apply", "-f", str(SHOP / "10-workloads.yaml"), "-f", str(SHOP / "20-services.yaml"), "-f", "-",
            data_dir=data_dir, stdin=policies)
        pods = wait_for(lambda: pods_ready(data_dir, 3), 60, "three ready pods")
        vip = wait_for(lambda: cluster_ip(data_dir, "payments"), 20, "a cluster IP")
        wait_for(lambda: policy_in_force(data_dir), 30, "payments ingress policy in the datapath")
        wait_for(lambda: connect(data_dir, "checkout", vip, 8080).returncode == 0, 20, "checkout -> payments")
        wait_for(lambda: fully_replicated(data_dir), 30, "every stream with three current copies")
        before = maps_snapshot(data_dir)
        stored = buckets_snapshot(data_dir)
        pids = service_pids(data_dir)
        state = config.read_instance(data_dir)
        assert state is not None and len(state.nats_servers) == 3
        supervisor_pid = state.supervisor_pid

        allowed = client(pods["checkout"]["ciliary"]["netns"], vip, 8080, timeout=2.0)
        denied = client(pods["frontend"]["ciliary"]["netns"], vip, 8080, timeout=0.25)
        time.sleep(1.0)
        # one server (the resources leader) killed and restarted at once by the supervisor
        first = resources_leader(data_dir)
        first_pid = pid_of(data_dir, first)
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: pid_of(data_dir, first) != first_pid, 30, f"{first} restarted")
        wait_for(lambda: fully_replicated(data_dir), 60, f"every copy current after {first} was killed")
        passed, refused = counts(denied)  # the changed policy applied next opens this path

        # another one kept down (the supervisor paused) while a changed policy is applied
        second = next(s.name for s in state.nats_servers if s.name != first)
        second_pid = pid_of(data_dir, second)
        os.kill(supervisor_pid, signal.SIGSTOP)
        try:
            os.kill(second_pid, signal.SIGKILL)
            applied = cli("apply", "-f", "-", data_dir=data_dir, stdin=widened)
            assert "configured" in applied.stdout, applied.stdout
        finally:
            os.kill(supervisor_pid, signal.SIGCONT)
        wait_for(lambda: pid_of(data_dir, second) != second_pid, 30, f"{second} restarted")
        wait_for(lambda: fully_replicated(data_dir), 60, f"every copy current after {second} was killed")
        wait_for(lambda: all_healthy(data_dir), 60, "every service healthy")
        wait_for(lambda: connect(data_dir, "frontend", vip, 8080, timeout=1).returncode == 0, 30,
                 "frontend -> payments: the policy applied with a server down is enforced")
        ok, failed, reasons = counts_and_reasons(allowed)
        print(f"replicated bus, {first} then {second} killed: allowed path {ok} connections, {failed} failed; "
              f"denied path {passed} passed, {refused} refused")
        assert failed == 0 and ok > 100, (ok, failed, reasons)
        assert passed == 0 and refused > 5, (passed, refused)
        assert service_pids(data_dir) == pids, "a service restarted while a server of the bus was lost"

        # the original policy back: every computed bucket and map as it began
        cli("apply", "-f", "-", data_dir=data_dir, stdin=policies)
        wait_for(lambda: connect(data_dir, "frontend", vip, 8080, timeout=1).returncode != 0, 30,
                 "frontend -> payments denied again")
        wait_for(lambda: maps_snapshot(data_dir) == before, 30, "kernel maps as before the kills")
        after = buckets_snapshot(data_dir)
        for bucket in COMPUTED:
            assert after[bucket] == stored[bucket], (bucket, set(after[bucket]) ^ set(stored[bucket]))

        # two identity replicas racing: one killed while pods with new label sets are created
        cli("apply", "-f", "-", data_dir=data_dir, stdin=identity_pods(6, 3))
        victim = pid_of(data_dir, "identity-2")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: pods_ready(data_dir, 9), 90, "nine ready pods")
        wait_for(lambda: pid_of(data_dir, "identity-2") != victim, 30, "identity-2 restarted")
        by_labels = assert_one_identity_per_label_set(data_dir)

        def race_identities() -> dict[str, int] | None:
            found = {p: i for p, i in endpoint_identities(data_dir).items() if p.startswith("default/race-")}
            return found if len(found) == 6 and all(found.values()) else None

        race_ids = wait_for(race_identities, 30, "an identity in the datapath for every new pod")
        for i in range(6):  # pods with one label set share its identity; different sets differ
            assert race_ids[f"default/race-{i}"] == race_ids[f"default/race-{i % 3}"]
        assert len(set(race_ids.values())) == 3
        assert set(race_ids.values()) <= set(by_labels.values())
