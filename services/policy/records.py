"""Resolution results as bus records, and the write plan that applies them.

Invariants:
- Pure: no NATS. `identity_record` / `status_payload` are deterministic, so equal
  resolutions encode to equal bytes and an unchanged key is never rewritten.
- `plan_writes` orders every put (sorted by key) before every delete (add before remove).
- Every local identity has a record once resolved: one no policy selects gets an open
  record (neither direction enforced, no entries), so a missing record means "not
  resolved yet", and the node executor keeps an endpoint's previous identity until its
  new one has a record (a relabelled pod never runs unenforced in between).
- An identity whose resolution failed (``error``, e.g. overflow) keeps the record already
  written for it; if there is none it gets a fail-closed record (both directions enforced,
  no entries, the error): a policy that cannot be applied never silently opens traffic.
- Named ports come from Pods: a container port name of any pod whose IP the ipcache maps
  to identity N is a named port of N (the first pod in key order wins on conflicts).
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ciliary import schema

from .resolve import IdentityPolicy, PolicyEntry, PolicyStatus, Resolution
from .rules import PROTOCOLS, PolicyKey


def identity_record(ip: IdentityPolicy, cluster: str, cluster_id: int,
                    status_keys: Mapping[PolicyKey, str]) -> schema.PolicyMapRecord:
    entries = entry_records(ip.entries)
    # the id -> rule table; were two rules to share an id, the one named last wins
    rules = dict(map(_RULE_OF, ip.entries))
    rules.pop(0, None)  # the default allow-all entries name no rule
    return schema.PolicyMapRecord(
        identity=ip.identity, cluster=cluster, cluster_id=cluster_id,
        ingress_enforced=ip.ingress_enforced, egress_enforced=ip.egress_enforced,
        audit_ingress=ip.audit, audit_egress=ip.audit, entries=entries,
        rules=dict(sorted(rules.items())),
        policies=sorted(status_keys.get(k, str(k)) for k in ip.policies), error=ip.error,
    )


_RECORD_OF = operator.attrgetter("record")
_RULE_OF = operator.attrgetter("rule_ref_text")


def entry_records(entries: Sequence[PolicyEntry]) -> list[schema.PolicyEntryRecord]:
    """The records of `entries`, in one C-level pass (`PolicyEntry.record` is built once
    per entry and kept on it)."""
    return list(map(_RECORD_OF, entries))


def fail_closed_record(ip: IdentityPolicy, cluster: str, cluster_id: int,
                       status_keys: Mapping[PolicyKey, str]) -> schema.PolicyMapRecord:
    return schema.PolicyMapRecord(
        identity=ip.identity, cluster=cluster, cluster_id=cluster_id,
        ingress_enforced=True, egress_enforced=True,
        policies=sorted(status_keys.get(k, str(k)) for k in ip.policies), error=ip.error,
    )


def open_record(identity: int, cluster: str, cluster_id: int) -> schema.PolicyMapRecord:
    """The record of a local identity no policy selects: allow all, both directions."""
    return schema.PolicyMapRecord(identity=identity, cluster=cluster, cluster_id=cluster_id,
                                  ingress_enforced=False, egress_enforced=False)


def update_desired(
    desired: dict[str, bytes], res: Resolution, changed: Iterable[int], cluster: str,
    cluster_id: int, status_keys: Mapping[PolicyKey, str], current: Mapping[str, bytes],
    local: Collection[int] = (),
) -> set[str]:
    """Bring `desired` (bucket ``policy`` as it should be, encoded, for the previous
    resolution; empty at first) up to date: only the identities in `changed` are
    re-encoded, plus those in error (whose record depends on what is currently written).
    Every identity in `local` gets a record (an open one when nothing selects it);
    `changed` must name every identity that joined or left `local` since. Returns the
    keys it recomputed (`puts_among` plans their writes)."""
    redo = set(changed) | {i for i, ip in res.identities.items() if ip.error}
    keys = set()
    for ident in redo:
        key = schema.policy_key(ident)
        keys.add(key)
        ip = res.identities.get(ident)
        if ip is None:
            if ident in local:
                desired[key] = schema.encode(open_record(ident, cluster, cluster_id))
            else:
                desired.pop(key, None)
        elif not ip.error:
            desired[key] = schema.encode(identity_record(ip, cluster, cluster_id, status_keys))
        elif key in current:
            desired[key] = current[key]
        else:
            desired[key] = schema.encode(fail_closed_record(ip, cluster, cluster_id, status_keys))
    return keys


def status_payload(st: PolicyStatus) -> dict[str, Any]:
    rec = schema.PolicyStatusRecord(
        state=st.state, error=st.error, warnings=list(st.warnings),
        selected_identities=list(st.selected),
    )
    return msgspec.to_builtins(rec)


class BucketValues(Mapping[str, bytes]):
    """The values of a ``key -> (revision, value)`` mirror, read through (no copy)."""

    def __init__(self, held: Mapping[str, tuple[int, bytes]]) -> None:
        self._held = held

    def __getitem__(self, key: str) -> bytes:
        return self._held[key][1]

    def get(self, key: str, default: Any = None) -> Any:
        found = self._held.get(key)
        return default if found is None else found[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True)
class WritePlan:
    puts: list[tuple[str, bytes]]
    deletes: list[str]

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)


def plan_writes(current: Mapping[str, bytes], desired: Mapping[str, bytes]) -> WritePlan:
    """Puts for new/changed keys (sorted), then deletes of keys no longer desired."""
    puts = puts_among(current, desired, desired)
    deletes = sorted(k for k in current if k not in desired)
    return WritePlan(puts, deletes)


def puts_among(current: Mapping[str, bytes], desired: Mapping[str, bytes], keys: Iterable[str]) -> list[tuple[str, bytes]]:
    """The puts `plan_writes` would make, restricted to `keys` (sorted): for a pass's
    first writes, without comparing every key of the bucket."""
    return [(k, desired[k]) for k in sorted(keys) if k in desired and current.get(k) != desired[k]]


def named_ports_from_pods(
    pods: Iterable[tuple[str, dict[str, Any]]], pod_identity: Mapping[str, int]
) -> dict[int, dict[str, tuple[int, int]]]:
    """``pods``: (``namespace/name``, manifest); ``pod_identity``: ``namespace/name`` → id."""
    out: dict[int, dict[str, tuple[int, int]]] = {}
    for ref, manifest in sorted(pods, key=lambda p: p[0]):
        ident = pod_identity.get(ref)
        if ident is None:
            continue
        spec = manifest.get("spec") or {}
        for container in spec.get("containers") or []:
            for port in container.get("ports") or []:
                name = port.get("name")
                number = port.get("containerPort")
                if not name or not isinstance(number, int):
                    continue
                proto = PROTOCOLS.get(str(port.get("protocol") or "TCP").upper())
                if proto is None:
                    continue
                out.setdefault(ident, {}).setdefault(str(name).lower(), (number, proto))
    return out
