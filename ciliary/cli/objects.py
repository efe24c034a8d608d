"""``ciliary apply``, ``delete`` and ``get``: objects in the resource store.

Invariants:
- Bad input (manifests, arguments) is reported as one clear message per problem, naming
  file, document, object and field (``ManifestError``), or as a ``CliError`` — never a
  traceback. Nothing is applied when any object of the input is invalid.
- ``get`` shows objects as an API server would (``ciliary.kubeshape``): ``-o json`` /
  ``-o yaml`` (one object, or a ``List``), ``-o jsonpath=TEMPLATE`` (``ciliary.jsonpath``,
  checked before connecting), ``-o name``, and tables with kubectl's columns, ``-o wide``
  adding kubectl's wide ones (``gettable``).
- Reads and writes go through ``ciliary.store.ResourceStore`` on the command's bus.
- ``apply`` that meets a NATS timeout (a replicated bus electing a leader after losing a
  server) runs again as a whole, up to ``APPLY_RETRY_SECONDS`` after it started; every run
  is all-or-nothing and compare-and-set, so repeating it is safe.
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
from typing import Any

from ciliary import jsonpath, kubeshape, output, tracing
from ciliary.bus import Bus
from ciliary.cli import common, gettable
from ciliary.resources import KINDS, Resource, load_manifests, resolve_kind
from ciliary.store import ResourceStore, StoredObject

PROGRESS_MIN_OBJECTS = 500  # applies of more objects show progress on a terminal
APPLY_RETRY_SECONDS = 30.0  # a JetStream leader election takes ~10 s


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
        results = common.run_with_bus_retrying(args, work, within=APPLY_RETRY_SECONDS, what="apply")
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

    template = _jsonpath_template(args.output)
    objects = common.run_with_bus(args, work)
    if args.output == "name":  # names only: nothing to shape
        print("".join(f"{_resource_name(o.record.api_version, kind)}/{o.record.name}\n"
                      for o in objects), end="")
        return 0
    shaped = [kubeshape.shape(o.to_manifest()) for o in objects]
    data = shaped[0] if args.name else kubeshape.as_list(shaped)
    if args.output == "json":
        print(output.to_json(data))
    elif args.output == "yaml":
        print(output.to_yaml(data), end="")
    elif template is not None:
        sys.stdout.write(template.render(data))
    else:
        if not objects:
            where = "" if namespace is None or not namespaced else f" in {namespace} namespace"
            print(f"No {KINDS[kind].plural} found{where}.", file=sys.stderr)
            return 0
        print(gettable.render(kind, shaped, show_namespace=namespace is None,
                              wide=args.output == "wide"))
    return 0


def _resource_name(api_version: str, kind: str) -> str:
    """How ``kubectl -o name`` names a kind: ``pod``, ``networkpolicy.networking.k8s.io``."""
    group = api_version.rpartition("/")[0]
    return f"{kind.lower()}.{group}" if group else kind.lower()


OUTPUT_FORMATS = ("table", "wide", "json", "yaml", "name")


def output_format(value: str) -> str:
    """``-o``: one of OUTPUT_FORMATS or ``jsonpath=TEMPLATE``."""
    if value in OUTPUT_FORMATS or value.startswith("jsonpath="):
        return value
    raise argparse.ArgumentTypeError(
        f"unknown output format {value!r}: use one of {', '.join(OUTPUT_FORMATS)} or jsonpath=TEMPLATE")


def _jsonpath_template(value: str) -> jsonpath.Template | None:
    if not value.startswith("jsonpath="):
        return None
    try:
        return jsonpath.compile_template(value[len("jsonpath="):])
    except jsonpath.JSONPathError as err:
        raise common.CliError(f"error parsing jsonpath {value[len('jsonpath='):]!r}: {err}") from None


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
    p.add_argument("-o", "--output", type=output_format, default="table",
                   help="table (default), wide, json, yaml, name or jsonpath=TEMPLATE")
    p.set_defaults(func=cmd_get)
