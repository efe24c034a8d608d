"""The health endpoint over HTTP, for probes that cannot speak NATS (a kubelet's).

Invariants:
- Served only when ``CILIARY_HEALTH_PORT`` is set (to a port > 0) on
  ``CILIARY_HEALTH_HOST`` (default ``127.0.0.1``; deploy/ sets ``0.0.0.0``). The embedded
  default sets neither: its health is answered on NATS only.
- ``GET /livez`` answers 200 while the event loop runs (the process is not wedged);
  ``GET /readyz`` answers 200 when the service is healthy (connected, every watch synced)
  and 503 otherwise, both with the service's ``HealthReport`` as JSON. Anything else is
  404, a request that is not HTTP is 400; the server never raises into the service.
- One short request per connection (``Connection: close``); reading a request is
  bounded in size and time, so a slow or hostile client cannot hold the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from ciliary import config, schema

log = logging.getLogger(__name__)

ENV_HEALTH_PORT = "CILIARY_HEALTH_PORT"
ENV_HEALTH_HOST = "CILIARY_HEALTH_HOST"
MAX_REQUEST = 8192
READ_TIMEOUT = 5.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


def health_port(env: dict[str, str] | None = None) -> int:
    """The configured port, 0 when the HTTP endpoint is off."""
    return int(config.env_number(ENV_HEALTH_PORT, 0, integer=True, minimum=0, env=env))


def respond(request_line: str, report: schema.HealthReport) -> tuple[int, bytes]:
    """Status and body for one request line (``GET /readyz HTTP/1.1``)."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, b'{"error": "not an HTTP request"}'
    method, path = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD") or path not in ("/livez", "/readyz", "/healthz"):
        return 404, b'{"error": "GET /livez or /readyz"}'
    body = schema.to_json(report)
    if path == "/livez":
        return 200, body
    return (200 if report.healthy else 503), body


def encode_response(status: int, body: bytes) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


async def serve(report: Callable[[], schema.HealthReport], port: int,
                host: str | None = None) -> asyncio.Server:
    """Start the server; the caller closes it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            status, body = respond(line, report())
            if line.startswith("HEAD "):
                body = b""
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            status, body = 400, b'{"error": "incomplete request"}'
        try:
            writer.write(encode_response(status, body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    bind = host or os.environ.get(ENV_HEALTH_HOST) or "127.0.0.1"
    server = await asyncio.start_server(handle, bind, port, limit=MAX_REQUEST)
    log.info("health endpoint on http://%s:%d/readyz", bind, port)
    return server
