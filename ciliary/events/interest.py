"""Leases: subscribers declaring interest in event topics for a while (pure).

A subscriber publishes (or requests) on ``ciliary.events.interest`` a JSON object
``{"topics": ["flows", ...], "ttl_s": 60}`` (both optional: every topic, 60 s) and renews
it before it ends; every publishing service keeps the latest end per topic.

Invariants:
- ``parse_request`` accepts exactly that object (an empty body included) and raises
  ``InterestError`` naming the field for anything else: unknown fields, a topic not in
  ``TOPICS``, a ``ttl_s`` outside ``MIN_TTL_S``..``MAX_TTL_S``.
- A lease only ever extends a topic's end (a shorter lease never cuts another
  subscriber's); a topic is leased while ``now < end``.
- Times are the caller's monotonic seconds; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from .subjects import TOPICS, VERSION

DEFAULT_TTL_S = 60.0
MIN_TTL_S = 1.0
MAX_TTL_S = 3600.0


class InterestError(ValueError):
    """A lease request that is not valid, naming the field."""


class InterestRequest(msgspec.Struct, forbid_unknown_fields=True):
    topics: list[str] = []
    ttl_s: float = DEFAULT_TTL_S


def parse_request(data: bytes) -> tuple[tuple[str, ...], float]:
    """(topics, ttl seconds) of a lease request; every topic when none is named."""
    if not data.strip():
        return TOPICS, DEFAULT_TTL_S
    try:
        req = msgspec.json.decode(data, type=InterestRequest)
    except msgspec.ValidationError as err:
        raise InterestError(f"interest request: {err}") from None
    except msgspec.DecodeError as err:
        raise InterestError(f"interest request: not a JSON object: {err}") from None
    for i, topic in enumerate(req.topics):
        if topic not in TOPICS:
            raise InterestError(f"interest request: topics[{i}]: unknown topic {topic!r}; "
                                f"expected one of {', '.join(TOPICS)}")
    if not MIN_TTL_S <= req.ttl_s <= MAX_TTL_S:
        raise InterestError(f"interest request: ttl_s: {req.ttl_s:g} is outside "
                            f"{MIN_TTL_S:g}..{MAX_TTL_S:g} seconds")
    return tuple(dict.fromkeys(req.topics)) or TOPICS, req.ttl_s


def reply(topics: Iterable[str], ttl_s: float) -> dict[str, Any]:
    """The answer to a valid lease request."""
    return {"version": VERSION, "topics": list(topics), "ttl_s": ttl_s}


def error_reply(err: InterestError) -> dict[str, Any]:
    return {"version": VERSION, "error": str(err)}


class Leases:
    """The end of the longest lease per topic."""

    def __init__(self) -> None:
        self.ends: dict[str, float] = {}

    def grant(self, topics: Iterable[str], ttl_s: float, now: float) -> list[str]:
        """Extend ``topics`` to ``now + ttl_s``; the topics that were not leased before."""
        started = []
        end = now + ttl_s
        for topic in topics:
            before = self.ends.get(topic, 0.0)
            if before <= now:
                started.append(topic)
            if end > before:
                self.ends[topic] = end
        return started

    def leased(self, topic: str, now: float) -> bool:
        return self.ends.get(topic, 0.0) > now

    def end(self, topic: str) -> float:
        return self.ends.get(topic, 0.0)
