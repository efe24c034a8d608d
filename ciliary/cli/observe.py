"""``ciliary observe`` (``hubble observe``) and ``ciliary metrics``.

Invariants:
- Filter flags are Hubble's and build the same ``FlowFilter`` lists (``ciliary.flowfilter
  .build_filters``, in command-line order, ``--not`` applying to the next flag).
- History comes from the flows service over NATS request/reply (``SUBJECT_FLOWS_QUERY``),
  answered as a stream of ``FlowQueryReply`` chunks (``Bus.request_stream``), so an
  answer of any size arrives (``ReplyChunks`` checks they arrive complete and in order,
  and a missing chunk is an error, never a silently shorter answer); ``--follow``
  subscribes to ``SUBJECT_FLOWS_ALL`` (``FlowBatch`` messages, ``Bus.subscribe_raw``) and
  filters locally with the same matcher. The bus is used only through its public API;
  this module never imports a service package.
- The service reads its ``FLOWS`` stream for history the rings no longer hold; while it
  reads it sends empty progress chunks (``scanned``), shown on stderr only on a terminal
  or with ``--progress``. An answer cut short by the service's scan bound (``truncated``)
  or lacking the stream part (``notice``) is printed with a notice on stderr.
- Output formats are ``hubble observe``'s: compact, dict, json, jsonpb, table. Events
  the service counted as lost within the answer's time span (``lost_events`` of the last
  chunk) follow the flows as Hubble lost-events lines.
- Failures are ``CliError``s (exit code 1, one clear line), never tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from ciliary import flowfilter, hubble, schema
from ciliary.bus import Bus, BusError, Message, NoReply
from ciliary.cli import common, flowrender


class QueryError(Exception):
    """The flows service refused a query, or its answer did not arrive complete."""

    def __init__(self, message: str, *, unanswered: bool = False) -> None:
        super().__init__(message)
        self.unanswered = unanswered  # nothing (or nothing more) came: is the service running?


class ReplyChunks:
    """Reassembles the chunks of one ``FlowQuery`` answer (pure): ``feed`` each payload in
    arrival order; it returns the chunk's flows and raises ``QueryError`` for an error
    reply or a chunk out of sequence. ``done`` once the last chunk (``more`` unset) came;
    ``final`` is that chunk (it carries the counters)."""

    def __init__(self) -> None:
        self.next = 0
        self.final: schema.FlowQueryReply | None = None
        self.scanned = 0  # flows of the FLOWS stream the service has read so far

    @property
    def done(self) -> bool:
        return self.final is not None

    def feed(self, data: bytes) -> list[schema.Flow]:
        try:
            reply = schema.decode(data, schema.FlowQueryReply)
        except Exception as err:  # msgspec.DecodeError / ValidationError
            raise QueryError(f"bad answer from the flows service: {err}") from err
        if not reply.ok:
            raise QueryError(reply.error)
        if reply.chunk != self.next:
            raise QueryError(f"the answer arrived incomplete: chunk {self.next} is missing "
                             f"(got chunk {reply.chunk}); try again or ask for fewer flows")
        self.next += 1
        self.scanned = max(self.scanned, reply.scanned)
        if not reply.more:
            self.final = reply
        return reply.flows

    def notices(self) -> list[str]:
        """What the complete answer lacks, one line each (empty when nothing)."""
        final = self.final
        if final is None:
            return []
        out = [final.notice] if final.notice else []
        if final.truncated:
            out.append(f"the answer may be incomplete: the flows service stops reading the flow history "
                       f"after {final.scanned:,} flows per query; narrow it with --since/--until or filters")
        return out


class Progress(common.Progress):
    """The progress of a long history read: flows of the stream scanned so far."""

    def update(self, scanned: int) -> None:
        self.show(f"reading flow history: {scanned:,} flows scanned")


async def query_flows(
    bus: Bus, query: schema.FlowQuery, timeout: float, *, chunks: ReplyChunks | None = None,
    progress: Callable[[int], None] | None = None,
) -> AsyncIterator[list[schema.Flow]]:
    """The flows answering ``query``, chunk by chunk (oldest first). Raises ``QueryError``
    when there is no answer within ``timeout`` seconds (from the request or the previous
    chunk) or the answer is incomplete. ``chunks`` (a fresh ``ReplyChunks``) is left
    holding the final chunk; ``progress`` gets the flows scanned from each progress chunk."""
    chunks = ReplyChunks() if chunks is None else chunks
    replies = bus.request_stream(schema.SUBJECT_FLOWS_QUERY, query, timeout=timeout)
    async with aclosing(replies):
        while not chunks.done:
            try:
                data = await anext(replies)
            except NoReply as err:
                what = "no answer" if chunks.next == 0 else f"the answer stopped after {chunks.next} chunks"
                raise QueryError(f"{what} on {schema.SUBJECT_FLOWS_QUERY}", unanswered=True) from err
            flows = chunks.feed(data)
            if progress is not None and not flows and not chunks.done:
                progress(chunks.scanned)
            yield flows


DEFAULT_LAST = 20

# (flags, filter name, help)
FILTER_OPTIONS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("--from-pod",), "from-pod", "flows from pods with this name prefix ([namespace/]<pod-name>)"),
    (("--to-pod",), "to-pod", "flows to pods with this name prefix ([namespace/]<pod-name>)"),
    (("--pod",), "pod", "flows from or to pods with this name prefix ([namespace/]<pod-name>)"),
    (("-n", "--namespace"), "namespace", "flows from or to this namespace"),
    (("--from-namespace",), "from-namespace", "flows from this namespace"),
    (("--to-namespace",), "to-namespace", "flows to this namespace"),
    (("-l", "--label"), "label", "flows from or to endpoints matching this label selector"),
    (("--from-label",), "from-label", "flows from endpoints matching this label selector"),
    (("--to-label",), "to-label", "flows to endpoints matching this label selector"),
    (("--identity",), "identity", "flows from or to this security identity (number or reserved name)"),
    (("--from-identity",), "from-identity", "flows from this security identity"),
    (("--to-identity",), "to-identity", "flows to this security identity"),
    (("--ip",), "ip", "flows from or to this IP or CIDR"),
    (("--from-ip",), "from-ip", "flows from this IP or CIDR"),
    (("--to-ip",), "to-ip", "flows to this IP or CIDR"),
    (("--fqdn",), "fqdn", "flows from or to this DNS name (pattern, e.g. *.example.com)"),
    (("--from-fqdn",), "from-fqdn", "flows from this DNS name (source_names)"),
    (("--to-fqdn",), "to-fqdn", "flows to this DNS name (destination_names)"),
    (("--service",), "service", "flows from or to this service ([namespace/]<name>)"),
    (("--from-service",), "from-service", "flows from this service"),
    (("--to-service",), "to-service", "flows to this service"),
    (("--verdict",), "verdict", "FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED, TRANSLATED"),
    (("--drop-reason-desc",), "drop-reason-desc", "drop reason, e.g. POLICY_DENIED"),
    (("--protocol",), "protocol", "tcp, udp, icmp, icmpv4, icmpv6, sctp, dns"),
    (("--port",), "port", "flows from or to this L4 port"),
    (("--from-port",), "from-port", "flows from this L4 port"),
    (("--to-port",), "to-port", "flows to this L4 port"),
    (("--traffic-direction",), "traffic-direction", "ingress or egress"),
    (("-t", "--type"), "type", "event type: trace, drop, policy-verdict, l7, trace:to-endpoint, ..."),
    (("--node-name",), "node-name", "node name pattern: node-glob or cluster/node-glob"),
    (("--cluster",), "cluster", "flows from or to endpoints of this cluster (ClusterMesh)"),
    (("--from-cluster",), "from-cluster", "flows from endpoints of this cluster"),
    (("--to-cluster",), "to-cluster", "flows to endpoints of this cluster"),
    (("--dns-query",), "dns-query", "DNS query regular expression"),
    (("--tcp-flags",), "tcp-flags", "TCP flags, e.g. SYN or SYN,ACK"),
    (("--ip-version",), "ip-version", "4 or 6"),
    (("--uuid",), "uuid", "flow UUID"),
    (("--trace-id",), "trace-id", "trace id of the request on the flow's connection (Envoy sidecars)"),
)


class _FilterAction(argparse.Action):
    """Record (filter name, value) in command-line order in ``namespace.filter_flags``."""

    def __init__(self, option_strings: list[str], dest: str, filter_name: str = "", **kwargs: Any) -> None:
        self.filter_name = filter_name
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        flags = list(getattr(namespace, "filter_flags", None) or [])
        flags.append((self.filter_name, values))
        namespace.filter_flags = flags


def add_observe_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(filter_flags=[])
    for names, filter_name, help_text in FILTER_OPTIONS:
        p.add_argument(*names, action=_FilterAction, filter_name=filter_name, dest="filter_flags_" + filter_name.replace("-", "_"),
                       metavar="VALUE", help=help_text)
    p.add_argument("--not", action=_FilterAction, filter_name="not", nargs=0, dest="filter_flags_not",
                   help="negate the next filter flag")
    p.add_argument("--since", help="flows since this time: duration ago (5m, 1h30m) or RFC 3339")
    p.add_argument("--until", help="flows until this time: duration ago or RFC 3339")
    p.add_argument("--last", type=int, default=None, help=f"the last N flows (default {DEFAULT_LAST})")
    p.add_argument("--first", type=int, default=None, help="the first (oldest) N flows of the retained history")
    p.add_argument("--all", action="store_true", help="every flow of the retained history (rings and FLOWS stream)")
    p.add_argument("-f", "--follow", action="store_true", help="follow new flows")
    p.add_argument("-o", "--output", choices=list(flowrender.OUTPUTS), default="compact")
    p.add_argument("--print-node-name", action="store_true", help="print the node name in each line")
    p.add_argument("--timeout", type=float, default=common.REQUEST_TIMEOUT, help="query timeout in seconds")
    p.add_argument("--progress", action="store_true",
                   help="report progress of long history reads on stderr (default: only on a terminal)")
    p.add_argument("--print-raw-filters", action="store_true",
                   help="print the allowlist/denylist filters and exit without querying")


def raw_filters_text(query: schema.FlowQuery) -> str:
    """``hubble observe --print-raw-filters`` output: YAML lists of JSON filters."""
    lines: list[str] = []
    for name, filters in (("allowlist", query.whitelist), ("denylist", query.blacklist)):
        if filters:
            lines.append(f"{name}:")
            lines += [f"    - '{flowfilter.filters_json([f])[1:-1]}'" for f in filters]
    return "\n".join(lines)


def build_query(args: argparse.Namespace, now_ns: int | None = None) -> schema.FlowQuery:
    """The ``FlowQuery`` for parsed ``observe`` arguments (raises FilterError)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    whitelist, blacklist = flowfilter.build_filters(getattr(args, "filter_flags", []) or [])
    since = flowfilter.parse_time_arg(args.since, now_ns) if args.since else 0
    until = flowfilter.parse_time_arg(args.until, now_ns) if args.until else 0
    if args.first is not None and args.last is not None:
        raise flowfilter.FilterError("--first and --last cannot be combined")
    rings_only = False
    if args.first is not None:
        number, first = args.first, True
    elif args.last is not None:
        number, first = args.last, False
    elif args.all or args.since or args.until:
        number, first = 0, False
    elif args.follow:
        number, first = 0, False
    else:  # Hubble's default: the last 20 flows of the rings (the stream is not read)
        number, first, rings_only = DEFAULT_LAST, False, True
    if number < 0:
        raise flowfilter.FilterError("--first/--last must not be negative")
    return schema.FlowQuery(whitelist=whitelist, blacklist=blacklist, since_ns=since,
                            until_ns=until, number=number, first=first, rings_only=rings_only)


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``observe`` and ``metrics`` to the ``ciliary`` parser."""
    p = subparsers.add_parser("observe", parents=[common_parent],
                              help="observe flows (hubble observe)")
    add_observe_arguments(p)
    p.set_defaults(func=cmd_observe)

    p = subparsers.add_parser("metrics", parents=[common_parent],
                              help="flow metrics in Prometheus text format")
    p.add_argument("--timeout", type=float, default=common.REQUEST_TIMEOUT)
    p.set_defaults(func=cmd_metrics)


def cmd_observe(args: argparse.Namespace) -> int:
    try:
        query = build_query(args)
    except flowfilter.FilterError as err:
        raise common.CliError(str(err)) from err
    if args.print_raw_filters:
        text = raw_filters_text(query)
        if text:
            print(text)
        return 0
    printer = flowrender.FlowPrinter(args.output, node_name=args.print_node_name)

    def emit(flow: schema.Flow) -> None:
        text = printer.write(flow)
        if text is not None:
            print(text, flush=args.follow)

    async def work(bus: Bus) -> int:
        live: asyncio.Queue[schema.Flow] = asyncio.Queue()
        sub = None
        if args.follow:
            async def on_flow(msg: Message) -> None:
                try:
                    batch = schema.decode(msg.data, schema.FlowBatch)
                except Exception:  # a payload that is not a flow batch is skipped
                    return
                for flow in batch.flows:
                    if flowfilter.matches(flow, query.whitelist, query.blacklist):
                        live.put_nowait(flow)

            sub = await bus.subscribe_raw(schema.SUBJECT_FLOWS_ALL, on_flow)
        seen: set[str] = set()
        if not args.follow or query.number or query.since_ns:
            chunks = ReplyChunks()
            progress = Progress(sys.stderr, enabled=args.progress or sys.stderr.isatty())
            try:
                async for flows in query_flows(bus, query, args.timeout, chunks=chunks,
                                               progress=progress.update):
                    if flows:
                        progress.clear()
                    for flow in flows:
                        if sub is not None:
                            seen.add(flow.uuid)
                        emit(flow)
            except QueryError as err:
                hint = "\n  is the flows service running? try: ciliary status" if err.unanswered else ""
                raise common.CliError(f"{err}{hint}") from err
            finally:
                progress.clear()
            for lost in chunks.final.lost_events if chunks.final is not None else ():
                text = printer.write_lost(lost)
                if text is not None:
                    print(text, flush=args.follow)
            for notice in chunks.notices():
                print(f"notice: {notice}", file=sys.stderr)
        if sub is None:
            return 0
        try:
            while True:
                flow = await live.get()
                if flow.uuid in seen:
                    continue
                if query.until_ns and hubble.flow_time_ns(flow) > query.until_ns:
                    continue
                emit(flow)
        finally:
            await sub.unsubscribe()

    try:
        common.run_with_bus(args, work)
    finally:
        tail = printer.close()
        if tail is not None:
            print(tail)
        sys.stdout.flush()
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    """The flows service's metrics text: Hubble's flow families, then the node and
    control-plane families of every service's health report (the text ``/metrics`` serves)."""
    async def work(bus: Bus) -> schema.FlowMetricsReply:
        try:
            return await bus.request(schema.SUBJECT_FLOWS_METRICS, schema.FlowMetricsRequest(),
                                     schema.FlowMetricsReply, timeout=args.timeout)
        except BusError as err:
            raise common.CliError(f"{err}\n  is the flows service running? try: ciliary status") from err

    print(common.run_with_bus(args, work).text, end="")
    return 0
