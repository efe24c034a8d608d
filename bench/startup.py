"""Time from ``ciliary up -d`` to every service healthy, and ``down`` to nothing left.

Runs the real CLI against fresh data directories (nothing is routed anywhere: the
instance listens on loopback only). Writes bench/results/startup.json and prints a table.

    .venv/bin/python bench/startup.py [--runs 5] [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ciliary.output import table  # noqa: E402


def _cli(*args: str, data_dir: str) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ciliary.cli", *args, "--data-dir", data_dir],
        capture_output=True, text=True, cwd=ROOT,
    )
    if result.returncode != 0:
        raise SystemExit(f"ciliary {' '.join(args)} failed: {result.stderr}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    up, down = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ciliary-bench-") as data_dir:
            up.append(_cli("up", "-d", "--nodes", str(args.nodes), data_dir=data_dir))
            down.append(_cli("down", data_dir=data_dir))
        print(f"run {run + 1}/{args.runs}: up {up[-1]:.2f}s down {down[-1]:.2f}s", file=sys.stderr)
    results = {
        "nodes": args.nodes,
        "runs": args.runs,
        "up_to_healthy_s": {"median": statistics.median(up), "min": min(up), "max": max(up)},
        "down_s": {"median": statistics.median(down), "min": min(down), "max": max(down)},
    }
    out = ROOT / "bench" / "results" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(
        ["STEP", "MEDIAN", "MIN", "MAX"],
        [
            ["up -d until healthy", f"{results['up_to_healthy_s']['median']:.2f}s", f"{min(up):.2f}s", f"{max(up):.2f}s"],
            ["down", f"{results['down_s']['median']:.2f}s", f"{min(down):.2f}s", f"{max(down):.2f}s"],
        ],
    ))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
