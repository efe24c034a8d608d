"""Policy resolution: the records of bucket ``policy``, policy status and policy trace.

Invariants:
- Bucket ``policy`` (writer: policy) holds one key per local identity:
  ``policy_key(identity)`` = ``id.<identity>`` -> PolicyMapRecord; an identity no policy
  selects has an open record (neither direction enforced, no entries). No key means "not
  resolved yet": the node executor keeps an endpoint's previous identity while its new
  one has no key. The writer puts new and changed keys before it deletes stale ones.
- Policy status goes to bucket ``status`` under the policy object's own key
  (``CiliumNetworkPolicy.<ns>.<name>``, ...) as a StatusRecord whose ``status`` is
  PolicyStatusRecord's fields.
- ``ciliary policy trace`` asks SUBJECT_POLICY_TRACE (PolicyTraceRequest ->
  PolicyTraceReply).
"""

from __future__ import annotations

import msgspec

from .wire import Record, decode

__all__ = [
    "POLICY_DIRECTIONS",
    "POLICY_ID_PREFIX",
    "POLICY_VERDICTS",
    "PolicyEntryRecord",
    "PolicyMapHead",
    "PolicyMapRecord",
    "PolicyStatusRecord",
    "PolicyTraceReply",
    "PolicyTraceRequest",
    "PolicyTraceStep",
    "decode_policy_map_record",
    "policy_key",
]

POLICY_ID_PREFIX = "id."
POLICY_DIRECTIONS = ("ingress", "egress")
POLICY_VERDICTS = ("allow", "deny")


def policy_key(identity: int) -> str:
    """Key of a local identity's entries in bucket ``policy``."""
    return f"{POLICY_ID_PREFIX}{identity}"


class PolicyEntryRecord(Record, array_like=True):
    """One policy map entry {local, peer, dport, proto, direction} -> {verdict, audit, rule}.

    Encoded as an array in field order, not a map: a record carries up to thousands of
    entries and a relabel rewrites dozens of records, so field names would be most of
    the bytes every reader receives (29 bytes an entry instead of 70). Append new fields
    at the end, with defaults.

    ``peer``/``port``/``proto`` 0 are wildcards; ``proto`` is 0 only together with ``port``
    0. ``end_port`` > 0 is the range ``port..end_port`` that the executor expands into one
    map key per port. ICMP (proto 1 / 58) carries the ICMP type in ``port``.
    """

    peer: int
    port: int
    proto: int
    direction: str  # POLICY_DIRECTIONS
    verdict: str  # POLICY_VERDICTS; deny wins over allow at lookup
    end_port: int = 0
    audit: bool = False  # a deny that is only logged (policy audit mode)
    rule_ref: int = 0  # u32 for the map value and flow events; 0 = default allow-all


class PolicyMapRecord(Record):
    """``policy`` ``id.<identity>``: everything the executor writes for one local identity."""

    identity: int
    cluster: str
    cluster_id: int
    ingress_enforced: bool  # EP_F_POLICY_INGRESS: consult the map, miss = drop
    egress_enforced: bool  # EP_F_POLICY_EGRESS
    audit_ingress: bool = False  # EP_F_AUDIT_INGRESS: drops become audit verdicts
    audit_egress: bool = False  # EP_F_AUDIT_EGRESS
    entries: list[PolicyEntryRecord] = []  # sorted, one per key
    rules: dict[int, str] = {}  # rule_ref -> "CiliumNetworkPolicy/ns/name spec[0].ingress[1]"
    policies: list[str] = []  # status keys of the policies selecting this identity
    error: str = ""  # set when the identity's policy could not be applied (e.g. overflow)


class PolicyMapHead(Record):
    """A ``PolicyMapRecord`` read without its entries, from the same bytes: for readers that
    need an identity's enforcement flags or rule names only. Decoding skips building the
    entries (about five times faster on a record of 1,000 entries), so a node executor or
    the flows service pays little for the records of identities it does not enforce."""

    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    audit_ingress: bool = False
    audit_egress: bool = False
    rules: dict[int, str] = {}
    error: str = ""


# `PolicyEntryRecord` as written before entries were arrays: a map of the same fields
_PolicyEntryMapRecord = msgspec.defstruct(
    "_PolicyEntryMapRecord",
    [(f.name, f.type) if f.required else (f.name, f.type, f.default)
     for f in msgspec.structs.fields(PolicyEntryRecord)],
    bases=(Record,),
)


class _PolicyMapRecordWithEntryMaps(PolicyMapRecord):
    entries: list[_PolicyEntryMapRecord] = []  # type: ignore[assignment]


def decode_policy_map_record(data: bytes) -> PolicyMapRecord:
    """A ``policy`` value as a `PolicyMapRecord`, whether its entries are arrays or, as
    written by an older policy service, maps (a node executor upgraded first keeps
    reading the records already stored). Raises ``msgspec.ValidationError`` /
    ``DecodeError`` on anything else."""
    try:
        return decode(data, PolicyMapRecord)
    except msgspec.ValidationError:
        old = decode(data, _PolicyMapRecordWithEntryMaps)
    fields = msgspec.structs.asdict(old)
    fields["entries"] = [PolicyEntryRecord(**msgspec.structs.asdict(e)) for e in old.entries]
    return PolicyMapRecord(**fields)


class PolicyStatusRecord(Record):
    """``status`` of one policy object (stored as StatusRecord.status)."""

    state: str  # "ok" | "error"
    error: str = ""
    warnings: list[str] = []  # accepted but not enforced (toFQDNs, L7, ...)
    selected_identities: list[int] = []  # local identities (endpoints) the policy selects


class PolicyTraceRequest(Record):
    """Would traffic from ``from_labels`` (or ``from_cidr``) to ``to_labels`` (or ``to_cidr``)
    pass? An IP/CIDR side is the identity the ipcache maps it to (longest prefix)."""

    from_labels: list[str]
    to_labels: list[str] = []
    to_cidr: str = ""  # an IP or CIDR outside the cluster instead of to_labels
    port: int = 0
    proto: str = "TCP"  # TCP | UDP | SCTP | ICMP | ICMPv6
    from_identity: int = 0  # optional: the numeric identities, when known
    to_identity: int = 0
    from_cidr: str = ""  # an IP or CIDR instead of from_labels (resolved as the ipcache does)


class PolicyTraceStep(Record):
    direction: str
    verdict: str  # allow | deny
    reason: str  # rule | default-deny | no-default-deny | not-enforced | not-local
    rules: list[str] = []
    audit: bool = False


class PolicyTraceReply(Record):
    ok: bool = True
    error: str = ""
    verdict: str = ""  # allow | deny
    egress: PolicyTraceStep | None = None
    ingress: PolicyTraceStep | None = None
