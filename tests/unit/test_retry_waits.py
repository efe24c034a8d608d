"""How long failed work waits before it is tried again: a pass loop honours the wait a
remote asked for (an API server's Retry-After), and a reflector's backoff starts again
after a watch that delivered before it failed."""

from __future__ import annotations

import asyncio
import time

from ciliary.watch import PassLoop
from services.kubebridge.kinds import BY_KIND
from services.kubebridge.reflector import Reflector
from services.kubebridge.settings import BridgeSettings


class Throttled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("429 Too Many Requests")
        self.retry_after = retry_after


async def test_a_failed_pass_waits_the_retry_after_it_was_given() -> None:
    starts: list[float] = []
    done = asyncio.Event()

    async def run_pass() -> None:
        starts.append(time.monotonic())
        if len(starts) == 1:
            raise Throttled(0.4)  # the first backoff step alone would be 0.1 s
        done.set()

    loop = PassLoop("kubebridge-status", run_pass)
    task = asyncio.ensure_future(loop.run())
    loop.mark_dirty()
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
    assert starts[1] - starts[0] >= 0.4


def test_a_reflectors_failures_count_again_after_a_watch_that_delivered() -> None:
    reflector = Reflector(None, BY_KIND["Pod"], BridgeSettings(), lambda _kind: None)  # type: ignore[arg-type]
    attempts = reflector._failed_attempt(0, reflector._delivered())
    attempts = reflector._failed_attempt(attempts, reflector._delivered())
    assert attempts == 2  # nothing delivered in between: the backoff grows
    before = reflector._delivered()
    reflector.counters["events"] += 3  # a watch that worked for a while, then broke
    assert reflector._failed_attempt(attempts, before) == 1
    before = reflector._delivered()
    reflector.counters["bookmarks"] += 1
    assert reflector._failed_attempt(5, before) == 1
