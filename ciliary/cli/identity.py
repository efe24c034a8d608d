"""``ciliary identity``: list, get, explain and report security identities.

Invariants:
- ``list``/``get`` read bucket ``identities`` through ``ciliary.bus.Bus``; ``explain`` and
  ``report`` ask the identity service on ``SUBJECT_IDENTITY_EXPLAIN``/``_REPORT``. This
  module never imports a service package.
- Every command has ``-o json``; tables are aligned (``ciliary.output.table``).
- Failures are ``CliError``s (exit code 1, one clear line), never tracebacks.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from ciliary import output, schema
from ciliary.bus import Bus, BusError
from ciliary.cli import common


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``identity list|get|explain|report`` to the ``ciliary`` parser."""
    parser = subparsers.add_parser("identity", parents=[common_parent],
                                   help="security identities: list, get, explain, report")
    sub = parser.add_subparsers(dest="identity_command", required=True, parser_class=type(parser))

    p = sub.add_parser("list", parents=[common_parent], help="every identity with its labels and users")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("get", parents=[common_parent], help="one identity by numeric ID")
    p.add_argument("id", type=int)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("explain", parents=[common_parent],
                       help="which labels of a pod decide its identity, and why")
    p.add_argument("--pod", metavar="NS/NAME", help="an existing pod")
    p.add_argument("--labels", metavar="K=V,...", help="labels to evaluate instead of a pod")
    p.add_argument("-n", "--namespace", default="default", help="namespace for --labels")
    p.add_argument("--service-account", default="", help="service account for --labels")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", parents=[common_parent],
                       help="label hygiene: labels that multiply identities")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--min-pods", type=int, default=5)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_report)


def parse_label_list(text: str) -> dict[str, str]:
    """``a=b,c=d`` -> ``{"a": "b", "c": "d"}``; raises ValueError on an item without ``=``."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not of the form key=value")
        labels[key.strip()] = value.strip()
    return labels


def plain(value: Any) -> Any:
    """A record as JSON-ready builtins with every field, defaults included."""
    if isinstance(value, msgspec.Struct):
        return {f: plain(getattr(value, f)) for f in value.__struct_fields__}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


UNCOUNTED = ("reserved", "remote")


async def read_identities(bus: Bus) -> list[dict[str, Any]]:
    """Every identity in bucket ``identities``, joined with its label-set record."""
    entries = await bus.kv_list(schema.BUCKET_IDENTITIES)
    for _ in range(2):  # a listing can come back before its keys did; reserved ids always exist
        if schema.identity_id_key(1) in entries:
            break
        entries = await bus.kv_list(schema.BUCKET_IDENTITIES)
    usage: dict[int, schema.IdentityLabelsRecord] = {}
    records: list[schema.IdentityRecord] = []
    for key, entry in entries.items():
        if entry.value is None:
            continue
        try:
            if key.startswith(schema.IDENTITY_LABELS_PREFIX):
                rec = schema.decode(entry.value, schema.IdentityLabelsRecord)
                usage[rec.id] = rec
            elif key.startswith(schema.IDENTITY_ID_PREFIX):
                records.append(schema.decode(entry.value, schema.IdentityRecord))
        except Exception:  # a foreign writer stored garbage: skip it
            continue
    out = []
    for rec in sorted(records, key=lambda r: r.id):
        use = usage.get(rec.id)
        committed = use is not None and list(use.labels) == list(rec.labels)
        out.append({
            "id": rec.id,
            "scope": rec.scope,
            "labels": list(rec.labels),
            "cluster": rec.cluster,
            "cluster_id": rec.cluster_id,
            # reserved identities and a connected cluster's (scope remote) have no label-set record
            "refs": use.refs if committed and use is not None else (None if rec.scope in UNCOUNTED else 0),
            "unused_since": use.unused_since if committed and use is not None else 0.0,
            "committed": committed or rec.scope in UNCOUNTED,
        })
    return out


# ---------------------------------------------------------------- list / get


def cmd_list(args: argparse.Namespace) -> int:
    identities = common.run_with_bus(args, read_identities)
    identities = [i for i in identities if i["committed"]]
    if args.output == "json":
        print(output.to_json(identities))
        return 0
    rows = [[i["id"], i["scope"], "-" if i["refs"] is None else i["refs"], " ".join(i["labels"])]
            for i in identities]
    print(output.table(["ID", "SCOPE", "REFS", "LABELS"], rows))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    async def work(bus: Bus) -> dict[str, Any] | None:
        found = await bus.kv_get_record(schema.BUCKET_IDENTITIES, schema.identity_id_key(args.id),
                                        schema.IdentityRecord)
        if found is None:
            return None
        for item in await read_identities(bus):
            if item["id"] == args.id:
                return item
        return None

    item = common.run_with_bus(args, work)
    if item is None:
        raise common.CliError(f"identity {args.id} not found")
    if args.output == "json":
        print(output.to_json(item))
        return 0
    rows = [["ID", item["id"]], ["SCOPE", item["scope"]],
            ["CLUSTER", f"{item['cluster']} (id {item['cluster_id']})"],
            ["REFS", "-" if item["refs"] is None else item["refs"]]]
    rows += [["LABELS" if i == 0 else "", label] for i, label in enumerate(item["labels"])]
    print("\n".join(f"{k:<8}  {v}" for k, v in rows))
    return 0


# ---------------------------------------------------------------- explain / report


def _request(args: argparse.Namespace, subject: str, request: Any, reply_type: type) -> Any:
    async def work(bus: Bus) -> Any:
        try:
            return await bus.request(subject, request, reply_type, timeout=common.REQUEST_TIMEOUT)
        except BusError as err:
            raise common.CliError(f"{err}: is the identity service running? try: ciliary status") from err

    reply = common.run_with_bus(args, work)
    if not reply.ok:
        raise common.CliError(reply.error)
    return reply


def cmd_explain(args: argparse.Namespace) -> int:
    if bool(args.pod) == bool(args.labels):
        raise common.CliError("give either --pod NS/NAME or --labels K=V,... [--namespace NS]")
    if args.pod:
        namespace, sep, name = args.pod.partition("/")
        if not sep:
            namespace, name = args.namespace or "default", args.pod
        request = schema.IdentityExplainRequest(namespace=namespace, pod=name)
    else:
        try:
            labels = parse_label_list(args.labels)
        except ValueError as err:
            raise common.CliError(str(err)) from err
        request = schema.IdentityExplainRequest(namespace=args.namespace or "default", labels=labels,
                                                service_account=args.service_account)
    reply = _request(args, schema.SUBJECT_IDENTITY_EXPLAIN, request, schema.IdentityExplainReply)
    if args.output == "json":
        print(output.to_json(plain(reply)))
        return 0
    rows = [[v.label, v.origin, "kept" if v.kept else "EXCLUDED", v.rule or "-", v.reason]
            for v in reply.verdicts]
    print(output.table(["LABEL", "FROM", "VERDICT", "RULE", "REASON"], rows))
    ident = reply.identity or "not allocated yet"
    print(f"\nidentity {ident}: {len(reply.identity_labels)} identity labels")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    request = schema.IdentityReportRequest(top=args.top, min_pods=args.min_pods)
    reply = _request(args, schema.SUBJECT_IDENTITY_REPORT, request, schema.IdentityReportReply)
    if args.output == "json":
        print(output.to_json(plain(reply)))
        return 0
    print(f"cluster {reply.cluster} (id {reply.cluster_id}): {reply.pods} pods -> "
          f"{reply.identities_estimated} identities estimated, {reply.identities_allocated} allocated, "
          f"limit {reply.limit}")
    rows = [[r.key, r.pods, r.values, f"{r.uniqueness:.2f}", r.identities_without,
             "FLAG" if r.flagged else "", r.reason or ", ".join(r.examples)]
            for r in reply.labels]
    if rows:
        print(output.table(["LABEL", "PODS", "VALUES", "UNIQUE", "IDS-WITHOUT", "", "WHY / EXAMPLES"], rows))
    for line in reply.advice:
        print(f"advice: {line}")
    return 0
