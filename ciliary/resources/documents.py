"""Cutting a YAML stream into parts that each hold whole documents.

Invariants:
- A cut is made only at the start of a line holding a document-start marker (``---``
  followed by a blank or the line's end). YAML forbids such a line inside any scalar, so
  every part parses on its own into exactly the documents it holds in the whole stream,
  in order, and the parts joined are the text.
- A stream with directives (a line starting with ``%``) is not cut: a directive belongs
  to the document after it.
- Pure: no I/O.
"""

from __future__ import annotations

_MARKER_END = frozenset(" \t\r\n")


def split_documents(text: str, parts: int, *, first_share: float | None = None) -> list[str]:
    """``text`` in at most ``parts`` pieces cut at document starts: the first about
    ``first_share`` of the text (default: an equal share), the others equal. Each cut is
    the first document start at or after its target position."""
    if parts <= 1 or text.startswith("%") or "\n%" in text:
        return [text]
    first = 1 / parts if first_share is None else min(max(first_share, 0.0), 1.0)
    cuts: list[int] = []
    for i in range(1, parts):
        target = int(len(text) * (first + (1 - first) * (i - 1) / (parts - 1)))
        at = _document_start_from(text, max(target, cuts[-1] + 1 if cuts else 1))
        if at is None:
            break
        cuts.append(at)
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _document_start_from(text: str, position: int) -> int | None:
    """Where the first line at or after ``position`` (never 0) that is a document-start
    marker begins, or None."""
    at = position - 1
    while True:
        at = text.find("\n---", at)
        if at < 0:
            return None
        after = at + 4
        if after == len(text) or text[after] in _MARKER_END:
            return at + 1
        at += 1
