"""``ciliary apply``, ``delete`` and ``get``: objects in the resource store.

Invariants:
- Bad input (manifests, arguments) is reported as one clear message per problem, naming
  file, document, object and field (``ManifestError``), or as a ``CliError`` — never a
  traceback. Nothing is applied when any object of the input is invalid.
- ``get`` has ``-o json`` / ``-o yaml`` (one object, or a ``List``); tables are aligned,
  with the kind's columns between NAME and AGE, like ``kubectl get``.
- Reads and writes go through ``ciliary.store.ResourceStore`` on the command's bus.
- ``apply`` parses and validates everything before it connects (a large file in parts
  on every core, the cyclic garbage collector kept off the loaded objects), then writes
  through the store's pipelined all-or-nothing apply; on stdout it prints one result
  line per object, in input order. Progress goes to stderr only: on a terminal above
  ``PROGRESS_MIN_OBJECTS`` objects, or with ``--progress``.
- ``apply`` and ``delete`` run in a root span (``ciliary apply`` / ``ciliary delete``)
  whose context every write carries; when it is exported, the command prints
  ``trace <id>`` on stderr.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from typing import Any

from ciliary import output, tracing
from ciliary.bus import Bus
from ciliary.cli import common
from ciliary.resources import KINDS, Resource, load_manifests, resolve_kind
from ciliary.store import ResourceStore, StoredObject

PROGRESS_MIN_OBJECTS = 500  # applies of more objects show progress on a terminal


def cmd_apply(args: argparse.Namespace) -> int:
    with tracing.command_span(tracing.SPAN_APPLY):
        gc.disable()  # every object the load builds lives on: no collector passes over them
        try:
            resources = load_manifests(args.filename, stdin=sys.stdin, workers=os.cpu_count() or 1)
        finally:
            gc.freeze()  # and later passes skip them (until the command ends)
            gc.enable()
        try:
            return _apply(args, resources)
        finally:
            gc.unfreeze()


def _apply(args: argparse.Namespace, resources: list[Resource]) -> int:
    if not resources:
        raise common.CliError(f"no objects found in {', '.join(args.filename)}")
    tty = sys.stderr.isatty()
    progress = common.Progress(sys.stderr, enabled=args.progress or (tty and len(resources) > PROGRESS_MIN_OBJECTS),
                               min_interval=0.1 if tty else 1.0)
    label = f"applying {len(resources):,} objects"

    def report(done: int, planned: int) -> None:
        if done == planned or progress.due():
            progress.show(f"{label}: {common.progress_bar(done, planned)} written", force=True)

    async def work(bus: Bus) -> list[Any]:
        progress.show(f"{label}: reading what is stored", force=True)
        await bus.ensure_buckets()  # a bus whose services have not started yet has none
        return await ResourceStore(bus).apply(resources, progress=report if progress.enabled else None)

    try:
        results = common.run_with_bus(args, work)
    finally:
        progress.clear()
    sys.stdout.write("".join(f"{result}\n" for result in results))
    _trace_results(len(resources), results)
    return 0


def _trace_results(objects: int, results: list[Any]) -> None:
    """Counts on the command's span, and its trace id on stderr, when it is exported."""
    trace_id = tracing.current_trace_id()
    if not trace_id:
        return
    actions: dict[str, int] = {}
    for result in results:
        actions[result.action] = actions.get(result.action, 0) + 1
    tracing.set_attributes({tracing.ATTR_OBJECTS: objects,
                            **{tracing.ATTR_ACTION.format(action=a.replace(" ", "_")): n
                               for a, n in actions.items()}})
    print(f"trace {trace_id}", file=sys.stderr)


def cmd_delete(args: argparse.Namespace) -> int:
    targets: list[tuple[str, str, str]] = []
    if args.filename:
        if args.kind or args.names:
            raise common.CliError("give either -f PATH or KIND NAME, not both")
        for res in load_manifests(args.filename, stdin=sys.stdin):
            targets.append((res.kind, res.namespace, res.name))
    else:
        if not args.kind or not args.names:
            raise common.CliError("usage: ciliary delete -f PATH | ciliary delete KIND NAME [-n NS]")
        kind = resolve_kind(args.kind)
        namespace = (args.namespace or "default") if KINDS[kind].namespaced else ""
        targets = [(kind, namespace, name) for name in args.names]

    async def work(bus: Bus) -> list[Any]:
        store = ResourceStore(bus)
        return [await store.delete(*t) for t in targets]

    missing = 0
    with tracing.command_span(tracing.SPAN_DELETE):
        results = common.run_with_bus(args, work)
        _trace_results(len(targets), results)
    for result in results:
        if result.action == "not found":
            missing += 1
            common.print_error(f"{result.kind} {_ref(result.namespace, result.name)} not found")
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
                raise common.CliError(
                    f"{kind} {_ref(namespace or 'default' if namespaced else '', args.name)} not found"
                )
            return [found]
        return await store.list(kind, namespace)

    objects = common.run_with_bus(args, work)
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


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``apply``, ``delete`` and ``get`` to the ``ciliary`` parser."""
    p = subparsers.add_parser("apply", parents=[common_parent], help="create or update objects from manifests")
    p.add_argument("-f", "--filename", action="append", required=True, help="file, directory or - for stdin")
    p.add_argument("--progress", action="store_true",
                   help=f"report progress on stderr (default: on a terminal, above {PROGRESS_MIN_OBJECTS} objects)")
    p.set_defaults(func=cmd_apply)

    p = subparsers.add_parser("delete", parents=[common_parent], help="delete objects by manifest or by kind and name")
    p.add_argument("-f", "--filename", action="append")
    p.add_argument("kind", nargs="?")
    p.add_argument("names", nargs="*")
    p.add_argument("-n", "--namespace")
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("get", parents=[common_parent], help="list or show objects")
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    p.set_defaults(func=cmd_get)
