"""The base of every bus payload and its encodings.

Invariants:
- Every payload is a ``Record``: a frozen, keyword-only ``msgspec.Struct`` whose fields at
  their default values are left out of the encoding (``omit_defaults``).
- On the wire a record is msgpack (``encode``/``decode``); for humans it is JSON
  (``to_json``); ``json_schema`` describes records for the docs.
- ``decode`` either returns a value of the requested type or raises a ``msgspec`` error
  (``ValidationError`` for a well-formed message of the wrong shape); it never returns a
  partial record.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

__all__ = ["Record", "decode", "encode", "json_schema", "to_json"]

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


class Record(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base for every bus payload."""


def encode(record: Any) -> bytes:
    """msgpack bytes for the wire."""
    return _encoder.encode(record)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode msgpack bytes into ``type_``; raises ``msgspec.ValidationError`` on bad input."""
    return msgspec.msgpack.decode(data, type=type_)


def to_json(record: Any) -> bytes:
    return msgspec.json.encode(record)


def json_schema(types: list[type]) -> dict[str, Any]:
    """JSON Schema for the given records, for the docs."""
    return msgspec.json.schema_components(types)[1]
