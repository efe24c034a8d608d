"""Reading manifest text into documents: YAML streams and JSON, with located errors.

Invariants:
- YAML is parsed with a safe loader that keeps timestamps as strings (Kubernetes fields
  such as ``creationTimestamp`` are strings) and rejects duplicate mapping keys (as
  ``kubectl`` does) instead of silently keeping the last one.
- `parse` returns every document, including empty ones as ``None``, so document indices
  match the ``---``-separated positions in the file. On a syntax error it returns the
  documents before the error plus a `SyntaxProblem` (1-based line and column).
- Nothing here raises for bad input.
- Documents are built straight from the C parser's events (``_fast_documents``) for the
  plain subset manifests use: no anchors, aliases, explicit tags, merge keys or
  non-scalar keys, scalars resolved exactly as the safe loader resolves them. Anything
  else, and any error, is handed to the reference loader (``_Loader``) for the whole
  text, so results and error positions are the reference loader's in every case.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
    try:
        return _fast_documents(text), None
    except (_Unsupported, yaml.YAMLError, ValueError, TypeError, AttributeError):
        return _reference_parse(text)


def _reference_parse(text: str) -> tuple[list[Any], SyntaxProblem | None]:
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
    except (ValueError, TypeError, AttributeError) as exc:  # an explicit tag on a bad value
        return docs, SyntaxProblem(len(docs), None, None, f"invalid tagged value: {exc}")
    finally:
        loader.dispose()
    return docs, None


class _Unsupported(Exception):
    """The text uses YAML the fast builder leaves to the reference loader."""


_STR = "tag:yaml.org,2002:str"
_PLAIN_TAGS = frozenset({_STR, "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                         "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"})
_events = yaml.events


def _fast_documents(text: str) -> list[Any]:
    """Every document of ``text``, built from parser events; raises ``_Unsupported`` or a
    ``yaml.YAMLError`` where the reference loader must decide."""
    loader = _Loader(text)
    try:
        get = loader.get_event
        plain = _PlainScalars(loader)
        docs: list[Any] = []
        get()  # StreamStartEvent
        while type(get()) is _events.DocumentStartEvent:
            docs.append(_build_node(get, plain))
            get()  # DocumentEndEvent
        return docs
    finally:
        loader.dispose()


class _PlainScalars:
    """Plain (unquoted, untagged) scalars resolved and constructed as the safe loader does,
    memoised by text: ``value(text) -> (tag, object)``."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.resolvers = loader.yaml_implicit_resolvers
        self.wildcard = self.resolvers.get(None, [])
        self.known: dict[str, tuple[str, Any]] = {}

    def value(self, text: str) -> tuple[str, Any]:
        found = self.known.get(text)
        if found is not None:
            return found
        tag = _STR
        for candidate, regexp in self.resolvers.get(text[:1], []) + self.wildcard:
            if regexp.match(text):
                tag = candidate
                break
        if tag not in _PLAIN_TAGS:
            raise _Unsupported(tag)
        obj = text if tag == _STR else self.loader.yaml_constructors[tag](
            self.loader, yaml.ScalarNode(tag, text))
        self.known[text] = found = (tag, obj)
        return found


def _build_node(get: Callable[[], Any], plain: _PlainScalars) -> Any:
    """The object of the node whose events come next (iterative: no recursion limit)."""
    stack: list[tuple[Any, set[tuple[str, str]] | None]] = []  # (container, mapping's keys)
    key: list[Any] = []  # per open mapping: [] while its next key is awaited, else [key]
    while True:
        event = get()
        kind = type(event)
        if kind is _events.ScalarEvent:
            if event.anchor is not None or event.tag is not None:
                raise _Unsupported("tagged or anchored scalar")
            if event.implicit[0]:
                tag, value = plain.value(event.value)
            else:
                tag, value = _STR, event.value
        elif kind is _events.MappingStartEvent or kind is _events.SequenceStartEvent:
            if event.anchor is not None or event.tag is not None:
                raise _Unsupported("tagged or anchored collection")
            if stack and stack[-1][1] is not None and not key[-1]:
                raise _Unsupported("non-scalar mapping key")
            mapping = kind is _events.MappingStartEvent
            stack.append(({} if mapping else [], set() if mapping else None))
            if mapping:
                key.append([])
            continue
        elif kind is _events.MappingEndEvent or kind is _events.SequenceEndEvent:
            value, keys = stack.pop()
            if keys is not None:
                key.pop()
            tag = ""
        else:  # AliasEvent
            raise _Unsupported("alias")
        if not stack:
            return value
        parent, keys = stack[-1]
        if keys is None:
            parent.append(value)
            continue
        pending = key[-1]
        if pending:
            parent[pending.pop()] = value
            continue
        if tag == "tag:yaml.org,2002:merge" or not tag:
            raise _Unsupported("merge or non-scalar key")
        ident = (tag, event.value)
        if ident in keys:
            raise _Unsupported("duplicate key")  # the reference loader words the error
        keys.add(ident)
        pending.append(value)
