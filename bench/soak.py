"""Soak under churn: is the memory of every process of an instance bounded?

Starts the embedded default with two nodes (``ciliary up -d``, its own cluster name
``sk<4 hex>`` and data directory, ``EmbeddedInstance`` of bench/sandbox.py; identity GC
grace shortened to ``--gc-grace`` seconds so that identities of deleted pods are freed
during the run), then for ``--minutes`` runs the churn of bench/soakload.py one round
every ``--period`` seconds: a pod created (a new identity), the oldest churn pod deleted, a
one-pod Service created and an older one deleted, the policy rewritten, while a client pod
keeps connecting to the ``churn-web`` cluster IP. RSS and RssAnon of the supervisor,
nats-server, every service and every node executor are sampled every ``--interval``
seconds; cache sizes (``detail.caches`` of ``ciliary status -o json``) and KV bucket sizes
are taken every minute. At the end: convergence (every live pod ready, no identity or
ipcache row and no status of a deleted pod after the grace), ``ciliary down``.

Everything lives in ``ciliary-`` namespaces and on loopback. Writes
bench/results/soak.json (git commit and dirty flag included) and prints a table per process:
start, peak, end, slope over the last half (MiB/min), growth of the last third over the
middle third, verdict.

    .venv/bin/python bench/soak.py [--minutes 30] [--period 6] [--interval 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sandbox as S  # noqa: E402
from bench import soakload as SL  # noqa: E402
from ciliary import schema  # noqa: E402
from ciliary.output import table  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"
BUCKETS = (schema.BUCKET_RESOURCES, schema.BUCKET_STATUS, schema.BUCKET_IDENTITIES, schema.BUCKET_IPCACHE,
           schema.BUCKET_SERVICES, schema.BUCKET_POLICY, schema.BUCKET_ALLOCATIONS)


def cli_for(data_dir: Path) -> SL.Cli:
    def cli(*args: str, stdin: str | None = None) -> str:
        p = subprocess.run([sys.executable, "-m", "ciliary.cli", *args], capture_output=True, text=True,
                           input=stdin, env=dict(os.environ, CILIARY_DATA_DIR=str(data_dir)), cwd=ROOT,
                           timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"ciliary {' '.join(args)}: rc {p.returncode}: {(p.stdout + p.stderr)[-400:]}")
        return p.stdout
    return cli


def bucket_sizes(instance: S.EmbeddedInstance) -> dict[str, int]:
    return {bucket: len(keys) for bucket, keys in SL.bucket_keys(instance.data_dir, BUCKETS).items()}


def wait_for(what: str, fn: Any, timeout: float, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except Exception:  # noqa: BLE001 - retried until the deadline
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--period", type=float, default=6.0, help="seconds between churn rounds")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--gc-grace", type=float, default=20.0, help="identity GC grace (seconds)")
    parser.add_argument("--live-pods", type=int, default=3)
    args = parser.parse_args()
    S.install_sigterm()
    os.environ["CILIARY_IDENTITY_GC_GRACE"] = str(args.gc_grace)
    started = time.monotonic()
    snapshots: list[dict[str, Any]] = []
    with S.EmbeddedInstance("sk", 78, nodes=2) as instance:
        cli = cli_for(instance.data_dir)
        churn = SL.Churn(cli, ["node-1", "node-2"], live_pods=args.live_pods)
        churn.setup()
        client = wait_for("the client pod ready", lambda: SL.ready_pods(cli).get("soak-client"), 90)
        vip = wait_for("churn-web's cluster IP", lambda: json.loads(
            cli("get", "svc", "churn-web", "-o", "json")).get("spec", {}).get("clusterIP"), 30)
        sampler = SL.Sampler(instance.data_dir, args.interval).start()
        churn.start_traffic(client["ciliary"]["netns"], vip)
        end = time.monotonic() + args.minutes * 60
        next_snapshot = time.monotonic()
        try:
            while time.monotonic() < end:
                t0 = time.monotonic()
                churn.step()
                if t0 >= next_snapshot:
                    status = json.loads(cli("status", "-o", "json"))
                    snapshots.append({"t_s": round(t0 - started, 1), "round": churn.round_no,
                                      "caches": SL.cache_counts(status), "buckets": bucket_sizes(instance)})
                    next_snapshot = t0 + 60
                print(f"\r{(time.monotonic() - started) / 60:5.1f} min  round {churn.round_no}  "
                      f"errors {len(churn.errors)}", end="", file=sys.stderr, flush=True)
                time.sleep(max(0.0, args.period - (time.monotonic() - t0)))
        finally:
            ok, failed = churn.stop_traffic()
            sampler.stop()
        print(file=sys.stderr)
        converge_t0 = time.monotonic()
        wait_for("every live pod ready", lambda: len(SL.ready_pods(cli)) == churn.expected_pods() or None, 120)
        wait_for("no identity or ipcache entry of a deleted pod",
                 lambda: not any(SL.leftovers(cli, churn, instance.data_dir).values()) or None, args.gc_grace + 90, poll=5)
        converged_s = time.monotonic() - converge_t0
        status = json.loads(cli("status", "-o", "json"))
        final = {"caches": SL.cache_counts(status), "buckets": bucket_sizes(instance),
                 "leftovers": SL.leftovers(cli, churn, instance.data_dir)}
        restarts = {name: len(pids) - 1 for name, pids in sampler.pids_seen.items() if len(pids) > 1}
    processes = {name: SL.summary(samples) for name, samples in sorted(sampler.samples.items())}
    results = {
        "command": "bench/soak.py " + " ".join(sys.argv[1:]),
        "git": S.git_state(),
        "minutes": args.minutes, "period_s": args.period, "interval_s": args.interval,
        "gc_grace_s": args.gc_grace, "live_pods": args.live_pods, "nodes": 2,
        "rounds": churn.round_no, "pods_created": churn.round_no, "pods_deleted": len(churn.deleted),
        "round_errors": churn.errors, "connections": {"answered": ok, "failed": failed},
        "converged_after_s": round(converged_s, 1), "restarts": restarts,
        "wall_s": round(time.monotonic() - started, 1), "cleanup_problems": instance.problems,
        "note": ("RSS and RssAnon sampled from /proc/<pid>/status; growth = mean of the last third "
                 "minus mean of the middle third; verdict 'growing' when growth exceeds the "
                 "allowance and the last half still climbs > 0.5 MiB/min"),
        "processes": processes, "snapshots": snapshots, "final": final,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(results: dict[str, Any]) -> str:
    rows = []
    for name, p in results["processes"].items():
        rss, anon = p["rss"], p["anon"]
        rows.append([name, f"{rss['start_mib']:.1f}", f"{rss['peak_mib']:.1f}", f"{rss['end_mib']:.1f}",
                     f"{anon['end_mib']:.1f}", f"{rss['slope_last_half_mib_per_min']:+.2f}",
                     f"{rss['growth_mib']:+.1f}", f"{anon['growth_mib']:+.1f}", rss["verdict"], anon["verdict"]])
    lines = [table(["PROCESS", "RSS START", "PEAK", "END", "ANON END", "SLOPE/MIN", "GROWTH", "ANON GROWTH",
                    "RSS", "ANON"], rows)]
    caches = results["final"]["caches"]
    cache_rows = [[service, cache, str(c.get("size")), str(c.get("cap", "-")), str(c.get("evicted", 0))]
                  for service, named in sorted(caches.items()) for cache, c in sorted(named.items())]
    if cache_rows:
        lines += ["", table(["SERVICE", "CACHE", "SIZE", "CAP", "EVICTED"], cache_rows)]
    lines += ["", table(["BUCKET", "KEYS AT END"], [[b, str(n)] for b, n in results["final"]["buckets"].items()])]
    c = results["connections"]
    lines += ["", f"{results['rounds']} rounds ({results['pods_created']} pods created, {results['pods_deleted']} "
              f"deleted), {c['answered']} connections answered, {c['failed']} failed, "
              f"converged {results['converged_after_s']} s after the churn stopped, restarts {results['restarts'] or 'none'}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
