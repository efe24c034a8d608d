"""The node executor's side of the installed ``ciliary-cni``: CNI calls over loopback TCP.

A request is the plugin's ``CNI_*`` variables as ``KEY=value`` lines, ``LENGTH=<n>``, an
empty line, then ``n`` bytes of network configuration. The answer is the exit code on
one line, then the JSON document the plugin prints (nothing for a DEL that succeeded).

Invariants:
- Only ``CNI_*`` keys are taken from a request; a malformed request (no empty line, a
  bad or too large length, bytes missing) is answered with CNI error 4 (invalid
  environment) or 6 (decoding), never by dropping the connection silently.
- Calls run one at a time (``run`` is awaited under a lock): CNI calls for one node are
  serialised, as host-local IPAM expects.
- Served on 127.0.0.1 only: the relay is reachable from the host, not from pods.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_CONF = 1 << 20
READ_TIMEOUT = 10.0
Runner = Callable[[dict[str, str], str], Awaitable[tuple[int, dict[str, Any] | None]]]


class RelayError(ValueError):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def parse_head(head: bytes) -> tuple[dict[str, str], int]:
    """The CNI environment and the configuration's length from the request head."""
    env: dict[str, str] = {}
    length = -1
    for line in head.decode("utf-8", "replace").split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise RelayError(4, f"malformed request line {line[:60]!r}")
        if key == "LENGTH":
            if not value.isdigit() or int(value) > MAX_CONF:
                raise RelayError(6, f"bad configuration length {value[:20]!r}")
            length = int(value)
        elif key.startswith("CNI_") and value:
            env[key] = value
    if length < 0:
        raise RelayError(6, "request without LENGTH")
    return env, length


def encode_answer(code: int, document: dict[str, Any] | None) -> bytes:
    body = json.dumps(document) + "\n" if document is not None else ""
    return f"{code}\n{body}".encode()


async def serve(run: Runner, port: int, host: str = "127.0.0.1") -> asyncio.Server:
    lock = asyncio.Lock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\n\n"), READ_TIMEOUT)
            env, length = parse_head(head)
            conf = (await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)).decode()
            async with lock:
                code, document = await run(env, conf)
            log.info("CNI %s %s: exit %d", env.get("CNI_COMMAND", "?"), env.get("CNI_CONTAINERID", "?"), code)
        except RelayError as err:
            code, document = 1, {"cniVersion": "1.0.0", "code": err.code, "msg": str(err)}
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, UnicodeDecodeError) as err:
            code, document = 1, {"cniVersion": "1.0.0", "code": 6, "msg": f"incomplete CNI request: {err}"}
        try:
            writer.write(encode_answer(code, document))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_CONF + 4096)
    log.info("CNI relay on %s:%d", host, port)
    return server
