"""Bulk ``ciliary apply -f``: N Services + N EndpointSlices + a Namespace, before and after.

Starts a throw-away nats-server (loopback, own store directory, removed at the end; no
``ciliary up``) and, for each size (default 2,001 and 20,001 objects, the manifest file of
bench/servicelb.py's control-plane part), measures:

- parse: the YAML text to documents — the reference safe loader (the parser before) and
  the event-built documents (after);
- load: ``load_manifests`` (parse + decode + validate), in one piece and in parts on
  every core (``workers``); parse and load with the cyclic garbage collector off, as
  ``ciliary apply`` runs them;
- store: ``ResourceStore.apply`` of the loaded objects into a fresh namespace (every
  object created) and again (every object unchanged) — the pipelined apply against the
  sequential apply kept below (``SequentialStore``: one get and one compare-and-set put
  per object, one after another), both in this process on the same connection;
- cli: the real ``python -m ciliary.cli apply -f FILE`` (a data dir whose instance file
  points at the server), created and unchanged, against the same command of commit
  ``--before`` (exported with ``git archive`` to a temporary directory and run from there);
  both with compiled byte code cached, as after an install (``PYTHONDONTWRITEBYTECODE``
  is dropped from their environment and one ``ciliary --help`` runs first).

Each cell is the median wall time of ``--runs`` runs (min and max in the JSON; for the
CLI also its CPU time, user + system with its forked workers, which a busy machine
distorts less); every run applies into a namespace of its own. Writes bench/results/apply.json (with the git commit, whether
the tree was dirty, the machine's CPU count and load) and prints an aligned table.

    .venv/bin/python bench/apply.py [--sizes 2001,20001] [--runs 3] [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sandbox import NatsServer  # noqa: E402
from ciliary import config, schema  # noqa: E402
from ciliary.bus import Bus, BusError, RevisionMismatch  # noqa: E402
from ciliary.output import table  # noqa: E402
from ciliary.resources import Resource, load_manifests, yamlio  # noqa: E402
from ciliary.store import ApplyResult, ResourceStore, kv_key, now_rfc3339  # noqa: E402

BEFORE = "fd0b24fc48d265af40b144731c1f683efae9609c"  # the last commit with the sequential apply
RESULTS = REPO / "bench" / "results" / "apply.json"


# ---- the apply as it was: one read and one write after another ----------------------------------


def _old_content(manifest: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(manifest)
    body.pop("status", None)
    meta = body.get("metadata") or {}
    for field in ("uid", "resourceVersion", "generation", "creationTimestamp"):
        meta.pop(field, None)
    return body


class SequentialStore:
    """``ResourceStore.apply`` as it was at ``BEFORE`` (the baseline)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def apply(self, resources: Iterable[Resource]) -> list[ApplyResult]:
        planned: list[tuple[str, schema.ResourceRecord | None, int, schema.ResourceRecord]] = []
        results: list[ApplyResult] = []
        for res in resources:
            key = kv_key(res.kind, res.namespace, res.name)
            existing = await self.bus.kv_get_record(schema.BUCKET_RESOURCES, key, schema.ResourceRecord)
            if existing is None:
                record = schema.ResourceRecord(
                    kind=res.kind, api_version=res.api_version, namespace=res.namespace,
                    name=res.name, uid=str(uuid.uuid4()), generation=1, created=now_rfc3339(),
                    manifest=_old_content(res.manifest))
                planned.append((key, None, 0, record))
                results.append(ApplyResult(res.kind, res.namespace, res.name, "created"))
                continue
            old, revision = existing
            new_content = _old_content(res.manifest)
            if new_content == _old_content(old.manifest) and old.api_version == res.api_version:
                results.append(ApplyResult(res.kind, res.namespace, res.name, "unchanged"))
                continue
            record = schema.ResourceRecord(
                kind=res.kind, api_version=res.api_version, namespace=res.namespace,
                name=res.name, uid=old.uid, generation=old.generation + 1, created=old.created,
                manifest=new_content)
            planned.append((key, old, revision, record))
            results.append(ApplyResult(res.kind, res.namespace, res.name, "configured"))
        done: list[tuple[str, schema.ResourceRecord | None, int]] = []
        try:
            for key, old, revision, record in planned:
                done.append((key, old, await self.bus.kv_put(
                    schema.BUCKET_RESOURCES, key, record, last_revision=revision)))
        except (BusError, RevisionMismatch) as err:
            for key, old, new_revision in reversed(done):
                try:
                    if old is None:
                        await self.bus.kv_delete(schema.BUCKET_RESOURCES, key, last_revision=new_revision)
                    else:
                        await self.bus.kv_put(schema.BUCKET_RESOURCES, key, old, last_revision=new_revision)
                except BusError:
                    pass
            raise BusError(f"apply failed, nothing changed: {err}") from err
        return results


# ---- inputs ---------------------------------------------------------------------------------------


def manifest(services: int, namespace: str) -> str:
    """One multi-document file: the Namespace, then per service a selector-less Service
    (one named port, cluster IP requested) and its manual EndpointSlice with 3 endpoints
    (the objects of bench/servicelb.py's control-plane part)."""
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"]
    for i in range(services):
        name = f"svc-{i:05d}"
        cluster_ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
        eps = "".join(f"- addresses: [10.208.{(3 * i + j) // 250 % 256}.{(3 * i + j) % 250 + 1}]\n"
                      for j in range(3))
        docs.append(f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
                    f"spec:\n  clusterIP: {cluster_ip}\n  ports:\n"
                    f"  - {{name: http, port: 80, protocol: TCP}}\n")
        docs.append(f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n"
                    f"  name: {name}-1\n  namespace: {namespace}\n"
                    f"  labels: {{kubernetes.io/service-name: {name}}}\n"
                    f"addressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n"
                    f"endpoints:\n{eps}")
    return "---\n".join(docs)


# ---- the server and the CLI -----------------------------------------------------------------------


def cli_env(python_path: Path | None, data_dir: Path) -> dict[str, str]:
    """The CLI's environment: as installed, with byte code cached (``warm_up`` writes it)."""
    env = dict(os.environ, CILIARY_DATA_DIR=str(data_dir))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    return env


def warm_up(python_path: Path | None, data_dir: Path) -> None:
    """One ``ciliary --help``, so the timed runs find compiled byte code, as after an install."""
    subprocess.run([sys.executable, "-m", "ciliary.cli", "--help"], capture_output=True, check=True,
                   env=cli_env(python_path, data_dir), cwd=python_path or REPO)


def cli_seconds(python_path: Path | None, data_dir: Path, path: Path, expect: int) -> tuple[float, float]:
    """Wall and CPU time (user + system, its forked workers included) of one
    ``ciliary apply -f path``, from process start to exit."""
    env = cli_env(python_path, data_dir)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ciliary.cli", "apply", "-f", str(path)],
                          capture_output=True, text=True, env=env, cwd=python_path or REPO)
    seconds = time.perf_counter() - started
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or done.stdout.count("\n") != expect:
        raise RuntimeError(f"ciliary apply failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, now.ru_utime - used.ru_utime + now.ru_stime - used.ru_stime


def export_before(rev: str, dest: Path) -> Path | None:
    """The ``ciliary`` package of commit ``rev`` under ``dest`` (None without git)."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "ciliary"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"no CLI baseline: cannot export {rev}: {err}", file=sys.stderr)
        return None
    return dest


def git_state() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "dirty": bool(status.strip())}


# ---- measuring ------------------------------------------------------------------------------------


def stats(samples: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(samples), 3), "min": round(min(samples), 3),
            "max": round(max(samples), 3), "runs": len(samples)}


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took with the cyclic garbage collector off, as the CLI loads."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    finally:
        gc.enable()


async def store_seconds(url: str, make: Callable[[Bus], Any], resources: list[Resource]) -> tuple[float, float]:
    """(create, unchanged) seconds of ``make(bus).apply(resources)`` applied twice."""
    bus = await Bus.connect(url, "bench-apply")
    try:
        store = make(bus)
        out = []
        for action in ("created", "unchanged"):
            started = time.perf_counter()
            results = await store.apply(resources)
            out.append(time.perf_counter() - started)
            if {r.action for r in results} != {action}:
                raise RuntimeError(f"expected every object {action}")
        return out[0], out[1]
    finally:
        await bus.close()


def measure(size: int, runs: int, server: NatsServer, root: Path, before: Path | None) -> dict[str, Any]:
    services = (size - 1) // 2
    text = manifest(services, "probe")
    path = root / f"apply-{size}.yaml"
    path.write_text(text)
    workers = os.cpu_count() or 1
    parse_ref, parse_fast, load_one, load_parts = [], [], [], []
    for _ in range(runs):
        parse_ref.append(timed(lambda: yamlio._reference_parse(text)))
        parse_fast.append(timed(lambda: yamlio.parse(text, json_input=False)))
        load_one.append(timed(lambda: load_manifests([str(path)], workers=1)))
        load_parts.append(timed(lambda: load_manifests([str(path)], workers=workers)))
    out: dict[str, Any] = {
        "objects": size, "file_bytes": len(text.encode()), "workers": workers,
        "parse_reference_s": stats(parse_ref), "parse_events_s": stats(parse_fast),
        "load_one_piece_s": stats(load_one), "load_in_parts_s": stats(load_parts),
    }
    print(f"  {size:,} objects: parse and load measured", flush=True)

    variants: dict[str, Callable[[Bus], Any]] = {"sequential": SequentialStore, "pipelined": ResourceStore}
    store: dict[str, dict[str, list[float]]] = {v: {"create": [], "unchanged": []} for v in variants}
    for run in range(runs):
        for variant, make in variants.items():
            resources = load_manifests([str(path)], workers=1)
            namespace = f"s{variant[0]}{size}r{run}"
            resources = [_in_namespace(r, namespace) for r in resources]
            create, unchanged = asyncio.run(store_seconds(server.url, make, resources))
            store[variant]["create"].append(create)
            store[variant]["unchanged"].append(unchanged)
            print(f"  {size:,} objects: store {variant} run {run + 1}: {create:.2f}s create, "
                  f"{unchanged:.2f}s unchanged", flush=True)
    out["store_s"] = {v: {k: stats(s) for k, s in d.items()} for v, d in store.items()}

    data_dir = root / "data"
    clis: dict[str, Path | None] = {"after": None}
    if before is not None:
        clis = {"before": before, **clis}
    cli: dict[str, dict[str, list[float]]] = {v: {"create": [], "unchanged": []} for v in clis}
    cpu: dict[str, dict[str, list[float]]] = {v: {"create": [], "unchanged": []} for v in clis}
    for python_path in clis.values():
        warm_up(python_path, data_dir)
    for run in range(runs):
        for variant, python_path in clis.items():
            file = root / f"cli-{size}-{variant}-{run}.yaml"
            file.write_text(manifest(services, f"c{variant[0]}{size}r{run}"))
            for action in ("create", "unchanged"):
                wall, used = cli_seconds(python_path, data_dir, file, size)
                cli[variant][action].append(wall)
                cpu[variant][action].append(used)
            print(f"  {size:,} objects: CLI {variant} run {run + 1}: {cli[variant]['create'][-1]:.2f}s create, "
                  f"{cli[variant]['unchanged'][-1]:.2f}s unchanged", flush=True)
            file.unlink()
    out["cli_s"] = {v: {k: stats(s) for k, s in d.items()} for v, d in cli.items()}
    out["cli_cpu_s"] = {v: {k: stats(s) for k, s in d.items()} for v, d in cpu.items()}
    return out


def _in_namespace(res: Resource, namespace: str) -> Resource:
    manifest_ = copy.deepcopy(res.manifest)
    if res.namespace:
        manifest_["metadata"]["namespace"] = namespace
        return Resource(kind=res.kind, api_version=res.api_version, namespace=namespace,
                        name=res.name, manifest=manifest_)
    manifest_["metadata"]["name"] = namespace
    return Resource(kind=res.kind, api_version=res.api_version, namespace="", name=namespace,
                    manifest=manifest_)


# ---- output ---------------------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    def s(cell: dict[str, float] | None) -> str:
        return "" if cell is None else f"{cell['median']:.2f} s"

    def row(n: str, step: str, before: dict[str, float] | None, after: dict[str, float],
            cpu: dict[str, float] | None = None) -> list[str]:
        speedup = "" if before is None else f"{before['median'] / max(after['median'], 1e-9):.1f}x"
        return [n, step, s(before), s(after), speedup, s(cpu)]

    rows = []
    for size, r in results["sizes"].items():
        n = f"{int(size):,}"
        st, cli = r["store_s"], r["cli_s"]
        before = cli.get("before", {})
        rows += [
            row(n, "parse YAML: reference loader -> event-built", r["parse_reference_s"], r["parse_events_s"]),
            row(n, f"load + validate: one piece -> {r['workers']} parts", r["load_one_piece_s"],
                r["load_in_parts_s"]),
            row(n, "ResourceStore.apply, all created: sequential -> pipelined",
                st["sequential"]["create"], st["pipelined"]["create"]),
            row(n, "ResourceStore.apply, all unchanged: sequential -> pipelined",
                st["sequential"]["unchanged"], st["pipelined"]["unchanged"]),
            row(n, "ciliary apply -f FILE, all created: before -> after", before.get("create"),
                cli["after"]["create"], r["cli_cpu_s"]["after"]["create"]),
            row(n, "ciliary apply -f FILE, all unchanged: before -> after", before.get("unchanged"),
                cli["after"]["unchanged"], r["cli_cpu_s"]["after"]["unchanged"]),
        ]
    return table(["OBJECTS", "STEP", "BEFORE", "AFTER", "SPEED-UP", "AFTER, CPU"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2001,20001", help="objects per apply (2N+1), comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="git revision of the CLI baseline ('' for none)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ciliary-bench-apply-"))
    server = None
    try:
        server = NatsServer(root / "nats")
        config.write_instance(root / "data", config.InstanceState(nats_url=server.url,
                                                                  supervisor_pid=os.getpid()))
        asyncio.run(_ensure_buckets(server.url))
        before = None
        if args.before:
            (root / "before").mkdir()
            before = export_before(args.before, root / "before")
        results: dict[str, Any] = {
            "command": "python bench/apply.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "git": git_state(), "before": args.before or None,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_1m_start": round(os.getloadavg()[0], 2)},
            "sizes": {},
        }
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"{size:,} objects ({args.runs} runs)", flush=True)
            results["sizes"][str(size)] = measure(size, args.runs, server, root, before)
        results["machine"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"git {results['git'].get('commit', '?')[:12]}{' (dirty)' if results['git'].get('dirty') else ''}; "
          f"load average {results['machine']['load_average_1m_start']} -> "
          f"{results['machine']['load_average_1m_end']}; wrote {args.output}")
    return 0


async def _ensure_buckets(url: str) -> None:
    bus = await Bus.connect(url, "bench-setup")
    try:
        await bus.ensure_buckets()
    finally:
        await bus.close()


if __name__ == "__main__":
    sys.exit(main())
