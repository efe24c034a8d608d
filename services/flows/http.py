"""A minimal HTTP/1.0 server on asyncio streams for /metrics and the service map UI.

Invariants:
- Only ``GET`` and ``HEAD`` are answered (405 otherwise); one request per connection;
  a request head must arrive within 5 s and fit in 64 KiB.
- Routes are exact paths mapped to handlers ``(query) -> Response``; a ``fallback``
  handler answers every other path (the metrics-only server answers any path with the
  metrics text, as before), else 404.
- Handlers run on the event loop: synchronous and cheap, or coroutines (awaited) that
  never block it.
- The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import inspect
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error"}


@dataclass(frozen=True)
class Response:
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    status: int = 200


Handler = Callable[[dict[str, str]], Response | Awaitable[Response]]


def parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    """``/path?a=1&b=2`` -> (``/path``, {a: 1, b: 2}); the last value of a key wins."""
    text = target.decode("latin-1")
    parts = urllib.parse.urlsplit(text)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return urllib.parse.unquote(parts.path) or "/", query


async def start_http_server(
    port: int, routes: dict[str, Handler], host: str = DEFAULT_HOST,
    fallback: Handler | None = None,
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            line = request.split(b"\r\n", 1)[0].split(b" ")
            method = line[0]
            path, query = parse_target(line[1]) if len(line) > 1 else ("/", {})
            if method not in (b"GET", b"HEAD"):
                resp = Response(b"", status=405)
            else:
                handler = routes.get(path) or fallback
                if handler is None:
                    resp = Response(b"not found\n", status=404)
                else:
                    try:
                        answer = handler(query)
                        resp = await answer if inspect.isawaitable(answer) else answer
                    except ValueError as err:
                        resp = Response(f"bad request: {err}\n".encode(), status=400)
            head = (
                f"HTTP/1.0 {resp.status} {REASONS.get(resp.status, 'Error')}\r\n"
                f"Content-Type: {resp.content_type}\r\n"
                f"Content-Length: {len(resp.body)}\r\n"
                "Cache-Control: no-store\r\n\r\n"
            ).encode()
            writer.write(head + (resp.body if method != b"HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
