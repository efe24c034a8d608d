"""An OTLP/HTTP receiver for tests: aiohttp on a loopback port, decoding
``ExportTraceServiceRequest`` and ``ExportLogsServiceRequest`` with opentelemetry-proto
into flat ``ReceivedSpan`` / ``ReceivedLog`` rows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from ciliary.supervisor import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # '' for a root span
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass(frozen=True)
class ReceivedLog:
    service: str
    time_unix_nano: int
    severity: str
    body: Any
    event_name: str
    attributes: dict[str, Any]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


@dataclass
class OTLPReceiver:
    """``POST /v1/traces`` collects spans, ``POST /v1/logs`` log records; every request
    is counted, undecodable ones answered 400."""

    port: int = field(default_factory=free_port)
    spans: list[ReceivedSpan] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    requests: int = 0
    rejected: int = 0
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._on_traces)
        app.router.add_post("/v1/logs", self._on_logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _decoded(self, request: web.Request, export: Message) -> bool:
        """Count the request and parse its body into ``export``; False (counted as
        rejected) when it is not one."""
        self.requests += 1
        try:
            export.ParseFromString(await request.read())
        except DecodeError:
            self.rejected += 1
            return False
        return True

    async def _on_traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        if not await self._decoded(request, export):
            return web.Response(status=400)
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        resource=resource,
                    ))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _on_logs(self, request: web.Request) -> web.Response:
        export = ExportLogsServiceRequest()
        if not await self._decoded(request, export):
            return web.Response(status=400)
        for resource_logs in export.resource_logs:
            resource = {a.key: _value(a.value) for a in resource_logs.resource.attributes}
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    self.logs.append(ReceivedLog(
                        service=str(resource.get("service.name", "")),
                        time_unix_nano=record.time_unix_nano,
                        severity=record.severity_text,
                        body=_value(record.body),
                        event_name=record.event_name,
                        attributes={a.key: _value(a.value) for a in record.attributes},
                    ))
        return web.Response(body=ExportLogsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Poll ``check`` until it holds or ``timeout`` seconds passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if check():
                return True
            await asyncio.sleep(0.05)
        return check()


class GrpcTraceReceiver:
    """An OTLP/gRPC trace receiver on a loopback port (grpc.aio), keeping each span's
    service and name."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[tuple[str, str, str]] = []  # (service, name, trace id)
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
                for resource_spans in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            receiver.spans.append((str(resource.get("service.name", "")), span.name,
                                                   span.trace_id.hex()))
                return ExportTraceServiceResponse()

        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
