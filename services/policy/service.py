"""Policy service shell: watches the policies and the objects their selectors match.

Watches CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy, Namespaces and
Pods. Writes bucket ``policy`` once resolution lands.
"""

from __future__ import annotations

import asyncio

from ciliary.runtime import Context, mirror_kinds

WATCHED_KINDS = (
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "NetworkPolicy",
    "Namespace",
    "Pod",
)


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    mirror_kinds(ctx, tg, WATCHED_KINDS)
