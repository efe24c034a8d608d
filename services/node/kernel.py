"""The node's kernel behind one async facade: namespaces, datapath, socket LB, routes.

Invariants:
- Every blocking kernel operation of the node executor (bcc compile and load, tc attach
  through pyroute2, namespace, link and route changes, cgroups, map dumps, conntrack GC,
  unpinning) runs here, in a worker thread (``asyncio.to_thread``), so the event loop
  never waits on the kernel. Callers await operations named after what they do.
- One exception by design: ``maps`` (the reconciler's ``MapOps``) is used inline on the
  event loop; single map syscalls are short, and the reconciler stays single-threaded.
- ``load_datapath`` comes before every endpoint, socket-LB, map and event operation;
  those raise ``RuntimeError`` before it.
- ``close`` releases this process's handles only: programs stay attached and maps pinned,
  so the datapath keeps enforcing after the executor exits. ``teardown`` (after ``close``)
  removes the node: its cgroup, its namespaces, its pinned maps and, once no other node
  of the cluster is left, the outside world.
- Host mode (``host_mode``): the node is the namespace the process runs in. No
  namespace is created or removed; endpoints are attached in it, ``from_netdev`` goes on
  the node's own device, and teardown detaches the programs it attached instead of
  removing namespaces.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from services.node import debug, meshlink, netns, world
from services.node.datapath import Datapath, MapSizes, ensure_bpffs
from services.node.layouts import FlowEvent
from services.node.maps import MapOps
from services.node.socklb import SockLB

log = logging.getLogger(__name__)


class NodeKernel:
    """The kernel objects of one node of one cluster."""

    def __init__(self, cluster: str, cluster_id: int, node: str, *, map_sizes: MapSizes,
                 socket_lb_mode: str, host_mode: bool = False) -> None:
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.node = node
        self.host_mode = host_mode
        self.netns: str | None = netns.node_side(cluster, node, host_mode)
        self.host_device = ""  # host mode: where from_netdev is attached ("" = nowhere)
        self.map_sizes = map_sizes
        self.socket_lb_mode = socket_lb_mode
        self.datapath: Datapath | None = None
        self.socklb: SockLB | None = None

    # ------------------------------------------------------------------ node

    async def create_node_namespaces(self, underlay_cidr: str, pod_cidr: str, host_ip: str) -> None:
        """The node's namespace on the underlay, and the outside world routing ``pod_cidr``
        to ``host_ip`` (both idempotent)."""
        await asyncio.to_thread(self._create_node_namespaces, underlay_cidr, pod_cidr, host_ip)

    def _create_node_namespaces(self, underlay_cidr: str, pod_cidr: str, host_ip: str) -> None:
        netns.create_node(self.cluster, self.node, underlay_cidr)
        world.ensure_world(self.cluster, self.cluster_id)
        world.connect_node(self.cluster, self.cluster_id, self.node, pod_cidr, host_ip)

    async def prepare_host(self, node_ip: str, device: str) -> tuple[str, str]:
        """Host mode: the node's address and device (given, or the first global IPv4
        address and its device) and forwarding on. Returns (address, device)."""
        def prepare() -> tuple[str, str]:
            found_ip, found_dev = netns.host_address()
            netns.set_sysctls(None, {"net/ipv4/ip_forward": "1"})
            return node_ip or found_ip, device or (found_dev if not node_ip or node_ip == found_ip else "")
        address, self.host_device = await asyncio.to_thread(prepare)
        return address, self.host_device

    async def route_pod_cidr(self, cidr: str, via: str) -> None:
        """Direct routing: another node's pod CIDR via its underlay address."""
        await asyncio.to_thread(netns.route_pod_cidr, self.cluster, self.node, cidr, via, host=self.host_mode)

    async def run_cni(self, env: dict[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
        """One CNI call (ADD/DEL/CHECK/VERSION) as the plugin runs it, in this process's
        namespace: the installed ``ciliary-cni`` relays here (host mode)."""
        from services.node import cni

        return await asyncio.to_thread(cni.run, env, stdin)

    async def link_mesh(self, remote_cluster: str) -> bool:
        """ClusterMesh: the underlay link to ``remote_cluster`` (False when it is not on
        this machine)."""
        if self.host_mode:
            return False
        return await asyncio.to_thread(meshlink.ensure_link, self.cluster, remote_cluster)

    async def unlink_mesh(self, remote_cluster: str) -> None:
        if self.host_mode:
            return
        await asyncio.to_thread(meshlink.remove_link, self.cluster, remote_cluster)

    async def route_remote_node(self, address: str, pod_cidr: str) -> None:
        """ClusterMesh: a connected cluster's node (underlay ``address``) and its pods."""
        if self.host_mode:
            return
        await asyncio.to_thread(meshlink.route_remote_node, self.cluster, self.node, address, pod_cidr)

    async def unroute_remote_node(self, address: str, pod_cidr: str) -> None:
        if self.host_mode:
            return
        await asyncio.to_thread(meshlink.unroute_remote_node, self.cluster, self.node, address, pod_cidr)

    async def create_pod_namespace(self, name: str) -> None:
        await asyncio.to_thread(netns.ensure_netns, name)

    async def remove_pod_namespace(self, name: str) -> None:
        await asyncio.to_thread(netns.remove_netns, name)

    # ------------------------------------------------------------------ datapath

    async def load_datapath(self) -> float:
        """Compile and load the tc programs (maps pinned under the node's pin directory)
        and attach ``from_netdev``/``to_netdev`` to the node's underlay interface, where
        NodePort and externalIPs traffic arrives. Returns the seconds the load took."""
        await asyncio.to_thread(ensure_bpffs)
        self.datapath = Datapath(self.cluster, self.node, self.netns, map_sizes=self.map_sizes)
        seconds = await asyncio.to_thread(self.datapath.load)
        if not self.host_mode:
            await asyncio.to_thread(self.datapath.attach_host, netns.link_name(self.cluster, self.node, "node"))
        elif self.host_device:
            await asyncio.to_thread(self.datapath.attach_host, self.host_device)
        return seconds

    def _loaded(self) -> Datapath:
        if self.datapath is None:
            raise RuntimeError("datapath not loaded")
        return self.datapath

    @property
    def maps(self) -> MapOps:
        return self._loaded().maps

    @property
    def pin_dir(self) -> str:
        return str(self.datapath.pin_dir) if self.datapath is not None else ""

    async def attach_endpoint(self, host_ifname: str) -> None:
        """Attach the endpoint programs to a pod's host veth; ``LookupError`` when the
        interface is gone."""
        await asyncio.to_thread(self._loaded().attach, host_ifname)

    async def attach_socket_lb(self) -> str:
        """Create the node cgroup and attach (in mode ``off``: detach) the socket-LB
        programs; returns the cgroup's path."""
        self.socklb = SockLB.for_datapath(self._loaded(), self.socket_lb_mode)
        return await asyncio.to_thread(self._attach_socket_lb, self.socklb)

    @staticmethod
    def _attach_socket_lb(socklb: SockLB) -> str:
        socklb.load()
        socklb.attach()
        return str(socklb.cgroup)

    def start_event_ring(self, callback: Callable[[list[FlowEvent]], None]) -> None:
        """Start the ring-buffer reader thread; ``callback`` runs on that thread."""
        self._loaded().ring_reader(callback)

    async def events_lost(self) -> int:
        """Events the datapath could not put on the ring buffer (kernel counter)."""
        return await asyncio.to_thread(self._loaded().events_lost)

    async def gc_conntrack(self) -> int:
        """Delete expired conntrack and NodePort SNAT entries; returns how many conntrack
        entries were deleted."""
        return await asyncio.to_thread(self._loaded().gc_conntrack)

    async def read_debug_view(self, view: str, endpoints: Iterable[Any], identity: int = 0) -> list[dict[str, Any]]:
        """Rows of one ``ciliary node`` debug view, read from the maps."""
        return await asyncio.to_thread(debug.view_rows, view, self.maps, list(endpoints), identity)

    # ------------------------------------------------------------------ stop

    async def close(self) -> None:
        """Stop the ring reader and release this process's handles."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        if self.datapath is not None:
            self.datapath.close()
        if self.socklb is not None:
            self.socklb.close()

    async def teardown(self, endpoint_devices: Iterable[str] = ()) -> None:
        """Remove the node from the kernel (after ``close``); in host mode detach the
        programs from the node's device and ``endpoint_devices`` instead of removing
        namespaces."""
        if self.socklb is not None:
            try:
                await asyncio.to_thread(self.socklb.teardown)
            except Exception as err:
                log.warning("removing the node cgroup failed: %s", err)
        if self.host_mode:
            if self.datapath is not None:
                for device in [self.host_device, *endpoint_devices]:
                    if device:
                        await asyncio.to_thread(self.datapath.detach, device)
                await asyncio.to_thread(self.datapath.unpin)
            return
        await asyncio.to_thread(netns.delete_node, self.cluster, self.node)
        if self.datapath is not None:
            await asyncio.to_thread(self.datapath.unpin)
        await asyncio.to_thread(world.remove_world_if_alone, self.cluster)


__all__ = ["NodeKernel"]
