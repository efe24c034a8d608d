"""Netlink sockets in named namespaces are opened without forking the process.

A fork of the node executor (or of this test process) would run every library's at-fork
handlers in the child; ``services.node.nssocket`` opens the socket from a thread that
entered the namespace instead. Real namespaces, real netlink.
"""

from __future__ import annotations

import os

from pyroute2 import IPRoute

from services.node import netns as N
from services.node import nssocket


def test_iproute_in_a_named_namespace_sees_that_namespace_and_forks_nothing(cluster_name: str) -> None:
    forks: list[int] = []
    os.register_at_fork(before=lambda: forks.append(1))  # counts forks of this process
    node = N.create_node(cluster_name, "node-1", "10.250.0.0/24")
    try:
        assert nssocket.installed()
        before = len(forks)
        with IPRoute(netns=node.netns) as ipr:
            names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)}
        assert len(forks) == before, "opening the socket forked the process"
        # the node's own links and underlay address: the socket lives in the namespace
        assert "lo" in names and len(names) >= 2
        assert node.underlay_ip in addrs
        with IPRoute() as ipr:  # this thread's namespace was never touched
            root_addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)}
        assert node.underlay_ip not in root_addrs
    finally:
        N.delete_cluster(cluster_name)
