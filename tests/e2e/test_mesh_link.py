"""ClusterMesh underlay in the kernel: two clusters' underlays joined by one veth pair,
routes from a node to a remote node's pods, and both gone after unlink / teardown."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from services.node import meshlink
from services.node import netns as N

from .conftest import require_privileges
from .podnet import EchoServer, tcp_echoes, wait_for

PORT = 7801


def reaches(ns: str, address: str) -> bool:
    """A TCP round trip from namespace ``ns`` to the echo server at ``address``."""
    return tcp_echoes(ns, address, PORT, timeout=1.0)


def add_pod_address(cluster: str, node: str, address: str) -> None:
    """A pod stand-in: ``address`` on the node's loopback."""
    with IPRoute(netns=N.node_netns(cluster, node)) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=32)


@pytest.fixture
def two_clusters(cluster_names: list[str]) -> Iterator[tuple[str, str]]:
    require_privileges()
    east, west = "t" + secrets.token_hex(2), "t" + secrets.token_hex(2)
    cluster_names.extend([east, west])
    try:
        yield east, west
    finally:
        N.delete_cluster(east)
        N.delete_cluster(west)


def test_link_routes_and_unlink(two_clusters: tuple[str, str]) -> None:
    east, west = two_clusters
    N.create_node(east, "node-1", "172.30.213.1/24")
    N.create_node(west, "node-1", "172.30.212.1/24")
    add_pod_address(east, "node-1", "10.213.1.5")
    add_pod_address(west, "node-1", "10.212.1.5")
    # each side routes the other's node and pod CIDR (as the mesh routes do)
    meshlink.route_remote_node(east, "node-1", "172.30.212.1", "10.212.1.0/24")
    meshlink.route_remote_node(west, "node-1", "172.30.213.1", "10.213.1.0/24")
    east_ns, west_ns = N.node_netns(east, "node-1"), N.node_netns(west, "node-1")
    servers = [EchoServer(west_ns, PORT), EchoServer(east_ns, PORT)]
    try:
        assert not reaches(east_ns, "10.212.1.5")  # no link yet: the underlays are apart
        assert meshlink.ensure_link(east, west) and meshlink.ensure_link(west, east)  # idempotent, either side
        # a new veth into both bridges forwards once its ports are up and ARP resolved
        wait_for(lambda: reaches(east_ns, "10.212.1.5") and reaches(west_ns, "10.213.1.5"), 15,
                 "both directions across the new link")
        assert servers[0].peers[-1][0] == "172.30.213.1"  # routed, not translated
        meshlink.unroute_remote_node(east, "node-1", "172.30.212.1", "10.212.1.0/24")
        assert not reaches(east_ns, "10.212.1.5")
        meshlink.route_remote_node(east, "node-1", "172.30.212.1", "10.212.1.0/24")
        meshlink.remove_link(east, west)
        meshlink.remove_link(east, west)  # already gone: fine
        assert not reaches(east_ns, "10.212.1.5")
    finally:
        for server in servers:
            server.close()
    for ns, ifname in meshlink.link_names(east, west):
        with IPRoute(netns=ns) as ipr:
            assert not ipr.link_lookup(ifname=ifname)


def test_no_link_to_a_cluster_not_on_this_machine(two_clusters: tuple[str, str]) -> None:
    east, west = two_clusters
    N.create_node(east, "node-1", "172.30.213.1/24")
    assert meshlink.ensure_link(east, west) is False
    N.create_node(west, "node-1", "172.30.212.1/24")
    assert meshlink.ensure_link(east, west) is True
    N.delete_cluster(west)  # ciliary down of west: the pair goes with its namespace
    (ns_a, if_a), _ = meshlink.link_names(east, west)

    def east_end_left() -> bool:
        with IPRoute(netns=ns_a) as ipr:
            return bool(ipr.link_lookup(ifname=if_a))
    # the kernel dismantles a deleted namespace asynchronously
    wait_for(lambda: not east_end_left(), 10, "east's end of the link gone with west", interval=0.05)
