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
- A service instance's last report is kept until it has been missing from the answers for
  ``FORGET_AFTER`` refreshes in a row (a scatter-gather answer that came late must not make
  its series blink); then its series go away.
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
FORGET_AFTER = 3  # refreshes an instance may be missing from before its series go


class HealthScrape:
    def __init__(self, bus: Bus, max_age: float = REFRESH_S) -> None:
        self.bus = bus
        self.max_age = max_age
        self.latest: dict[str, tuple[schema.HealthReport, int]] = {}  # instance -> (report, refresh no.)
        self.refreshes = 0
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
            self.refreshes += 1
            for report in reports:
                self.latest[report.instance] = (report, self.refreshes)
            for instance, (_, seen) in list(self.latest.items()):
                if self.refreshes - seen >= FORGET_AFTER:
                    del self.latest[instance]
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

    @property
    def reports(self) -> list[schema.HealthReport]:
        """The latest report of every instance still remembered, in ``gather_health`` order."""
        order = {name: i for i, name in enumerate(schema.SERVICE_NAMES)}
        reports = [report for report, _ in self.latest.values()]
        return sorted(reports, key=lambda r: (order.get(r.service, 99), r.instance))

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.max_age)
