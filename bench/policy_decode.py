"""What a policy record costs its readers: the full ``PolicyMapRecord`` against the
``PolicyMapHead`` the node executor (for identities it does not enforce) and the flows
service read, decoded from the same bytes.

Per entry count (a record of N ingress allow entries, 50 rules, as a relabel rewrites them
for every subject that names the relabelled pod as a peer): median decode time over
``--repeat`` decodes, both ways, and the ratio head / full.

Usage: .venv/bin/python bench/policy_decode.py [--sizes 100,1000,10000] [--repeat 200]
Writes bench/results/policy_decode.json (with the git commit and whether the tree was dirty).
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

RESULTS = REPO / "bench" / "results" / "policy_decode.json"


def record(entries: int) -> bytes:
    return schema.encode(schema.PolicyMapRecord(
        identity=65800, cluster="c1", cluster_id=1, ingress_enforced=True, egress_enforced=False,
        entries=[schema.PolicyEntryRecord(peer=70000 + i, port=80, proto=6, direction="ingress",
                                          verdict="allow", rule_ref=i % 50) for i in range(entries)],
        rules={i: f"CiliumNetworkPolicy/default/p{i} spec[0].ingress[0]" for i in range(50)},
        policies=[f"CiliumNetworkPolicy.default.p{i}" for i in range(50)]))


def median_ms(data: bytes, type_: type, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        schema.decode(data, type_)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 4)


def measure(entries: int, repeat: int) -> dict[str, Any]:
    data = record(entries)
    full = median_ms(data, schema.PolicyMapRecord, repeat)
    head = median_ms(data, schema.PolicyMapHead, repeat)
    return {"entries": entries, "bytes": len(data), "full_ms": full, "head_ms": head}


def render(res: dict[str, Any]) -> str:
    rows = [[f"{r['entries']:,}", f"{r['bytes']:,}", r["full_ms"], r["head_ms"],
             round(r["head_ms"] / r["full_ms"], 3)] for r in res["sizes"]]
    return output.table(["entries", "bytes", "full record ms", "head ms", "head / full"], rows)


def main() -> int:
    return S.sized_bench(__doc__, "bench/policy_decode.py", measure, render, sizes="100,1000,10000", repeat=200,
                         results=RESULTS)


if __name__ == "__main__":
    sys.exit(main())
