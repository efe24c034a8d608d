"""ClusterMesh on a node: the underlay link to each connected cluster and routes to its pods.

Follows bucket ``mesh`` ``node.>`` (the nodes of connected clusters, written by the mesh
service). Not part of the service health: a node serves its own pods without the mesh.

Invariants:
- For every connected cluster with nodes in ``mesh`` the node ensures the underlay link
  (``meshlink``; only when that cluster's underlay is on this machine) and, per remote
  node, a /32 to its underlay address and a route to its pod CIDR. A remote node that
  leaves ``mesh`` (disconnect, TTL) loses its routes; a cluster with no node left loses
  its link. Everything goes through ``kernel.NodeKernel``.
- ``plan`` is pure: the routes and linked clusters the records call for; records of this
  cluster, without an address or with a pod CIDR that is not IPv4 are skipped.
- Failures are logged and retried on the next pass (``PassLoop`` backoff); nothing raises.
- Host mode (no sandbox underlay) leaves routing to the host: nothing is done.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from ciliary import schema
from ciliary.watch import Mirror, PassLoop, decoder

log = logging.getLogger(__name__)

Route = tuple[str, str, str]  # (cluster, underlay address, pod CIDR)


def plan(nodes: Mapping[str, schema.MeshNode], local_cluster: str) -> set[Route]:
    routes = set()
    for node in nodes.values():
        if node.cluster == local_cluster or not node.address:
            continue
        try:
            ipaddress.IPv4Address(node.address)
            cidr = str(ipaddress.IPv4Network(node.pod_cidr)) if node.pod_cidr else ""
        except ValueError:
            log.warning("mesh node %s/%s: bad address %r or pod CIDR %r; skipped", node.cluster, node.name,
                        node.address, node.pod_cidr)
            continue
        routes.add((node.cluster, node.address, cidr))
    return routes


class MeshRoutes:
    def __init__(self, kernel: Any, cluster: str) -> None:
        self.kernel = kernel
        self.cluster = cluster
        self.routed: set[Route] = set()
        self.linked: set[str] = set()
        self.mirror: Mirror[schema.MeshNode] = Mirror(schema.BUCKET_MESH, f"{schema.MESH_NODE_PREFIX}.>",
                                                      name="mesh/node", decode=decoder(schema.MeshNode))
        self.loop = PassLoop("mesh-routes", self._pass, ready=lambda: self.mirror.synced)
        self.mirror.notify(self.loop)

    def start(self, tg: asyncio.TaskGroup, bus: Any) -> None:
        tg.create_task(self.mirror.follow(bus), name="watch-mesh-nodes")
        tg.create_task(self.loop.run(), name="mesh-routes")

    async def _pass(self) -> bool:
        wanted = plan(self.mirror.values, self.cluster)
        clusters = {route[0] for route in wanted}
        failed = False
        for remote in sorted(clusters - self.linked):
            try:
                if await self.kernel.link_mesh(remote):
                    log.info("underlay linked with cluster %s", remote)
                self.linked.add(remote)
            except Exception as err:
                log.warning("underlay link to cluster %s: %s", remote, err)
                failed = True
        for route in sorted(wanted - self.routed):
            try:
                await self.kernel.route_remote_node(route[1], route[2])
                self.routed.add(route)
                log.info("route to cluster %s: %s via %s", route[0], route[2], route[1])
            except Exception as err:
                log.warning("route to cluster %s node %s: %s", route[0], route[1], err)
                failed = True
        for route in sorted(self.routed - wanted):
            try:
                await self.kernel.unroute_remote_node(route[1], route[2])
                self.routed.discard(route)
            except Exception as err:
                log.warning("removing the route to %s: %s", route[1], err)
                failed = True
        for remote in sorted(self.linked - clusters):
            try:
                await self.kernel.unlink_mesh(remote)
                self.linked.discard(remote)
                log.info("underlay link with cluster %s removed", remote)
            except Exception as err:
                log.warning("removing the underlay link to cluster %s: %s", remote, err)
                failed = True
        if failed:
            raise RuntimeError("some mesh routes failed; retrying")
        return False
