"""Node, underlay and pod network namespaces (pyroute2, synchronous).

Topology of one cluster, all of it inside namespaces this module creates:

    ciliary-<cluster>-ul         underlay: bridge ``ciliary-br`` joining every node
    ciliary-<cluster>-<node>     node: underlay veth, one host veth per pod,
                                 /32 route per local pod, route per remote pod CIDR
    ciliary-<cluster>-<node>-<h> pod: ``eth0`` with the pod IP/32, default route via
                                 169.254.1.1 (onlink, static neighbour = host veth MAC)

In host mode (``host=True``) the node is the namespace the caller runs in — a real
node's host namespace, as a hostNetwork DaemonSet pod sees it — and pods are the
namespaces a container runtime created; no node or underlay namespace exists.

Invariants:
- Sandbox mode: nothing is ever created in, moved to, or routed through the caller's
  (root) namespace: veth pairs are created inside a ``ciliary-`` namespace and their
  peer is moved straight into another ``ciliary-`` namespace.
- Host mode: only the caller's own namespace (the node) and the named pod namespace the
  runtime passed are touched; a pod namespace that is the caller's own is refused.
- Every namespace and every link is named ``ciliary-...`` (links are at most 15
  characters: ``ciliary-`` + 7 hex digits of a name hash), except the pod's
  ``eth0``, which dies with the pod namespace.
- IPv6 is disabled in node and pod namespaces; ip_forward is enabled in node
  namespaces only.
- Namespaces are created by ``ip netns add`` (no Python runs in a forked child). Create
  functions are idempotent for namespaces; delete functions are
  idempotent and never fail on something already gone.
- Functions block (netlink round trips); the async executor calls them from a
  worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import states as nud_states

from services.node import nssocket
from services.node.nssocket import run_in_netns

PREFIX = "ciliary-"
TOPOLOGY_LOCK = "/run/lock/ciliary-topology.lock"
NETNS_RUN_DIR = "/var/run/netns"
GATEWAY_IP = "169.254.1.1"
BRIDGE = "ciliary-br"
POD_IFNAME = "eth0"

nssocket.install()  # sockets in named namespaces without forking this process

_CLUSTER_RE = re.compile(r"^[a-z0-9]{1,16}$")
_NODE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


@dataclass(frozen=True, slots=True)
class NodeNet:
    cluster: str
    node: str
    netns: str
    underlay_ifname: str
    underlay_ifindex: int
    underlay_mac: str
    underlay_ip: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    cluster: str
    node: str
    pod: str
    netns: str
    node_netns: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_ifindex: int
    pod_mac: str
    ip: str


# ---- names ------------------------------------------------------------------


def _check(cluster: str, node: str | None = None) -> None:
    if not _CLUSTER_RE.match(cluster):
        raise ValueError(f"cluster name must match {_CLUSTER_RE.pattern}: {cluster!r}")
    if node is not None and (not _NODE_RE.match(node) or node in ("ul", "world")):
        raise ValueError(f"node name must match {_NODE_RE.pattern} and not be 'ul' or 'world': {node!r}")


def _hash(*parts: str, n: int = 7) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:n]


def link_name(*parts: str) -> str:
    """A 15-character ``ciliary-<7 hex>`` link name derived from ``parts``."""
    return PREFIX + _hash(*parts)


def underlay_netns(cluster: str) -> str:
    _check(cluster)
    return f"{PREFIX}{cluster}-ul"


def node_netns(cluster: str, node: str) -> str:
    _check(cluster, node)
    return f"{PREFIX}{cluster}-{node}"


def pod_netns(cluster: str, node: str, pod: str) -> str:
    return f"{node_netns(cluster, node)}-{_hash(cluster, node, pod, n=8)}"


def host_ifname(cluster: str, node: str, pod: str) -> str:
    return link_name(cluster, node, pod)


def cluster_netns(cluster: str) -> list[str]:
    """Every namespace of ``cluster`` that exists now."""
    prefix = f"{PREFIX}{cluster}-"
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


# ---- running code inside a namespace -------------------------------------------


def set_sysctls(name: str | None, values: dict[str, str]) -> None:
    """Write ``/proc/sys/<key>`` values inside netns ``name`` (keys use '/'); ``None`` is
    the caller's own namespace."""

    def write() -> None:
        for key, value in values.items():
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)

    if name is None:
        write()
    else:
        run_in_netns(name, write)


def node_side(cluster: str, node: str, host: bool) -> str | None:
    """The namespace holding the node side of endpoints: the sandbox node's, or (host
    mode) ``None``, the caller's own."""
    return None if host else node_netns(cluster, node)


def is_own_netns(name: str) -> bool:
    """Whether named namespace ``name`` is the one the caller runs in."""
    try:
        return os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino == os.stat("/proc/self/ns/net").st_ino
    except FileNotFoundError:
        return False


def host_address() -> tuple[str, str]:
    """(address, device) of the first global IPv4 address of the caller's namespace, or
    ("", "") when it has none."""
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get("scope", 0) == 0:
                index = addr["index"]
                name = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
                return addr.get_attr("IFA_ADDRESS"), name
    return "", ""


def ensure_netns(name: str) -> None:
    """Create network namespace ``name`` (must carry the ``ciliary-`` prefix) if absent."""
    with topology_lock():
        _ensure_netns(name)


def remove_netns(name: str) -> None:
    """Remove network namespace ``name`` if present."""
    _remove_netns(name)


def create_netns_unlocked(name: str) -> None:
    """``ensure_netns`` for a caller that already holds ``topology_lock``."""
    _ensure_netns(name)


def _ensure_netns(name: str) -> None:
    if not name.startswith(PREFIX):
        raise ValueError(f"refusing to create a namespace without prefix {PREFIX}: {name}")
    if name not in netns.listnetns():
        # `ip netns add` (fork + exec) rather than pyroute2's ``netns.create``, which forks a
        # Python child that runs the at-fork handlers of a multi-threaded parent (the
        # OpenTelemetry SDK starts a thread there): such a child was seen to crash (SIGSEGV)
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
        if done.returncode != 0 and name not in netns.listnetns():
            raise OSError(f"ip netns add {name}: {done.stderr.strip() or f'exit {done.returncode}'}")


def _remove_netns(name: str) -> None:
    if name in netns.listnetns():
        try:
            netns.remove(name)
        except FileNotFoundError:
            pass


def delete_links(ns: str | None, ifname: str) -> None:
    """Delete the links named ``ifname`` in ``ns`` (None: this process's namespace), a
    veth taking its peer along; nothing when the namespace or the link is gone."""
    if ns is not None and ns not in netns.listnetns():
        return
    with IPRoute(netns=ns) as ipr:
        for idx in ipr.link_lookup(ifname=ifname):
            try:
                ipr.link("del", index=idx)
            except NetlinkError:
                pass


def _link(ipr: IPRoute, ifname: str) -> dict | None:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        return None
    return ipr.get_links(idx[0])[0]


def veth_into(ns_a: str | None, name_a: str, ns_b: str, name_b: str) -> None:
    """veth ``name_a`` in ``ns_a`` (``None``: the caller's) paired with ``name_b`` in ``ns_b``."""
    with IPRoute(netns=ns_a) as ipr:
        if ipr.link_lookup(ifname=name_a):
            return
        ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b})
        peer = ipr.link_lookup(ifname=name_b)[0]
        ipr.link("set", index=peer, net_ns_fd=ns_b)


_NO_IPV6 = {
    "net/ipv6/conf/all/disable_ipv6": "1",
    "net/ipv6/conf/default/disable_ipv6": "1",
}


# ---- underlay and nodes --------------------------------------------------------------


def ensure_underlay(cluster: str) -> str:
    """The underlay namespace with its bridge, up. Returns the namespace name."""
    ns = underlay_netns(cluster)
    _ensure_netns(ns)
    with IPRoute(netns=ns) as ipr:
        if not ipr.link_lookup(ifname=BRIDGE):
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=BRIDGE)[0], state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return ns


@contextlib.contextmanager
def topology_lock() -> Iterator[None]:
    """Serialises namespace and bridge creation across processes: two node executors
    starting together must not both create (and so replace) the underlay namespace."""
    os.makedirs(os.path.dirname(TOPOLOGY_LOCK), exist_ok=True)
    with open(TOPOLOGY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def create_node(cluster: str, node: str, underlay_cidr: str) -> NodeNet:
    """Node namespace joined to the underlay bridge with ``underlay_cidr`` (e.g. 172.31.7.1/24)."""
    with topology_lock():
        return _create_node(cluster, node, underlay_cidr)


def _create_node(cluster: str, node: str, underlay_cidr: str) -> NodeNet:
    iface = ipaddress.ip_interface(underlay_cidr)
    ul = ensure_underlay(cluster)
    ns = node_netns(cluster, node)
    _ensure_netns(ns)
    set_sysctls(ns, {
        **_NO_IPV6,
        "net/ipv4/ip_forward": "1",
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
    })
    ul_side = link_name(cluster, node, "ul")
    node_side = link_name(cluster, node, "node")
    veth_into(ul, ul_side, ns, node_side)
    with IPRoute(netns=ul) as ipr:
        idx = ipr.link_lookup(ifname=ul_side)[0]
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname=BRIDGE)[0])
        ipr.link("set", index=idx, state="up")
    with IPRoute(netns=ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        link = _link(ipr, node_side)
        assert link is not None
        idx = link["index"]
        ipr.link("set", index=idx, state="up")
        try:
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST
                raise
        return NodeNet(cluster, node, ns, node_side, idx, link.get("address"), str(iface.ip))


def route_pod_cidr(cluster: str, node: str, cidr: str, via: str, *, host: bool = False) -> None:
    """Direct routing: in ``node``, reach ``cidr`` (another node's pods) via underlay IP ``via``."""
    with IPRoute(netns=node_side(cluster, node, host)) as ipr:
        ipr.route("replace", dst=cidr, gateway=via)


def delete_node(cluster: str, node: str) -> None:
    """Remove a node namespace, its pods and its underlay port. Idempotent."""
    ns = node_netns(cluster, node)
    pod_re = re.compile(re.escape(ns) + r"-[0-9a-f]{8}$")
    for name in netns.listnetns():
        if pod_re.match(name):
            _remove_netns(name)
    delete_links(underlay_netns(cluster), link_name(cluster, node, "ul"))
    _remove_netns(ns)


def delete_cluster(cluster: str) -> None:
    """Remove every namespace of ``cluster`` (pods, nodes, underlay). Idempotent."""
    names = cluster_netns(cluster)
    # pods first, then nodes, then the underlay
    for name in sorted(names, key=len, reverse=True):
        _remove_netns(name)


# ---- endpoints -----------------------------------------------------------------------


def create_endpoint(cluster: str, node: str, pod: str, ip: str) -> Endpoint:
    """Pod namespace with ``eth0`` (ip/32) wired to host veth ``ciliary-<hash>`` in the node."""
    pns = pod_netns(cluster, node, pod)
    _ensure_netns(pns)
    return wire_endpoint(cluster, node, pod, pns, host_ifname(cluster, node, pod), POD_IFNAME, ip)


def wire_endpoint(cluster: str, node: str, pod: str, pns: str, host_if: str, pod_if: str,
                  ip: str, *, host: bool = False) -> Endpoint:
    """Wire the existing namespace ``pns`` to node ``node``: a veth whose host side
    ``host_if`` lives in the node namespace (host mode: the caller's) and whose pod side
    is ``pod_if`` (ip/32, default route via the link-local gateway). Idempotent."""
    if host:
        if is_own_netns(pns):
            raise ValueError(f"refusing to wire the node's own namespace {pns} as a pod")
    elif not pns.startswith(PREFIX):
        raise ValueError(f"refusing to wire a namespace without prefix {PREFIX}: {pns}")
    node_ns = node_side(cluster, node, host)
    tmp_if = link_name(cluster, node, pod, "peer")
    set_sysctls(pns, _NO_IPV6)
    with IPRoute(netns=pns) as ipr:
        have_pod_if = bool(ipr.link_lookup(ifname=pod_if))
    if not have_pod_if:
        veth_into(node_ns, host_if, pns, tmp_if)
    with IPRoute(netns=node_ns) as ipr:
        host_link = _link(ipr, host_if)
        if host_link is None:
            raise RuntimeError(f"{host_if} missing in {node_ns or 'the node'} while {pns} has {pod_if}")
        host_idx, host_mac = host_link["index"], host_link.get("address")
    with IPRoute(netns=pns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        if not have_pod_if:
            idx = ipr.link_lookup(ifname=tmp_if)[0]
            ipr.link("set", index=idx, ifname=pod_if)
        eth = _link(ipr, pod_if)
        assert eth is not None
        pod_idx, pod_mac = eth["index"], eth.get("address")
        ipr.link("set", index=pod_idx, state="up")
        try:
            ipr.addr("add", index=pod_idx, address=ip, prefixlen=32)
        except NetlinkError as e:
            if e.code != 17:
                raise
        ipr.neigh("replace", dst=GATEWAY_IP, lladdr=host_mac, ifindex=pod_idx,
                  state=nud_states["permanent"])
        ipr.route("replace", dst=f"{GATEWAY_IP}/32", oif=pod_idx, scope=253)
        ipr.route("replace", dst="0.0.0.0/0", gateway=GATEWAY_IP, oif=pod_idx)
    set_sysctls(node_ns, {f"net/ipv4/conf/{host_if}/proxy_arp": "1"})
    with IPRoute(netns=node_ns) as ipr:
        ipr.link("set", index=host_idx, state="up")
        ipr.neigh("replace", dst=ip, lladdr=pod_mac, ifindex=host_idx,
                  state=nud_states["permanent"])
        ipr.route("replace", dst=f"{ip}/32", oif=host_idx, scope=253)
    return Endpoint(cluster, node, pod, pns, node_ns or "", host_if, host_idx, host_mac,
                    pod_if, pod_idx, pod_mac, ip)


def endpoint_links(cluster: str, node: str, host_if: str, pns: str, pod_if: str, *,
                   host: bool = False) -> dict | None:
    """What exists of a wired endpoint: host/pod ifindex and the pod's addresses, or None."""
    node_ns = node_side(cluster, node, host)
    if (node_ns is not None and node_ns not in netns.listnetns()) or pns not in netns.listnetns():
        return None
    with IPRoute(netns=node_ns) as ipr:
        host_link = _link(ipr, host_if)
    with IPRoute(netns=pns) as ipr:
        pod = _link(ipr, pod_if)
        addrs = [] if pod is None else [
            a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=pod["index"], family=2)
        ]
    if host_link is None or pod is None:
        return None
    return {"host_ifindex": host_link["index"], "pod_ifindex": pod["index"], "addresses": addrs}


def unwire_endpoint(cluster: str, node: str, host_if: str, *, host: bool = False) -> None:
    """Remove the host veth (which removes its pod peer and the routes). Idempotent."""
    delete_links(node_side(cluster, node, host), host_if)


def delete_endpoint(cluster: str, node: str, pod: str) -> None:
    """Inverse of ``create_endpoint``: the host veth (and so the pod's eth0) and the pod namespace."""
    unwire_endpoint(cluster, node, host_ifname(cluster, node, pod))
    _remove_netns(pod_netns(cluster, node, pod))
