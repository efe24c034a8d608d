"""A connection that does not reconnect (the CLI's, the CNI plugin's) fails with a clear
``BusError`` when no server of its URL list answers, instead of waiting for one: a CNI DEL
run while the bus is gone (a node executor tearing down after its supervisor was killed)
must finish."""

from __future__ import annotations

import asyncio

import pytest

from ciliary.bus import Bus, BusError
from ciliary.supervisor import free_port

HANG_GUARD = 30.0  # far above the two attempts per server; only keeps a regression from hanging


async def test_no_server_answering_is_an_error_not_a_wait() -> None:
    url = ",".join(f"nats://127.0.0.1:{free_port()}" for _ in range(3))
    with pytest.raises(BusError, match="cannot connect to NATS"):
        await asyncio.wait_for(Bus.connect(url, "probe", allow_reconnect=False), HANG_GUARD)


async def test_a_live_server_in_the_list_is_found(nats_server) -> None:
    url = f"nats://127.0.0.1:{free_port()},{nats_server.url}"
    bus = await asyncio.wait_for(Bus.connect(url, "probe", allow_reconnect=False), HANG_GUARD)
    try:
        assert bus.connected
    finally:
        await bus.close()
