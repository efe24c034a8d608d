"""OpenTelemetry plumbing shared by every service.

Invariants:
- Trace context travels in NATS message headers using the W3C ``traceparent`` /
  ``tracestate`` names, so a span started by ``ciliary apply`` continues in whichever
  service handles the resulting KV change or request.
- Nothing here exports spans by default; an exporter is configured only when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and the OTLP exporter package is installed.
"""

from __future__ import annotations

import os

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

_configured = False


def setup_tracing(service_name: str, cluster: str) -> trace.Tracer:
    """Install a tracer provider for this process (idempotent) and return its tracer."""
    global _configured
    if not _configured:
        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": f"ciliary-{service_name}", "ciliary.cluster": cluster}
            )
        )
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            try:  # optional dependency
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore
                    OTLPSpanExporter,
                )
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            except ImportError:
                pass
        trace.set_tracer_provider(provider)
        _configured = True
    return trace.get_tracer("ciliary")


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (plus any given)."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: dict[str, str] | None) -> context.Context:
    """The trace context a message was sent under (empty context when none)."""
    return propagate.extract(headers or {})


def attach_context(headers: dict[str, str] | None) -> object:
    """Make the trace context a message was sent under current; returns the token for
    ``detach_context``."""
    return context.attach(extract_context(headers))


def detach_context(token: object) -> None:
    context.detach(token)  # type: ignore[arg-type]
