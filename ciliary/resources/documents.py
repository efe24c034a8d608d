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

import bisect
import re

_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.M)


def split_documents(text: str, parts: int, *, first_share: float | None = None) -> list[str]:
    """``text`` in at most ``parts`` pieces cut at document starts: the first about
    ``first_share`` of the text (default: an equal share), the others equal."""
    if parts <= 1 or re.search(r"^%", text, re.M):
        return [text]
    first = 1 / parts if first_share is None else min(max(first_share, 0.0), 1.0)
    starts = [m.start() for m in _DOCUMENT_START.finditer(text) if m.start() > 0]
    cuts: list[int] = []
    for i in range(1, parts):
        target = int(len(text) * (first + (1 - first) * (i - 1) / (parts - 1)))
        at = _first_at_or_after(starts, target)
        if at is not None and (not cuts or at > cuts[-1]):
            cuts.append(at)
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _first_at_or_after(positions: list[int], target: int) -> int | None:
    index = bisect.bisect_left(positions, target)
    return positions[index] if index < len(positions) else None
