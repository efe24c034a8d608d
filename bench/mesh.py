"""ClusterMesh: cross-cluster convergence, failover gap, mesh memory per remote backend.

Two throw-away embedded instances (``ciliary up -d --nodes 1``; clusters ``w<4 hex>`` and
``e<4 hex>``, own data dirs) connected with ``ciliary clustermesh connect``.

1. Convergence, for N in 10, 1,000, 10,000 global services (--quick: 10, 1,000): west
   holds N selector-less Services annotated ``service.cilium.io/global: "true"`` with one
   manual EndpointSlice of 3 backends each (unrouted 10.208.x.x addresses: never probed, no
   packet sent); east holds the same N Services (global, no backend of its own), so every
   east frontend's slots are west's backends. Then ``--reps`` times one backend of one
   service is replaced in west (a store write on west's bus), timed from the write until
   the new backend is in one of the frontend's slots in east's node (its pinned lb4 maps,
   read with bpf(2) lookups), with the stages on the way: west's mesh export holds it,
   east's ``mesh`` bucket holds it, east's ``services`` row holds it.
2. Mesh memory: east's mesh service RSS before the connect and once all N services are
   imported, per 1,000 remote backends (3 per service).
3. Failover gap (N=10 run only, unless --no-failover): a global ``payments`` service with
   affinity local and one real backend pod in each cluster, a client pod in east connecting
   every 10 ms; ``--failovers`` times the east backend is made unready (readiness gate) and
   ready again; per failover the gap from the last answer of east to the first of west,
   and the failed attempts in between.

Usage: .venv/bin/python bench/mesh.py [--quick] [--sizes 10,1000] [--reps 30] [--failovers 5]
Writes bench/results/mesh.json (not with --quick unless --output) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import kubeproxy_rules as K  # noqa: E402
import sandbox as S  # noqa: E402

from ciliary import output  # noqa: E402

RESULTS = REPO / "bench" / "results" / "mesh.json"
NODE = "node-1"
GLOBAL = {"service.cilium.io/global": "true"}


def service_doc(svc: K.ServicePort) -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {svc.name}\n  namespace: {svc.namespace}\n"
            f"  annotations: {{service.cilium.io/global: \"true\"}}\n"
            f"spec:\n  ports:\n  - {{name: {svc.port_name}, port: {svc.port}, protocol: {svc.protocol}}}\n")


def slice_doc(svc: K.ServicePort) -> str:
    port = svc.endpoints[0][1]
    eps = "".join(f"- addresses: [{ip}]\n" for ip, _ in svc.endpoints)
    return (f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc.name}-1\n"
            f"  namespace: {svc.namespace}\n  labels: {{kubernetes.io/service-name: {svc.name}}}\n"
            f"addressType: IPv4\nports:\n- {{name: {svc.port_name}, port: {port}, protocol: {svc.protocol}}}\n"
            f"endpoints:\n{eps}")


def manifests(svcs: list[K.ServicePort], *, slices: bool) -> str:
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {svcs[0].namespace}}}\n"]
    for svc in svcs:
        docs.append(service_doc(svc))
        if slices:
            docs.append(slice_doc(svc))
    return "---\n".join(docs)


def frontend_vip(inst: S.EmbeddedInstance, name: str, namespace: str) -> str:
    out = inst.cli("service", "get", name, "-n", namespace, "-o", "json", check=False)
    if out.returncode != 0:
        return ""
    found = [fe["address"] for fe in json.loads(out.stdout)["frontends"] if fe["type"] == "ClusterIP"]
    return found[0] if found else ""


async def _churn(west: S.EmbeddedInstance, east: S.EmbeddedInstance, svc: K.ServicePort, vip: str, reps: int,
                 fe: S.KernelFrontend) -> list[dict[str, float]]:
    """``reps`` one-backend changes in west, each timed to east's kernel with its stages."""
    from ciliary import schema
    from ciliary.bus import Bus
    from ciliary.kv import SYNCED
    from ciliary.resources.loader import loads
    from ciliary.store import ResourceStore

    wbus = await west.connect("bench-mesh-west", allow_reconnect=False)
    ebus = await east.connect("bench-mesh-east", allow_reconnect=False)
    seen: dict[str, dict[str, float]] = {"export": {}, "mesh": {}, "row": {}}

    async def follow(bus: Bus, stage: str, bucket: str, key: str, type_: type) -> None:
        try:
            async for entry in bus.watch(bucket, key):
                if entry is not SYNCED and entry.value:
                    now = time.perf_counter()
                    for backend in schema.decode(entry.value, type_).backends:
                        seen[stage].setdefault(backend.ip, now)
        except Exception as err:  # the stage stays unmeasured (NaN), said once
            print(f"    watch {bucket}/{key}: {type(err).__name__}: {err}", flush=True)
            raise

    ref = f"{svc.namespace}.{svc.name}"
    watchers = [
        asyncio.create_task(follow(wbus, "export", schema.BUCKET_MESH_EXPORT, f"service.{ref}", schema.MeshService)),
        asyncio.create_task(follow(ebus, "mesh", schema.BUCKET_MESH, f"service.{west.cluster}.{ref}",
                                   schema.MeshService)),
        asyncio.create_task(follow(ebus, "row", schema.BUCKET_SERVICES, schema.lb_frontend_key(vip, svc.port, "TCP"),
                                   schema.LBFrontend)),
    ]
    try:
        store = ResourceStore(wbus)
        old_ip = svc.endpoints[2][0]
        out = []
        for rep in range(reps):
            new_svc, new_ip = K.replace_endpoint(svc, rep)
            t0 = time.perf_counter()
            await store.apply(loads(slice_doc(new_svc), "<bench>"))
            t_kernel = await fe.wait(lambda a, ip=new_ip: ip in a, 60, f"backend {new_ip}")
            out.append({"kernel": t_kernel - t0, **{s: seen[s].get(new_ip, float("nan")) - t0 for s in seen}})
            await fe.wait(lambda a, ip=old_ip: ip not in a, 60, f"removal of {old_ip}", poll=0.005)
            old_ip = new_ip
            await asyncio.sleep(0.2)
        return out
    finally:
        for task in watchers:
            task.cancel()
        await wbus.close()
        await ebus.close()


def mesh_rss(inst: S.EmbeddedInstance) -> float:
    return S.process_memory(inst.pids().get("mesh", 0)).get("rss_mib", float("nan"))


def wait_for(probe: Any, what: str, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f}s")
        if time.monotonic() - last_report > 10:
            print(f"    waiting for {what} ...", flush=True)
            last_report = time.monotonic()
        time.sleep(every)


def convergence(n: int, reps: int, load_timeout: float) -> dict[str, Any]:
    svcs = K.synthetic_services(n)
    churned = svcs[n // 2]
    lb = 65536 if 4 * n <= 65536 else 1 << (4 * n - 1).bit_length()
    os.environ["CILIARY_MAP_LB"] = str(lb)
    ids = secrets.randbelow(40)
    with S.EmbeddedInstance("w", cluster_id=150 + ids) as west, S.EmbeddedInstance("e", cluster_id=200 + ids) as east:
        print(f"  N={n}: west {west.cluster} up in {west.up_seconds:.1f}s, east {east.cluster} in "
              f"{east.up_seconds:.1f}s", flush=True)
        for inst, slices in ((west, True), (east, False)):
            path = inst.data_dir / "services.yaml"
            path.write_text(manifests(svcs, slices=slices))
            inst.cli("apply", "-f", str(path), timeout=load_timeout)
        rss_before = mesh_rss(east)
        t0 = time.monotonic()
        east.cli("clustermesh", "connect", "--to", str(west.data_dir), "--timeout", str(load_timeout),
                 timeout=load_timeout + 30)
        vip = wait_for(lambda: frontend_vip(east, churned.name, churned.namespace), "east's frontend", load_timeout)
        fe = S.KernelFrontend(east, NODE, vip, churned.port)
        try:
            want = {ip for ip, _ in churned.endpoints}
            wait_for(lambda: fe.slot_addresses() == want, "west's backends in east's kernel", load_timeout, 0.2)

            def all_imported() -> bool:
                st = json.loads(east.cli("clustermesh", "status", "-o", "json", check=False).stdout or "{}")
                return any(r.get("services") == n for r in st.get("remotes", []))
            wait_for(all_imported, f"all {n} services imported", load_timeout)
            converge_all_s = time.monotonic() - t0
            rss_after = mesh_rss(east)
            print(f"  N={n}: all imported {converge_all_s:.1f}s after connect; mesh RSS {rss_before} -> "
                  f"{rss_after} MiB", flush=True)
            samples = asyncio.run(_churn(west, east, churned, vip, reps, fe))
        finally:
            fe.close()
        processes = {name: S.process_memory(pid) for name, pid in sorted(east.pids().items())}
    for inst in (west, east):
        if inst.problems:
            raise RuntimeError(f"N={n}: " + "; ".join(inst.problems))

    def stage(name: str) -> dict[str, Any]:
        return S.ms_stats([s[name] for s in samples if s[name] == s[name]] or [float("nan")])

    backends = 3 * n
    return {"services": n, "remote_backends": backends, "reps": reps,
            "connect_to_all_imported_s": round(converge_all_s, 2),
            "west_write_to_east_kernel_ms": stage("kernel"),
            "west_write_to_west_export_ms": stage("export"),
            "west_write_to_east_mesh_ms": stage("mesh"),
            "west_write_to_east_row_ms": stage("row"),
            "mesh_rss_before_mib": rss_before, "mesh_rss_after_mib": rss_after,
            "mesh_rss_per_1000_remote_backends_mib": round((rss_after - rss_before) * 1000 / backends, 3),
            "east_processes": processes}


# ---- failover ---------------------------------------------------------------------------------


def pod(name: str, labels: dict[str, str], gate: Path | None) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [{
        "name": "session", "image": "ciliary/workload",
        "command": ["python3", "-m", "ciliary.workload", "session", "--tcp", "8080", "--name", name],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]
    if gate is not None:
        gate.touch()
        containers.append({"name": "gate", "image": "ciliary/workload", "command": ["sleep", "3600"],
                           "readinessProbe": {"exec": {"command": ["test", "-f", str(gate)]}, "periodSeconds": 1}})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": NODE, "containers": containers}}


def apply(inst: S.EmbeddedInstance, *docs: dict[str, Any]) -> None:
    path = inst.data_dir / f"apply-{secrets.token_hex(3)}.yaml"  # JSON documents, YAML stream
    path.write_text("\n---\n".join(json.dumps(d) for d in docs))
    inst.cli("apply", "-f", str(path))


def slot_clusters(inst: S.EmbeddedInstance) -> list[str]:
    out = inst.cli("service", "get", "payments", "-o", "json", check=False)
    if out.returncode != 0:
        return []
    fe = next(f for f in json.loads(out.stdout)["frontends"] if f["type"] == "ClusterIP")
    by_id = {b["id"]: b.get("cluster", "") for b in fe.get("backends", [])}
    return sorted(by_id[i] for i in fe.get("slots", []))


def failover(rounds: int) -> dict[str, Any]:
    gates = Path(tempfile.mkdtemp(prefix="ciliary-bench-mesh-"))
    ids = secrets.randbelow(40)
    os.environ.pop("CILIARY_MAP_LB", None)
    with S.EmbeddedInstance("w", cluster_id=150 + ids) as west, S.EmbeddedInstance("e", cluster_id=200 + ids) as east:
        east.cli("clustermesh", "connect", "--to", str(west.data_dir))
        svc = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "payments", "namespace": "default",
                            "annotations": {**GLOBAL, "service.cilium.io/affinity": "local"}},
               "spec": {"selector": {"app": "payments"}, "ports": [{"name": "tcp", "port": 80, "targetPort": 8080}]}}
        client = {"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": "checkout", "namespace": "default", "labels": {"app": "checkout"}},
                  "spec": {"nodeName": NODE, "containers": [{"name": "idle", "image": "ciliary/workload", "command": [
                      "python3", "-m", "ciliary.workload", "serve", "--tcp", "7000", "--name", "checkout"]}]}}
        apply(east, svc, pod("payments-east", {"app": "payments"}, gates / "east"), client)
        apply(west, svc, pod("payments-west", {"app": "payments"}, None))
        wait_for(lambda: slot_clusters(east) == [""] and len(json.loads(east.cli(
            "service", "get", "payments", "-o", "json").stdout)["frontends"][0].get("backends", [])) == 2,
            "payments with both backends in east", 90)
        vip = frontend_vip(east, "payments", "default")
        stop = gates / "stop"
        argv = [sys.executable, "-m", "ciliary.cli", "--data-dir", str(east.data_dir), "exec", "checkout", "--",
                sys.executable, "-m", "ciliary.workload", "loop", vip, "80", "--interval", "0.01", "--timeout", "0.5",
                "--stop-file", str(stop), "--max-seconds", str(30 + rounds * 15)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        marks = []
        try:
            time.sleep(3.0)  # the client runs (no timing depends on it: the gaps come from its records)
            for _ in range(rounds):
                marks.append(time.time())
                (gates / "east").unlink()
                wait_for(lambda: slot_clusters(east) == [west.cluster], "failover to west", 30, 0.1)
                time.sleep(1.0)
                (gates / "east").touch()
                wait_for(lambda: slot_clusters(east) == [""], "back to east", 30, 0.1)
                time.sleep(1.0)
        finally:
            stop.touch()
            out, err = proc.communicate(timeout=60)
    records = json.loads(out)["records"]
    gaps, failed = [], []
    for mark in marks:
        after = [r for r in records if r[0] >= mark - 0.5]
        first_west = next(i for i, r in enumerate(after) if r[2] == "payments-west")
        last_east = max(i for i, r in enumerate(after[:first_west]) if r[2] == "payments-east")
        gaps.append(after[first_west][0] - after[last_east][1])
        failed.append(sum(1 for r in after[last_east:first_west] if r[2] is None))
    return {"rounds": rounds, "gap_ms": S.ms_stats(gaps), "failed_attempts": failed,
            "client_interval_ms": 10, "attempts": len(records)}


def render(res: dict[str, Any]) -> str:
    rows = []
    for r in res["convergence"]:
        k, e, m, w = (r[f"west_write_to_{s}_ms"] for s in ("east_kernel", "west_export", "east_mesh", "east_row"))
        rows.append([f"{r['services']:,}", f"{k['p50']:.1f}", f"{k['p99']:.1f}", f"{e['p50']:.1f}", f"{m['p50']:.1f}",
                     f"{w['p50']:.1f}", f"{r['connect_to_all_imported_s']:.1f}",
                     f"{r['mesh_rss_per_1000_remote_backends_mib']:.2f}"])
    text = output.table(["GLOBAL SERVICES", "WEST->EAST KERNEL P50 ms", "P99 ms", "EXPORT P50", "EAST MESH P50",
                         "EAST ROW P50", "CONNECT->ALL IMPORTED s", "MESH MiB / 1,000 REMOTE BACKENDS"], rows)
    if res.get("failover"):
        f = res["failover"]
        text += (f"\nfailover (affinity local, client every {f['client_interval_ms']} ms, {f['rounds']} rounds): "
                 f"gap p50 {f['gap_ms']['p50']:.0f} ms, max {f['gap_ms']['max']:.0f} ms; failed attempts "
                 f"{f['failed_attempts']}")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 10,1000,10000)")
    parser.add_argument("--reps", type=int, default=None, help="changes per N (default 30; --quick 10)")
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([10, 1000] if args.quick else [10, 1000, 10000])
    reps = args.reps or (10 if args.quick else 30)
    S.install_sigterm()
    res: dict[str, Any] = {"bench": "mesh", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "git": S.git_state(), "machine": S.machine(), "command": " ".join(sys.argv),
                           "convergence": []}
    dest = args.output or (None if args.quick else RESULTS)

    def save() -> None:  # after every part: a later failure keeps what was measured
        if dest is not None:
            dest.write_text(json.dumps(res, indent=1) + "\n")

    for n in sizes:
        print(f"convergence N={n}", flush=True)
        res["convergence"].append(convergence(n, reps, load_timeout=600))
        save()
    if not args.no_failover:
        print("failover", flush=True)
        res["failover"] = failover(args.failovers)
        save()
    print(render(res))
    if dest is not None:
        print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
