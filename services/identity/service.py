"""Identity service shell: watches the objects that determine security identities.

Watches Pods (labels, IPs), Namespaces (namespace labels become identity labels) and Nodes
(host and remote-node identities). Writes buckets ``identities`` and ``ipcache`` once
allocation lands; until then it mirrors its inputs and reports their counts.
"""

from __future__ import annotations

import asyncio

from ciliary.runtime import Context, mirror_kinds

WATCHED_KINDS = ("Pod", "Namespace", "Node")


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    mirror_kinds(ctx, tg, WATCHED_KINDS)
