"""Memory and CPU of every process of a running instance: what deploy/ requests and limits.

Starts the embedded default (``ciliary up -d`` with its own cluster name and data
directory), lets it idle, applies the examples, then samples each process's resident
memory (VmRSS, VmHWM = peak) and CPU seconds from /proc. Everything listens on loopback
and lives in ``ciliary-`` namespaces; ``down`` removes it. Writes
bench/results/footprint.json and prints a table.

    .venv/bin/python bench/footprint.py [--nodes 1] [--settle 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ciliary import config  # noqa: E402
from ciliary.output import table  # noqa: E402


def _cli(*args: str, data_dir: str) -> None:
    result = subprocess.run([sys.executable, "-m", "ciliary.cli", *args, "--data-dir", data_dir],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"ciliary {' '.join(args)} failed: {result.stderr}")


def _sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status.splitlines() if ":" in line}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return {
        "rss_mib": round(int(fields["VmRSS"][0]) / 1024, 1),
        "peak_rss_mib": round(int(fields["VmHWM"][0]) / 1024, 1),
        "cpu_s": round((int(stat[11]) + int(stat[12])) / tick, 2),
        "children": len(children),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    cluster = f"fp{os.getpid() % 10000}"
    with tempfile.TemporaryDirectory(prefix="ciliary-bench-") as data_dir:
        started = time.monotonic()
        _cli("up", "-d", "--nodes", str(args.nodes), "--cluster", cluster, "--cluster-id", "77",
             data_dir=data_dir)
        try:
            _cli("apply", "-f", str(ROOT / "examples" / "shop"), data_dir=data_dir)
            time.sleep(args.settle)
            state = config.read_instance(Path(data_dir))
            assert state is not None
            processes = {p.name: _sample(p.pid) for p in state.processes}
        finally:
            _cli("down", data_dir=data_dir)
    results = {
        "command": "bench/footprint.py " + " ".join(sys.argv[1:]),
        "nodes": args.nodes,
        "settle_s": args.settle,
        "wall_s": round(time.monotonic() - started, 1),
        "note": "idle instance with examples/ applied; rss after settling, peak = VmHWM since start",
        "processes": processes,
    }
    out = ROOT / "bench" / "results" / "footprint.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(["PROCESS", "RSS", "PEAK RSS", "CPU"],
                [[name, f"{p['rss_mib']} MiB", f"{p['peak_rss_mib']} MiB", f"{p['cpu_s']} s"]
                 for name, p in sorted(processes.items())]))


if __name__ == "__main__":
    main()
