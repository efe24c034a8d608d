"""Hubble's vocabulary: the names, numbers and encodings a flow is written in.

Invariants:
- Names and numbers (verdicts, Cilium drop reasons and their ``flow.DropReason`` enum
  names, monitor message types, trace observation points, policy match types, ICMP type
  names, TCP flag order) are Cilium's/Hubble's, so the flows service writes flows the way
  Hubble does and ``ciliary observe`` filters and prints them with the same values.
- Reserved identities (``RESERVED_IDENTITIES``, ``RESERVED_IDENTITY_IDS``,
  ``IDENTITY_WORLD``…) are ``ciliary.schema``'s; this module does not repeat them.
- Flow times are RFC 3339 text in UTC with 0/3/6/9 fractional digits (protojson's
  Timestamp); ``parse_rfc3339`` reads any RFC 3339 offset back to unix nanoseconds.
- The JSON form of a flow is Hubble's ``GetFlowsResponse`` as protojson writes it
  (``{"flow": …, "node_name": …, "time": …}``, zero values omitted, Go's HTML-safe
  escapes): what ``hubble observe -o json`` prints and Hubble's exporter writes.
- Pure: no I/O; of ciliary it imports only ``ciliary.schema``.
"""

from __future__ import annotations

import calendar
import time as _time
from typing import Any

import msgspec

from ciliary import schema

# ---------------------------------------------------------------- verdicts and event types

VERDICTS: dict[int, str] = {
    0: "VERDICT_UNKNOWN",
    1: "FORWARDED",
    2: "DROPPED",
    3: "ERROR",
    4: "AUDIT",
    5: "REDIRECTED",
    6: "TRACED",
    7: "TRANSLATED",
}
VERDICT_NAMES = frozenset(VERDICTS.values())

# Cilium monitor message types (pkg/monitor/api MessageType*); names as `hubble --type`.
MSG_DROP = 1
MSG_DEBUG = 2
MSG_CAPTURE = 3
MSG_TRACE = 4
MSG_POLICY_VERDICT = 5
MSG_RECORDER = 6
MSG_TRACE_SOCK = 7
MSG_ACCESS_LOG = 129
MSG_AGENT = 130
MESSAGE_TYPE_NAMES: dict[str, int] = {
    "drop": MSG_DROP,
    "debug": MSG_DEBUG,
    "capture": MSG_CAPTURE,
    "trace": MSG_TRACE,
    "policy-verdict": MSG_POLICY_VERDICT,
    "recorder": MSG_RECORDER,
    "trace-sock": MSG_TRACE_SOCK,
    "l7": MSG_ACCESS_LOG,
    "agent": MSG_AGENT,
}

# Trace observation points: monitor sub type -> (CLI name, flow.TraceObservationPoint).
TRACE_TO_ENDPOINT = 0
TRACE_FROM_ENDPOINT = 5
TRACE_POINTS: dict[int, tuple[str, str]] = {
    0: ("to-endpoint", "TO_ENDPOINT"),
    1: ("to-proxy", "TO_PROXY"),
    2: ("to-host", "TO_HOST"),
    3: ("to-stack", "TO_STACK"),
    4: ("to-overlay", "TO_OVERLAY"),
    5: ("from-endpoint", "FROM_ENDPOINT"),
    6: ("from-proxy", "FROM_PROXY"),
    7: ("from-host", "FROM_HOST"),
    8: ("from-stack", "FROM_STACK"),
    9: ("from-overlay", "FROM_OVERLAY"),
    10: ("from-network", "FROM_NETWORK"),
    11: ("to-network", "TO_NETWORK"),
}

POLICY_MATCH_TYPES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all",
                      5: "L3-Proto", 6: "Proto-Only"}

# ---------------------------------------------------------------- drop reasons

# Cilium drop reasons: code -> (flow.DropReason enum name, pkg/monitor/api text).
DROP_REASONS: dict[int, tuple[str, str]] = {
    130: ("INVALID_SOURCE_MAC", "Invalid source mac"),
    131: ("INVALID_DESTINATION_MAC", "Invalid destination mac"),
    132: ("INVALID_SOURCE_IP", "Invalid source ip"),
    133: ("POLICY_DENIED", "Policy denied"),
    134: ("INVALID_PACKET_DROPPED", "Invalid packet"),
    135: ("CT_TRUNCATED_OR_INVALID_HEADER", "CT: Truncated or invalid header"),
    136: ("CT_MISSING_TCP_ACK_FLAG", "CT: Missing TCP ACK flag"),
    137: ("CT_UNKNOWN_L4_PROTOCOL", "CT: Unknown L4 protocol"),
    138: ("CT_CANNOT_CREATE_ENTRY_FROM_PACKET", "CT: Can't create entry from packet"),
    139: ("UNSUPPORTED_L3_PROTOCOL", "Unsupported L3 protocol"),
    140: ("MISSED_TAIL_CALL", "Missed tail call"),
    141: ("ERROR_WRITING_TO_PACKET", "Error writing to packet"),
    142: ("UNKNOWN_L4_PROTOCOL", "Unknown L4 protocol"),
    143: ("UNKNOWN_ICMPV4_CODE", "Unknown ICMPv4 code"),
    144: ("UNKNOWN_ICMPV4_TYPE", "Unknown ICMPv4 type"),
    145: ("UNKNOWN_ICMPV6_CODE", "Unknown ICMPv6 code"),
    146: ("UNKNOWN_ICMPV6_TYPE", "Unknown ICMPv6 type"),
    147: ("ERROR_RETRIEVING_TUNNEL_KEY", "Error retrieving tunnel key"),
    148: ("ERROR_RETRIEVING_TUNNEL_OPTIONS", "Error retrieving tunnel options"),
    149: ("INVALID_GENEVE_OPTION", "Invalid Geneve option"),
    150: ("UNKNOWN_L3_TARGET_ADDRESS", "Unknown L3 target address"),
    151: ("STALE_OR_UNROUTABLE_IP", "Stale or unroutable IP"),
    152: ("NO_MATCHING_LOCAL_CONTAINER_FOUND", "No matching local container found"),
    153: ("ERROR_WHILE_CORRECTING_L3_CHECKSUM", "Error while correcting L3 checksum"),
    154: ("ERROR_WHILE_CORRECTING_L4_CHECKSUM", "Error while correcting L4 checksum"),
    155: ("CT_MAP_INSERTION_FAILED", "CT: Map insertion failed"),
    156: ("INVALID_IPV6_EXTENSION_HEADER", "Invalid IPv6 extension header"),
    157: ("IP_FRAGMENTATION_NOT_SUPPORTED", "IP fragmentation not supported"),
    158: ("SERVICE_BACKEND_NOT_FOUND", "Service backend not found"),
    160: ("NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT", "No tunnel/encapsulation endpoint (datapath BUG!)"),
    161: ("FAILED_TO_INSERT_INTO_PROXYMAP", "Failed to insert into proxymap"),
    162: ("REACHED_EDT_RATE_LIMITING_DROP_HORIZON", "Reached EDT rate-limiting drop horizon"),
    163: ("UNKNOWN_CONNECTION_TRACKING_STATE", "Unknown connection tracking state"),
    164: ("LOCAL_HOST_IS_UNREACHABLE", "Local host is unreachable"),
    165: ("NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION",
          "No configuration available to perform policy decision"),
    166: ("UNSUPPORTED_L2_PROTOCOL", "Unsupported L2 protocol"),
    167: ("NO_MAPPING_FOR_NAT_MASQUERADE", "No mapping for NAT masquerade"),
    168: ("UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE", "Unsupported protocol for NAT masquerade"),
    169: ("FIB_LOOKUP_FAILED", "FIB lookup failed"),
    170: ("ENCAPSULATION_TRAFFIC_IS_PROHIBITED", "Encapsulation traffic is prohibited"),
    171: ("INVALID_IDENTITY", "Invalid identity"),
    172: ("UNKNOWN_SENDER", "Unknown sender"),
    173: ("NAT_NOT_NEEDED", "NAT not needed"),
    174: ("IS_A_CLUSTERIP", "Is a ClusterIP"),
    175: ("FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND", "First logical datagram fragment not found"),
    176: ("FORBIDDEN_ICMPV6_MESSAGE", "Forbidden ICMPv6 message"),
    177: ("DENIED_BY_LB_SRC_RANGE_CHECK", "Denied by LB src range check"),
    178: ("SOCKET_LOOKUP_FAILED", "Socket lookup failed"),
    179: ("SOCKET_ASSIGN_FAILED", "Socket assign failed"),
    180: ("PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL", "Proxy redirection not supported for protocol"),
    181: ("POLICY_DENY", "Policy denied by denylist"),
}
DROP_REASON_CODES: dict[str, int] = {name: code for code, (name, _) in DROP_REASONS.items()}


def drop_reason_desc(code: int) -> str:
    """flow.DropReason enum name; unknown codes keep their number."""
    return DROP_REASONS[code][0] if code in DROP_REASONS else ("DROP_REASON_UNKNOWN" if code == 0 else str(code))


def drop_reason_text(code: int) -> str:
    """Cilium's human-readable drop reason (``api.DropReason``)."""
    return DROP_REASONS[code][1] if code in DROP_REASONS else str(code)


# ---------------------------------------------------------------- L4


ICMPV4_TYPES = {
    0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
    8: "EchoRequest", 9: "RouterAdvertisement", 10: "RouterSolicitation", 11: "TimeExceeded",
    12: "ParameterProblem", 13: "TimestampRequest", 14: "TimestampReply", 15: "InfoRequest",
    16: "InfoReply", 17: "AddressMaskRequest", 18: "AddressMaskReply",
}
ICMPV4_CODES = {
    3: {0: "Net", 1: "Host", 2: "Protocol", 3: "Port", 4: "FragmentationNeeded",
        5: "SourceRoutingFailed", 6: "NetUnknown", 7: "HostUnknown", 8: "SourceIsolated",
        9: "NetAdminProhibited", 10: "HostAdminProhibited", 11: "NetTOS", 12: "HostTOS",
        13: "CommAdminProhibited", 14: "HostPrecedence", 15: "PrecedenceCutoff"},
    5: {0: "Net", 1: "Host", 2: "TOS+Net", 3: "TOS+Host"},
    11: {0: "TTLExceeded", 1: "FragmentReassemblyTimeExceeded"},
    12: {0: "PointerIndicatesError", 1: "MissingOption", 2: "BadLength"},
}


def icmpv4_typecode(icmp_type: int, code: int) -> str:
    """gopacket's ICMPv4TypeCode.String(): ``EchoRequest``, ``DestinationUnreachable(Port)``."""
    name = ICMPV4_TYPES.get(icmp_type)
    if name is None:
        return f"{icmp_type}({code})"
    codes = ICMPV4_CODES.get(icmp_type)
    if codes is None:
        return name
    return f"{name}({codes.get(code, code)})"


TCP_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")


def tcp_flags_text(flags: schema.TCPFlags | None) -> str:
    """Hubble's ``getTCPFlags``: ``SYN, ACK``."""
    if flags is None:
        return ""
    return ", ".join(name for name in TCP_FLAG_ORDER if getattr(flags, name))


def l4_ports(flow: schema.Flow) -> tuple[int, int] | None:
    """(source port, destination port) of a TCP, UDP or SCTP flow; None for any other."""
    l4 = flow.l4
    if l4 is None:
        return None
    for proto in (l4.TCP, l4.UDP, l4.SCTP):
        if proto is not None:
            return proto.source_port, proto.destination_port
    return None


# ---------------------------------------------------------------- time


_second_text: dict[int, str] = {}  # unix second -> "YYYY-MM-DDTHH:MM:SS", a few recent ones


def _rfc3339_second(secs: int) -> str:
    text = _second_text.get(secs)
    if text is None:
        text = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(secs))
        if len(_second_text) >= 64:
            _second_text.clear()
        _second_text[secs] = text
    return text


def rfc3339_nano(ns: int) -> str:
    """protojson Timestamp text: UTC, 0/3/6/9 fractional digits. The second part is
    memoised (flows arrive in time order, so a few seconds cover a whole batch)."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = _rfc3339_second(secs)
    if frac == 0:
        return base + "Z"
    if frac % 1_000_000 == 0:
        return f"{base}.{frac // 1_000_000:03d}Z"
    if frac % 1000 == 0:
        return f"{base}.{frac // 1000:06d}Z"
    return f"{base}.{frac:09d}Z"


def parse_rfc3339(text: str) -> int:
    """Unix ns of an RFC 3339 timestamp (``Z`` or ``±hh:mm`` offset); ValueError if bad."""
    text = text.strip()
    if len(text) < 19 or text[10] not in "Tt ":
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    head = text[:19]
    if (head[4], head[7], head[13], head[16]) != ("-", "-", ":", ":"):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    try:
        fields = (int(head[0:4]), int(head[5:7]), int(head[8:10]),
                  int(head[11:13]), int(head[14:16]), int(head[17:19]))
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}") from None
    year, month, day, hour, minute, second = fields
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour < 24 and minute < 60 and second < 61):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    secs = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    rest = text[19:]
    frac_ns = 0
    if rest.startswith("."):
        digits = ""
        i = 1
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        if not digits:
            raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
        frac_ns = int((digits + "000000000")[:9])
        rest = rest[i:]
    if rest in ("Z", "z"):
        offset = 0
    elif len(rest) == 6 and rest[0] in "+-" and rest[3] == ":":
        offset = (int(rest[1:3]) * 3600 + int(rest[4:6]) * 60) * (1 if rest[0] == "+" else -1)
    else:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    return (secs - offset) * 1_000_000_000 + frac_ns


def flow_time_ns(flow: schema.Flow) -> int:
    """Unix ns of the flow's ``time``; 0 when unset or not a timestamp."""
    try:
        return parse_rfc3339(flow.time)
    except (ValueError, IndexError):
        return 0


# ---------------------------------------------------------------- JSON form


def flow_dict(flow: schema.Flow) -> dict[str, Any]:
    """The flow as protojson would print it (zero values omitted)."""
    return msgspec.json.decode(schema.to_json(flow))


def response_dict(flow: schema.Flow) -> dict[str, Any]:
    """Hubble's GetFlowsResponse: ``{"flow": …, "node_name": …, "time": …}``."""
    out: dict[str, Any] = {"flow": flow_dict(flow)}
    if flow.node_name:
        out["node_name"] = flow.node_name
    if flow.time:
        out["time"] = flow.time
    return out


def _go_json(data: Any) -> str:
    """Compact JSON as Go's encoding/json writes it (HTML-safe escapes)."""
    text = msgspec.json.encode(data).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def format_jsonpb(flow: schema.Flow) -> str:
    """One line of ``hubble observe -o jsonpb`` (and ``-o json``, and Hubble's exporter)."""
    return _go_json(response_dict(flow))


def lost_response_dict(lost: schema.LostEvent) -> dict[str, Any]:
    """Hubble's GetFlowsResponse carrying a LostEvent: ``{"lost_events": {"source": …,
    "num_events_lost": "…"}, "node_name": …, "time": …}`` (uint64 as a string, like protojson)."""
    out: dict[str, Any] = {"lost_events": {"source": lost.source, "num_events_lost": str(lost.num_events_lost)}}
    if lost.node_name:
        out["node_name"] = lost.node_name
    if lost.time_ns:
        out["time"] = rfc3339_nano(lost.time_ns)
    return out


def format_lost_jsonpb(lost: schema.LostEvent) -> str:
    """One line of ``hubble observe -o json`` for a lost-events response."""
    return _go_json(lost_response_dict(lost))
