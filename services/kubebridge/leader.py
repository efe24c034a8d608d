"""The bridge's leader elector: runs the Lease decisions of ``lease`` against the API.

Invariants:
- One loop per process, every ``retry_period``: read the Lease, decide, create/update it.
  `is_leader()` is true only within ``renew_deadline`` of the last successful create or
  update by this process, so a leader cut off from the API server stops writing before
  the lease can expire for the others.
- A lost update (409) or any failure only ends this round; nothing is retried blindly.
  After a 429/503 the next round waits the answer's ``Retry-After`` when that is longer
  than ``retry_period``.
- ``on_change`` is called whenever `is_leader()` may have changed value (a gain, a loss,
  a release), and after every write that renews a leadership that had run out, even if
  nothing observed it running out (the deadline passed while that write was in flight):
  a caller that found no leader in that gap and skipped its work is woken again.
  `release()` clears the holder when the process stops while leading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .client import ApiError, KubeClient
from .lease import LeaseView, decide, lease_body
from .settings import BridgeSettings

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 2.0  # seconds a stopping leader spends giving the lease up


class LeaderElector:
    def __init__(self, client: KubeClient, settings: BridgeSettings,
                 on_change: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.client = client
        self.settings = settings
        self.on_change = on_change
        self.clock = clock
        self.sleep = sleep
        self.renewed_at: float | None = None
        self.reported = False  # `is_leader()` as last passed on through ``on_change``
        self.retry_after = 0.0  # seconds the API server asked to wait (429/503), this round
        self._seen: tuple[tuple[str, str, int], float] | None = None  # record, first seen
        self._view: LeaseView | None = None
        self.holder = ""
        self.counters = {"acquired": 0, "renewals": 0, "conflicts": 0, "errors": 0}

    @property
    def path(self) -> str:
        s = self.settings
        return f"/apis/coordination.k8s.io/v1/namespaces/{s.lease_namespace}/leases/{s.lease_name}"

    def is_leader(self) -> bool:
        return (self.renewed_at is not None
                and self.clock() - self.renewed_at < self.settings.renew_deadline)

    async def run(self) -> None:
        while True:
            await self.round()
            self._report()
            await self.sleep(max(self.settings.retry_period, self.retry_after))
            self._report()  # the renew deadline may have passed while sleeping

    def _report(self, *, regained: bool = False) -> None:
        """Call ``on_change`` if `is_leader()` changed since the last call, or if
        ``regained`` (leadership renewed after running out, seen or not)."""
        now = self.is_leader()
        if now != self.reported:
            log.info("kubebridge: %s the lease %s/%s", "holds" if now else "does not hold",
                     self.settings.lease_namespace, self.settings.lease_name)
        if now != self.reported or regained:
            self.reported = now
            self.on_change()

    async def round(self) -> None:
        s = self.settings
        self.retry_after = 0.0
        try:
            try:
                lease: dict[str, Any] | None = await self.client.request("GET", self.path)
            except ApiError as err:
                if err.status != 404:
                    raise
                lease = None
            view = LeaseView.of(lease) if lease is not None else None
            now = self.clock()
            if view is not None and (self._seen is None or self._seen[0] != view.record):
                self._seen = (view.record, now)
            self._view = view
            self.holder = view.holder if view else ""
            action = decide(view, s.identity, now=now,
                            observed_at=self._seen[1] if self._seen else now)
            if action == "wait":
                return
            body = lease_body(s.lease_namespace, s.lease_name, s.identity, s.lease_duration,
                              previous=view, acquire=action == "acquire",
                              now=datetime.now(UTC))
            if action == "create":
                path = self.path.rsplit("/", 1)[0]
                written = await self.client.request("POST", path, body=body)
            else:
                written = await self.client.request("PUT", self.path, body=body)
            lapsed = not self.is_leader()  # ran out at some moment before this write landed
            self.renewed_at = now
            self._view = LeaseView.of(written) if isinstance(written, dict) else None
            self.holder = s.identity
            self.counters["renewals" if action == "renew" else "acquired"] += 1
            self._report(regained=lapsed)
        except ApiError as err:
            self.counters["conflicts" if err.status == 409 else "errors"] += 1
            if err.status in (429, 503) and err.retry_after is not None:
                self.retry_after = err.retry_after
            if err.status != 409:
                log.info("kubebridge: lease: %s", err)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
            self.counters["errors"] += 1
            log.info("kubebridge: lease: %s: %s", type(err).__name__, err)

    async def release(self) -> None:
        """Give the lease up (when stopping while leading); failures are ignored."""
        if not self.is_leader() or self._view is None:
            return
        s = self.settings
        self.renewed_at = None
        body = lease_body(s.lease_namespace, s.lease_name, s.identity, s.lease_duration,
                          previous=self._view, release=True)
        try:
            await asyncio.wait_for(self.client.request("PUT", self.path, body=body),
                                   RELEASE_TIMEOUT)
        except (ApiError, aiohttp.ClientError, TimeoutError, ConnectionError) as err:
            log.info("kubebridge: releasing the lease: %s", err)
        self._report()
