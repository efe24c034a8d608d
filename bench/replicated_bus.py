"""``ciliary apply`` on the replicated bus (``--nats-replicas 3``) with every server up and
with one server killed, against the single server; and how long a killed server takes to
be current again.

Each instance is the supervisor without nodes (its NATS part and every control-plane
service; nothing leaves loopback). For a server kept down, the supervisor is paused
(SIGSTOP) so it does not restart the server, then resumed (SIGCONT) to restart it.
Every apply is the real CLI (a fresh process, as a user runs it) writing a new Namespace.
Writes bench/results/replicated_bus.json (with the date, the machine, the git commit and
whether the tree was dirty) and prints a table.

    .venv/bin/python bench/replicated_bus.py [--applies 7]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sandbox as S  # noqa: E402

from ciliary import config, natscluster  # noqa: E402
from ciliary.output import table  # noqa: E402


def _cli(*args: str, data_dir: Path, stdin: str = "") -> tuple[bool, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ciliary.cli", *args, "--data-dir", str(data_dir)],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)
    return done.returncode == 0, time.monotonic() - started


class Instance:
    def __init__(self, data_dir: Path, replicas: int) -> None:
        self.data_dir = data_dir
        self.replicas = replicas
        self.applied = 0
        (data_dir / "logs").mkdir(parents=True)
        with open(data_dir / "logs" / "supervisor.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ciliary.supervisor", "--data-dir", str(data_dir), "--nodes", "0",
                 "--cluster", "b" + secrets.token_hex(4), "--cluster-id", "98",
                 "--nats-replicas", str(replicas)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _cli("status", data_dir=data_dir)[0] and self.replicated():
                return
            time.sleep(0.5)
        raise SystemExit(f"instance with {replicas} server(s) not healthy within 60s; see {data_dir}/logs")

    @property
    def state(self) -> config.InstanceState:
        state = config.read_instance(self.data_dir)
        assert state is not None
        return state

    def replicated(self) -> bool:
        """Every server healthy and every stream with all copies current."""
        if self.replicas == 1:
            return True
        answers: dict[str, Any] = {}
        for server in self.state.nats_servers:
            try:
                with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=1):
                    pass
                with urllib.request.urlopen(f"{server.monitor_url}/jsz?streams=true&config=true",
                                            timeout=1) as resp:
                    answers[server.server_name] = json.loads(resp.read())
            except OSError:
                return False
        summary = natscluster.replication_summary(answers)
        return summary["fully_replicated"] == len(summary["streams"]) > 0

    def apply(self) -> tuple[bool, float]:
        self.applied += 1
        return _cli("apply", "-f", "-", data_dir=self.data_dir,
                    stdin=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: bench-{self.applied}}}\n")

    def applies(self, count: int) -> list[float]:
        times = []
        for _ in range(count):
            ok, seconds = self.apply()
            if not ok:
                raise SystemExit(f"apply failed; see {self.data_dir}/logs")
            times.append(seconds)
        return times

    def resources_leader(self) -> str:
        server = self.state.nats_servers[0]
        with urllib.request.urlopen(f"{server.monitor_url}/jsz?streams=true", timeout=2) as resp:
            answer = json.loads(resp.read())
        return next(s["cluster"]["leader"] for a in answer["account_details"] for s in a["stream_detail"]
                    if s["name"] == "KV_resources")

    def kill_server(self, server_name: str, *, keep_down: bool) -> float:
        """SIGKILL one server (``keep_down``: with the supervisor paused, so it stays down);
        returns when it was killed."""
        name = next(s.name for s in self.state.nats_servers if s.server_name == server_name)
        pid = next(p.pid for p in self.state.processes if p.name == name)
        if keep_down:
            os.kill(self.proc.pid, signal.SIGSTOP)
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def first_apply_after(self, killed_at: float) -> tuple[float, int]:
        """Seconds from the kill to the first apply that succeeded, and the attempts failed."""
        failed = 0
        while not self.apply()[0]:
            failed += 1
            if failed > 20:
                raise SystemExit(f"no apply succeeded after a server was killed; see {self.data_dir}/logs")
        return time.monotonic() - killed_at, failed

    def resume_until_replicated(self, since: float = 0.0) -> float:
        """Seconds from ``since`` (default: now, resuming the supervisor) until every stream
        is fully replicated again."""
        resumed = since or time.monotonic()
        os.kill(self.proc.pid, signal.SIGCONT)
        while not self.replicated():
            if time.monotonic() - resumed > 120:
                raise SystemExit("the killed server did not catch up within 120s")
            time.sleep(0.2)
        return time.monotonic() - resumed

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        _cli("down", data_dir=self.data_dir)
        self.proc.wait(timeout=30)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--applies", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, Any] = {
        **S.results_header(" ".join([".venv/bin/python", "bench/replicated_bus.py", *sys.argv[1:]])),
        "applies": args.applies}
    with tempfile.TemporaryDirectory(prefix="ciliary-bench-") as tmp:
        single = Instance(Path(tmp) / "r1", 1)
        try:
            results["single_server_apply_s"] = _stats(single.applies(args.applies))
        finally:
            single.stop()
        bus = Instance(Path(tmp) / "r3", 3)
        try:
            results["three_servers_apply_s"] = _stats(bus.applies(args.applies))
            for role in ("follower", "leader"):
                leader = bus.resources_leader()
                victim = leader if role == "leader" else next(
                    s.server_name for s in bus.state.nats_servers if s.server_name != leader)
                killed_at = bus.kill_server(victim, keep_down=True)
                first, failed = bus.first_apply_after(killed_at)
                down = bus.applies(args.applies)
                caught_up = bus.resume_until_replicated()
                results[f"kill_{role}"] = {
                    "first_apply_after_kill_s": first, "failed_attempts": failed,
                    "apply_with_one_server_down_s": _stats(down),
                    "restart_to_fully_replicated_s": caught_up,
                }
                print(f"killed the resources {role}: first apply after {first:.2f}s ({failed} failed), "
                      f"caught up {caught_up:.2f}s after restart", file=sys.stderr)
            # as under ``ciliary up``: the supervisor restarts the killed leader at once
            killed_at = bus.kill_server(bus.resources_leader(), keep_down=False)
            first, failed = bus.first_apply_after(killed_at)
            results["kill_leader_restarted"] = {
                "first_apply_after_kill_s": first, "failed_attempts": failed,
                "kill_to_fully_replicated_s": bus.resume_until_replicated(killed_at),
            }
        finally:
            bus.stop()
    out = ROOT / "bench" / "results" / "replicated_bus.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    base = results["single_server_apply_s"]["median"]
    rows = [["1 server", f"{base:.2f}s", "1.00", "-", "-"],
            ["3 servers, all up", f"{results['three_servers_apply_s']['median']:.2f}s",
             f"{results['three_servers_apply_s']['median'] / base:.2f}", "-", "-"]]
    for role in ("follower", "leader"):
        entry = results[f"kill_{role}"]
        median = entry["apply_with_one_server_down_s"]["median"]
        rows.append([f"3 servers, resources {role} killed", f"{median:.2f}s", f"{median / base:.2f}",
                     f"{entry['first_apply_after_kill_s']:.2f}s ({entry['failed_attempts']} failed)",
                     f"{entry['restart_to_fully_replicated_s']:.2f}s"])
    entry = results["kill_leader_restarted"]
    rows.append(["3 servers, resources leader killed, restarted", "-", "-",
                 f"{entry['first_apply_after_kill_s']:.2f}s ({entry['failed_attempts']} failed)",
                 f"{entry['kill_to_fully_replicated_s']:.2f}s (from the kill)"])
    print(table(["BUS", "APPLY (MEDIAN)", "VS 1 SERVER", "FIRST APPLY AFTER KILL", "RESTART TO CURRENT"], rows))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
