"""Structured manifest errors.

Invariants:
- A `FieldError` is a problem inside one object, located by a Kubernetes-style field path
  relative to that object (``spec.ports[0].port``, ``metadata.labels[app]``); ``""`` means
  the object (or document) as a whole.
- A `Problem` is a `FieldError` placed in its input: source file (or ``"<stdin>"``),
  0-based YAML document index, List item index, and the object's kind/namespace/name as far
  as they are known. ``str(problem)`` is one human-readable line.
- `ManifestError` carries every problem found in one load; it is raised only when there is
  at least one problem, and nothing partial is returned alongside it.
"""

from __future__ import annotations

import msgspec


class FieldError(msgspec.Struct, frozen=True):
    """One problem inside one object: `field` is a path relative to the object."""

    field: str
    message: str


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One problem located in the user's input."""

    source: str
    message: str
    document: int | None = None
    item: int | None = None
    kind: str = ""
    namespace: str = ""
    name: str = ""
    field: str = ""
    line: int | None = None
    column: int | None = None

    def object_label(self) -> str:
        """``Kind namespace/name`` (or ``Kind name`` when cluster-scoped), or ``""``."""
        if not self.kind and not self.name:
            return ""
        name = self.name or "<unnamed>"
        ref = f"{self.namespace}/{name}" if self.namespace else name
        return f"{self.kind or '<no kind>'} {ref}"

    def __str__(self) -> str:
        parts = [self.source]
        if self.document is not None:
            parts.append(f"document {self.document}")
        if self.item is not None:
            parts.append(f"item {self.item}")
        if self.line is not None:
            where = f"line {self.line}"
            if self.column is not None:
                where += f", column {self.column}"
            parts.append(where)
        label = self.object_label()
        if label:
            parts.append(label)
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


class ManifestError(Exception):
    """Every problem found while loading or decoding manifests (never empty)."""

    def __init__(self, problems: list[Problem]) -> None:
        if not problems:
            raise ValueError("ManifestError needs at least one problem")
        self.problems: list[Problem] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class UnknownKindError(ValueError):
    """A user-supplied kind word (CLI argument, key) names no supported kind."""
