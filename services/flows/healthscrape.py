"""The node and control-plane part of the flows service's metrics: health reports, gathered.

``HealthScrape`` asks every service for its health (the scatter-gather ``ciliary status``
uses) and renders ``ciliary.healthmetrics`` from the answers; the flows service appends
that to its Hubble metrics on ``/metrics`` and on ``ciliary.flows.metrics``, so the served
endpoint and ``ciliary metrics`` print the same text.

Invariants:
- A scrape awaits a refresh only when the last one is older than ``max_age`` seconds;
  concurrent scrapes share one refresh, and a refresh that fails keeps the previous
  reports (logged), so a scrape always gets an answer.
- ``run`` refreshes every ``max_age`` seconds while the metrics are served, so the pass
  histograms see the passes of services nobody scrapes for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ciliary import healthmetrics, schema
from ciliary.bus import Bus
from ciliary.status import gather_health

log = logging.getLogger(__name__)

REFRESH_S = 5.0
GATHER_TIMEOUT_S = 0.5


class HealthScrape:
    def __init__(self, bus: Bus, max_age: float = REFRESH_S) -> None:
        self.bus = bus
        self.max_age = max_age
        self.reports: list[schema.HealthReport] = []
        self.passes = healthmetrics.PassHistograms()
        self.taken = 0.0  # monotonic time of the last refresh; 0 = never
        self._refresh: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        if self._refresh is not None:
            await asyncio.shield(self._refresh)
            return
        self._refresh = asyncio.get_running_loop().create_future()
        try:
            reports = await gather_health(self.bus, timeout=GATHER_TIMEOUT_S)
            self.passes.observe(reports)
            self.reports = reports
            self.taken = time.monotonic()
        except Exception as err:  # a failed gather keeps the previous reports
            log.warning("flows: cannot gather health for metrics: %s", err)
        finally:
            self._refresh.set_result(None)
            self._refresh = None

    async def text(self) -> str:
        if not self.taken or time.monotonic() - self.taken > self.max_age:
            await self.refresh()
        return healthmetrics.render(self.reports, self.passes)

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.max_age)
