"""Validation building blocks shared by every kind: an error collector, field paths,
metadata, labels, selectors, ports and CIDRs.

Invariants:
- Checks never raise for bad input; they append `FieldError`s to an `Errors` collector.
- Field paths use Kubernetes' rendering: ``a.b[0].c`` for list indices and ``a.labels[key]``
  for map keys, relative to the object.
"""

from __future__ import annotations

from collections.abc import Callable

from . import names
from .errors import FieldError
from .meta import ObjectMeta
from .selector import LabelSelector


class Errors:
    """Collects `FieldError`s in the order they are found."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(FieldError(field, message))

    def check(self, field: str, message: str | None) -> None:
        """Record `message` (a ``names.check_*`` result) if it is not ``None``."""
        if message is not None:
            self.add(field, message)


def at(path: str, child: str | int) -> str:
    """``path.child`` for a field name, ``path[child]`` for an index."""
    if isinstance(child, int):
        return f"{path}[{child}]"
    return f"{path}.{child}" if path else child


def key(path: str, k: str) -> str:
    return f"{path}[{k}]"


NameCheck = Callable[[str], "str | None"]


def check_metadata(meta: ObjectMeta, errs: Errors, name_check: NameCheck) -> None:
    if not meta.name:
        errs.add("metadata.name", "name is required")
    else:
        errs.check("metadata.name", name_check(meta.name))
    if meta.namespace:
        errs.check("metadata.namespace", names.check_dns1123_label(meta.namespace))
    check_labels(meta.labels, "metadata.labels", errs)
    for k in meta.annotations:
        errs.check(key("metadata.annotations", k), names.check_qualified_name(k))
    if meta.generation < 0:
        errs.add("metadata.generation", f"must be non-negative, got {meta.generation}")


def check_labels(labels: dict[str, str], path: str, errs: Errors) -> None:
    for k, v in labels.items():
        errs.check(key(path, k), names.check_qualified_name(k) or names.check_label_value(v))


def check_selector(
    sel: LabelSelector, path: str, errs: Errors, *, allow_source: bool = False
) -> None:
    """matchLabels keys/values valid; In/NotIn need values; Exists/DoesNotExist forbid them."""
    for k, v in sel.match_labels.items():
        field = key(at(path, "matchLabels"), k)
        errs.check(
            field,
            names.check_selector_key(k, allow_source=allow_source) or names.check_label_value(v),
        )
    for i, req in enumerate(sel.match_expressions):
        rpath = at(at(path, "matchExpressions"), i)
        errs.check(at(rpath, "key"), names.check_selector_key(req.key, allow_source=allow_source))
        if req.operator in ("In", "NotIn"):
            if not req.values:
                errs.add(at(rpath, "values"), f"must be specified when operator is {req.operator}")
            for j, value in enumerate(req.values):
                errs.check(at(at(rpath, "values"), j), names.check_label_value(value))
        elif req.values:
            errs.add(at(rpath, "values"), f"may not be specified when operator is {req.operator}")


def check_port_or_name(value: int | str, path: str, errs: Errors) -> None:
    """A Kubernetes IntOrString port: 1-65535 or an IANA service name."""
    if isinstance(value, int):
        errs.check(path, names.check_port_number(value))
    else:
        errs.check(path, names.check_port_name(value))


def check_cidr_with_except(
    cidr: str, excepts: list[str], path: str, errs: Errors, *, cidr_field: str, strict: bool
) -> None:
    errs.check(at(path, cidr_field), names.check_cidr(cidr))
    for i, message in names.check_except_within(cidr, excepts, strict=strict):
        errs.add(at(at(path, "except"), i), message)


def check_unique(values: list[str], path_of: Callable[[int], str], what: str, errs: Errors) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            errs.add(path_of(i), f"duplicate {what} {value!r}")
        seen.add(value)
