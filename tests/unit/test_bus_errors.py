"""How the bus reports NATS failures: a timeout is a ``BusTimeout`` (a ``BusError`` the CLI
prints as one clear line, and still a ``TimeoutError`` for callers that retry on one)."""

from __future__ import annotations

import nats
import nats.errors
import pytest

from ciliary.bus import Bus, BusError, BusTimeout


async def test_a_nats_timeout_is_a_bus_timeout_naming_the_subject() -> None:
    bus = Bus(nats.aio.client.Client(), "test")

    async def unanswered() -> None:
        raise nats.errors.TimeoutError

    with pytest.raises(BusTimeout) as caught:
        await bus._refusable("$KV.resources.Namespace.shop", unanswered())
    assert isinstance(caught.value, BusError) and isinstance(caught.value, TimeoutError)
    assert "$KV.resources.Namespace.shop" in str(caught.value) and "retry" in str(caught.value)


async def test_other_failures_pass_through_unchanged() -> None:
    bus = Bus(nats.aio.client.Client(), "test")

    async def broken() -> None:
        raise ValueError("not a timeout")

    with pytest.raises(ValueError, match="not a timeout"):
        await bus._refusable("$KV.resources.x", broken())
