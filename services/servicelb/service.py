"""Service load-balancing shell: watches what turns into load-balancer frontends.

Watches Services, EndpointSlices, Pods (to derive slices in the embedded default) and
Nodes (NodePort frontends). Writes bucket ``services`` once the service model lands.
"""

from __future__ import annotations

import asyncio

from ciliary.runtime import Context, mirror_kinds

WATCHED_KINDS = ("Service", "EndpointSlice", "Pod", "Node")


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    mirror_kinds(ctx, tg, WATCHED_KINDS)
