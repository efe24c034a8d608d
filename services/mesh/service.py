"""Mesh service shell: watches the objects that become ClusterMesh global state.

Watches Services (the ``service.cilium.io/global`` annotation) and Nodes. Will exchange
identities, ipcache and global services with remote clusters.
"""

from __future__ import annotations

import asyncio

from ciliary.runtime import Context, mirror_kinds

WATCHED_KINDS = ("Service", "Node")


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    mirror_kinds(ctx, tg, WATCHED_KINDS)
