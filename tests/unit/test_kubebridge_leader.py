"""The bridge's leader elector against a scripted API server and a manual clock.

Asserted is what the bridge relies on: every moment `is_leader()` was false is followed
by an ``on_change`` once leadership is back (a reconcile skipped in that gap runs again),
and a throttled lease request waits the ``Retry-After`` the API server asked for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.kubebridge.client import ApiError
from services.kubebridge.leader import LeaderElector
from services.kubebridge.settings import BridgeSettings

SETTINGS = BridgeSettings(identity="kb-1", lease_duration=2.0, renew_deadline=1.5,
                          retry_period=0.2)


class Done(Exception):
    """The script is over."""


class ScriptedApi:
    """Answers each request with the next step: ``(method, seconds it takes, answer)``,
    the answer a dict or an `ApiError` to raise. Time is the manual clock's."""

    def __init__(self, steps: list[tuple[str, float, Any]]) -> None:
        self.steps = list(steps)
        self.now = 0.0
        self.sent: list[tuple[float, str]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)

    async def request(self, method: str, path: str, **_: Any) -> Any:
        if not self.steps:
            raise Done()
        self.sent.append((self.now, method))
        expected, takes, answer = self.steps.pop(0)
        assert method == expected, (method, expected, self.sent)
        self.now += takes
        if isinstance(answer, ApiError):
            raise answer
        return answer


def lease(holder: str, renewed: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": "l", "namespace": "kube-system", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 2,
                     "renewTime": renewed, "leaseTransitions": 0}}


THROTTLED = ApiError(429, "too many requests", reason="TooManyRequests", retry_after=1.0)


async def run_script(api: ScriptedApi) -> list[bool]:
    """``is_leader()`` at every ``on_change`` while the elector runs through the script."""
    seen: list[bool] = []
    elector = LeaderElector(api, SETTINGS,  # type: ignore[arg-type]
                            on_change=lambda: seen.append(elector.is_leader()),
                            clock=api.clock, sleep=api.sleep)
    with pytest.raises(Done):
        await elector.run()
    return seen


async def test_leadership_that_ran_out_during_the_renewing_write_is_reported_again() -> None:
    api = ScriptedApi([
        ("GET", 0.0, ApiError(404, "not found")),
        ("POST", 0.0, lease("kb-1", "t0", "1")),          # leads from t=0
        ("GET", 0.0, THROTTLED),                          # t=0.2, waits Retry-After
        ("GET", 0.1, lease("kb-1", "t0", "1")),           # t=1.2: still leading
        ("PUT", 0.4, lease("kb-1", "t1", "2")),           # lands at 1.6: the deadline (1.5)
    ])                                                    # passed while it was in flight
    seen = await run_script(api)
    assert seen == [True, True]  # a pass skipped between 1.5 and 1.6 is run again


async def test_a_throttled_lease_request_waits_its_retry_after() -> None:
    api = ScriptedApi([
        ("GET", 0.0, ApiError(404, "not found")),
        ("POST", 0.0, lease("kb-1", "t0", "1")),
        ("GET", 0.0, THROTTLED),
        ("GET", 0.0, lease("kb-1", "t0", "1")),
        ("PUT", 0.0, lease("kb-1", "t1", "2")),
    ])
    seen = await run_script(api)
    gets = [at for at, method in api.sent if method == "GET"]
    assert gets == pytest.approx([0.0, 0.2, 1.2])  # not 0.4: the server asked for a second
    assert seen == [True]  # renewed at 1.2, within the deadline: leadership never ran out


async def test_an_observed_loss_and_the_gain_after_it_are_reported_once_each() -> None:
    api = ScriptedApi([
        ("GET", 0.0, ApiError(404, "not found")),
        ("POST", 0.0, lease("kb-1", "t0", "1")),
        ("GET", 0.0, THROTTLED),                          # t=0.2
        ("GET", 0.0, THROTTLED),                          # t=1.2
        ("GET", 0.0, lease("kb-1", "t0", "1")),           # t=2.2: lost at 1.5, seen asleep
        ("PUT", 0.0, lease("kb-1", "t1", "2")),
    ])
    seen = await run_script(api)
    assert seen == [True, False, True]
