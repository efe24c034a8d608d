"""kubectl's JSONPath templates (``-o jsonpath=...``) over plain JSON data.

The subset ``kubectl get -o jsonpath`` users write: text outside braces printed as is;
inside braces a path (``$``/``@``, ``.field``, ``['field']``, ``[n]``, ``[a:b:step]``,
``[*]``, ``..field``, ``[a,b]``, filters ``[?(@.path)]`` and ``[?(@.path OP literal)]``
with ``== != < <= > >=``), a quoted literal (``{"\\n"}``, ``{'\\t'}``), or
``{range PATH}...{end}``.

Invariants:
- Pure: `render(template, data)` depends on nothing else; `compile_template` raises
  `JSONPathError` naming the position for a template that does not parse, never another
  exception; evaluation never raises: a missing key or index selects nothing (kubectl
  ``get`` allows missing keys).
- Output as kubectl prints it: the results of one expression joined by one space; strings
  raw, whole numbers without a decimal point, booleans ``true``/``false``, objects and
  lists as compact JSON with sorted keys; ``range`` repeats its body per item with nothing
  added between items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class JSONPathError(ValueError):
    pass


# ---------------------------------------------------------------- path steps


@dataclass(frozen=True)
class Field:
    name: str  # "*" for every value


@dataclass(frozen=True)
class Recursive:
    name: str  # "*" for every descendant


@dataclass(frozen=True)
class Index:
    keys: tuple[Any, ...]  # ints (list indices) or strs (object keys)


@dataclass(frozen=True)
class Slice:
    start: int | None
    stop: int | None
    step: int | None


@dataclass(frozen=True)
class Filter:
    path: tuple[Any, ...]  # steps from @
    op: str  # "" (exists) or a comparison
    value: Any = None


Step = Field | Recursive | Index | Slice | Filter


def _children(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value[k] for k in sorted(value)]
    if isinstance(value, list):
        return list(value)
    return []


def _apply(step: Step, values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if isinstance(step, Field):
            if step.name == "*":
                out += _children(value)
            elif isinstance(value, dict) and step.name in value:
                out.append(value[step.name])
        elif isinstance(step, Recursive):
            for node in _walk(value):
                if step.name == "*":
                    out += _children(node)
                elif isinstance(node, dict) and step.name in node:
                    out.append(node[step.name])
        elif isinstance(step, Index):
            for key in step.keys:
                if isinstance(key, int) and isinstance(value, list):
                    if -len(value) <= key < len(value):
                        out.append(value[key])
                elif isinstance(key, str) and isinstance(value, dict) and key in value:
                    out.append(value[key])
        elif isinstance(step, Slice):
            if isinstance(value, list):
                out += value[step.start:step.stop:step.step]
        else:
            out += [item for item in _children(value) if _passes(step, item)]
    return out


def _walk(value: Any) -> Iterator[Any]:
    yield value
    for child in _children(value):
        yield from _walk(child)


def _passes(flt: Filter, item: Any) -> bool:
    found = _evaluate(flt.path, item, item)
    if not flt.op:
        return bool(found)
    for value in found:
        try:
            if flt.op == "==" and value == flt.value:
                return True
            if flt.op == "!=" and value != flt.value:
                return True
            if flt.op in ("<", "<=", ">", ">=") and _numeric(value) and _numeric(flt.value):
                if {"<": value < flt.value, "<=": value <= flt.value,
                    ">": value > flt.value, ">=": value >= flt.value}[flt.op]:
                    return True
        except TypeError:
            continue
    return False


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _evaluate(steps: tuple[Any, ...], root: Any, current: Any) -> list[Any]:
    if not steps:
        return [current]
    start, rest = steps[0], steps[1:]
    values = [root] if start == "$" else [current]
    for step in rest:
        values = _apply(step, values)
    return values


# ---------------------------------------------------------------- parsing

_NAME = re.compile(r"(?:\\.|[^.\[\]\s(),=!<>])+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class _PathParser:
    def __init__(self, text: str, offset: int) -> None:
        self.text = text
        self.pos = 0
        self.offset = offset  # of text in the template, for messages

    def error(self, message: str) -> JSONPathError:
        return JSONPathError(f"{message} at character {self.offset + self.pos + 1}")

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def parse(self) -> tuple[Any, ...]:
        path = self.path()
        if self.pos != len(self.text):
            raise self.error(f"unexpected {self.text[self.pos:]!r}")
        return path

    def path(self) -> tuple[Any, ...]:
        steps: list[Any] = []
        if self.peek() in ("$", "@"):
            steps.append(self.peek())
            self.pos += 1
        else:
            steps.append("@")
        while self.pos < len(self.text):
            ch = self.peek()
            if self.peek(2) == "..":
                self.pos += 2
                steps.append(Recursive(self.name(allow_star=True)))
            elif ch == ".":
                self.pos += 1
                if self.pos == len(self.text) or self.peek() == "[":
                    continue  # "." alone is the current object; ".[0]" as "[0]"
                steps.append(Field(self.name(allow_star=True)))
            elif ch == "[":
                steps.append(self.bracket())
            else:
                break
        return tuple(steps)

    def name(self, *, allow_star: bool) -> str:
        if allow_star and self.peek() == "*":
            self.pos += 1
            return "*"
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.error("expected a field name")
        self.pos = match.end()
        return re.sub(r"\\(.)", r"\1", match.group())

    def skip_spaces(self) -> None:
        while self.peek() == " ":
            self.pos += 1

    def bracket(self) -> Step:
        self.pos += 1  # "["
        self.skip_spaces()
        if self.peek() == "*":
            self.pos += 1
            self.expect("]")
            return Field("*")
        if self.peek(2) == "?(":
            self.pos += 2
            flt = self.filter()
            self.expect(")")
            self.expect("]")
            return flt
        if ":" in self.text[self.pos:self.text.find("]", self.pos)]:
            parts = self.text[self.pos:self.text.find("]", self.pos)].split(":")
            if len(parts) > 3:
                raise self.error("a slice has at most start:stop:step")
            try:
                nums = [int(p) if p.strip() else None for p in parts] + [None] * (3 - len(parts))
            except ValueError:
                raise self.error("slice bounds must be integers") from None
            if nums[2] == 0:
                raise self.error("slice step must not be 0")
            self.pos = self.text.find("]", self.pos) + 1
            return Slice(nums[0], nums[1], nums[2])
        keys: list[Any] = []
        while True:
            self.skip_spaces()
            if self.peek() in ("'", '"'):
                keys.append(self.quoted())
            else:
                match = re.compile(r"-?\d+").match(self.text, self.pos)
                if not match:
                    raise self.error("expected an index, a quoted key, * or ?(...)")
                keys.append(int(match.group()))
                self.pos = match.end()
            self.skip_spaces()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return Index(tuple(keys))

    def quoted(self) -> str:
        quote = self.peek()
        end = self.pos + 1
        while end < len(self.text) and self.text[end] != quote:
            end += 2 if self.text[end] == "\\" else 1
        if end >= len(self.text):
            raise self.error("unterminated quoted string")
        raw = self.text[self.pos + 1:end]
        self.pos = end + 1
        return _unescape(raw)

    def expect(self, what: str) -> None:
        self.skip_spaces()
        if self.peek(len(what)) != what:
            raise self.error(f"expected {what!r}")
        self.pos += len(what)

    def filter(self) -> Filter:
        self.skip_spaces()
        if self.peek() != "@":
            raise self.error("a filter starts with @")
        path = self.path()
        self.skip_spaces()
        for op in ("==", "!=", "<=", ">=", "<", ">"):
            if self.peek(len(op)) == op:
                self.pos += len(op)
                self.skip_spaces()
                return Filter(path, op, self.literal())
        return Filter(path, "")

    def literal(self) -> Any:
        if self.peek() in ("'", '"'):
            return self.quoted()
        for word, value in (("true", True), ("false", False), ("null", None)):
            if self.peek(len(word)) == word:
                self.pos += len(word)
                return value
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            raise self.error("expected a literal (quoted string, number, true, false)")
        self.pos = match.end()
        text = match.group()
        return float(text) if "." in text else int(text)


def _unescape(raw: str) -> str:
    try:
        return json.loads('"' + raw.replace('"', '\\"').replace("\\'", "'") + '"')
    except json.JSONDecodeError:
        return raw


# ---------------------------------------------------------------- templates


@dataclass
class _Node:
    kind: str  # "text" | "path" | "range"
    text: str = ""
    path: tuple[Any, ...] = ()
    body: list[_Node] = field(default_factory=list)


@dataclass
class Template:
    nodes: list[_Node]

    def render(self, data: Any) -> str:
        out: list[str] = []
        _render(self.nodes, data, data, out)
        return "".join(out)


def _render(nodes: list[_Node], root: Any, current: Any, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "path":
            out.append(" ".join(format_value(v) for v in _evaluate(node.path, root, current)))
        else:
            for item in _range_items(_evaluate(node.path, root, current)):
                _render(node.body, root, item, out)


def _range_items(values: list[Any]) -> list[Any]:
    """``range`` over one list iterates its items (as kubectl does for ``.items``)."""
    if len(values) == 1 and isinstance(values[0], list):
        return values[0]
    return values


def format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return str(value)


def _actions(template: str) -> Iterator[tuple[int, str, bool]]:
    """``(offset, text, is_action)`` pieces of a template; braces inside quotes count not."""
    pos = 0
    while pos < len(template):
        start = template.find("{", pos)
        if start < 0:
            yield pos, template[pos:], False
            return
        if start > pos:
            yield pos, template[pos:start], False
        i, quote = start + 1, ""
        while i < len(template):
            ch = template[i]
            if quote:
                if ch == "\\":
                    i += 1
                elif ch == quote:
                    quote = ""
            elif ch in ("'", '"'):
                quote = ch
            elif ch == "}":
                break
            i += 1
        if i >= len(template):
            raise JSONPathError(f"unclosed action starting at character {start + 1}")
        yield start + 1, template[start + 1:i], True
        pos = i + 1


def compile_template(template: str) -> Template:
    """Parse a kubectl JSONPath template (see the module docstring)."""
    stack: list[list[_Node]] = [[]]
    for offset, text, is_action in _actions(template):
        if not is_action:
            stack[-1].append(_Node("text", text=text))
            continue
        body = text.strip()
        lead = offset + len(text) - len(text.lstrip())
        if body == "end":
            if len(stack) == 1:
                raise JSONPathError(f"{{end}} without {{range}} at character {offset}")
            stack.pop()
        elif body.startswith("range ") or body == "range":
            expr = body[5:].strip()
            if not expr:
                raise JSONPathError(f"range needs a path at character {offset}")
            node = _Node("range", path=_PathParser(expr, lead + 6).parse())
            stack[-1].append(node)
            stack.append(node.body)
        elif body[:1] in ("'", '"'):
            parser = _PathParser(body, lead)
            stack[-1].append(_Node("text", text=parser.quoted()))
            if parser.pos != len(body):
                raise parser.error("text after a quoted literal")
        elif not body:
            raise JSONPathError(f"empty action at character {offset}")
        else:
            stack[-1].append(_Node("path", path=_PathParser(body, lead).parse()))
    if len(stack) != 1:
        raise JSONPathError("{range} without {end}")
    return Template(stack[0])


def render(template: str, data: Any) -> str:
    return compile_template(template).render(data)
