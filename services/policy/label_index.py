"""An inverted index of identity labels: which identities carry label ``source:key=value``.

Invariants:
- After any sequence of `add` / `remove` calls the index holds exactly the parsed label
  triples ``(source, key, value)`` of the identities currently added (an identity is
  removed with the triples it was added with).
- `select(requirements)` returns a new set, equal to the identities for which every
  `Requirement.matches` holds (``selectors.Requirement``: source ``any`` matches every
  source; ``In`` / ``NotIn`` look at the values present under the key, ``Exists`` /
  ``DoesNotExist`` at whether any is). The empty requirement list selects every identity.
- The index never holds empty sets: a key or value whose last identity left is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

ValueSets = dict[str, set[int]]  # label value -> identities carrying it


class _Requirement(Protocol):
    source: str
    key: str
    op: str
    values: tuple[str, ...]


class LabelIndex:
    def __init__(self) -> None:
        self.all: set[int] = set()
        # (source, key) -> value -> identities; source "any" aggregates every source
        self._values: dict[tuple[str, str], ValueSets] = {}
        self._present: dict[tuple[str, str], set[int]] = {}  # (source, key) -> identities

    def add(self, ident: int, pairs: Iterable[tuple[str, str, str]]) -> None:
        self.all.add(ident)
        for source, key, value in pairs:
            for sk in ((source, key), ("any", key)):
                self._values.setdefault(sk, {}).setdefault(value, set()).add(ident)
                self._present.setdefault(sk, set()).add(ident)

    def remove(self, ident: int, pairs: Iterable[tuple[str, str, str]]) -> None:
        """Remove an identity; `pairs` are all the triples it was added with."""
        self.all.discard(ident)
        for source, key, value in pairs:
            for sk in ((source, key), ("any", key)):
                by_value = self._values.get(sk)
                if by_value is None:
                    continue
                members = by_value.get(value)
                if members is not None:
                    members.discard(ident)
                    if not members:
                        del by_value[value]
                present = self._present[sk]
                present.discard(ident)
                if not by_value:
                    del self._values[sk]
                    del self._present[sk]

    def select(self, requirements: Sequence[_Requirement]) -> set[int]:
        """Identities matching every requirement (see the module invariants)."""
        found: set[int] | None = None
        # positive requirements first (they are small), complements last
        for req in sorted(requirements, key=lambda r: r.op not in ("In", "Exists")):
            sk = (req.source, req.key)
            if req.op == "In":
                by_value = self._values.get(sk, {})
                hits: set[int] = set()
                for value in req.values:
                    hits |= by_value.get(value, set())
                found = hits if found is None else found & hits
            elif req.op == "Exists":
                present = self._present.get(sk, set())
                found = set(present) if found is None else found & present
            else:
                if req.op == "NotIn":
                    by_value = self._values.get(sk, {})
                    excluded: set[int] = set()
                    for value in req.values:
                        excluded |= by_value.get(value, set())
                else:  # DoesNotExist
                    excluded = self._present.get(sk, set())
                found = (self.all - excluded) if found is None else found - excluded
            if not found:
                return set()
        return set(self.all) if found is None else found
