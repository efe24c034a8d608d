"""OpenTelemetry plumbing shared by every process: export setup and header propagation.

Invariants:
- Trace context travels in NATS message headers using the W3C ``traceparent`` /
  ``tracestate`` names, so a span started by ``ciliary apply`` continues in whichever
  service handles the resulting KV change or request.
- Spans are exported only when the standard OTLP environment names an endpoint
  (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``) and
  ``OTEL_TRACES_EXPORTER`` / ``OTEL_SDK_DISABLED`` do not turn export off. Otherwise no
  tracer provider is installed: the API's no-op tracer starts no recording span, no
  ``traceparent`` is produced, and the SDK is not even imported.
- ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` picks the exporter: ``http/protobuf`` (the
  default) or ``grpc``; any other value is reported once on stderr and nothing is
  exported — a bad setting never stops a process.
- Every process has its own ``service.name``: ``ciliary-<process>`` (``ciliary-identity``,
  ``ciliary-node``, ``ciliary-cli``, ...), whatever ``OTEL_SERVICE_NAME`` says, since the
  supervisor hands one environment to every child; a set ``OTEL_SERVICE_NAME`` becomes
  ``service.namespace`` instead. ``OTEL_RESOURCE_ATTRIBUTES`` adds attributes.
- ``shutdown_tracing`` flushes what is queued (bounded by the exporter's timeout); the
  service shell calls it after its event loop ended, the CLI before it exits (with
  ``CLI_EXPORT_TIMEOUT`` unless ``OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT`` is set).
- Only the trace context travels: ``inject_headers`` adds ``traceparent``/``tracestate``
  when a span is current and nothing otherwise (no baggage).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, propagate, trace

from ciliary import __version__

log = logging.getLogger(__name__)

PROTOCOL_HTTP = "http/protobuf"
PROTOCOL_GRPC = "grpc"
PROTOCOLS = (PROTOCOL_HTTP, PROTOCOL_GRPC)
TRACER_NAME = "ciliary"
CLI_EXPORT_TIMEOUT = 2.0  # seconds a command waits at most for the backend when it exits

_configured = False
_provider: Any = None  # the SDK TracerProvider this process installed, if any


class TracingSettingError(ValueError):
    """An OTel environment variable holds a value ciliary cannot use."""


def otlp_protocol(env: Mapping[str, str], signal: str) -> str | None:
    """The OTLP protocol the environment asks for to export ``signal`` (``TRACES``,
    ``LOGS``), or None when it is not exported: the SDK is disabled,
    ``OTEL_<signal>_EXPORTER`` is ``none``, or no endpoint is named. Raises
    ``TracingSettingError`` for an unsupported protocol."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return None
    if not (env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    protocol = env.get(name)
    if not protocol:
        name = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = env.get(name) or PROTOCOL_HTTP
    protocol = protocol.strip().lower()
    if protocol not in PROTOCOLS:
        raise TracingSettingError(f"{name}={protocol!r}: supported are {', '.join(PROTOCOLS)}")
    return protocol


def export_protocol(env: Mapping[str, str]) -> str | None:
    """The OTLP protocol spans are exported with, or None when they are not exported.
    Raises ``TracingSettingError`` for an unsupported protocol."""
    return otlp_protocol(env, "TRACES")


def resource_attributes(process: str, *, cluster: str = "", node: str = "", instance: str = "",
                        env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The attributes ciliary sets on this process's resource (they win over
    ``OTEL_RESOURCE_ATTRIBUTES``)."""
    attrs = {"service.name": f"ciliary-{process}", "service.version": __version__}
    optional = {"service.namespace": env.get("OTEL_SERVICE_NAME", ""), "service.instance.id": instance,
                "ciliary.cluster": cluster, "ciliary.node": node}
    attrs.update((name, value) for name, value in optional.items() if value)
    return attrs


def _exporter(protocol: str, timeout: float | None) -> Any:
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT"):
        timeout = None  # the environment's own choice wins
    if protocol == PROTOCOL_GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter(timeout=timeout)


def setup_tracing(process: str, cluster: str = "", *, node: str = "", instance: str = "",
                  exporter: Any = None, export_timeout: float | None = None) -> trace.Tracer:
    """Install this process's tracer provider when spans are to be exported (idempotent)
    and return the ``ciliary`` tracer. ``exporter`` (a SpanExporter) overrides the
    environment's choice; tests pass an in-memory one. ``export_timeout`` (seconds)
    bounds one export with its retries unless the environment sets its own timeout: a
    short-lived command must not wait long for an unreachable backend."""
    global _configured, _provider
    if not _configured:
        _configured = True
        protocol = None
        if exporter is None:
            try:
                protocol = export_protocol(os.environ)
            except TracingSettingError as err:
                log.error("tracing off: %s", err)
        if exporter is not None or protocol is not None:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create(resource_attributes(
                process, cluster=cluster, node=node, instance=instance)))
            try:
                provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(protocol or "", export_timeout)))
            except Exception as err:  # e.g. an endpoint the exporter cannot parse
                log.error("tracing off: OTLP exporter: %s: %s", type(err).__name__, err)
            else:
                trace.set_tracer_provider(provider)
                _provider = provider
    return trace.get_tracer(TRACER_NAME)


def exporting() -> bool:
    """Whether this process exports spans."""
    return _provider is not None


def shutdown_tracing() -> None:
    """Export every finished span still queued, then stop the exporter (a no-op when
    nothing is exported). Blocking: call it outside the event loop."""
    global _provider
    if _provider is not None:
        provider, _provider = _provider, None
        try:
            provider.shutdown()
        except Exception as err:  # an unreachable backend must not fail the exit
            log.warning("tracing: flushing spans failed: %s", err)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (plus any given); without a valid
    current span there is nothing to carry and the propagators are not run."""
    carrier: dict[str, str] = dict(headers or {})
    if trace.get_current_span().get_span_context().is_valid:
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
