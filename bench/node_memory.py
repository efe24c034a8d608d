"""Memory of the node executor's desired state for N load-balancer frontends, and the cost
of the periodic work on it.

Builds N frontends of 3 backends as servicelb writes them (``schema.LBFrontend``), then
measures with tracemalloc, in this one process:

- ``rows``: the KV values as the executor's ``services`` mirror keeps them (msgpack bytes);
- ``decoded``: the same values decoded, as the mirror's ``values`` holds them;
- ``reconciler``: a ``Reconciler`` after ``set_desired`` of every frontend's entries
  (``translate.frontend_entries``, the executor's own calls) and one reconcile into a
  map double that keeps nothing.

The ratio column is the reconciler's memory over the decoded records' (the baseline: what
the executor holds anyway for the same frontends). A second table times, on the same table,
one full garbage collection with the table in the process and with it frozen (``gc.freeze``, as
the executor keeps it), and
the status counts every 5 s (``stats()``, running totals) against walking every row
(``recount()``, what the counts cost before they were kept), and one full resync against a
map double that holds the entries (``FakeMapOps``: the Python part of a resync, without
syscalls). Nothing touches the kernel or NATS.

Usage: .venv/bin/python bench/node_memory.py [--sizes 1000,10000] [--output PATH]
Writes bench/results/node_memory.json (with the git commit and whether the tree was dirty).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import msgspec  # noqa: E402
import sandbox as S  # noqa: E402

from ciliary import output, schema  # noqa: E402
from services.node import maps as M  # noqa: E402
from services.node import translate as T  # noqa: E402
from services.node.reconciler import Reconciler  # noqa: E402

RESULTS = REPO / "bench" / "results" / "node_memory.json"
MAGLEV_TABLE = 16381


class DiscardingOps:
    """MapOps that accepts every call and keeps nothing (only the table is measured)."""

    def update(self, *_: Any) -> None: ...
    def update_batch(self, *_: Any) -> None: ...
    def delete(self, *_: Any) -> None: ...
    def delete_batch(self, *_: Any) -> None: ...
    def dump(self, _map: str) -> dict:
        return {}


def frontend(i: int) -> schema.LBFrontend:
    backends = [schema.LBBackend(id=3 * i + j + 1, ip=f"10.{(i >> 8) & 255}.{i & 255}.{j + 1}",
                                 port=8080, proto="TCP") for j in range(3)]
    return schema.LBFrontend(namespace="default", name=f"svc-{i}", type="ClusterIP",
                             address=f"10.96.{(i >> 8) & 255}.{i & 255}", port=80, proto="TCP",
                             service_id=i + 1, rev_nat_id=i + 1, backends=backends,
                             slots=[b.id for b in backends])


def measure(n: int) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        encoder = msgspec.msgpack.Encoder()
        rows = {schema.lb_frontend_key(f"10.96.{(i >> 8) & 255}.{i & 255}", 80, "TCP"): encoder.encode(frontend(i))
                for i in range(n)}
        after_rows = tracemalloc.get_traced_memory()[0]
        decoder = msgspec.msgpack.Decoder(schema.LBFrontend)
        decoded = {key: decoder.decode(value) for key, value in rows.items()}
        after_decoded = tracemalloc.get_traced_memory()[0]
        rec = Reconciler()
        for key, fe in decoded.items():
            rec.set_desired(T.frontend_owner(key), T.frontend_entries(fe, "node-1", MAGLEV_TABLE))
        rec.reconcile(DiscardingOps(), 0.0)
        gc.collect()
        after_reconciler = tracemalloc.get_traced_memory()[0]
        table_rows = rec.stats().done
    finally:
        tracemalloc.stop()
    timing = time_periodic_work(rec)
    mib = 1 << 20
    return {"frontends": n, "table_rows": table_rows,
            "rows_mib": round((after_rows - base) / mib, 1),
            "decoded_mib": round((after_decoded - after_rows) / mib, 1),
            "reconciler_mib": round((after_reconciler - after_decoded) / mib, 1),
            "reconciler_bytes_per_row": round((after_reconciler - after_decoded) / max(1, table_rows)),
            **timing}


def best_ms(fn: Any, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 3)


def time_periodic_work(rec: Reconciler) -> dict[str, float]:
    ops = M.FakeMapOps()
    rec.full_resync(ops, 1.0)  # the double now holds every entry
    return {"stats_ms": best_ms(rec.stats), "recount_ms": best_ms(rec.recount),
            "full_resync_ms": best_ms(lambda: rec.full_resync(ops, 2.0), repeat=3),
            # what a full (generation 2) collection costs with this table in the process,
            # and once the table is frozen out of it (ciliary/heap.py)
            "gc_full_collection_ms": best_ms(gc.collect, repeat=3),
            "gc_full_collection_frozen_ms": _frozen_collection_ms()}


def _frozen_collection_ms() -> float:
    gc.freeze()
    try:
        return best_ms(gc.collect, repeat=3)
    finally:
        gc.unfreeze()


def render(results: dict[str, Any]) -> str:
    rows = [[r["frontends"], r["table_rows"], r["rows_mib"], r["decoded_mib"], r["reconciler_mib"],
             r["reconciler_bytes_per_row"], round(r["reconciler_mib"] / r["decoded_mib"], 2) if r["decoded_mib"] else "-"]
            for r in results["sizes"]]
    memory = output.table(["frontends", "table rows", "KV rows MiB", "decoded MiB", "reconciler MiB",
                           "bytes per row", "reconciler / decoded"], rows)
    periodic = output.table(
        ["frontends", "stats() ms", "walk every row (recount) ms", "stats / walk", "full resync ms",
         "full gc ms", "full gc, table frozen ms"],
        [[r["frontends"], r["stats_ms"], r["recount_ms"],
          round(r["stats_ms"] / r["recount_ms"], 4) if r["recount_ms"] else "-", r["full_resync_ms"],
          r.get("gc_full_collection_ms"), r.get("gc_full_collection_frozen_ms")]
         for r in results["sizes"]])
    return memory + "\n\n" + periodic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    results = {"command": " ".join([".venv/bin/python", "bench/node_memory.py", *sys.argv[1:]]),
               "machine": S.machine(), "sizes": [measure(n) for n in sizes]}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
