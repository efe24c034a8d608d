"""OTLP/HTTP trace payloads (protobuf and JSON) decoded into ``L7Span`` records (pure).

Invariants:
- ``decode_traces`` returns every span of one ``ExportTraceServiceRequest`` or raises
  ``OTLPError``: a payload that does not parse, a span whose trace id is not 16 bytes or
  whose span id is not 8 bytes, or an unknown content type. Nothing is returned from a
  request that has one bad span, so a malformed request stores nothing.
- JSON follows the OTLP/JSON rules: ids are hex strings, enum values may be numbers,
  64-bit integers may be strings; it is decoded with ``opentelemetry-proto``'s message
  classes after the ids are re-encoded.
- Envoy's tag names and the OpenTelemetry semantic-convention names are both read:
  ``http.response.status_code`` or ``http.status_code``, ``response_flags``,
  ``upstream_cluster`` (``upstream_cluster.name``), ``upstream_address``,
  ``istio.canonical_service``, and the sidecar's connection-address tags.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from ciliary import schema

CONTENT_PROTOBUF = "application/x-protobuf"
CONTENT_JSON = "application/json"
SPAN_KINDS = {0: "", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
MAX_ATTRIBUTE = 512  # characters kept of one attribute value


class OTLPError(ValueError):
    """A request that is not valid OTLP."""


def _any_value(value: Any) -> str:
    which = value.WhichOneof("value")
    if which is None:
        return ""
    v = getattr(value, which)
    if which == "array_value":
        return ",".join(_any_value(x) for x in v.values)
    if which == "kvlist_value":
        return ",".join(f"{kv.key}={_any_value(kv.value)}" for kv in v.values)
    if which == "bytes_value":
        return v.hex()
    if which == "bool_value":
        return "true" if v else "false"
    return str(v)[:MAX_ATTRIBUTE]


def _hex_ids(node: Any) -> None:
    """OTLP/JSON ids are hex; protobuf's JSON mapping wants base64: re-encode in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id") \
                    and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise OTLPError(f"{key}: {value!r} is not hex") from None
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def parse_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    kind = content_type.split(";", 1)[0].strip().lower()
    request = ExportTraceServiceRequest()
    if kind == CONTENT_PROTOBUF:
        try:
            request.ParseFromString(body)
        except (DecodeError, ValueError, RuntimeError) as err:
            raise OTLPError(f"protobuf: {err}") from None
    elif kind == CONTENT_JSON:
        try:
            document = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError) as err:
            raise OTLPError(f"JSON: {err}") from None
        if not isinstance(document, dict):
            raise OTLPError("JSON: expected an object (ExportTraceServiceRequest)")
        _hex_ids(document)
        try:
            json_format.ParseDict(document, request, ignore_unknown_fields=True)
        except json_format.ParseError as err:
            raise OTLPError(f"JSON: {err}") from None
    else:
        raise OTLPError(f"content type {content_type!r}: expected {CONTENT_PROTOBUF} or {CONTENT_JSON}")
    return request


def _address(attrs: dict[str, str], *keys: str) -> str:
    for key in keys:
        value = attrs.get(key, "")
        if value and value != "-":
            return value
    return ""


def _status(attrs: dict[str, str]) -> int:
    text = attrs.get("http.response.status_code") or attrs.get("http.status_code") or ""
    return int(text) if text.isdigit() else 0


def decode_traces(body: bytes, content_type: str) -> list[schema.L7Span]:
    """Every span of one OTLP/HTTP export request; ``OTLPError`` for a malformed one."""
    request = parse_request(body, content_type)
    spans: list[schema.L7Span] = []
    for rs in request.resource_spans:
        resource = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
        service = resource.get("service.name", "")
        for ss in rs.scope_spans:
            for span in ss.spans:
                if len(span.trace_id) != 16 or span.trace_id == bytes(16):
                    raise OTLPError(f"span {span.name!r}: trace id must be 16 non-zero bytes")
                if len(span.span_id) != 8:
                    raise OTLPError(f"span {span.name!r}: span id must be 8 bytes")
                if span.parent_span_id and len(span.parent_span_id) != 8:
                    raise OTLPError(f"span {span.name!r}: parent span id must be 8 bytes")
                attrs = {kv.key: _any_value(kv.value) for kv in span.attributes}
                flags = attrs.get("response_flags", "")
                spans.append(schema.L7Span(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), name=span.name[:MAX_ATTRIBUTE],
                    service=service, kind=SPAN_KINDS.get(span.kind, ""),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    direction=attrs.get("istio.direction", ""),
                    canonical_service=attrs.get("istio.canonical_service", ""),
                    namespace=attrs.get("k8s.namespace.name", ""), pod=attrs.get("k8s.pod.name", ""),
                    method=attrs.get("http.request.method") or attrs.get("http.method", ""),
                    url=attrs.get("url.full") or attrs.get("http.url", ""),
                    status_code=_status(attrs),
                    response_flags="" if flags == "-" else flags,
                    upstream_cluster=attrs.get("upstream_cluster") or attrs.get("upstream_cluster.name", ""),
                    upstream_address=_address(attrs, "upstream.remote_address", "upstream_address"),
                    upstream_local_address=_address(attrs, "upstream.local_address"),
                    downstream_remote_address=_address(attrs, "downstream.remote_address", "peer.address"),
                    downstream_local_address=_address(attrs, "downstream.local_address"),
                    error=attrs.get("error") == "true" or span.status.code == 2,
                    attributes=attrs,
                ))
    return spans


def response_body(content_type: str) -> tuple[bytes, str]:
    """An empty ``ExportTraceServiceResponse`` in the request's encoding."""
    if content_type.split(";", 1)[0].strip().lower() == CONTENT_JSON:
        return b"{}", CONTENT_JSON
    return ExportTraceServiceResponse().SerializeToString(), CONTENT_PROTOBUF
