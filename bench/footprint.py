"""Memory and CPU of every process of a running instance: what deploy/ requests and limits.

Starts the embedded default (``ciliary up -d`` with its own cluster name and data
directory, ``EmbeddedInstance`` of bench/sandbox.py), applies the examples, lets it idle,
then samples each process's resident memory (VmRSS, VmHWM = peak) and CPU seconds from
/proc. Everything listens on loopback and lives in ``ciliary-`` namespaces; ``down``
removes it. Writes bench/results/footprint.json and prints a table.

    .venv/bin/python bench/footprint.py [--nodes 1] [--settle 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import sandbox as S  # noqa: E402
from ciliary.output import table  # noqa: E402


def _sample(pid: int) -> dict[str, float]:
    memory = S.process_memory(pid)
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return {
        "rss_mib": memory["rss_mib"],
        "peak_rss_mib": memory["peak_rss_mib"],
        "cpu_s": round(S.process_cpu_s(pid), 2),
        "children": len(children),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    started = time.monotonic()
    with S.EmbeddedInstance("fp", 77, nodes=args.nodes) as instance:
        instance.cli("apply", "-f", str(ROOT / "examples" / "shop"))
        time.sleep(args.settle)
        processes = {name: _sample(pid) for name, pid in instance.pids().items()}
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
