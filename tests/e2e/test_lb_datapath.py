"""End-to-end: Maglev, ClientIP session affinity and NodePort in the real BPF datapath.

One cluster per test (see conftest): node-1 (pod-a, pod-b) and node-2 (pod-c), joined
by an underlay bridge, all inside ``ciliary-t<hex>-*`` namespaces. Frontends are written
with ``translate.lb_frontend_entries`` from ``schema.LBFrontend`` records, exactly as the
node agent does.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

from ciliary import schema
from services.node import layouts as L
from services.node import maps as M
from services.node import netns as N
from services.node import translate as T
from services.servicelb import maglev

from .podnet import tcp_connect, udp_roundtrip

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NODE1_IP, NODE2_IP = "172.31.7.1", "172.31.7.2"  # conftest NODES underlay addresses
NODE_PORT = 30080


def _backend(bid: int, ip: str, port: int, node: str, proto: str = "TCP") -> schema.LBBackend:
    return schema.LBBackend(id=bid, ip=ip, port=port, proto=proto, node=node)


def _frontend(address: str, port: int, rev: int, backends: list[schema.LBBackend], *,
              proto: str = "TCP", type_: str = "ClusterIP", node: str = "", algorithm: str = "random",
              affinity: int = 0, m: int = maglev.DEFAULT_TABLE_SIZE) -> schema.LBFrontend:
    slots = [b.id for b in backends]
    table = (maglev.maglev_table(((f"{b.ip}:{b.port}", b.id) for b in backends), m)
             if algorithm == "maglev" and backends else [])
    return schema.LBFrontend(namespace="default", name=f"svc{rev}", type=type_, address=address,
                             port=port, proto=proto, service_id=rev, rev_nat_id=rev,
                             backends=backends, slots=slots, algorithm=algorithm, maglev=table,
                             affinity_timeout=affinity, node=node)


def _program(dp, fe: schema.LBFrontend, node: str) -> list[M.Entry]:
    entries = T.lb_frontend_entries(fe, node, dp.map_sizes.maglev_table)
    M.apply(dp.maps, entries)
    return entries


def _conn(netns: str, ip: str, port: int, sport: int = 0, payload: bytes = b"x",
          timeout: float = 2.0) -> tuple[tuple[str, int], bytes]:
    """One TCP round trip from ``netns``; closes with RST (no TIME_WAIT), so the same
    source port can connect again at once. Returns (peer address, reply)."""

    def run() -> tuple[tuple[str, int], bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.settimeout(timeout)
            if sport:
                s.bind(("0.0.0.0", sport))
            s.connect((ip, port))
            s.sendall(payload)
            return s.getpeername(), s.recv(100)

    return N.run_in_netns(netns, run)


def _who(reply: bytes) -> bytes:
    return reply.split(b":", 1)[0]


def _flush_conntrack(dp) -> None:
    M.gc_conntrack(dp.maps, time.monotonic_ns() + 10 * 24 * 3600 * 10**9)


@pytest.fixture
def three_backends(cluster, servers):
    """pod-b:8080 "b1", pod-b:8081 "b2", pod-c:8080 "c" (ids 1, 2, 3)."""
    b, c = cluster.pods["pod-b"], cluster.pods["pod-c"]
    servers(b.netns, 8080, reply_prefix=b"b1:")
    servers(b.netns, 8081, reply_prefix=b"b2:")
    servers(c.netns, 8080, reply_prefix=b"c:")
    return [_backend(1, b.ip, 8080, "node-1"), _backend(2, b.ip, 8081, "node-1"),
            _backend(3, c.ip, 8080, "node-2")]


NAMES = {1: b"b1", 2: b"b2", 3: b"c"}


# ---- Maglev ----------------------------------------------------------------------------


def test_maglev_selection_is_the_table_entry_of_the_flow_hash(cluster, three_backends):
    a = cluster.pods["pod-a"]
    dp1 = cluster.datapaths["node-1"]
    vip = "10.96.1.10"
    fe = _frontend(vip, 80, 21, three_backends, algorithm="maglev")
    entries = _program(dp1, fe, "node-1")
    m = dp1.map_sizes.maglev_table
    slot0 = dp1.maps.dump(L.LB4_SERVICES)[entries[-1].key]
    assert slot0.flags2 & L.SVC_FLAG2_MAGLEV and slot0.count == 3
    assert len(dp1.maps.dump(L.LB4_MAGLEV)) == m == len(fe.maglev)

    ports = range(42000, 42030)
    first = {}
    for sport in ports:
        peer, reply = _conn(a.netns, vip, 80, sport=sport)
        assert peer == (vip, 80)
        expected = fe.maglev[M.maglev_hash(a.ip, sport, 80, "tcp") % m]
        assert _who(reply) == NAMES[expected], f"sport {sport}"
        first[sport] = _who(reply)
    assert len(set(first.values())) >= 2, "30 flows should spread over the backends"

    # Without any conntrack state the same 5-tuple lands on the same backend again.
    _flush_conntrack(dp1)
    for sport in list(ports)[:10]:
        assert _who(_conn(a.netns, vip, 80, sport=sport)[1]) == first[sport]

    # A flow keeps its backend while it lives, even when the table changes under it.
    with tcp_connect(a.netns, vip, 80) as s:
        s.sendall(b"1")
        owner = _who(s.recv(100))
        M.apply(dp1.maps, M.lb_maglev_entries(21, [4] * m))  # backend 4 does not exist
        s.sendall(b"2")
        assert _who(s.recv(100)) == owner
    # ... and a missing backend in the table falls back to a random slot.
    assert _who(_conn(a.netns, vip, 80)[1]) in (b"b1", b"b2", b"c")


# ---- session affinity -----------------------------------------------------------------------


def test_client_ip_affinity_pins_the_client(cluster, three_backends):
    a = cluster.pods["pod-a"]
    dp1 = cluster.datapaths["node-1"]
    pinned, spread = "10.96.1.20", "10.96.1.21"
    _program(dp1, _frontend(pinned, 80, 22, three_backends, affinity=600), "node-1")
    _program(dp1, _frontend(spread, 80, 23, three_backends), "node-1")

    seen = {_who(_conn(a.netns, pinned, 80)[1]) for _ in range(24)}
    assert len(seen) == 1, f"affinity: one backend for every new connection, got {seen}"
    aff = dp1.maps.dump(L.LB4_AFFINITY)
    key = L.Lb4AffinityKey(client_ip=L.ip4(a.ip), rev_nat_id=22)
    assert NAMES[aff[key].backend_id] == seen.pop()

    without = {_who(_conn(a.netns, spread, 80)[1]) for _ in range(24)}
    assert len(without) >= 2, f"no affinity: random selection, got {without}"
    assert L.Lb4AffinityKey(client_ip=L.ip4(a.ip), rev_nat_id=23) not in dp1.maps.dump(L.LB4_AFFINITY)


def test_affinity_entry_is_used_only_while_valid(cluster, three_backends):
    """Deterministic: one slot (backend 1) plus an affinity entry naming backend 3."""
    a = cluster.pods["pod-a"]
    dp1 = cluster.datapaths["node-1"]
    vip, rev = "10.96.1.22", 24
    b1, _, c3 = three_backends
    M.apply(dp1.maps, [
        M.lb_backend_entry(1, b1.ip, b1.port, "tcp"), M.lb_backend_entry(3, c3.ip, c3.port, "tcp"),
        M.lb_revnat_entry(rev, vip, 80),
        *M.lb_affinity_match_entries(rev, [1, 3]),
        *M.lb_service_entries(vip, 80, "tcp", rev, [1], flags=L.SVC_FLAG_AFFINITY, affinity_timeout=2),
    ])
    key = L.Lb4AffinityKey(client_ip=L.ip4(a.ip), rev_nat_id=rev)

    def pin(backend_id: int, age_s: float) -> None:
        dp1.maps.update(L.LB4_AFFINITY, key, L.LbAffinityVal(
            last_used=time.monotonic_ns() - int(age_s * 1e9), backend_id=backend_id))

    pin(3, 0)
    assert _who(_conn(a.netns, vip, 80)[1]) == b"c"  # a valid entry wins over the slot
    pin(3, 2.5)
    assert _who(_conn(a.netns, vip, 80)[1]) == b"b1"  # older than the 2 s timeout
    assert dp1.maps.dump(L.LB4_AFFINITY)[key].backend_id == 1  # re-recorded
    pin(3, 0)
    M.remove(dp1.maps, M.lb_affinity_match_entries(rev, [3]))
    assert _who(_conn(a.netns, vip, 80)[1]) == b"b1"  # no longer a backend of the service


def test_affinity_expires_after_the_timeout(cluster, three_backends):
    a = cluster.pods["pod-a"]
    dp1 = cluster.datapaths["node-1"]
    vip = "10.96.1.23"
    _program(dp1, _frontend(vip, 80, 25, three_backends, affinity=2), "node-1")
    key = L.Lb4AffinityKey(client_ip=L.ip4(a.ip), rev_nat_id=25)

    first = _who(_conn(a.netns, vip, 80)[1])
    assert {_who(_conn(a.netns, vip, 80)[1]) for _ in range(5)} == {first}
    changed = False
    for _ in range(12):  # P(no change in 12 expiries, 3 backends) = 3**-12
        before = dp1.maps.dump(L.LB4_AFFINITY)[key]
        time.sleep(2.3)
        now = _who(_conn(a.netns, vip, 80)[1])
        after = dp1.maps.dump(L.LB4_AFFINITY)[key]
        assert after.last_used - before.last_used >= 2_000_000_000
        assert NAMES[after.backend_id] == now
        if now != first:
            changed = True
            break
    assert changed, "after the timeout the client is balanced again"


# ---- NodePort ------------------------------------------------------------------------------------


def _attach_hosts(cluster) -> None:
    for node, dp in cluster.datapaths.items():
        dp.attach_host(cluster.topo.nodes[node].underlay_ifname)


def test_nodeport_local_backend_keeps_the_client_address(cluster, servers):
    a, b, c = (cluster.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    server = servers(b.netns, 8080, reply_prefix=b"b:")
    _attach_hosts(cluster)
    dp1 = cluster.datapaths["node-1"]
    fe = _frontend(NODE1_IP, NODE_PORT, 31, [_backend(1, b.ip, 8080, "node-1")],
                   type_="NodePort", node="node-1")
    _program(dp1, fe, "node-1")

    node2 = cluster.topo.nodes["node-2"].netns
    for client_ns, client_ip in ((c.netns, c.ip), (node2, NODE2_IP)):
        for i in range(5):
            peer, reply = _conn(client_ns, NODE1_IP, NODE_PORT, payload=b"n%d" % i)
            assert (peer, reply) == ((NODE1_IP, NODE_PORT), b"b:n%d" % i)
            assert server.peers[-1][0] == client_ip  # no SNAT for a local backend
    # a pod on node-1 itself reaches it through its own from_container
    assert _conn(a.netns, NODE1_IP, NODE_PORT)[1] == b"b:x"

    ct = dp1.maps.dump(L.CT)
    assert any(k.flags == L.CT_KEY_F_HOST and L.ip4_str(k.daddr) == b.ip and v.rev_nat_id == 31
               for k, v in ct.items())
    assert cluster.metric("pod-a", L.REASON_FORWARDED, L.DIR_SERVICE) > 0
    ev = cluster.events.wait_for(lambda e: e.direction == L.DIR_SERVICE and e.ct_state == L.CT_NEW
                                 and L.ip4_str(e.orig_daddr) == NODE1_IP)
    assert L.port_int(ev.orig_dport) == NODE_PORT and L.ip4_str(ev.daddr) == b.ip


def test_nodeport_remote_backend_is_snated_to_the_node(cluster, servers):
    a, b, c = (cluster.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    server = servers(c.netns, 8080, reply_prefix=b"c:")
    udp = servers(c.netns, 5353, udp=True, reply_prefix=b"u:")
    _attach_hosts(cluster)
    dp1 = cluster.datapaths["node-1"]
    _program(dp1, _frontend(NODE1_IP, NODE_PORT, 32, [_backend(3, c.ip, 8080, "node-2")],
                            type_="NodePort", node="node-1"), "node-1")
    _program(dp1, _frontend(NODE1_IP, NODE_PORT, 33, [_backend(4, c.ip, 5353, "node-2", "UDP")],
                            proto="UDP", type_="NodePort", node="node-1"), "node-1")

    node2 = cluster.topo.nodes["node-2"].netns
    # pod-c reaches itself through node-1 (hairpin), node-2's own namespace too
    for client_ns in (c.netns, node2, c.netns):
        for i in range(4):
            peer, reply = _conn(client_ns, NODE1_IP, NODE_PORT, payload=b"r%d" % i)
            assert (peer, reply) == ((NODE1_IP, NODE_PORT), b"c:r%d" % i)
            assert server.peers[-1][0] == NODE1_IP  # SNAT to node-1
            assert L.NODEPORT_SNAT_MIN <= server.peers[-1][1] <= L.NODEPORT_SNAT_MAX
    # a long-lived connection keeps its translation
    with tcp_connect(c.netns, NODE1_IP, NODE_PORT) as s:
        for i in range(5):
            s.sendall(b"p%d" % i)
            assert s.recv(100) == b"c:p%d" % i
    assert udp_roundtrip(node2, NODE1_IP, NODE_PORT, b"dns") == (b"u:dns", (NODE1_IP, NODE_PORT))
    assert udp.peers[-1][0] == NODE1_IP

    nat = dp1.maps.dump(L.NAT4)
    rev = [k for k in nat if k.flags == L.NAT_KEY_REV]
    fwd = [k for k in nat if k.flags == L.NAT_KEY_FWD]
    assert len(rev) == len(fwd) >= 13
    assert len({(k.dport, k.proto) for k in rev}) == len(rev)  # one SNAT port per flow
    assert all(L.ip4_str(k.daddr) == NODE1_IP and L.ip4_str(k.saddr) == c.ip for k in rev)
    svc = [v for k, v in dp1.maps.dump(L.CT).items()
           if k.flags == L.CT_KEY_F_SERVICE | L.CT_KEY_F_HOST and v.flags & L.CT_F_SNAT]
    assert len(svc) >= 13
    # GC keeps live entries and removes them once expired
    assert M.gc_nat(dp1.maps) == 0
    assert M.gc_nat(dp1.maps, time.monotonic_ns() + 10 * 24 * 3600 * 10**9) == len(nat)


def test_nodeport_mixed_backends_and_no_backends(cluster, servers):
    b, c = cluster.pods["pod-b"], cluster.pods["pod-c"]
    servers(b.netns, 8080, reply_prefix=b"b:")
    servers(c.netns, 8080, reply_prefix=b"c:")
    _attach_hosts(cluster)
    dp1 = cluster.datapaths["node-1"]
    _program(dp1, _frontend(NODE1_IP, NODE_PORT, 34, [_backend(1, b.ip, 8080, "node-1"),
                                                       _backend(3, c.ip, 8080, "node-2")],
                            type_="NodePort", node="node-1", algorithm="maglev"), "node-1")
    seen = {_who(_conn(c.netns, NODE1_IP, NODE_PORT)[1]) for _ in range(20)}
    assert seen == {b"b", b"c"}

    # NodePort frontend without backends: 158 at node-1's from_netdev
    _program(dp1, _frontend(NODE1_IP, NODE_PORT + 1, 35, [], type_="NodePort", node="node-1"),
             "node-1")
    with pytest.raises(OSError):
        tcp_connect(c.netns, NODE1_IP, NODE_PORT + 1, timeout=0.7)
    ev = cluster.events.wait_for(lambda e: e.drop_reason == L.DROP_NO_SERVICE
                                 and e.direction == L.DIR_SERVICE)
    assert L.ip4_str(ev.orig_daddr) == NODE1_IP and L.port_int(ev.orig_dport) == NODE_PORT + 1
    assert cluster.metric("pod-a", L.DROP_NO_SERVICE, L.DIR_SERVICE) >= 1

    # traffic that is no service passes the host programs untouched
    assert _conn(c.netns, b.ip, 8080)[1] == b"b:x"


def test_vip_without_backends_still_drops_158(cluster):
    a = cluster.pods["pod-a"]
    dp1 = cluster.datapaths["node-1"]
    vip = "10.96.1.30"
    _program(dp1, _frontend(vip, 80, 36, [], algorithm="maglev", affinity=30), "node-1")
    with pytest.raises(OSError):
        tcp_connect(a.netns, vip, 80, timeout=0.7)
    ev = cluster.events.wait_for(lambda e: e.drop_reason == L.DROP_NO_SERVICE
                                 and L.ip4_str(e.orig_daddr) == vip)
    assert ev.direction == L.DIR_EGRESS and ev.ep_id == 11
    assert cluster.metric("pod-a", L.DROP_NO_SERVICE, L.DIR_EGRESS) >= 1


def test_external_ip_reaches_backends_through_the_node_it_is_routed_to(cluster, servers):
    """An externalIPs frontend is on every node; traffic routed to node-1 from outside its
    pods (here: node-2's own namespace) is served by node-1's from_netdev, SNATed to
    node-1's address (FIB source, not the external IP) when the backend is remote."""
    from pyroute2 import IPRoute

    b, c = cluster.pods["pod-b"], cluster.pods["pod-c"]
    local = servers(b.netns, 8080, reply_prefix=b"b:")
    remote = servers(c.netns, 8080, reply_prefix=b"c:")
    _attach_hosts(cluster)
    ext = "198.51.100.10"
    node2 = cluster.topo.nodes["node-2"].netns
    with IPRoute(netns=node2) as ipr:
        ipr.route("replace", dst=f"{ext}/32", gateway=NODE1_IP)
    for rev, backend, server, peer_ip in ((41, _backend(1, b.ip, 8080, "node-1"), local, NODE2_IP),
                                          (42, _backend(3, c.ip, 8080, "node-2"), remote, NODE1_IP)):
        fe = _frontend(ext, 80, rev, [backend], type_="ExternalIP")
        for node, dp in cluster.datapaths.items():
            _program(dp, fe, node)
        for i in range(3):
            assert _conn(node2, ext, 80, payload=b"e%d" % i) == ((ext, 80), b"%s:e%d" % (server.prefix[:-1], i))
            assert server.peers[-1][0] == peer_ip
