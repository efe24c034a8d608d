"""Hubble flow filters: matching and construction from ``hubble observe`` flags.

Invariants (Hubble's semantics):
- Within one ``FlowFilter`` every set field must match (AND); the values of one field are
  alternatives (OR). A list of whitelist filters matches if any filter matches (an empty
  whitelist matches everything); a flow matching any blacklist filter is excluded.
- ``build_filters`` turns flags into filters exactly like hubble's ``filterTracker``: a
  ``--from-*``/``--to-*``/shared flag goes into both the "left" and the "right" filter,
  ``--pod X``-style flags put the source side into the left filter and the destination
  side into the right; equal left and right collapse into one filter. ``--not`` sends the
  next flag to the blacklist.
- FQDN filters (``--fqdn``/``--from-fqdn``/``--to-fqdn``) match ``source_names`` /
  ``destination_names`` like Hubble: the pattern is lower-cased, trimmed of a trailing
  dot, may hold only ``[-a-zA-Z0-9_.*]``, and must match a whole name, ``*`` standing for
  any run of those characters (dots included); a flow without names never matches.
- Nothing here does I/O; bad input raises ``FilterError`` with a user-facing message.
- Names and numbers (verdicts, drop reasons, event types) are ``ciliary.hubble``'s,
  reserved identities ``ciliary.schema``'s; this module never imports the CLI.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import msgspec

from ciliary import schema
from ciliary.hubble import (
    DROP_REASON_CODES,
    MESSAGE_TYPE_NAMES,
    MSG_TRACE,
    TRACE_POINTS,
    VERDICT_NAMES,
    l4_ports,
    parse_rfc3339,
)


class FilterError(ValueError):
    """An invalid filter flag or value (message is shown to the user)."""


# ---------------------------------------------------------------- label selectors


@dataclass(frozen=True)
class Requirement:
    key: str  # "app" (any source) or "k8s:app"
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()


_SELECTOR_RE = re.compile(
    r"""^\s*(?:
        (?P<not>!)\s*(?P<nkey>[^\s=!,()]+)
      | (?P<key>[^\s=!,()]+)\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>[^\s,()]*)
          | \s(?P<setop>in|notin)\s*\((?P<set>[^()]*)\)
        )?
    )\s*$""",
    re.VERBOSE,
)


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


@lru_cache(maxsize=512)
def parse_selector(text: str) -> tuple[Requirement, ...]:
    """Kubernetes label selector syntax: ``k=v,k2!=v,k3 in (a,b),k4 notin (c),k5,!k6``."""
    reqs: list[Requirement] = []
    if not text.strip():
        return ()
    for part in _split_selector(text):
        m = _SELECTOR_RE.match(part)
        if m is None or not part.strip():
            raise FilterError(f"invalid label selector {text!r}: cannot parse {part.strip()!r}")
        if m.group("not"):
            reqs.append(Requirement(m.group("nkey"), "!"))
        elif m.group("op"):
            op = "!=" if m.group("op") == "!=" else "="
            reqs.append(Requirement(m.group("key"), op, (m.group("value"),)))
        elif m.group("setop"):
            values = tuple(v.strip() for v in m.group("set").split(",") if v.strip())
            reqs.append(Requirement(m.group("key"), m.group("setop"), values))
        else:
            reqs.append(Requirement(m.group("key"), "exists"))
    return tuple(reqs)


def _label_map(labels: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``k8s:app=x`` -> {"k8s:app": ("k8s", "x")}; also keyed by bare key for any-source."""
    out: dict[str, tuple[str, str]] = {}
    for label in labels:
        kv, _, value = label.partition("=")
        source, sep, key = kv.partition(":")
        if not sep:
            source, key = "unspec", kv
        out[f"{source}:{key}"] = (key, value)
    return out


def _lookup(labels: dict[str, tuple[str, str]], key: str) -> list[str]:
    if ":" in key:
        hit = labels.get(key)
        return [hit[1]] if hit else []
    return [value for k, value in labels.values() if k == key]


def selector_matches(selector: str, labels: Sequence[str]) -> bool:
    """A selector key with a ``source:`` prefix matches that source only, else any source."""
    lm = _label_map(labels)
    for req in parse_selector(selector):
        found = _lookup(lm, req.key)
        if req.op == "exists":
            ok = bool(found)
        elif req.op == "!":
            ok = not found
        elif req.op == "=":
            ok = req.values[0] in found
        elif req.op == "!=":
            ok = req.values[0] not in found
        elif req.op == "in":
            ok = any(v in req.values for v in found)
        else:  # notin
            ok = not any(v in req.values for v in found)
        if not ok:
            return False
    return True


# ---------------------------------------------------------------- matching


def _pod_matches(patterns: Sequence[str], namespace: str, name: str) -> bool:
    """``[namespace/]name-prefix`` (no namespace: ``default``); ``ns/`` matches all of ``ns``."""
    if not namespace and not name:
        return False
    for pattern in patterns:
        ns, sep, prefix = pattern.partition("/")
        if not sep:
            ns, prefix = "default", pattern
        if ns == namespace and name.startswith(prefix):
            return True
    return False


@lru_cache(maxsize=1024)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as err:
        raise FilterError(f"invalid IP or CIDR {text!r}") from err


def _ip_matches(patterns: Sequence[str], ip: str) -> bool:
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in _network(p) for p in patterns)


def _protocols(flow: schema.Flow) -> set[str]:
    out: set[str] = set()
    if flow.l4 is not None:
        if flow.l4.TCP is not None:
            out.add("tcp")
        if flow.l4.UDP is not None:
            out.add("udp")
        if flow.l4.SCTP is not None:
            out.add("sctp")
        if flow.l4.ICMPv4 is not None:
            out |= {"icmp", "icmpv4"}
        if flow.l4.ICMPv6 is not None:
            out |= {"icmp", "icmpv6"}
    if flow.l7 is not None and flow.l7.dns is not None:
        out.add("dns")
    return out


def _node_matches(patterns: Sequence[str], node_name: str) -> bool:
    cluster, sep, node = node_name.rpartition("/")
    for pattern in patterns:
        pc, psep, pn = pattern.rpartition("/")
        if psep:
            if fnmatch.fnmatchcase(cluster, pc or "*") and fnmatch.fnmatchcase(node, pn or "*"):
                return True
        elif fnmatch.fnmatchcase(node if sep else node_name, pattern):
            return True
    return False


def _event_type_matches(filters: Sequence[schema.FlowEventTypeFilter], flow: schema.Flow) -> bool:
    et = flow.event_type or schema.FlowEventType()
    return any(
        f.type == et.type and (not f.match_sub_type or f.sub_type == et.sub_type) for f in filters
    )


def _tcp_flags_match(filters: Sequence[schema.TCPFlags], flow: schema.Flow) -> bool:
    if flow.l4 is None or flow.l4.TCP is None or flow.l4.TCP.flags is None:
        return False
    have = flow.l4.TCP.flags
    for want in filters:
        wanted = [n for n in schema.TCPFlags.__struct_fields__ if getattr(want, n)]
        if wanted and all(getattr(have, n) for n in wanted):
            return True
    return False


def filter_matches(f: schema.FlowFilter, flow: schema.Flow) -> bool:
    """True when every set field of ``f`` matches ``flow``."""
    src = flow.source or schema.FlowEndpoint()
    dst = flow.destination or schema.FlowEndpoint()
    ip = flow.ip or schema.FlowIP()
    if f.uuid and flow.uuid not in f.uuid:
        return False
    if f.trace_id and (flow.trace_context is None or flow.trace_context.parent is None
                       or flow.trace_context.parent.trace_id not in f.trace_id):
        return False
    if f.source_ip and not _ip_matches(f.source_ip, ip.source):
        return False
    if f.destination_ip and not _ip_matches(f.destination_ip, ip.destination):
        return False
    if f.source_pod and not _pod_matches(f.source_pod, src.namespace, src.pod_name):
        return False
    if f.destination_pod and not _pod_matches(f.destination_pod, dst.namespace, dst.pod_name):
        return False
    if f.source_service:
        svc = flow.source_service or schema.FlowService()
        if not _pod_matches(f.source_service, svc.namespace, svc.name):
            return False
    if f.destination_service:
        svc = flow.destination_service or schema.FlowService()
        if not _pod_matches(f.destination_service, svc.namespace, svc.name):
            return False
    if f.source_label and not any(selector_matches(s, src.labels) for s in f.source_label):
        return False
    if f.destination_label and not any(selector_matches(s, dst.labels) for s in f.destination_label):
        return False
    if f.source_identity and src.identity not in f.source_identity:
        return False
    if f.source_cluster_name and src.cluster_name not in f.source_cluster_name:
        return False
    if f.destination_cluster_name and dst.cluster_name not in f.destination_cluster_name:
        return False
    if f.destination_identity and dst.identity not in f.destination_identity:
        return False
    if f.traffic_direction and flow.traffic_direction not in f.traffic_direction:
        return False
    if f.verdict and flow.verdict not in f.verdict:
        return False
    if f.drop_reason_desc and flow.drop_reason_desc not in f.drop_reason_desc:
        return False
    if f.event_type and not _event_type_matches(f.event_type, flow):
        return False
    if f.protocol and not ({p.lower() for p in f.protocol} & _protocols(flow)):
        return False
    if f.source_port or f.destination_port:
        ports = l4_ports(flow)
        if ports is None:
            return False
        if f.source_port and str(ports[0]) not in f.source_port:
            return False
        if f.destination_port and str(ports[1]) not in f.destination_port:
            return False
    if f.reply and (flow.is_reply is None or flow.is_reply not in f.reply):
        return False
    if f.dns_query:
        query = flow.l7.dns.query if flow.l7 is not None and flow.l7.dns is not None else None
        if query is None or not any(_regex(p).search(query) for p in f.dns_query):
            return False
    if f.node_name and not _node_matches(f.node_name, flow.node_name):
        return False
    if f.tcp_flags and not _tcp_flags_match(f.tcp_flags, flow):
        return False
    if f.ip_version and ip.ipVersion not in f.ip_version:
        return False
    if f.source_fqdn and not _fqdn_matches(f.source_fqdn, flow.source_names):
        return False
    if f.destination_fqdn and not _fqdn_matches(f.destination_fqdn, flow.destination_names):
        return False
    return True


_FQDN_VALID = re.compile(r"^[-a-zA-Z0-9_.*]+$")


@lru_cache(maxsize=256)
def fqdn_pattern(pattern: str) -> re.Pattern[str]:
    """Hubble's FQDN filter: ``www.example.com`` or ``*.example.com`` as an anchored regex."""
    text = pattern.strip().lower().removesuffix(".")
    if not _FQDN_VALID.match(text):
        raise FilterError(f'invalid FQDN filter {pattern!r}: only alphanumeric ASCII characters, '
                          'the hyphen "-", "_", "." and "*" are allowed')
    return re.compile("^" + text.replace(".", "[.]").replace("*", "[-a-zA-Z0-9_.]*") + "$")


def _fqdn_matches(patterns: Sequence[str], names: Sequence[str]) -> bool:
    return any(fqdn_pattern(p).match(name) for name in names for p in patterns)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise FilterError(f"invalid regular expression {pattern!r}: {err}") from err


def matches(
    flow: schema.Flow,
    whitelist: Sequence[schema.FlowFilter] = (),
    blacklist: Sequence[schema.FlowFilter] = (),
) -> bool:
    if whitelist and not any(filter_matches(f, flow) for f in whitelist):
        return False
    return not any(filter_matches(f, flow) for f in blacklist)


def validate(filters: Iterable[schema.FlowFilter]) -> None:
    """Raise FilterError for values that can never be evaluated (bad CIDR, selector, regex)."""
    for f in filters:
        for text in (*f.source_ip, *f.destination_ip):
            _network(text)
        for sel in (*f.source_label, *f.destination_label):
            parse_selector(sel)
        for pattern in f.dns_query:
            _regex(pattern)
        for pattern in (*f.source_fqdn, *f.destination_fqdn):
            fqdn_pattern(pattern)


# ---------------------------------------------------------------- flags -> filters


@dataclass
class _Tracker:
    left: dict[str, list] | None = None
    right: dict[str, list] | None = None
    changed: list[str] = field(default_factory=list)

    def apply_left(self, name: str, value: object) -> None:
        if self.left is None:
            self.left = {}
        self.left.setdefault(name, []).append(value)

    def apply_right(self, name: str, value: object) -> None:
        if self.right is None:
            self.right = {}
        self.right.setdefault(name, []).append(value)

    def apply(self, name: str, value: object) -> None:
        self.apply_left(name, value)
        self.apply_right(name, value)

    def filters(self) -> list[schema.FlowFilter]:
        if self.left is None and self.right is None:
            return []
        if self.left == self.right:
            return [schema.FlowFilter(**self.left)]  # type: ignore[arg-type]
        return [schema.FlowFilter(**side) for side in (self.left, self.right) if side is not None]


CONFLICTS: tuple[tuple[str, ...], ...] = (
    ("from-fqdn", "from-ip", "from-namespace", "from-pod", "fqdn", "ip", "namespace", "pod"),
    ("to-fqdn", "to-ip", "to-namespace", "to-pod", "fqdn", "ip", "namespace", "pod"),
    ("label", "from-label"),
    ("label", "to-label"),
    ("service", "from-service"),
    ("service", "to-service"),
    ("port", "to-port"),
    ("port", "from-port"),
    ("identity", "to-identity"),
    ("identity", "from-identity"),
)

# flag -> (how, left FlowFilter field, right FlowFilter field)
#   "split": left gets the source side, right the destination side (--pod X)
#   "both":  the one field goes into left and right (--from-pod X, --verdict V)
_FLAGS: dict[str, tuple[str, str, str]] = {
    "uuid": ("both", "uuid", "uuid"),
    "trace-id": ("both", "trace_id", "trace_id"),
    "pod": ("split", "source_pod", "destination_pod"),
    "from-pod": ("both", "source_pod", "source_pod"),
    "to-pod": ("both", "destination_pod", "destination_pod"),
    "namespace": ("split", "source_pod", "destination_pod"),
    "from-namespace": ("both", "source_pod", "source_pod"),
    "to-namespace": ("both", "destination_pod", "destination_pod"),
    "ip": ("split", "source_ip", "destination_ip"),
    "from-ip": ("both", "source_ip", "source_ip"),
    "to-ip": ("both", "destination_ip", "destination_ip"),
    "fqdn": ("split", "source_fqdn", "destination_fqdn"),
    "from-fqdn": ("both", "source_fqdn", "source_fqdn"),
    "to-fqdn": ("both", "destination_fqdn", "destination_fqdn"),
    "label": ("split", "source_label", "destination_label"),
    "from-label": ("both", "source_label", "source_label"),
    "to-label": ("both", "destination_label", "destination_label"),
    "service": ("split", "source_service", "destination_service"),
    "from-service": ("both", "source_service", "source_service"),
    "to-service": ("both", "destination_service", "destination_service"),
    "port": ("split", "source_port", "destination_port"),
    "from-port": ("both", "source_port", "source_port"),
    "to-port": ("both", "destination_port", "destination_port"),
    "identity": ("split", "source_identity", "destination_identity"),
    "from-identity": ("both", "source_identity", "source_identity"),
    "to-identity": ("both", "destination_identity", "destination_identity"),
    "verdict": ("both", "verdict", "verdict"),
    "drop-reason-desc": ("both", "drop_reason_desc", "drop_reason_desc"),
    "type": ("both", "event_type", "event_type"),
    "protocol": ("both", "protocol", "protocol"),
    "traffic-direction": ("both", "traffic_direction", "traffic_direction"),
    "node-name": ("both", "node_name", "node_name"),
    "cluster": ("split", "source_cluster_name", "destination_cluster_name"),
    "from-cluster": ("both", "source_cluster_name", "source_cluster_name"),
    "to-cluster": ("both", "destination_cluster_name", "destination_cluster_name"),
    "dns-query": ("both", "dns_query", "dns_query"),
    "tcp-flags": ("both", "tcp_flags", "tcp_flags"),
    "ip-version": ("both", "ip_version", "ip_version"),
}
FILTER_FLAGS = tuple(_FLAGS)


def parse_identity(value: str) -> int:
    if value in schema.RESERVED_IDENTITY_IDS:
        return schema.RESERVED_IDENTITY_IDS[value]
    try:
        num = int(value)
    except ValueError:
        num = -1
    if not 0 <= num <= 0xFFFFFFFF:
        names = ", ".join(schema.RESERVED_IDENTITY_IDS)
        raise FilterError(f"invalid security identity {value!r}, expected one of [{names}] or a numeric value")
    return num


def parse_event_type(value: str) -> schema.FlowEventTypeFilter:
    """``trace``, ``drop``, ``trace:to-endpoint``, ``4:5``."""
    name, _, sub = value.partition(":")
    if name in MESSAGE_TYPE_NAMES:
        type_ = MESSAGE_TYPE_NAMES[name]
    elif name.isdigit():
        type_ = int(name)
    else:
        raise FilterError(
            f"unable to parse type {name!r}, not a known type name ({', '.join(MESSAGE_TYPE_NAMES)}) "
            "and unable to parse as numeric value"
        )
    if not sub:
        return schema.FlowEventTypeFilter(type=type_)
    if type_ == MSG_TRACE:
        for code, (cli_name, _) in TRACE_POINTS.items():
            if cli_name == sub:
                return schema.FlowEventTypeFilter(type=type_, match_sub_type=True, sub_type=code)
    if type_ == MESSAGE_TYPE_NAMES["drop"] and sub.upper() in DROP_REASON_CODES:
        return schema.FlowEventTypeFilter(
            type=type_, match_sub_type=True, sub_type=DROP_REASON_CODES[sub.upper()]
        )
    if not sub.isdigit():
        raise FilterError(f"unable to parse event sub-type {sub!r}, not a known sub-type name and unable to parse as numeric value")
    return schema.FlowEventTypeFilter(type=type_, match_sub_type=True, sub_type=int(sub))


def parse_tcp_flags(value: str) -> schema.TCPFlags:
    names = set(schema.TCPFlags.__struct_fields__)
    set_flags: dict[str, bool] = {}
    for part in value.split(","):
        flag = part.strip().upper()
        if flag not in names:
            raise FilterError(f"unknown tcp flag: {part}")
        set_flags[flag] = True
    return schema.TCPFlags(**set_flags)


_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv4", "icmpv6", "sctp", "dns")


def _convert(name: str, value: str) -> object:
    if name in ("identity", "from-identity", "to-identity"):
        return parse_identity(value)
    if name in ("namespace", "from-namespace", "to-namespace"):
        if not value or "/" in value:
            raise FilterError(f"invalid namespace {value!r}")
        return value + "/"
    if name == "trace-id":
        trace = value.strip().lower()
        if len(trace) != 32 or any(c not in "0123456789abcdef" for c in trace):
            raise FilterError(f"invalid --trace-id value: {value} (expected 32 hex digits)")
        return trace
    if name == "verdict":
        verdict = value.upper()
        if verdict not in VERDICT_NAMES or verdict == "VERDICT_UNKNOWN":
            raise FilterError(f"invalid --verdict value: {value}")
        return verdict
    if name == "drop-reason-desc":
        desc = value.upper()
        if desc not in DROP_REASON_CODES:
            raise FilterError(f"invalid --drop-reason-desc value: {value}")
        return desc
    if name == "type":
        return parse_event_type(value)
    if name == "protocol":
        proto = value.lower()
        if proto not in _PROTOCOLS:
            raise FilterError(f"invalid --protocol value: {value} (one of {', '.join(_PROTOCOLS)})")
        return proto
    if name in ("port", "from-port", "to-port"):
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            raise FilterError(f"invalid port {value!r}")
        return str(int(value))
    if name == "traffic-direction":
        direction = value.lower()
        if direction not in ("ingress", "egress"):
            raise FilterError(f"{direction}: invalid traffic direction, expected ingress or egress")
        return direction.upper()
    if name in ("ip", "from-ip", "to-ip"):
        _network(value)
        return value
    if name in ("label", "from-label", "to-label"):
        parse_selector(value)
        return value
    if name == "dns-query":
        _regex(value)
        return value
    if name in ("fqdn", "from-fqdn", "to-fqdn"):
        fqdn_pattern(value)
        return value
    if name in ("cluster", "from-cluster", "to-cluster"):
        if not value:
            raise FilterError(f"invalid --{name} value: a cluster name is required")
        return value
    if name == "tcp-flags":
        return parse_tcp_flags(value)
    if name == "ip-version":
        version = value.lower()
        if version in ("4", "v4", "ipv4", "ip4"):
            return "IPv4"
        if version in ("6", "v6", "ipv6", "ip6"):
            return "IPv6"
        raise FilterError(f"invalid --ip-version value: {value}")
    return value


def build_filters(
    flags: Iterable[tuple[str, str | None]],
) -> tuple[list[schema.FlowFilter], list[schema.FlowFilter]]:
    """``[(flag, value), …]`` in command-line order -> (whitelist, blacklist).

    ``("not", None)`` makes the next flag a blacklist entry.
    """
    whitelist, blacklist = _Tracker(), _Tracker()
    blacklisting = False
    for name, value in flags:
        if name == "not":
            if blacklisting:
                raise FilterError("consecutive --not statements")
            blacklisting = True
            continue
        if name not in _FLAGS:
            raise FilterError(f"unknown filter flag --{name}")
        tracker = blacklist if blacklisting else whitelist
        blacklisting = False
        if name not in tracker.changed:
            tracker.changed.append(name)
        for group in CONFLICTS:
            if name in group:
                for other in group:
                    if other != name and other in tracker.changed:
                        raise FilterError(f"filters --{name} and --{other} cannot be combined")
        converted = _convert(name, value or "")
        how, left, right = _FLAGS[name]
        if how == "split":
            tracker.apply_left(left, converted)
            tracker.apply_right(right, converted)
        else:
            tracker.apply(left, converted)
    if blacklisting:
        raise FilterError("--not must be followed by a filter flag")
    return whitelist.filters(), blacklist.filters()


def filters_json(filters: Sequence[schema.FlowFilter]) -> str:
    """Stable text of a filter list (for tests and ``--print-filters``-style debugging)."""
    return msgspec.json.encode(filters).decode()


# ---------------------------------------------------------------- durations and times

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}


def parse_duration(text: str) -> int:
    """Go duration (``5m``, ``1h30m``, ``250ms``; also ``2d``) -> ns; FilterError if bad."""
    s = text.strip()
    if not s:
        raise FilterError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if m is None:
            raise FilterError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return int(total)


def parse_time_arg(text: str, now_ns: int) -> int:
    """``--since``/``--until`` value: a duration ago, RFC 3339, or ``YYYY-MM-DD`` -> unix ns."""
    s = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
        s += "T00:00:00Z"
    if re.match(r"\d{4}-\d{2}-\d{2}T", s):
        try:
            return parse_rfc3339(s)
        except ValueError as err:
            raise FilterError(f"invalid time {text!r}: {err}") from err
    try:
        return now_ns - parse_duration(s)
    except FilterError as err:
        raise FilterError(
            f"invalid time {text!r}: expected a duration (5m, 1h30m) or RFC 3339 (2026-11-26T05:00:00Z)"
        ) from err
