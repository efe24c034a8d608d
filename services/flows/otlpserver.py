"""The OTLP/HTTP trace receiver: ``POST /v1/traces`` over a Unix socket and optionally TCP.

Invariants:
- Protobuf and JSON bodies (``Content-Encoding: gzip`` or none) are accepted; a request
  that is not valid OTLP gets ``400`` with the reason and nothing is handed on; an
  accepted one is handed to ``accept`` whole, then answered with an empty
  ``ExportTraceServiceResponse`` in the request's encoding.
- Bodies above ``MAX_BODY`` are refused with ``413``: by aiohttp before decoding, and a
  gzip body whose decompressed size would exceed it is refused the same way without
  inflating more than ``MAX_BODY + 1`` bytes (no decompression bomb).
- The Unix socket (``ciliary.otlpsocket``) is made reachable for sidecars (mode 0666:
  Envoy runs under the proxy group); a stale socket file is replaced.
- Decoding runs on the event loop: a sidecar's export is a few KiB and decodes in well
  under a millisecond per span.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ciliary import schema

from .otlp import OTLPError, decode_traces, response_body

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024
PATH = "/v1/traces"
Accept = Callable[[list[schema.L7Span]], None]


class TooLarge(Exception):
    """A body that decompresses to more than the receiver accepts."""


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """The gzip ``data`` inflated, or ``TooLarge`` once more than ``limit`` bytes would come
    out (at most ``limit + 1`` are ever inflated); ``OTLPError`` for a broken stream."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as err:
        raise OTLPError(f"gzip: {err}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"the body inflates to more than {limit} bytes")
    if not inflater.eof:
        raise OTLPError("gzip: the stream ends early")
    return out


def make_app(accept: Accept) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        content_type = request.headers.get("Content-Type", "application/x-protobuf")
        try:
            if request.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gunzip_bounded(body, MAX_BODY)
            spans = decode_traces(body, content_type)
        except TooLarge as err:
            return web.Response(status=413, text=f"OTLP body too large: {err}\n")
        except OTLPError as err:
            return web.Response(status=400, text=f"malformed OTLP: {err}\n")
        accept(spans)
        payload, kind = response_body(content_type)
        return web.Response(body=payload, content_type=kind)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, traces)
    return app


async def start(accept: Accept, socket_path: str = "", port: int = 0,
                host: str = "127.0.0.1") -> web.AppRunner:
    """Serve the receiver on ``socket_path`` and/or ``host:port``; the caller cleans up."""
    runner = web.AppRunner(make_app(accept), access_log=None)
    await runner.setup()
    if socket_path:
        path = Path(socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, 0o666)
    if port:
        await web.TCPSite(runner, host, port).start()
    return runner
