"""Selectors filed under one requirement each must meet, so that a new or relabelled
identity is matched only against the selectors that could select it.

Invariants:
- A ``labels`` selector with an ``In`` or ``Exists`` requirement is anchored on one of them:
  the ``In`` with the fewest values (filed under each ``(source, key, value)``), else an
  ``Exists`` (filed under ``(source, key)``). Every other selector (another kind, or only
  ``NotIn`` / ``DoesNotExist`` requirements, or none) is unanchored: always a candidate.
- `candidates(view)` holds every held selector that matches `view`: an anchored selector
  matches only identities that meet its anchor requirement, i.e. that carry a label filed
  under the anchor (``IdentityView.by_key`` lists each label under its own source and
  under ``any``, as requirements look it up).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

Anchor = tuple[str, str, str] | tuple[str, str]  # (source, key, value) | (source, key)


class _Requirement(Protocol):
    source: str
    key: str
    op: str
    values: tuple[str, ...]


class _Selector(Hashable, Protocol):
    """What `selectors.Selector` offers here (this module does not import it: it imports us)."""

    kind: str
    requirements: Sequence[_Requirement]


class _View(Protocol):
    by_key: Mapping[tuple[str, str], list[str]]


def anchors_of(selector: _Selector) -> tuple[Anchor, ...]:
    """Where `selector` is filed; () when it is unanchored."""
    if selector.kind != "labels":
        return ()
    ins = [r for r in selector.requirements if r.op == "In"]
    if ins:
        req = min(ins, key=lambda r: len(r.values))
        return tuple((req.source, req.key, value) for value in req.values)
    exists = next((r for r in selector.requirements if r.op == "Exists"), None)
    return ((exists.source, exists.key),) if exists is not None else ()


class SelectorAnchors:
    def __init__(self) -> None:
        self._filed: dict[Anchor, set[_Selector]] = {}
        self._unanchored: set[_Selector] = set()

    def add(self, selector: _Selector) -> None:
        anchors = anchors_of(selector)
        if not anchors:
            self._unanchored.add(selector)
        for anchor in anchors:
            self._filed.setdefault(anchor, set()).add(selector)

    def remove(self, selector: _Selector) -> None:
        self._unanchored.discard(selector)
        for anchor in anchors_of(selector):
            filed = self._filed.get(anchor)
            if filed is not None:
                filed.discard(selector)
                if not filed:
                    del self._filed[anchor]

    def candidates(self, view: _View) -> set[_Selector]:
        """Every held selector that may select `view` (see the module invariants)."""
        found: set[_Selector] = set(self._unanchored)
        filed = self._filed
        for (source, key), values in view.by_key.items():
            hit = filed.get((source, key))
            if hit:
                found |= hit
            for value in values:
                hit = filed.get((source, key, value))
                if hit:
                    found |= hit
        return found
