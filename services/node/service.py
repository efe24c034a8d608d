"""Node executor shell: registers its Node and watches what this node must enforce.

Invariants:
- On start the executor makes sure a Node object named after it exists (as a kubelet
  registers itself); it never overwrites a Node someone else wrote.
- It watches Pods (those bound to this node are its endpoints) and Nodes (peer routes).
  Kernel reconciliation of identities, ipcache, services and policy attaches here.
"""

from __future__ import annotations

import asyncio
import logging

from ciliary.resources import Resource, resource_from_manifest
from ciliary.runtime import Context, mirror_kinds
from ciliary.store import ResourceStore

log = logging.getLogger(__name__)

WATCHED_KINDS = ("Pod", "Node")


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
    if node:
        created = await ResourceStore(ctx.bus).create_if_absent(node_resource(node, ctx.settings.cluster))
        if created:
            log.info("registered Node %s", node)
    mirror_kinds(ctx, tg, WATCHED_KINDS)
