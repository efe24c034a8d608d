"""ctypes twins of the BPF map keys, values and events in ``bpf/lib/types.h``.

Invariants:
- Every Structure here has exactly the size and field offsets of the C struct of
  the same name (``tests/unit/test_layouts.py`` compiles the header with gcc and
  compares); C padding fields are spelled out, so no struct has hidden holes.
- Fields typed ``__be32``/``__be16`` in C hold network byte order; the helpers
  ``ip4``/``port`` build them and ``ip4_str``/``port_int`` read them back.
- ``MAPS`` names every pinned map with its key and value layout; this is the
  one table userspace uses to encode and decode map entries.
- Constants mirror ``bpf/lib/types.h`` and ``bpf/lib/drop.h`` (Cilium numbers).
"""

from __future__ import annotations

import ctypes as ct
import socket
import struct

from ciliary import schema

# ---- constants (bpf/lib/types.h, bpf/lib/drop.h) -------------------------

IDENTITY_UNKNOWN = schema.IDENTITY_UNKNOWN
IDENTITY_HOST = schema.IDENTITY_HOST
IDENTITY_WORLD = schema.IDENTITY_WORLD

DIR_INGRESS = 1
DIR_EGRESS = 2
DIR_SERVICE = 3  # host programs (NodePort): Cilium METRIC_SERVICE

IPCACHE_F_LOCAL = 1 << 0

EP_F_POLICY_INGRESS = 1 << 0
EP_F_POLICY_EGRESS = 1 << 1
EP_F_AUDIT_INGRESS = 1 << 2
EP_F_AUDIT_EGRESS = 1 << 3

POLICY_ALLOW = 1
POLICY_DENY = 2
POLICY_F_AUDIT = 1 << 0

CT_KEY_F_SERVICE = 1 << 4
CT_KEY_F_HOST = 1 << 5
CT_NEW, CT_ESTABLISHED, CT_REPLY, CT_RELATED = 0, 1, 2, 3
CT_F_SEEN_REPLY = 1 << 0
CT_F_TX_CLOSING = 1 << 1
CT_F_RX_CLOSING = 1 << 2
CT_F_SERVICE = 1 << 3
CT_F_AUDITED = 1 << 4
CT_F_SNAT = 1 << 5

NAT_KEY_FWD = 1
NAT_KEY_REV = 2

SVC_FLAG_EXTERNAL_IP = 1 << 0
SVC_FLAG_NODEPORT = 1 << 1
SVC_FLAG_EXT_LOCAL_SCOPE = 1 << 2
SVC_FLAG_AFFINITY = 1 << 4
SVC_FLAG_LOADBALANCER = 1 << 5
SVC_FLAG2_INT_LOCAL_SCOPE = 1 << 4
SVC_FLAG2_MAGLEV = 1 << 7

LB_MAGLEV_TABLE_SIZE = 16381  # default M (cflag LB_MAGLEV_TABLE_SIZE)
LB_MAGLEV_SEED = 0x5CA1AB1E  # default jhash seed (cflag LB_MAGLEV_SEED)
NODEPORT_SNAT_MIN = 61000
NODEPORT_SNAT_MAX = 65535

REASON_FORWARDED = 0
REASON_EVENT_LOST = 254

EVENT_TRACE = 1
EVENT_DROP = 2

VERDICT_FORWARDED = 1
VERDICT_DROPPED = 2
VERDICT_AUDIT = 4
EVENT_F_POLICY_VERDICT = 1 << 0  # flow_event.flags: report the allowed connection's policy verdict

EVENT_PAYLOAD_LEN = 128

DROP_INVALID_SIP = 132
DROP_POLICY = 133
DROP_INVALID = 134
DROP_CT_INVALID_HDR = 135
DROP_UNKNOWN_L3 = 139
DROP_WRITE_ERROR = 141
DROP_UNKNOWN_L4 = 142
DROP_CSUM_L3 = 153
DROP_CSUM_L4 = 154
DROP_CT_CREATE_FAILED = 155
DROP_FRAG_NOSUPPORT = 157
DROP_NO_SERVICE = 158
DROP_NAT_NO_MAPPING = 167
DROP_NO_FIB = 169
DROP_POLICY_DENY = 181

# Every drop reason the datapath emits, with Cilium's (Hubble's) name for it.
DROP_REASONS = {
    DROP_INVALID_SIP: "INVALID_SOURCE_IP",
    DROP_POLICY: "POLICY_DENIED",
    DROP_INVALID: "INVALID_PACKET_DROPPED",
    DROP_CT_INVALID_HDR: "CT_TRUNCATED_OR_INVALID_HEADER",
    DROP_UNKNOWN_L3: "UNSUPPORTED_L3_PROTOCOL",
    DROP_WRITE_ERROR: "ERROR_WRITING_TO_PACKET",
    DROP_UNKNOWN_L4: "UNKNOWN_L4_PROTOCOL",
    DROP_CSUM_L3: "ERROR_WHILE_CORRECTING_L3_CHECKSUM",
    DROP_CSUM_L4: "ERROR_WHILE_CORRECTING_L4_CHECKSUM",
    DROP_CT_CREATE_FAILED: "CT_MAP_INSERTION_FAILED",
    DROP_FRAG_NOSUPPORT: "IP_FRAGMENTATION_NOT_SUPPORTED",
    DROP_NO_SERVICE: "SERVICE_BACKEND_NOT_FOUND",
    DROP_NAT_NO_MAPPING: "NO_MAPPING_FOR_NAT_MASQUERADE",
    DROP_NO_FIB: "FIB_LOOKUP_FAILED",
    DROP_POLICY_DENY: "POLICY_DENY",
}

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17


# ---- byte-order helpers ---------------------------------------------------


def ip4(addr: str) -> int:
    """Dotted quad -> integer whose in-memory (little-endian) bytes are network order."""
    return struct.unpack("=I", socket.inet_aton(addr))[0]


def ip4_str(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def port(p: int) -> int:
    """Host port -> __be16 field value."""
    return socket.htons(p)


def port_int(value: int) -> int:
    return socket.ntohs(value)


_ADDR_FIELDS = {"ip", "ipv4", "saddr", "daddr", "address", "orig_daddr", "client_ip", "addr"}
_PORT_FIELDS = {"sport", "dport", "port", "orig_dport"}


class Layout(ct.Structure):
    """Base: value equality, bytes round trip and a stable readable repr."""

    def __bytes__(self) -> bytes:
        return memoryview(self).tobytes()  # the raw buffer (2-3x faster than string_at)

    @classmethod
    def from_bytes(cls, data: bytes):
        """A layout from the first ``sizeof`` bytes of ``data`` (any buffer)."""
        return cls.from_buffer_copy(data)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and bytes(self) == bytes(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, bytes(self)))

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, _ in self._fields_:
            if name == "pad" or name.startswith("pad"):
                continue
            v = getattr(self, name)
            if name in _ADDR_FIELDS:
                v = ip4_str(v)
            elif name in _PORT_FIELDS:
                v = port_int(v)
            elif isinstance(v, ct.Array):
                v = bytes(v).rstrip(b"\0").hex()
                if not v:
                    continue
            out[name] = v
        return out

    def __repr__(self) -> str:
        inner = " ".join(f"{k}={v}" for k, v in self.fields().items())
        return f"{type(self).__name__}({inner})"


# ---- map layouts ------------------------------------------------------------


class IpcacheKey(Layout):
    _fields_ = [("prefixlen", ct.c_uint32), ("ip", ct.c_uint32)]


class IpcacheValue(Layout):
    _fields_ = [("identity", ct.c_uint32), ("flags", ct.c_uint32)]


class EndpointKey(Layout):
    _fields_ = [("ifindex", ct.c_uint32)]


class EndpointInfo(Layout):
    _fields_ = [
        ("ep_id", ct.c_uint32),
        ("identity", ct.c_uint32),
        ("ipv4", ct.c_uint32),
        ("flags", ct.c_uint32),
    ]


class PolicyKey(Layout):
    _fields_ = [
        ("local_id", ct.c_uint32),
        ("peer_id", ct.c_uint32),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("direction", ct.c_uint8),
    ]


class PolicyValue(Layout):
    _fields_ = [
        ("verdict", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint16),
        ("rule_ref", ct.c_uint32),
    ]


class CtKey(Layout):
    _fields_ = [
        ("saddr", ct.c_uint32),
        ("daddr", ct.c_uint32),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint16),
    ]


class CtEntry(Layout):
    _fields_ = [
        ("created_ns", ct.c_uint64),
        ("expires_ns", ct.c_uint64),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("backend_id", ct.c_uint32),
        ("src_identity", ct.c_uint32),
        ("rev_nat_id", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("tx_tcp_flags", ct.c_uint8),
        ("rx_tcp_flags", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    ]


class Lb4Key(Layout):
    _fields_ = [
        ("address", ct.c_uint32),
        ("dport", ct.c_uint16),
        ("backend_slot", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("scope", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
    ]


class Lb4Service(Layout):
    _fields_ = [
        ("backend_id", ct.c_uint32),
        ("count", ct.c_uint16),
        ("rev_nat_index", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("flags2", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
    ]


class Lb4BackendKey(Layout):
    _fields_ = [("backend_id", ct.c_uint32)]


class Lb4Backend(Layout):
    _fields_ = [
        ("address", ct.c_uint32),
        ("port", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("flags", ct.c_uint8),
    ]


class Lb4ReverseNatKey(Layout):
    _fields_ = [("rev_nat_id", ct.c_uint16)]


class Lb4ReverseNat(Layout):
    _fields_ = [("address", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class Lb4MaglevKey(Layout):
    _fields_ = [("rev_nat_id", ct.c_uint16), ("pad", ct.c_uint16), ("index", ct.c_uint32)]


class Lb4MaglevValue(Layout):
    _fields_ = [("backend_id", ct.c_uint32)]


class Lb4AffinityKey(Layout):
    _fields_ = [("client_ip", ct.c_uint32), ("rev_nat_id", ct.c_uint16), ("pad", ct.c_uint16)]


class LbAffinityVal(Layout):
    _fields_ = [("last_used", ct.c_uint64), ("backend_id", ct.c_uint32), ("pad", ct.c_uint32)]


class LbAffinityMatchKey(Layout):
    _fields_ = [("backend_id", ct.c_uint32), ("rev_nat_id", ct.c_uint16), ("pad", ct.c_uint16)]


class LbAffinityMatchValue(Layout):
    _fields_ = [("flags", ct.c_uint32)]


class Nat4Entry(Layout):
    _fields_ = [
        ("expires_ns", ct.c_uint64),
        ("addr", ct.c_uint32),
        ("port", ct.c_uint16),
        ("rev_nat_id", ct.c_uint16),
    ]


class MetricsKey(Layout):
    _fields_ = [("reason", ct.c_uint8), ("direction", ct.c_uint8), ("pad", ct.c_uint16)]


class MetricsValue(Layout):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


class FlowEvent(Layout):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("saddr", ct.c_uint32),
        ("daddr", ct.c_uint32),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("src_identity", ct.c_uint32),
        ("dst_identity", ct.c_uint32),
        ("ep_id", ct.c_uint32),
        ("ifindex", ct.c_uint32),
        ("rule_ref", ct.c_uint32),
        ("orig_daddr", ct.c_uint32),
        ("orig_dport", ct.c_uint16),
        ("pkt_len", ct.c_uint16),
        ("type", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("drop_reason", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("proto", ct.c_uint8),
        ("tcp_flags", ct.c_uint8),
        ("is_reply", ct.c_uint8),
        ("ct_state", ct.c_uint8),
        ("payload_len", ct.c_uint16),
        ("icmp_type", ct.c_uint8),
        ("icmp_code", ct.c_uint8),
        ("policy_match", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("payload", ct.c_uint8 * EVENT_PAYLOAD_LEN),
    ]

    def payload_bytes(self) -> bytes:
        return bytes(self.payload)[: self.payload_len]


# C struct name -> ctypes layout (what test_layouts compares).
C_STRUCTS: dict[str, type[Layout]] = {
    "ipcache_key": IpcacheKey,
    "ipcache_value": IpcacheValue,
    "endpoint_key": EndpointKey,
    "endpoint_info": EndpointInfo,
    "policy_key": PolicyKey,
    "policy_value": PolicyValue,
    "ct_key": CtKey,
    "ct_entry": CtEntry,
    "lb4_key": Lb4Key,
    "lb4_service": Lb4Service,
    "lb4_backend": Lb4Backend,
    "lb4_reverse_nat_key": Lb4ReverseNatKey,
    "lb4_reverse_nat": Lb4ReverseNat,
    "lb4_maglev_key": Lb4MaglevKey,
    "lb4_maglev_value": Lb4MaglevValue,
    "lb4_affinity_key": Lb4AffinityKey,
    "lb_affinity_val": LbAffinityVal,
    "lb_affinity_match_key": LbAffinityMatchKey,
    "lb_affinity_match_value": LbAffinityMatchValue,
    "nat4_entry": Nat4Entry,
    "metrics_key": MetricsKey,
    "metrics_value": MetricsValue,
    "flow_event": FlowEvent,
}

# Map names (bpf/lib/maps.h).
IPCACHE = "ciliary_ipcache"
LXC = "ciliary_lxc"
POLICY = "ciliary_policy"
CT = "ciliary_ct4_global"
LB4_SERVICES = "ciliary_lb4_services"
LB4_BACKENDS = "ciliary_lb4_backends"
LB4_REVERSE_NAT = "ciliary_lb4_reverse_nat"
LB4_MAGLEV = "ciliary_lb4_maglev"
LB_AFFINITY_MATCH = "ciliary_lb_affinity_match"
LB4_AFFINITY = "ciliary_lb4_affinity"
NAT4 = "ciliary_nat4"
METRICS = "ciliary_metrics"
EVENTS = "ciliary_events"

# Pinned map name -> (key layout, value layout).
MAPS: dict[str, tuple[type[Layout], type[Layout]]] = {
    IPCACHE: (IpcacheKey, IpcacheValue),
    LXC: (EndpointKey, EndpointInfo),
    POLICY: (PolicyKey, PolicyValue),
    CT: (CtKey, CtEntry),
    LB4_SERVICES: (Lb4Key, Lb4Service),
    LB4_BACKENDS: (Lb4BackendKey, Lb4Backend),
    LB4_REVERSE_NAT: (Lb4ReverseNatKey, Lb4ReverseNat),
    LB4_MAGLEV: (Lb4MaglevKey, Lb4MaglevValue),
    LB_AFFINITY_MATCH: (LbAffinityMatchKey, LbAffinityMatchValue),
    METRICS: (MetricsKey, MetricsValue),
}

# Pinned maps that only the datapath writes (session affinity, NodePort SNAT).
# Kept out of ``MAPS`` so that no reconciler ever owns (and prunes) them;
# ``MapOps`` reads and writes them like any other map.
STATE_MAPS: dict[str, tuple[type[Layout], type[Layout]]] = {
    LB4_AFFINITY: (Lb4AffinityKey, LbAffinityVal),
    NAT4: (CtKey, Nat4Entry),
}

ALL_MAPS: dict[str, tuple[type[Layout], type[Layout]]] = {**MAPS, **STATE_MAPS}
