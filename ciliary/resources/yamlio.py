"""Reading manifest text into documents: YAML streams and JSON, with located errors.

Invariants:
- YAML is parsed with a safe loader that keeps timestamps as strings (Kubernetes fields
  such as ``creationTimestamp`` are strings) and rejects duplicate mapping keys (as
  ``kubectl`` does) instead of silently keeping the last one.
- `parse` returns every document, including empty ones as ``None``, so document indices
  match the ``---``-separated positions in the file. On a syntax error it returns the
  documents before the error plus a `SyntaxProblem` (1-based line and column).
- Nothing here raises for bad input.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import yaml

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe loader: no timestamp conversion, duplicate keys are errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key_node.value!r}", key_node.start_mark,
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}


class SyntaxProblem(NamedTuple):
    document: int
    line: int | None
    column: int | None
    message: str


def parse(text: str, *, json_input: bool | None = None) -> tuple[list[Any], SyntaxProblem | None]:
    """Documents in `text`. `json_input` None sniffs: text starting with ``{`` tries JSON."""
    if json_input is None:
        json_input = text.lstrip().startswith("{")
        if json_input:
            docs, problem = _parse_json(text)
            return (docs, problem) if problem is None else _parse_yaml(text)
    return _parse_json(text) if json_input else _parse_yaml(text)


def _parse_json(text: str) -> tuple[list[Any], SyntaxProblem | None]:
    if not text.strip():
        return [], None
    try:
        return [json.loads(text)], None
    except json.JSONDecodeError as exc:
        return [], SyntaxProblem(0, exc.lineno, exc.colno, f"invalid JSON: {exc.msg}")


def _parse_yaml(text: str) -> tuple[list[Any], SyntaxProblem | None]:
    docs: list[Any] = []
    loader = _Loader(text)
    try:
        while loader.check_data():
            docs.append(loader.get_data())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or "invalid YAML"
        if exc.context:
            message = f"{message} ({exc.context})"
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        return docs, SyntaxProblem(len(docs), line, column, message)
    except yaml.YAMLError as exc:
        return docs, SyntaxProblem(len(docs), None, None, str(exc))
    finally:
        loader.dispose()
    return docs, None
