"""The identity service's pass for one relabel, incremental against full, in one process.

Runs the real ``IdentityService`` on a ``FakeBus`` (no NATS, no kernel) loaded with P pods
(each its own label set, spread over 20 namespaces, every one with an IP) and R
NetworkPolicies (each with an ``ipBlock``, so CIDR identities exist too). Then, per
repetition, one pod gets a label set never seen before (a new identity, its ipcache entry
moves) and the bench times that pass from its health detail (``recent_passes``: whole pass
and its parts). Two modes alternate on the same service: ``incremental`` (what the service
does) and ``full`` (the same pass with a full comparison forced, what every pass cost before
the desired ipcache was kept by deltas); the ratio column is incremental / full.

The FakeBus answers writes at once, so the numbers are the service's own CPU time per pass,
not NATS round trips.

Usage: .venv/bin/python bench/identity_pass.py [--pods 1000] [--policies 500] [--repeat 40]
Writes bench/results/identity_pass.json (with the git commit and whether the tree was dirty).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import sandbox as S  # noqa: E402

from ciliary import output, schema  # noqa: E402
from ciliary.runtime import Context, Settings  # noqa: E402
from ciliary.testing import FakeBus  # noqa: E402
from services.identity.service import IdentityService  # noqa: E402
from services.identity.settings import IdentityConfig  # noqa: E402

RESULTS = REPO / "bench" / "results" / "identity_pass.json"
NAMESPACES = 20
PARTS = ("inputs", "allocate", "ipcache", "housekeeping")


def put_resource(bus: FakeBus, manifest: dict[str, Any]) -> str:
    meta = manifest["metadata"]
    namespace = meta.get("namespace", "")
    key = f"{manifest['kind']}.{namespace or '_'}.{meta['name']}"
    bus.put(schema.BUCKET_RESOURCES, key, schema.ResourceRecord(
        kind=manifest["kind"], api_version=manifest["apiVersion"], namespace=namespace, name=meta["name"],
        uid=key, generation=1, created="", manifest=manifest))
    return key


def pod(n: int, generation: int = 0) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "spec": {"nodeName": "node-1"},
            "metadata": {"name": f"pod-{n}", "namespace": f"ns-{n % NAMESPACES}",
                         "labels": {"app": f"app-{n}", "gen": f"g{generation}"}}}


def load(bus: FakeBus, pods: int, policies: int) -> None:
    for n in range(NAMESPACES):
        put_resource(bus, {"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": f"ns-{n}", "labels": {"team": f"t{n}"}}})
    for n in range(pods):
        key = put_resource(bus, pod(n))
        bus.put(schema.BUCKET_STATUS, key, schema.StatusRecord(
            reporter="node/node-1", status={"podIP": f"10.1.{n // 250}.{n % 250 + 1}", "phase": "Running"}))
    for n in range(policies):
        put_resource(bus, {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"np-{n}", "namespace": f"ns-{n % NAMESPACES}"},
            "spec": {"podSelector": {"matchLabels": {"app": f"app-{n}"}},
                     "ingress": [{"from": [{"podSelector": {}},
                                           {"ipBlock": {"cidr": f"192.168.{n % 200}.0/24"}}]}]}})


async def measure(pods: int, policies: int, repeat: int) -> dict[str, Any]:
    bus = FakeBus()
    load(bus, pods, policies)
    ctx = Context(service="identity", settings=Settings(nats_url="mem://", instance="identity-bench"), bus=bus)
    service = IdentityService(ctx, IdentityConfig())
    samples: dict[str, list[dict[str, float]]] = {"incremental": [], "full": []}
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.TaskGroup() as tg:
            await service.start(tg)
            try:
                while ctx.detail.get("passes", 0) < 1:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)  # the echoes of the first pass's writes
                for n in range(2 * repeat):
                    mode = "full" if n % 2 else "incremental"
                    service._full_due = mode == "full"
                    before = service.passes
                    put_resource(bus, pod(n % pods, generation=n + 1))
                    while service.passes == before or ctx.detail.get("passes") != service.passes:
                        await asyncio.sleep(0.001)
                    first = service.recent_passes[-(service.passes - before)]
                    samples[mode].append({"ms": first["ms"], **{part: first.get(part, 0.0) for part in PARTS}})
                    await asyncio.sleep(0.05)
            finally:
                for task in tg._tasks:  # type: ignore[attr-defined]
                    task.cancel()
    out: dict[str, Any] = {"pods": pods, "policies": policies, "repeat": repeat,
                           "ipcache_entries": ctx.detail.get("ipcache"), "label_sets": ctx.detail.get("label_sets")}
    for mode, rows in samples.items():
        out[mode] = {name: summary([row[name] for row in rows]) for name in ("ms", *PARTS)}
    return out


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 2),
            "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2),
            "n": len(ordered)}


def render(res: dict[str, Any]) -> str:
    rows = []
    for name in ("ms", *PARTS):
        inc, full = res["incremental"][name], res["full"][name]
        ratio = round(inc["p50"] / full["p50"], 2) if full["p50"] else "-"
        rows.append(["whole pass" if name == "ms" else name, inc["p50"], inc["p99"], full["p50"], full["p99"], ratio])
    return output.table(["relabel pass (ms)", "incremental p50", "p99", "full p50", "p99", "incremental / full"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    res = S.results_header(" ".join([".venv/bin/python", "bench/identity_pass.py", *sys.argv[1:]]))
    res.update(asyncio.run(measure(args.pods, args.policies, args.repeat)))
    S.write_results(args.output, res, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
