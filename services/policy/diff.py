"""Ordered operations turning one set of policy entries into another.

Invariants:
- Applying the operations in order to a map holding ``old`` yields exactly ``new``.
- Every add/update precedes every delete (add-before-delete), so a key that survives is
  never absent in between and no traffic allowed by both old and new is ever dropped.
- Among adds, denies come first (a new deny is in place before a new allow it narrows);
  among deletes, allows go first (an old allow never outlives the deny that narrowed it).
  Within those groups operations are sorted by (identity, key): the output is deterministic.
- Enforcement flags are not entries; the writer of the map flips a direction to enforced
  after its entries are added and to not-enforced before they are deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .resolve import DENY, PolicyEntry

EntryKey = tuple[int, str, int, int, int, int]  # identity, direction, peer, proto, port, end


@dataclass(frozen=True)
class Op:
    action: str  # add | update | delete
    identity: int
    entry: PolicyEntry  # the new entry for add/update, the old one for delete

    @property
    def key(self) -> EntryKey:
        return (self.identity, *self.entry.key)

    def __str__(self) -> str:
        return f"{self.action} {self.identity} {self.entry}"


def _index(entries: Mapping[int, Iterable[PolicyEntry]]) -> dict[EntryKey, PolicyEntry]:
    return {(ident, *e.key): e for ident, es in entries.items() for e in es}


def diff(
    old: Mapping[int, Iterable[PolicyEntry]], new: Mapping[int, Iterable[PolicyEntry]]
) -> list[Op]:
    """Operations from `old` to `new` (both: local identity → entries)."""
    before = _index(old)
    after = _index(new)
    adds: list[Op] = []
    for key in sorted(after):
        entry = after[key]
        prev = before.get(key)
        if prev is None:
            adds.append(Op("add", key[0], entry))
        elif prev != entry:
            adds.append(Op("update", key[0], entry))
    deletes = [Op("delete", key[0], before[key]) for key in sorted(before) if key not in after]
    adds.sort(key=lambda op: (op.entry.verdict != DENY, op.key))
    deletes.sort(key=lambda op: (op.entry.verdict == DENY, op.key))
    return adds + deletes


def apply(
    state: Mapping[int, Iterable[PolicyEntry]], ops: Iterable[Op]
) -> dict[int, list[PolicyEntry]]:
    """Apply `ops` to `state` (for tests and dry runs); identities left empty vanish."""
    table = _index(state)
    for op in ops:
        if op.action == "delete":
            table.pop(op.key, None)
        else:
            table[op.key] = op.entry
    out: dict[int, list[PolicyEntry]] = {}
    for key in sorted(table):
        out.setdefault(key[0], []).append(table[key])
    return out
