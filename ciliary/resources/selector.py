"""Kubernetes label selectors (``metav1.LabelSelector``) and their matching semantics.

Invariants:
- `LabelSelector.matches` is pure and follows Kubernetes semantics: every ``matchLabels``
  pair and every ``matchExpressions`` requirement must hold (logical AND); an empty selector
  (``{}``) matches every label set. "No selector at all" (``None`` in an optional field)
  is a different thing and is interpreted by the consumer (e.g. a NetworkPolicy peer).
- ``NotIn`` and ``DoesNotExist`` match objects that lack the key.
- Cilium's ``EndpointSelector`` has the same wire format; keys there may carry a label
  source prefix (``k8s:app``, ``any:app``, ``reserved:host``). `matches` compares keys
  literally; callers that store source-less labels strip the prefix with `strip_source`.
- Unknown fields in a selector are an error (selectors only appear in strict kinds).
"""

from __future__ import annotations

from typing import Literal

import msgspec

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
OPERATORS: tuple[str, ...] = ("In", "NotIn", "Exists", "DoesNotExist")

# Cilium label sources that may prefix a selector key ("source:key").
_ANY_SOURCES = ("any", "k8s")


class LabelSelectorRequirement(
    msgspec.Struct, frozen=True, rename="camel", omit_defaults=True, forbid_unknown_fields=True
):
    """``key <operator> values``; `values` must be non-empty for In/NotIn, empty otherwise."""

    key: str
    operator: Operator
    values: list[str] = []

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist


class LabelSelector(
    msgspec.Struct, frozen=True, rename="camel", omit_defaults=True, forbid_unknown_fields=True
):
    """A label query; the empty selector selects everything."""

    match_labels: dict[str, str] = {}
    match_expressions: list[LabelSelectorRequirement] = []

    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: dict[str, str]) -> bool:
        for key, value in self.match_labels.items():
            if labels.get(key) != value:
                return False
        return all(req.matches(labels) for req in self.match_expressions)


def strip_source(key: str) -> str:
    """Drop a Cilium ``any:``/``k8s:`` source prefix from a selector key (other sources kept)."""
    source, sep, rest = key.partition(":")
    if sep and source in _ANY_SOURCES:
        return rest
    return key


def split_source(key: str) -> tuple[str, str]:
    """Split ``source:key`` into ``(source, key)``; ``("", key)`` when there is no prefix."""
    source, sep, rest = key.partition(":")
    if sep:
        return source, rest
    return "", key
