"""The ``ciliary`` command line.

Invariants:
- Every command finds its instance through ``--data-dir`` / ``CILIARY_DATA_DIR`` / the
  per-user default, and fails with exit code 1 and a hint when none is running.
- Bad input (manifests, arguments) is reported as one clear message per problem, naming
  file, document, object and field, with exit code 1 — never a traceback. Nothing is
  applied when any object of the input is invalid.
- Data output has ``-o json``; tables are aligned.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ciliary import config, output, schema
from ciliary.bus import Bus, BusError
from ciliary.resources import KINDS, ManifestError, load_manifests, resolve_kind
from ciliary.status import gather_health, missing_or_unhealthy
from ciliary.store import ResourceStore, StoredObject


class CliError(Exception):
    """A user-facing failure: printed as ``error: <message>``, exit code 1."""


# ---------------------------------------------------------------- instance discovery


def running_instance(data_dir: Path) -> config.InstanceState:
    state = config.read_instance(data_dir)
    if state is None or not config.pid_alive(state.supervisor_pid):
        raise CliError(
            f"no ciliary instance is running for data dir {data_dir}\n"
            f"  start one with: ciliary up -d --data-dir {data_dir}"
        )
    return state


async def _with_bus(data_dir: Path, work: Callable[[Bus], Awaitable[Any]]) -> Any:
    state = running_instance(data_dir)
    try:
        bus = await Bus.connect(state.nats_url, "ciliary-cli", allow_reconnect=False)
    except BusError as err:
        raise CliError(f"{err}\n  is the instance healthy? try: ciliary status") from err
    try:
        return await work(bus)
    finally:
        await bus.close()


def run_with_bus(args: argparse.Namespace, work: Callable[[Bus], Awaitable[Any]]) -> Any:
    return asyncio.run(_with_bus(args.data_dir_path, work))


# ---------------------------------------------------------------- apply / delete / get


def cmd_apply(args: argparse.Namespace) -> int:
    resources = load_manifests(args.filename, stdin=sys.stdin)
    if not resources:
        raise CliError(f"no objects found in {', '.join(args.filename)}")

    async def work(bus: Bus) -> list[Any]:
        return await ResourceStore(bus).apply(resources)

    for result in run_with_bus(args, work):
        print(result)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    targets: list[tuple[str, str, str]] = []
    if args.filename:
        if args.kind or args.names:
            raise CliError("give either -f PATH or KIND NAME, not both")
        for res in load_manifests(args.filename, stdin=sys.stdin):
            targets.append((res.kind, res.namespace, res.name))
    else:
        if not args.kind or not args.names:
            raise CliError("usage: ciliary delete -f PATH | ciliary delete KIND NAME [-n NS]")
        kind = resolve_kind(args.kind)
        namespace = (args.namespace or "default") if KINDS[kind].namespaced else ""
        targets = [(kind, namespace, name) for name in args.names]

    async def work(bus: Bus) -> list[Any]:
        store = ResourceStore(bus)
        return [await store.delete(*t) for t in targets]

    missing = 0
    for result in run_with_bus(args, work):
        if result.action == "not found":
            missing += 1
            print(f"error: {result.kind} {_ref(result.namespace, result.name)} not found", file=sys.stderr)
        else:
            print(result)
    return 1 if missing and not args.filename else 0


def _ref(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def cmd_get(args: argparse.Namespace) -> int:
    kind = resolve_kind(args.kind)
    namespaced = KINDS[kind].namespaced
    namespace: str | None
    if not namespaced:
        namespace = ""
    elif args.all_namespaces:
        namespace = None
    else:
        namespace = args.namespace or "default"

    async def work(bus: Bus) -> list[StoredObject]:
        store = ResourceStore(bus)
        if args.name:
            found = await store.get(kind, namespace or "default" if namespaced else "", args.name)
            if found is None:
                raise CliError(
                    f"{kind} {_ref(namespace or 'default' if namespaced else '', args.name)} not found"
                )
            return [found]
        return await store.list(kind, namespace)

    objects = run_with_bus(args, work)
    if args.output == "json":
        items = [o.to_manifest() for o in objects]
        print(output.to_json(items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}))
    elif args.output == "yaml":
        items = [o.to_manifest() for o in objects]
        print(output.to_yaml(items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}), end="")
    else:
        if not objects:
            where = "" if namespace is None or not namespaced else f" in {namespace} namespace"
            print(f"No {KINDS[kind].plural} found{where}.", file=sys.stderr)
            return 0
        print(render_table(kind, objects, show_namespace=namespace is None))
    return 0


def _service_ports(spec: dict[str, Any]) -> str:
    return ",".join(
        f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol', 'TCP')}"
        for p in spec.get("ports") or []
    ) or "<none>"


def _slice_endpoints(manifest: dict[str, Any]) -> str:
    addrs = [a for e in manifest.get("endpoints") or [] for a in e.get("addresses", [])]
    return ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more" if len(addrs) > 3 else "")


# kind -> the columns between NAME and AGE: (header, value from manifest, spec, status)
Column = tuple[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], Any]]
TABLE_COLUMNS: dict[str, list[Column]] = {
    "Pod": [
        ("STATUS", lambda m, spec, st: st.get("phase", "Pending")),
        ("IP", lambda m, spec, st: st.get("podIP", "<none>")),
        ("NODE", lambda m, spec, st: spec.get("nodeName", "<none>")),
    ],
    "Service": [
        ("TYPE", lambda m, spec, st: spec.get("type", "ClusterIP")),
        ("CLUSTER-IP", lambda m, spec, st: st.get("clusterIP") or spec.get("clusterIP") or "<pending>"),
        ("PORT(S)", lambda m, spec, st: _service_ports(spec)),
    ],
    "Node": [
        ("STATUS", lambda m, spec, st: st.get("phase", "Ready" if st else "Registered")),
        ("POD-CIDR", lambda m, spec, st: spec.get("podCIDR") or st.get("podCIDR") or "<none>"),
    ],
    "EndpointSlice": [
        ("ADDRESSTYPE", lambda m, spec, st: m.get("addressType", "")),
        ("ENDPOINTS", lambda m, spec, st: _slice_endpoints(m)),
    ],
}


def render_table(kind: str, objects: list[StoredObject], *, show_namespace: bool) -> str:
    columns = TABLE_COLUMNS.get(kind, [])
    headers = (["NAMESPACE"] if show_namespace else []) + ["NAME", *(h for h, _ in columns), "AGE"]
    rows: list[list[Any]] = []
    for obj in objects:
        manifest = obj.to_manifest()
        spec = manifest.get("spec") or {}
        status = manifest.get("status") or {}
        rows.append([
            *([obj.record.namespace] if show_namespace else []),
            obj.record.name,
            *(value(manifest, spec, status) for _, value in columns),
            output.age_since_rfc3339(obj.record.created),
        ])
    return output.table(headers, rows)


# ---------------------------------------------------------------- up / down / status


def cmd_up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir_path
    existing = config.read_instance(data_dir)
    if existing is not None and config.pid_alive(existing.supervisor_pid):
        raise CliError(
            f"an instance is already running for {data_dir} (nats {existing.nats_url}); "
            "stop it with: ciliary down"
        )
    config.remove_instance(data_dir)
    if args.nodes < 1:
        raise CliError("--nodes must be at least 1")
    argv = [
        sys.executable, "-m", "ciliary.supervisor", "--data-dir", str(data_dir),
        "--nats-port", str(args.nats_port), "--nodes", str(args.nodes),
        "--cluster", args.cluster, "--cluster-id", str(args.cluster_id),
    ]
    if not args.detach:
        from ciliary import supervisor

        print(f"ciliary up: data dir {data_dir}; Ctrl-C stops everything", file=sys.stderr)
        supervisor.main(argv[3:])
        return 0

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    with open(data_dir / "logs" / "supervisor.log", "ab") as log_file:
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    nodes = [f"node-{i}" for i in range(1, args.nodes + 1)]
    deadline = started + args.timeout
    missing: list[str] = ["nats-server"]
    last_report = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(
                f"the supervisor exited with code {proc.returncode}; see {data_dir / 'logs'}"
            )
        state = config.read_instance(data_dir)
        if state is not None:
            try:
                reports = asyncio.run(_health(state.nats_url))
            except BusError:
                reports = []
            missing = missing_or_unhealthy(reports, nodes)
            if not missing:
                elapsed = time.monotonic() - started
                print(f"ciliary is up in {elapsed:.1f}s: nats {state.nats_url}, "
                      f"{len(reports)} services healthy, data dir {data_dir}")
                if state.ui_url:
                    print(f"service map: {state.ui_url}   metrics: {state.metrics_url}")
                return 0
        report = f"waiting for: {', '.join(missing)}"
        if report != last_report and sys.stderr.isatty():
            print(report, file=sys.stderr)
        last_report = report
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    raise CliError(
        f"not healthy after {args.timeout:.0f}s (still waiting for {', '.join(missing)}); "
        f"stopped it; logs in {data_dir / 'logs'}"
    )


async def _health(url: str) -> list[schema.HealthReport]:
    bus = await Bus.connect(url, "ciliary-cli", allow_reconnect=False)
    try:
        return await gather_health(bus, timeout=0.5)
    finally:
        await bus.close()


def cmd_down(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir_path
    state = config.read_instance(data_dir)
    if state is None or not config.pid_alive(state.supervisor_pid):
        config.remove_instance(data_dir)
        print(f"no ciliary instance is running for {data_dir}")
        return 0
    os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    pids = [state.supervisor_pid] + [p.pid for p in state.processes]
    while time.monotonic() < deadline and any(config.pid_alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if config.pid_alive(p)]
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    config.remove_instance(data_dir)
    print(f"ciliary stopped ({len(pids)} processes{', ' + str(len(survivors)) + ' killed' if survivors else ''})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = running_instance(args.data_dir_path)
    reports = run_with_bus(args, lambda bus: gather_health(bus, timeout=args.timeout))
    now = time.time()
    missing = missing_or_unhealthy(reports, state.nodes)
    if args.output == "json":
        print(output.to_json({
            "nats_url": state.nats_url,
            "cluster": state.cluster,
            "cluster_id": state.cluster_id,
            "data_dir": str(args.data_dir_path),
            "ui_url": state.ui_url,
            "metrics_url": state.metrics_url,
            "healthy": not missing,
            "missing": missing,
            "services": [
                {
                    "name": r.service,
                    "instance": r.instance,
                    "node": r.node,
                    "pid": r.pid,
                    "version": r.version,
                    "healthy": r.healthy,
                    "uptime_seconds": round(now - r.started, 1),
                    "watching": r.watching,
                    "detail": r.detail,
                }
                for r in reports
            ],
        }))
        return 0 if not missing else 1
    print(f"cluster {state.cluster} (id {state.cluster_id})   nats {state.nats_url}   data dir {args.data_dir_path}")
    if state.ui_url:
        print(f"service map {state.ui_url}   metrics {state.metrics_url}")
    rows = [
        [r.service, r.node or "-", r.pid, r.version, "yes" if r.healthy else "NO",
         output.age(now - r.started), _watching(r)]
        for r in reports
    ]
    rows += [[name, "-", "-", "-", "MISSING", "-", ""] for name in missing if not any(
        (f"node/{r.node}" if r.service == "node" else r.service) == name for r in reports)]
    print(output.table(["SERVICE", "NODE", "PID", "VERSION", "HEALTHY", "UPTIME", "WATCHING"], rows))
    return 0 if not missing else 1


def _watching(report: schema.HealthReport) -> str:
    """``Pod=3 Namespace=2`` for each resource kind the service watches."""
    if report.service == "node":
        keys = ("pods", "endpoints", "ipcache", "frontends", "policy_entries")
        text = " ".join(f"{key}={report.detail[key]}" for key in keys if key in report.detail)
        if "map_pressure_max" in report.detail:
            text += f" map-pressure={report.detail['map_pressure_max']:.2%}"
        return text
    counts = report.detail.get("resources") or {}
    kinds = [w.split("/", 1)[1] for w in report.watching if w.startswith("resources/")]
    return " ".join(f"{kind}={counts.get(kind, 0)}" for kind in kinds)


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--data-dir", default=argparse.SUPPRESS, help=f"instance state directory (env {config.ENV_DATA_DIR}; default {config.default_data_dir()})"
    )
    parser = _Parser(prog="ciliary", description="ciliary: an eBPF Kubernetes networking data plane", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("apply", parents=[common], help="create or update objects from manifests")
    p.add_argument("-f", "--filename", action="append", required=True, help="file, directory or - for stdin")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("delete", parents=[common], help="delete objects by manifest or by kind and name")
    p.add_argument("-f", "--filename", action="append")
    p.add_argument("kind", nargs="?")
    p.add_argument("names", nargs="*")
    p.add_argument("-n", "--namespace")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("get", parents=[common], help="list or show objects")
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("up", parents=[common], help="start NATS and every service")
    p.add_argument("-d", "--detach", action="store_true", help="return once every service is healthy")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nats-port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--cluster", default=schema.DEFAULT_CLUSTER_NAME)
    p.add_argument("--cluster-id", type=int, default=schema.DEFAULT_CLUSTER_ID)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for health with -d")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", parents=[common], help="stop a detached instance")
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", parents=[common], help="show every service and its health")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--timeout", type=float, default=1.0)
    p.set_defaults(func=cmd_status)

    from ciliary import cli_service

    cli_service.add_commands(sub, common)

    from ciliary import cli_observe

    cli_observe.add_commands(sub, common, run_with_bus=run_with_bus, cli_error=CliError)

    from ciliary import cli_node

    cli_node.add_commands(sub, common)

    from ciliary import cli_policy

    cli_policy.add_commands(sub, common)

    from ciliary import cli_identity

    cli_identity.add_commands(sub, common, run_with_bus=run_with_bus, cli_error=CliError)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_dir_path = config.resolve_data_dir(getattr(args, "data_dir", None))
    try:
        code = args.func(args)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except BusError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        code = 0
    except Exception as err:  # last resort: a clear line, never a traceback
        print(f"error: unexpected {type(err).__name__}: {err}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
