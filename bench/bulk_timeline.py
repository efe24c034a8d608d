"""Bulk load, second by second: servicelb's rows against the node executor's kernel entries.

Starts a throw-away embedded instance (``ciliary up -d --nodes 1``, cluster ``k<4 hex>``),
then runs ``ciliary apply -f`` of N selector-less Services with one manual EndpointSlice
each (the control-plane manifest of bench/servicelb.py: backends at unrouted 10.208.x.x
addresses, no packet is sent) and samples every ``--period`` seconds, until every lb4
service entry is in the kernel:

- whether ``apply`` has returned;
- the writes servicelb made to bucket ``services`` (frontend rows, as a watch beside the
  benchmark counts them: a row written twice counts twice);
- the lb4 service entries in the node's pinned map (read with bpf(2)).

It shows where a bulk load waits: rows that arrive in one late jump mean servicelb holds
them; a kernel count far behind the rows means the node executor does.

Usage: .venv/bin/python bench/bulk_timeline.py [--services 10000] [--period 0.5]
Writes bench/results/bulk_timeline.json (with the git commit and whether the tree was
dirty) and prints the samples as an aligned table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import kubeproxy_rules as K  # noqa: E402
import sandbox as S  # noqa: E402
from servicelb import KV_NODE, kv_manifests  # noqa: E402

from ciliary import schema  # noqa: E402
from ciliary.kv import SYNCED  # noqa: E402
from ciliary.output import table  # noqa: E402

RESULTS = REPO / "bench" / "results" / "bulk_timeline.json"


def count_rows(inst: S.EmbeddedInstance, counts: dict[str, int], stop: threading.Event) -> None:
    """Counts every frontend row write to bucket ``services`` until ``stop`` (a thread)."""

    async def follow() -> None:
        bus = await inst.connect("bench-bulk-timeline")
        try:
            async for entry in bus.watch(schema.BUCKET_SERVICES, f"{schema.LB_FRONTEND_PREFIX}.>"):
                if stop.is_set():
                    return
                if entry is not SYNCED and not entry.deleted:
                    counts["rows"] += 1
        finally:
            await bus.close()

    asyncio.run(follow())


def timeline(n: int, period: float, timeout: float) -> dict[str, Any]:
    svcs = K.synthetic_services(n)
    samples: list[dict[str, Any]] = []
    with S.EmbeddedInstance("k", cluster_id=230) as inst:
        path = inst.data_dir / "services.yaml"
        path.write_text(kv_manifests(svcs))
        fe = S.KernelFrontend(inst, KV_NODE, svcs[0].cluster_ip, svcs[0].port)
        counts, stop = {"rows": 0}, threading.Event()
        watcher = threading.Thread(target=count_rows, args=(inst, counts, stop), daemon=True)
        watcher.start()
        time.sleep(1.0)  # the watch is up before the first write
        try:
            t0 = time.monotonic()
            apply = subprocess.Popen([sys.executable, "-m", "ciliary.cli", "apply", "-f", str(path)],
                                     env=dict(os.environ, CILIARY_DATA_DIR=str(inst.data_dir)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            returned = None
            while True:
                now = time.monotonic() - t0
                if returned is None and apply.poll() is not None:
                    returned = now
                entries = fe.services.count()
                samples.append({"s": round(now, 2), "apply_returned": returned is not None,
                                "frontend_row_writes": counts["rows"], "kernel_lb4_entries": entries})
                if entries >= 4 * n and returned is not None:
                    break
                if now > timeout:
                    raise TimeoutError(f"{entries}/{4 * n} lb4 entries after {timeout:.0f}s")
                time.sleep(period)
            if apply.returncode:
                raise RuntimeError(f"ciliary apply: {apply.stderr.read().decode()[-400:] if apply.stderr else ''}")
        finally:
            stop.set()
            fe.close()
    if inst.problems:
        raise RuntimeError("; ".join(inst.problems))
    return {"services": n, "apply_returned_s": returned, "all_in_kernel_s": samples[-1]["s"], "samples": samples}


def render(res: dict[str, Any]) -> str:
    return table(["SECONDS", "APPLY", "FRONTEND ROW WRITES", "KERNEL LB4 ENTRIES"],
                 [[s["s"], "returned" if s["apply_returned"] else "running", s["frontend_row_writes"],
                   s["kernel_lb4_entries"]] for s in res["timeline"]["samples"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--period", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/bulk_timeline.py needs root (network namespaces, BPF)")
    S.install_sigterm()
    res = S.results_header(f"bench/bulk_timeline.py --services {args.services} --period {args.period}")
    res["git"] = S.git_state()
    res["load_average_1m_start"] = round(os.getloadavg()[0], 2)
    res["timeline"] = timeline(args.services, args.period, args.timeout)
    S.write_results(RESULTS, res, render)


if __name__ == "__main__":
    main()
