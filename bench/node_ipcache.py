"""The node executor's cost of one ipcache change, per key against the whole bucket.

For N ipcache records (pods of this and other nodes), in one process and against the
executor's own ``Reconciler`` and ``translate`` (no kernel, no NATS): one record changes
identity, and the time to bring the reconciler's desired table up to date is taken two ways:

- ``whole bucket``: what the executor did before each key was its own owner: translate every
  record and hand the list to one reconciler owner (``set_desired``), which re-diffs every row;
- ``one key``: what it does now: translate the changed record and set its own owner.

The ratio column is one key / whole bucket. Both tables end equal (checked).

Usage: .venv/bin/python bench/node_ipcache.py [--sizes 1000,10000,50000] [--repeat 50]
Writes bench/results/node_ipcache.json (with the git commit and whether the tree was dirty).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402

from ciliary import output, schema  # noqa: E402
from services.node import translate as T  # noqa: E402
from services.node.reconciler import Reconciler  # noqa: E402

RESULTS = REPO / "bench" / "results" / "node_ipcache.json"
WHOLE_OWNER = "ipcache"


def records(n: int) -> dict[str, schema.IPCacheRecord]:
    out = {}
    for i in range(n):
        prefix = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}/32"
        out[schema.ipcache_key(prefix)] = schema.IPCacheRecord(
            prefix=prefix, identity=256 + i % 1000, source="pod", cluster="c1", cluster_id=1,
            node=f"node-{i % 3}", namespace="default", pod=f"pod-{i}")
    return out


def measure(n: int, repeat: int) -> dict[str, Any]:
    bucket = records(n)
    whole, per_key = Reconciler(), Reconciler()
    whole.set_desired(WHOLE_OWNER, T.ipcache_entries(bucket.values(), "node-0"))
    for key, record in bucket.items():
        per_key.set_desired(T.ipcache_owner(key), T.ipcache_record_entries(record, "node-0"))
    keys = list(bucket)
    whole_s, per_key_s = [], []
    for n_change in range(repeat):
        key = keys[(n_change * 7919) % len(keys)]
        old = bucket[key]
        bucket[key] = schema.IPCacheRecord(prefix=old.prefix, identity=old.identity + 1, source="pod",
                                           cluster="c1", cluster_id=1, node=old.node,
                                           namespace=old.namespace, pod=old.pod)
        t = time.perf_counter()
        whole.set_desired(WHOLE_OWNER, T.ipcache_entries(bucket.values(), "node-0"))
        whole_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        per_key.set_desired(T.ipcache_owner(key), T.ipcache_record_entries(bucket[key], "node-0"))
        per_key_s.append(time.perf_counter() - t)
    assert sorted(map(repr, whole.desired_entries())) == sorted(map(repr, per_key.desired_entries()))
    return {"records": n, "changes": repeat,
            "whole_bucket_ms": round(statistics.median(whole_s) * 1000, 4),
            "one_key_ms": round(statistics.median(per_key_s) * 1000, 4)}


def render(res: dict[str, Any]) -> str:
    rows = [[r["records"], r["whole_bucket_ms"], r["one_key_ms"],
             round(r["one_key_ms"] / r["whole_bucket_ms"], 5) if r["whole_bucket_ms"] else "-"]
            for r in res["sizes"]]
    return output.table(["ipcache records", "whole bucket p50 ms", "one key p50 ms", "one key / whole"], rows)


def main() -> int:
    return S.sized_bench(__doc__, "bench/node_ipcache.py", measure, render, sizes="1000,10000,50000", repeat=50,
                         results=RESULTS)


if __name__ == "__main__":
    sys.exit(main())
