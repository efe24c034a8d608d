"""The HTTP health endpoint a kubelet probes: /livez while the loop runs, /readyz by health."""

from __future__ import annotations

import asyncio
import json

from ciliary import healthhttp, schema


def _report(healthy: bool) -> schema.HealthReport:
    return schema.HealthReport(service="policy", instance="policy-1", pid=1, version="0",
                               started=0.0, healthy=healthy)


def test_readyz_follows_health_and_livez_does_not() -> None:
    assert healthhttp.respond("GET /readyz HTTP/1.1", _report(True))[0] == 200
    assert healthhttp.respond("GET /readyz HTTP/1.1", _report(False))[0] == 503
    assert healthhttp.respond("GET /livez HTTP/1.1", _report(False))[0] == 200
    assert healthhttp.respond("GET /metrics HTTP/1.1", _report(True))[0] == 404
    assert healthhttp.respond("POST /readyz HTTP/1.1", _report(True))[0] == 404
    assert healthhttp.respond("hello", _report(True))[0] == 400


def test_the_port_setting_is_off_unless_set_and_a_bad_value_is_off() -> None:
    assert healthhttp.health_port({}) == 0
    assert healthhttp.health_port({"CILIARY_HEALTH_PORT": "9879"}) == 9879
    assert healthhttp.health_port({"CILIARY_HEALTH_PORT": "nine"}) == 0


async def _get(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_a_real_socket_answers_probes_as_health_changes() -> None:
    state = {"healthy": False}
    server = await healthhttp.serve(lambda: _report(state["healthy"]), 0, "127.0.0.1")
    port = server.sockets[0].getsockname()[1]
    try:
        status, body = await _get(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and json.loads(body)["service"] == "policy"
        state["healthy"] = True
        assert (await _get(port, b"GET /readyz HTTP/1.1\r\n\r\n"))[0] == 200
        assert (await _get(port, b"GET /livez HTTP/1.0\r\n\r\n"))[0] == 200
        assert (await _get(port, b"\x16\x03\x01 not http\r\n\r\n"))[0] == 400
    finally:
        server.close()
        await server.wait_closed()
