"""The node executor in host mode: started inside namespaces that play two hosts, it
manages the namespace it runs in, serves pods whose namespaces a runtime made through the
installed ciliary-cni, routes the other host's pod CIDR, and creates no namespace."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from pyroute2 import IPRoute

from services.node import netns as N

from .hoststack import HostStack, root_links
from .podnet import EchoServer, tcp_echoes

POD = """apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers: [{{name: main, image: local}}]
"""

A_TO_NOBODY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-to-nobody, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
    - toEndpoints: [{matchLabels: {app: nobody}}]
"""


def test_host_mode_serves_runtime_pods_routes_peers_and_creates_no_namespace(
        cluster_name: str, tmp_path: Path) -> None:
    cluster_id = 100 + secrets.randbelow(100)
    before = root_links()
    stack = HostStack(cluster_name, cluster_id, tmp_path)
    try:
        stack.host("host1")
        stack.host("host2")
        stack.wire("host1", "host2")
        stack.start_nats("host1")
        for service in ("identity", "servicelb", "policy"):
            stack.start_service(service, "host1")
        stack.start_node("host1", teardown=False)
        stack.start_node("host2")
        conf1 = stack.wait_conflist("host1")
        conf2 = stack.wait_conflist("host2")
        plugin = conf1["plugins"][0]
        assert plugin["type"] == "ciliary-cni" and plugin["mode"] == "host" and plugin["node"] == "host1"
        subnet1, subnet2 = plugin["ipam"]["subnet"], conf2["plugins"][0]["ipam"]["subnet"]
        assert subnet1 != subnet2

        # the executors made no namespace: the cluster has exactly the two hosts
        assert set(N.cluster_netns(cluster_name)) == {f"ciliary-{cluster_name}-host1", f"ciliary-{cluster_name}-host2"}

        # pods: namespaces as a runtime makes them, wired by the installed plugin
        ns_a, ns_b = stack.netns_for_pod("sandbox-a"), stack.netns_for_pod("sandbox-b")
        code, add_a = stack.cni("host1", "ADD", container="ctr-a", netns=ns_a,
                                args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a")
        assert code == 0, add_a
        code, add_b = stack.cni("host2", "ADD", container="ctr-b", netns=ns_b,
                                args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=b")
        assert code == 0, add_b
        ip_a, ip_b = (r["ips"][0]["address"].split("/")[0] for r in (add_a, add_b))
        host_if_a = add_a["interfaces"][0]["name"]
        with IPRoute(netns=stack.hosts["host1"]) as ipr:  # the node side lives in the host's namespace
            assert ipr.link_lookup(ifname=host_if_a)
        assert stack.cni("host1", "CHECK", container="ctr-a", netns=ns_a) == (0, None)

        # the Pod objects (as the kube bridge mirrors them): the executors reported the
        # addresses the runtime's pods got, and identities follow
        stack.ciliary("apply", "-f", "-", stdin="---\n".join([
            POD.format(name="a", app="a", node="host1"), POD.format(name="b", app="b", node="host2")]))
        statuses = {p["metadata"]["name"]: p["status"] for p in
                    json.loads(stack.ciliary("get", "pods", "-o", "json").stdout)["items"]}
        assert (statuses["a"]["podIP"], statuses["b"]["podIP"]) == (ip_a, ip_b)

        def identities() -> dict[str, int]:
            return {e["ipv4"]: e["identity"] for e in stack.endpoints() if e["ipv4"] in (ip_a, ip_b)}

        stack.wait(lambda: len(identities()) == 2 and all(i > 255 for i in identities().values()),
                   30, "endpoints with identities")

        # host1 routes host2's pod CIDR via host2's address, and pod a reaches pod b across
        with IPRoute(netns=stack.hosts["host1"]) as ipr:
            routes = {r.get_attr("RTA_DST") + "/" + str(r["dst_len"]): r.get_attr("RTA_GATEWAY")
                      for r in ipr.get_routes(family=2) if r.get_attr("RTA_DST")}
        assert routes.get(subnet2) == stack.addresses["host2"]
        server = EchoServer(ns_b, 8080)
        try:
            stack.wait(lambda: tcp_echoes(ns_a, ip_b, 8080, timeout=1.5), 20, "a -> b across hosts")
            # a's egress policy, enforced by host1's datapath on a's veth
            stack.ciliary("apply", "-f", "-", stdin=A_TO_NOBODY)
            stack.wait(lambda: not tcp_echoes(ns_a, ip_b, 8080, timeout=1.5), 20, "policy drops a -> b")

            # an upgrade: host1's executor exits without teardown, as in a DaemonSet rollout;
            # the pinned datapath keeps enforcing on a's veth, the runtime keeps its
            # configuration, and the next executor adopts the endpoint it finds
            pins = sorted(p.name for p in Path(f"/sys/fs/bpf/ciliary/{cluster_name}/host1").iterdir())
            stack.stop_node("host1")
            with IPRoute(netns=stack.hosts["host1"]) as ipr:
                qdiscs = ipr.get_qdiscs(index=ipr.link_lookup(ifname=host_if_a)[0])
            assert "clsact" in {q.get_attr("TCA_KIND") for q in qdiscs}, "programs stay attached"
            assert not any(tcp_echoes(ns_a, ip_b, 8080, timeout=1.5) for _ in range(3)), \
                "the policy outlives the executor"
            assert (stack.cni_dirs("host1")[0] / "05-ciliary.conflist").exists()
            stack.start_node("host1")
            stack.wait(lambda: len(identities()) == 2, 60, "host1's endpoint adopted")
            assert sorted(p.name for p in Path(f"/sys/fs/bpf/ciliary/{cluster_name}/host1").iterdir()) == pins
            assert not tcp_echoes(ns_a, ip_b, 8080, timeout=1.5)
            # the new executor applies changes: the policy goes, a reaches b again
            stack.ciliary("delete", "cnp", "a-to-nobody", "-n", "default")
            stack.wait(lambda: tcp_echoes(ns_a, ip_b, 8080, timeout=1.5), 20, "a -> b once the policy is deleted")
        finally:
            server.close()

        # DEL frees everything: the host veth, the address, the endpoint
        assert stack.cni("host1", "DEL", container="ctr-a", netns=ns_a) == (0, None)
        assert stack.cni("host2", "DEL", container="ctr-b", netns=ns_b) == (0, None)
        with IPRoute(netns=stack.hosts["host1"]) as ipr:
            assert not ipr.link_lookup(ifname=host_if_a)
        assert not list((tmp_path / "host1" / "ipam").rglob(ip_a))
        stack.wait(lambda: not identities(), 10, "endpoints removed")
    finally:
        stack.close()
    conf_dir, bin_dir = stack.cni_dirs("host1")
    assert not (conf_dir / "05-ciliary.conflist").exists(), "teardown removes the conflist"
    assert not (bin_dir / "ciliary-cni").exists(), "teardown removes the plugin"
    assert root_links() == before, "nothing was created in the root namespace"
