"""Node executor shell: registers its Node, then runs the agent that owns the kernel.

Invariants:
- On start the executor makes sure a Node object named after it exists (as a kubelet
  registers itself); it never overwrites a Node someone else wrote.
- Everything privileged happens in the agent's ``NodeKernel``; this shell only wires
  ``NodeAgent`` to the service runtime and stops it (tearing down only when
  ``CILIARY_TEARDOWN_ON_EXIT=1``).
"""

from __future__ import annotations

import asyncio
import logging

from ciliary.resources import Resource, resource_from_manifest
from ciliary.runtime import Context
from ciliary.store import ResourceStore
from services.node.agent import NodeAgent

log = logging.getLogger(__name__)


def node_resource(name: str, cluster: str) -> Resource:
    manifest = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "io.cilium.k8s.policy.cluster": cluster,
            },
        },
        "spec": {},
    }
    return resource_from_manifest(manifest, source=f"node registration {name}")


async def main(ctx: Context, tg: asyncio.TaskGroup) -> None:
    node = ctx.settings.node
    if not node:
        raise SystemExit("the node executor needs CILIARY_NODE")
    created = await ResourceStore(ctx.bus).create_if_absent(node_resource(node, ctx.settings.cluster))
    if created:
        log.info("registered Node %s", node)
    agent = NodeAgent(ctx)
    try:
        await agent.start(tg)
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(agent.stop())
