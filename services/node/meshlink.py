"""ClusterMesh underlay: two clusters of one machine joined by a veth pair, and routes.

Invariants:
- The link between clusters A and B (names sorted) is one veth pair
  ``ciliary-<hash>`` in ``ciliary-A-ul`` ↔ ``ciliary-<hash>`` in ``ciliary-B-ul``, each
  end a port of its cluster's underlay bridge: the two underlays become one L2 segment.
  Both clusters compute the same names, creation is idempotent and serialised by the
  topology lock, and deleting either namespace (``ciliary down``) removes the pair.
- It is created only when both underlay namespaces exist on this machine; a remote that
  is not here gets no link (its nodes must be reachable some other way).
- A remote node is reached from a node namespace by a link-scope /32 route to its
  underlay address on the node's underlay interface plus a route to its pod CIDR via that
  address; nothing is added outside ``ciliary-`` namespaces.
- Functions block (netlink); the node executor calls them through ``kernel.NodeKernel``.
"""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from services.node import netns


def link_names(cluster_a: str, cluster_b: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """``((namespace, ifname), (namespace, ifname))`` of the pair, lower cluster name first."""
    low, high = sorted((cluster_a, cluster_b))
    return ((netns.underlay_netns(low), netns.link_name("mesh", low, high)),
            (netns.underlay_netns(high), netns.link_name("mesh", high, low)))


def ensure_link(local: str, remote: str) -> bool:
    """The pair between the two underlays; False when the remote's is not on this machine."""
    (ns_a, if_a), (ns_b, if_b) = link_names(local, remote)
    with netns.topology_lock():
        present = set(pr_netns.listnetns())
        if ns_a not in present or ns_b not in present:
            return False
        netns.veth_into(ns_a, if_a, ns_b, if_b)
        for ns, ifname in ((ns_a, if_a), (ns_b, if_b)):
            with IPRoute(netns=ns) as ipr:
                idx = ipr.link_lookup(ifname=ifname)
                bridge = ipr.link_lookup(ifname=netns.BRIDGE)
                if not idx or not bridge:
                    return False
                ipr.link("set", index=idx[0], master=bridge[0])
                ipr.link("set", index=idx[0], state="up")
    return True


def remove_link(local: str, remote: str) -> None:
    """Delete the pair (either end takes the other along). Idempotent."""
    for ns, ifname in link_names(local, remote):
        netns.delete_links(ns, ifname)


def route_remote_node(cluster: str, node: str, address: str, pod_cidr: str) -> None:
    """In ``node``: ``address``/32 on the underlay interface, ``pod_cidr`` via ``address``."""
    ifname = netns.link_name(cluster, node, "node")
    with IPRoute(netns=netns.node_netns(cluster, node)) as ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.route("replace", dst=f"{address}/32", oif=idx, scope=253)  # scope link
        if pod_cidr:
            ipr.route("replace", dst=pod_cidr, gateway=address, oif=idx)


def unroute_remote_node(cluster: str, node: str, address: str, pod_cidr: str) -> None:
    """Undo ``route_remote_node``; routes already gone are fine."""
    with IPRoute(netns=netns.node_netns(cluster, node)) as ipr:
        for dst in (pod_cidr, f"{address}/32"):
            if not dst:
                continue
            try:
                ipr.route("del", dst=dst)
            except NetlinkError:
                pass
