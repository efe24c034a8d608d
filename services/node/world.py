"""The world outside the cluster, inside the sandbox: one namespace on the underlay.

Invariants:
- ``ciliary-<cluster>-world`` joins the cluster's underlay bridge at
  ``172.30.<cluster id>.254`` and owns the whole documentation range ``203.0.113.0/24`` on
  its loopback, so a server bound there answers for any address of that range (a payment
  gateway, an upstream DNS server). It has no route anywhere but to the cluster's pod
  CIDRs, through the node that owns each of them: nothing leaves the machine.
- Every node routes ``203.0.113.0/24`` to it; every node adds the route back to its own
  pod CIDR. Creation is idempotent and serialised with the rest of the topology.
"""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.node import netns

WORLD_CIDR = "203.0.113.0/24"
WORLD_LOOPBACK = "203.0.113.1"
WORLD_HOST_INDEX = 254


def world_netns(cluster: str) -> str:
    netns.underlay_netns(cluster)  # validates the cluster name
    return f"{netns.PREFIX}{cluster}-world"


def world_underlay_ip(cluster_id: int) -> str:
    return f"172.30.{cluster_id % 256}.{WORLD_HOST_INDEX}"


def ensure_world(cluster: str, cluster_id: int) -> str:
    with netns.topology_lock():
        return _ensure_world(cluster, cluster_id)


def _ensure_world(cluster: str, cluster_id: int) -> str:
    ul = netns.ensure_underlay(cluster)
    ns = world_netns(cluster)
    netns.create_netns_unlocked(ns)
    netns.set_sysctls(ns, {"net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"})
    ul_side = netns.link_name(cluster, "world", "ul")
    world_side = netns.link_name(cluster, "world", "node")
    netns.veth_into(ul, ul_side, ns, world_side)
    with IPRoute(netns=ul) as ipr:
        idx = ipr.link_lookup(ifname=ul_side)[0]
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname=netns.BRIDGE)[0])
        ipr.link("set", index=idx, state="up")
    with IPRoute(netns=ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        idx = ipr.link_lookup(ifname=world_side)[0]
        ipr.link("set", index=idx, state="up")
        for index, address, prefixlen in ((idx, world_underlay_ip(cluster_id), 24), (lo, WORLD_LOOPBACK, 24)):
            try:
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            except NetlinkError as err:
                if err.code != 17:  # EEXIST
                    raise
    return ns


def connect_node(cluster: str, cluster_id: int, node: str, pod_cidr: str, node_ip: str) -> None:
    """Routes between ``node`` and the world: the range there, the node's pods back."""
    netns.route_pod_cidr(cluster, node, WORLD_CIDR, world_underlay_ip(cluster_id))
    with IPRoute(netns=world_netns(cluster)) as ipr:
        ipr.route("replace", dst=pod_cidr, gateway=node_ip)


def remove_world_if_alone(cluster: str) -> None:
    """Remove the world and the underlay once no node of the cluster is left."""
    names = set(netns.cluster_netns(cluster))
    names -= {world_netns(cluster), netns.underlay_netns(cluster)}
    if not names:
        netns.remove_netns(world_netns(cluster))
        netns.remove_netns(netns.underlay_netns(cluster))
