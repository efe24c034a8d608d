"""Raw manifest dict → typed model object, with msgspec errors turned into `FieldError`s.

Invariants:
- The raw manifest is never mutated; decoding works on a normalised copy in which ``null``
  field values are dropped (Kubernetes treats ``null`` as "unset"), ``null`` values in
  string maps (labels, annotations, matchLabels, Service selector) become ``""`` (as Go's
  JSON decoding does, so a selector is never silently widened) and Cilium ``toPorts``
  port numbers written as YAML integers become strings (named ports are lower-cased, as
  Cilium does).
- A msgspec ``ValidationError`` becomes exactly one `FieldError` whose path is rendered the
  Kubernetes way (``spec.ports[0].port``, ``metadata.labels[app]``).
- `decode` returns a typed object or raises `ManifestError`; it never returns partial data.
- `to_manifest` is the inverse of `decode` for validated objects: ``decode(kind,
  to_manifest(obj)) == obj``. (``msgspec.to_builtins`` alone may omit a default
  ``apiVersion``; `to_manifest` always writes it.)
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import msgspec.inspect as mi

from .errors import FieldError, ManifestError, Problem
from .kinds import KINDS, Resource
from .validate import validate as validate_object

_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`")
_FIELD_MSG = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<f>[^`]+)`")
_ENUM = re.compile(r"^Invalid enum value (?P<v>.+)$")
_CILIUM_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
_RULE_DIRECTIONS = ("ingress", "ingressDeny", "egress", "egressDeny")
_STRING_MAPS = frozenset({"labels", "annotations", "matchLabels"})

_KEY = object()  # path segment: a map key chosen by value

_PY_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool", dict: "object",
                  list: "array", type(None): "null"}


def normalize(kind: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """A decoding copy of `manifest` (see module invariants)."""
    data = _drop_nulls(manifest)
    spec = data.get("spec")
    if kind == "Service" and isinstance(spec, dict) and isinstance(spec.get("selector"), dict):
        spec["selector"] = _null_to_empty(manifest["spec"]["selector"])
    if kind in _CILIUM_KINDS:
        specs = data.get("specs")  # not a list: the model's decoding names the field
        rules = [data.get("spec")] + (list(specs) if isinstance(specs, list) else [])
        for rule in rules:
            _normalize_rule_ports(rule)
    return data


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _null_to_empty(v) if k in _STRING_MAPS and isinstance(v, dict) else _drop_nulls(v)
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _null_to_empty(mapping: dict[Any, Any]) -> dict[Any, Any]:
    """In a string map, ``key: null`` means ``key: ""`` (as Go's JSON decoding does)."""
    return {k: "" if v is None else v for k, v in mapping.items()}


def _normalize_rule_ports(rule: Any) -> None:
    if not isinstance(rule, dict):
        return
    for direction in _RULE_DIRECTIONS:
        for sub in _dicts(rule.get(direction)):
            for port_rule in _dicts(sub.get("toPorts")):
                for pp in _dicts(port_rule.get("ports")):
                    port = pp.get("port")
                    if isinstance(port, int) and not isinstance(port, bool):
                        pp["port"] = str(port)
                    elif isinstance(port, str) and not port.isdigit():
                        pp["port"] = port.lower()


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def convert(kind: str, manifest: dict[str, Any], *, nulls: bool = True) -> tuple[Any, list[FieldError]]:
    """``(object, [])`` or ``(None, [error])`` for a manifest of a known `kind`.

    ``nulls=False`` promises that no value in `manifest` is ``None``; then a kind whose
    normal form only differs by nulls is decoded from `manifest` itself (not copied)."""
    model = KINDS[kind].model
    data = manifest if not nulls and kind not in _CILIUM_KINDS else normalize(kind, manifest)
    try:
        return msgspec.convert(data, model), []
    except msgspec.ValidationError as exc:
        return None, [translate_error(str(exc), data, model)]


def translate_error(message: str, data: Any, model: type) -> FieldError:
    """Turn a msgspec validation message into a `FieldError` with a Kubernetes path."""
    match = _AT.match(message)
    msg, raw_path = (match["msg"], match["path"]) if match else (message, "")
    segments: list[Any] = []
    for m in _SEGMENT.finditer(raw_path):
        if m[1] is not None:
            segments.append(m[1])
        else:
            segments.append(_KEY if m[2] == "..." else int(m[2]))
    expected = _EXPECTED.match(msg)
    got = expected["got"] if expected else None
    rendered, value = _resolve(data, segments, got)
    if expected:
        return FieldError(rendered, _expected_message(expected["want"], got or "", value))
    field_msg = _FIELD_MSG.match(msg)
    if field_msg:
        path = f"{rendered}.{field_msg['f']}" if rendered else field_msg["f"]
        text = "required field is missing" if "missing" in field_msg["what"] else "unknown field"
        return FieldError(path, text)
    enum = _ENUM.match(msg)
    if enum:
        allowed = _literal_values(model, segments)
        text = f"unsupported value {enum['v']}"
        if allowed:
            text += "; must be one of: " + ", ".join(str(v) for v in allowed)
        return FieldError(rendered, text)
    return FieldError(rendered, _lower_first(msg))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _expected_message(want: str, got: str, value: Any) -> str:
    text = f"expected {want}, got {got}"
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text += f" {value!r}"
    return text


def _resolve(data: Any, segments: list[Any], got: str | None) -> tuple[str, Any]:
    """Render `segments` as a field path, choosing concrete map keys; also return the value."""
    out = ""
    current = data
    for seg in segments:
        if seg is _KEY:
            chosen = _pick_key(current, got)
            out += f"[{chosen}]" if chosen is not None else "[...]"
            current = current.get(chosen) if isinstance(current, dict) else None
        elif isinstance(seg, int):
            out += f"[{seg}]"
            current = current[seg] if isinstance(current, list) and seg < len(current) else None
        else:
            out = f"{out}.{seg}" if out else seg
            current = current.get(seg) if isinstance(current, dict) else None
    return out, current


def _pick_key(mapping: Any, got: str | None) -> Any:
    if not isinstance(mapping, dict):
        return None
    for k, v in mapping.items():
        if _PY_TYPE_NAMES.get(type(v)) == got:
            return k
    for k in mapping:
        if _PY_TYPE_NAMES.get(type(k)) == got:
            return k
    return None


def _literal_values(model: type, segments: list[Any]) -> tuple[Any, ...] | None:
    info: Any = mi.type_info(model)
    for seg in segments:
        info = _step(info, seg)
        if info is None:
            return None
    for alt in _alternatives(info):
        if isinstance(alt, mi.LiteralType):
            return alt.values
    return None


def _alternatives(info: Any) -> tuple[Any, ...]:
    return info.types if isinstance(info, mi.UnionType) else (info,)


def _step(info: Any, seg: Any) -> Any:
    for alt in _alternatives(info):
        if seg is _KEY and isinstance(alt, mi.DictType):
            return alt.value_type
        if isinstance(seg, int) and isinstance(alt, mi.ListType):
            return alt.item_type
        if isinstance(seg, str) and isinstance(alt, mi.StructType):
            for field in alt.fields:
                if field.encode_name == seg:
                    return field.type
    return None


def decode(
    resource_or_kind: Resource | str,
    manifest: dict[str, Any] | None = None,
    *,
    validate: bool = False,
) -> Any:
    """The typed model object for a stored manifest.

    Pass a `Resource` (its manifest is used unless `manifest` is given) or a Kind name plus
    the manifest. With `validate`, semantic validation runs too. Raises `ManifestError`.
    """
    if isinstance(resource_or_kind, Resource):
        kind = resource_or_kind.kind
        source = resource_or_kind.key
        manifest = resource_or_kind.manifest if manifest is None else manifest
    else:
        kind = resource_or_kind
        source = "<decode>"
    if manifest is None:
        raise TypeError("decode() needs a manifest when given a kind")
    if kind not in KINDS:
        raise ManifestError([Problem(source=source, kind=kind, field="kind",
                                     message=f"unknown kind {kind!r}")])
    obj, errors = convert(kind, manifest)
    if obj is not None and validate:
        errors = validate_object(obj)
    if errors:
        meta = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
        raise ManifestError([
            Problem(source=source, kind=kind, namespace=str(meta.get("namespace") or ""),
                    name=str(meta.get("name") or ""), field=e.field, message=e.message)
            for e in errors
        ])
    return obj


def to_manifest(obj: Any) -> dict[str, Any]:
    """A manifest dict for a typed object, with ``apiVersion`` and ``kind`` first."""
    info = KINDS[type(obj).__name__]
    body = msgspec.to_builtins(obj)
    body.pop("kind", None)
    body.pop("apiVersion", None)
    return {"apiVersion": obj.api_version or info.api_version, "kind": info.kind, **body}
