"""Message bodies of the public event API (pure).

Invariants:
- A flow message is one or more lines, each exactly one line of ``ciliary observe -o json``
  (``hubble.format_jsonpb``: Hubble's ``GetFlowsResponse`` JSON) followed by ``\\n``; a
  message never exceeds the limit it is given; a flow whose line alone exceeds it is not
  sent and is counted in ``FlowMessages.too_large``.
- A change event is a JSON object with ``version`` (``subjects.VERSION``), ``kind``,
  ``change`` (``added`` | ``updated`` | ``removed``) and ``cluster``, then the fields of its
  kind; ``removed`` carries the last state. An update that changes nothing a consumer can
  see gives no event (``None``).
- Builders take decoded records (``ciliary.schema``) and return plain dicts; ``encode``
  makes the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ciliary import schema

from .subjects import VERSION

ADDED, UPDATED, REMOVED = "added", "updated", "removed"


@dataclass
class FlowMessages:
    messages: list[bytes] = field(default_factory=list)
    too_large: int = 0


_GO_ESCAPES = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"))


def flow_line(flow: schema.Flow) -> bytes:
    """``hubble.format_jsonpb(flow)`` + ``\\n`` as bytes, built without the dict round trip:
    the flow's own JSON inside ``{"flow": …, "node_name": …, "time": …}``, then Go's HTML-safe
    escapes (the same bytes; tests/unit/test_events.py compares them)."""
    parts = [b'{"flow":', schema.to_json(flow)]
    if flow.node_name:
        parts += (b',"node_name":', msgspec.json.encode(flow.node_name))
    if flow.time:
        parts += (b',"time":', msgspec.json.encode(flow.time))
    parts.append(b"}\n")
    line = b"".join(parts)
    if b"<" in line or b">" in line or b"&" in line:
        for raw, escaped in _GO_ESCAPES:
            line = line.replace(raw, escaped)
    return line


def flow_messages(flows: Sequence[schema.Flow], limit: int) -> FlowMessages:
    """The flows as JSON-lines messages of at most ``limit`` bytes each, in order."""
    out = FlowMessages()
    part: list[bytes] = []
    size = 0
    for flow in flows:
        line = flow_line(flow)
        if len(line) > limit:
            out.too_large += 1
            continue
        if size + len(line) > limit:
            out.messages.append(b"".join(part))
            part, size = [], 0
        part.append(line)
        size += len(line)
    if part:
        out.messages.append(b"".join(part))
    return out


def encode(event: dict[str, Any]) -> bytes:
    return msgspec.json.encode(event)


def _change(old: Any, new: Any, view: Callable[[Any], dict[str, Any]], kind: str,
            cluster: str) -> dict[str, Any] | None:
    """The event for ``old`` -> ``new`` as seen through ``view``; None when nothing shows."""
    if old is None and new is None:
        return None
    if old is None:
        change, body = ADDED, view(new)
    elif new is None:
        change, body = REMOVED, view(old)
    else:
        body = view(new)
        if body == view(old):
            return None
        change = UPDATED
    return {"version": VERSION, "kind": kind, "change": change,
            "cluster": (new or old).cluster or cluster, **body}


# ---------------------------------------------------------------- identities


def _identity_view(rec: schema.IdentityRecord) -> dict[str, Any]:
    return {"identity": {"id": rec.id, "labels": list(rec.labels), "scope": rec.scope}}


def identity_event(old: schema.IdentityRecord | None, new: schema.IdentityRecord | None,
                   cluster: str = "") -> dict[str, Any] | None:
    """``kind: identity``: a numeric identity allocated, changed or released."""
    return _change(old, new, _identity_view, "identity", cluster)


# ---------------------------------------------------------------- endpoints


def _endpoint_view(rec: schema.IPCacheRecord) -> dict[str, Any]:
    ip, _, _ = rec.prefix.partition("/")
    return {"endpoint": {"namespace": rec.namespace, "pod": rec.pod, "node": rec.node, "ip": ip,
                         "identity": rec.identity}}


def endpoint_event(old: schema.IPCacheRecord | None, new: schema.IPCacheRecord | None,
                   cluster: str = "") -> dict[str, Any] | None:
    """``kind: endpoint``: a pod's address and identity appeared, changed or went away.
    ipcache entries of nodes, CIDRs and the world are not endpoints (None)."""
    old = old if old is not None and old.source == "pod" else None
    new = new if new is not None and new.source == "pod" else None
    return _change(old, new, _endpoint_view, "endpoint", cluster)


def endpoint_node(old: schema.IPCacheRecord | None, new: schema.IPCacheRecord | None) -> str:
    """The node an endpoint event is about (its subject's last token)."""
    rec = new if new is not None else old
    return rec.node if rec is not None else ""


# ---------------------------------------------------------------- policy


def _entries(rec: schema.PolicyMapRecord) -> list[dict[str, Any]]:
    return [{"direction": e.direction, "peer_identity": e.peer, "port": e.port, "end_port": e.end_port,
             "protocol": e.proto, "verdict": e.verdict, "audit": e.audit, "rule": rec.rules.get(e.rule_ref, "")}
            for e in rec.entries]


def _policy_view(rec: schema.PolicyMapRecord) -> dict[str, Any]:
    return {"identity": rec.identity, "ingress_enforced": rec.ingress_enforced,
            "egress_enforced": rec.egress_enforced, "audit_ingress": rec.audit_ingress,
            "audit_egress": rec.audit_egress, "policies": list(rec.policies), "error": rec.error}


def policy_event(old: schema.PolicyMapRecord | None, new: schema.PolicyMapRecord | None,
                 cluster: str = "") -> dict[str, Any] | None:
    """``kind: policy``: the verdicts the datapath applies for one local identity changed.
    ``added``/``removed`` are the policy map entries (direction, peer identity, port range,
    protocol number, allow/deny, audit, the rule they come from) that appeared/went away;
    a removed record (no policy selects the identity: allow all) removes every entry."""
    if old is None and new is None:
        return None
    before = _entries(old) if old is not None else []
    after = _entries(new) if new is not None else []
    keys_before = {msgspec.json.encode(e) for e in before}
    keys_after = {msgspec.json.encode(e) for e in after}
    added = [e for e in after if msgspec.json.encode(e) not in keys_before]
    removed = [e for e in before if msgspec.json.encode(e) not in keys_after]
    event = _change(old, new, _policy_view, "policy", cluster)
    if event is None:
        if not added and not removed:
            return None
        assert new is not None
        event = {"version": VERSION, "kind": "policy", "change": UPDATED,
                 "cluster": new.cluster or cluster, **_policy_view(new)}
    event["added"] = added
    event["removed"] = removed
    return event


# ---------------------------------------------------------------- services


def _service_view(rec: schema.LBFrontend) -> dict[str, Any]:
    return {"service": {"namespace": rec.namespace, "name": rec.name, "type": rec.type,
                        "port_name": rec.port_name},
            "frontend": {"address": rec.address, "port": rec.port, "protocol": rec.proto,
                         "node": rec.node},
            "algorithm": rec.algorithm, "traffic_policy": rec.traffic_policy,
            "backends": [{"ip": b.ip, "port": b.port, "protocol": b.proto, "state": b.state,
                          "node": b.node, "pod": b.pod} for b in rec.backends]}


def service_event(old: schema.LBFrontend | None, new: schema.LBFrontend | None,
                  cluster: str = "") -> dict[str, Any] | None:
    """``kind: service``: a load-balancer frontend and its backends appeared, changed or went."""
    return _change(old, new, _service_view, "service", cluster)
