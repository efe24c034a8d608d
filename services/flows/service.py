"""Flows service shell: watches the objects used to enrich flows.

Watches Pods, Namespaces and Services (names, labels, service frontends for flow
enrichment). Will consume ``flows.raw.<cluster>.<node>`` and write stream ``FLOWS``.
"""

from __future__ import annotations

import asyncio

from ciliary.runtime import Context, mirror_kinds

WATCHED_KINDS = ("Pod", "Namespace", "Service")


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    mirror_kinds(ctx, tg, WATCHED_KINDS)
