"""The printers of ``ciliary observe``: flows as ``hubble observe`` prints them.

Invariants:
- Every printer is a pure function of ``schema.Flow`` records: compact, dict, table
  (``hubble observe`` printer formats, UTC ``Jan _2 15:04:05.000`` timestamps) and json /
  jsonpb (one ``{"flow": …, "node_name": …, "time": …}`` object per line, the shape
  ``hubble observe -o json`` prints: ``hubble.format_jsonpb``).
- Lost events print as ``hubble observe`` prints them: ``EVENTS LOST: <SOURCE> CPU(0) <n>``
  (after the table, in table format), or a ``{"lost_events": …}`` line in json / jsonpb.
- Names (verdicts, drop reasons, trace observation points, reserved identities) come
  from ``ciliary.hubble`` and ``ciliary.schema``, so output reads like ``hubble observe``.
"""

from __future__ import annotations

import time as _time
from collections.abc import Iterable, Sequence

from ciliary import schema
from ciliary.hubble import (
    MSG_DROP,
    MSG_POLICY_VERDICT,
    MSG_TRACE,
    POLICY_MATCH_TYPES,
    TRACE_POINTS,
    drop_reason_text,
    format_jsonpb,
    format_lost_jsonpb,
    l4_ports,
    parse_rfc3339,
)

# ---------------------------------------------------------------- time


def stamp_milli(flow_time: str) -> str:
    """Go's ``time.StampMilli`` (``Jan _2 15:04:05.000``) in UTC; ``N/A`` if unset."""
    try:
        ns = parse_rfc3339(flow_time)
    except (ValueError, IndexError):
        return "N/A"
    secs, frac = divmod(ns, 1_000_000_000)
    t = _time.gmtime(secs)
    month = _time.strftime("%b", t)
    return f"{month} {t.tm_mday:>2} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{frac // 1_000_000:03d}"


# ---------------------------------------------------------------- flow pieces


def ports(flow: schema.Flow) -> tuple[str, str]:
    found = l4_ports(flow)
    if found is None:
        return "", ""
    return str(found[0]), str(found[1])


def _join_host_port(host: str, port: str) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def hostname(ip: str, port: str, namespace: str, pod: str, svc: str, names: Sequence[str]) -> str:
    """Hubble's ``Printer.Hostname`` with IP translation on."""
    host = ip
    if pod:
        host = f"{namespace}/{pod}" if namespace else pod
    elif svc:
        host = f"{namespace}/{svc}" if namespace else svc
    elif names:
        host = ",".join(names)
    if port and port != "0":
        return _join_host_port(host, port)
    return host


def host_names(flow: schema.Flow) -> tuple[str, str]:
    if flow.ip is None:
        return "", ""
    src_ns = flow.source.namespace if flow.source else ""
    src_pod = flow.source.pod_name if flow.source else ""
    dst_ns = flow.destination.namespace if flow.destination else ""
    dst_pod = flow.destination.pod_name if flow.destination else ""
    src_svc = dst_svc = ""
    if flow.source_service is not None:
        src_ns, src_svc = flow.source_service.namespace, flow.source_service.name
    if flow.destination_service is not None:
        dst_ns, dst_svc = flow.destination_service.namespace, flow.destination_service.name
    sport, dport = ports(flow)
    return (
        hostname(flow.ip.source, sport, src_ns, src_pod, src_svc, flow.source_names),
        hostname(flow.ip.destination, dport, dst_ns, dst_pod, dst_svc, flow.destination_names),
    )


def fmt_identity(identity: int) -> str:
    name = schema.RESERVED_IDENTITIES.get(identity)
    return f"({name})" if name else f"(ID:{identity})"


def flow_type(flow: schema.Flow) -> str:
    """Hubble's ``GetFlowType``: ``to-endpoint``, ``Policy denied``, ``dns-request proxy``…"""
    if flow.l7 is not None:
        kind = flow.l7.type.lower() or "unknown_l7_type"
        proto = "l7"
        if flow.l7.dns is not None:
            proto = "dns"
            kind += " " + flow.l7.dns.observation_source
        return f"{proto}-{kind}"
    et = flow.event_type or schema.FlowEventType()
    if et.type == MSG_TRACE:
        return TRACE_POINTS.get(et.sub_type, (str(et.sub_type), ""))[0]
    if et.type == MSG_DROP:
        return drop_reason_text(et.sub_type)
    if et.type == MSG_POLICY_VERDICT:
        match = POLICY_MATCH_TYPES.get(flow.policy_match_type, str(flow.policy_match_type))
        direction = flow.traffic_direction or "TRAFFIC_DIRECTION_UNKNOWN"
        return f"policy-verdict:{match} {direction}"
    return "UNKNOWN"


def verdict_text(flow: schema.Flow) -> str:
    verdict = flow.verdict or "VERDICT_UNKNOWN"
    is_pv = flow.event_type is not None and flow.event_type.type == MSG_POLICY_VERDICT
    if is_pv:
        if verdict in ("FORWARDED", "REDIRECTED"):
            return "ALLOWED"
        if verdict in ("DROPPED", "ERROR"):
            return "DENIED"
        if verdict == "AUDIT":
            return "AUDITED"
    return verdict


# ---------------------------------------------------------------- printers


def format_compact(flow: schema.Flow, *, node_name: bool = False) -> str:
    """One line of ``hubble observe -o compact``."""
    src, dst = host_names(flow)
    src_id = fmt_identity(flow.source.identity if flow.source else 0)
    dst_id = fmt_identity(flow.destination.identity if flow.destination else 0)
    arrow = "->"
    if flow.is_reply is None:
        arrow = "<>"
    elif flow.is_reply:
        src, dst = dst, src
        src_id, dst_id = dst_id, src_id
        arrow = "<-"
    node = f" [{flow.node_name}]" if node_name else ""
    return (
        f"{stamp_milli(flow.time)}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
        f"{flow_type(flow)} {verdict_text(flow)} ({flow.summary})"
    )


DICT_SEPARATOR = "------------"


def format_dict(flow: schema.Flow, *, node_name: bool = False) -> str:
    """One record of ``hubble observe -o dict`` (without the separator line)."""
    src, dst = host_names(flow)
    lines = [f"  TIMESTAMP: {stamp_milli(flow.time)}"]
    if node_name:
        lines.append(f"       NODE: {flow.node_name}")
    lines += [
        f"     SOURCE: {src}",
        f"DESTINATION: {dst}",
        f"       TYPE: {flow_type(flow)}",
        f"    VERDICT: {verdict_text(flow)}",
        f"    SUMMARY: {flow.summary}",
    ]
    return "\n".join(lines)


TABLE_HEADERS = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_row(flow: schema.Flow, *, node_name: bool = False) -> list[str]:
    src, dst = host_names(flow)
    row = [stamp_milli(flow.time)]
    if node_name:
        row.append(flow.node_name)
    return row + [src, dst, flow_type(flow), verdict_text(flow), flow.summary]


def format_table(flows: Iterable[schema.Flow], *, node_name: bool = False) -> str:
    """``hubble observe -o table``: Go tabwriter, padding 3, last column unpadded."""
    headers = list(TABLE_HEADERS)
    if node_name:
        headers.insert(1, "NODE")
    rows = [headers] + [table_row(f, node_name=node_name) for f in flows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers) - 1)]
    out = []
    for r in rows:
        cells = [cell.ljust(widths[i] + 3) for i, cell in enumerate(r[:-1])]
        out.append("".join(cells) + r[-1])
    return "\n".join(out)


OUTPUTS = ("compact", "dict", "json", "jsonpb", "table")


class FlowPrinter:
    """Streams flows in one output format; ``close()`` returns what is still buffered."""

    def __init__(self, output: str = "compact", *, node_name: bool = False) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"unknown output format {output!r} (one of {', '.join(OUTPUTS)})")
        self.output = output
        self.node_name = node_name
        self.lines = 0
        self._table: list[schema.Flow] = []
        self._lost: list[str] = []

    def write(self, flow: schema.Flow) -> str | None:
        """Text to print now for this flow (no trailing newline), or None if buffered."""
        self.lines += 1
        if self.output == "compact":
            return format_compact(flow, node_name=self.node_name)
        if self.output == "dict":
            text = format_dict(flow, node_name=self.node_name)
            return text if self.lines == 1 else f"{DICT_SEPARATOR}\n{text}"
        if self.output in ("json", "jsonpb"):
            return format_jsonpb(flow)
        self._table.append(flow)
        return None

    def write_lost(self, lost: schema.LostEvent) -> str | None:
        """Text to print now for a lost-events record, or None if buffered (table)."""
        if self.output in ("json", "jsonpb"):
            return format_lost_jsonpb(lost)
        node = f" [{lost.node_name}]" if self.node_name and lost.node_name else ""
        text = f"EVENTS LOST: {lost.source} CPU(0) {lost.num_events_lost}{node}"
        if self.output == "table":
            self._lost.append(text)
            return None
        return text

    def close(self) -> str | None:
        parts: list[str] = []
        if self.output == "table" and self._table:
            parts.append(format_table(self._table, node_name=self.node_name))
            self._table = []
        parts += self._lost
        self._lost = []
        return "\n".join(parts) if parts else None


def render(flows: Iterable[schema.Flow], output: str = "compact", *, node_name: bool = False) -> str:
    """All flows in one format, newline-terminated (empty string for no flows)."""
    printer = FlowPrinter(output, node_name=node_name)
    parts = [text for f in flows if (text := printer.write(f)) is not None]
    tail = printer.close()
    if tail is not None:
        parts.append(tail)
    return "".join(p + "\n" for p in parts)
