"""End-to-end: real namespaces, real sockets, the real BPF datapath.

One cluster per test: node-1 (pod-a, pod-b) and node-2 (pod-c), joined by an
underlay bridge; all inside ``ciliary-t<hex>-*`` namespaces (see conftest).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.node import layouts as L
from services.node import maps as M
from services.node import netns as N

from .podnet import (
    PIN_ROOT,
    SMALL_MAPS,
    icmp_ping,
    send_spoofed_udp,
    tcp_connect,
    tcp_roundtrip,
    udp_roundtrip,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parents[2]
VIP = "10.96.0.10"


def test_topology_plain_connectivity(topology, servers):
    a, b, c = (topology.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    servers(b.netns, 8080)
    servers(c.netns, 8080)
    servers(c.netns, 9090, udp=True)
    assert tcp_roundtrip(a.netns, b.ip, 8080, b"same-node") == b"same-node"
    assert tcp_roundtrip(a.netns, c.ip, 8080, b"cross-node") == b"cross-node"
    assert udp_roundtrip(a.netns, c.ip, 9090, b"u")[0] == b"u"
    assert c.host_ifname.startswith("ciliary-") and len(c.host_ifname) == 15


def test_pod_to_pod_with_programs(cluster, servers):
    a, b, c = (cluster.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    servers(a.netns, 8080)
    servers(b.netns, 8080)
    servers(c.netns, 8080)
    servers(b.netns, 9090, udp=True)
    servers(c.netns, 9090, udp=True)

    assert tcp_roundtrip(a.netns, b.ip, 8080, b"same-node") == b"same-node"
    assert tcp_roundtrip(a.netns, c.ip, 8080, b"cross-node") == b"cross-node"
    assert tcp_roundtrip(c.netns, a.ip, 8080, b"back") == b"back"
    assert udp_roundtrip(a.netns, b.ip, 9090, b"u1") == (b"u1", (b.ip, 9090))
    assert udp_roundtrip(a.netns, c.ip, 9090, b"u2") == (b"u2", (c.ip, 9090))
    assert icmp_ping(a.netns, c.ip)

    # The programs are on the path: counters, conntrack and events saw the flows.
    assert cluster.metric("pod-a", L.REASON_FORWARDED, L.DIR_EGRESS) > 0
    assert cluster.metric("pod-c", L.REASON_FORWARDED, L.DIR_INGRESS) > 0
    ev = cluster.events.wait_for(
        lambda e: e.ct_state == L.CT_NEW and e.direction == L.DIR_INGRESS
        and L.ip4_str(e.daddr) == c.ip and L.port_int(e.dport) == 8080)
    assert (ev.src_identity, ev.dst_identity) == (1001, 1003)
    assert ev.verdict == L.VERDICT_FORWARDED and ev.ep_id == 21
    synack = cluster.events.wait_for(
        lambda e: e.is_reply and e.tcp_flags & 0x12 == 0x12 and L.ip4_str(e.saddr) == c.ip)
    assert synack.ct_state == L.CT_REPLY

    ct1 = cluster.datapaths["node-1"].maps.dump(L.CT)
    egress = [k for k in ct1 if k.flags == L.DIR_EGRESS and L.ip4_str(k.daddr) == c.ip
              and L.port_int(k.dport) == 8080]
    assert egress and ct1[egress[0]].flags & L.CT_F_SEEN_REPLY

    # Re-attaching is idempotent and keeps traffic flowing.
    dp1 = cluster.datapaths["node-1"]
    dp1.attach(a.host_ifname)
    assert tcp_roundtrip(a.netns, c.ip, 8080, b"again") == b"again"

    # Conntrack GC: nothing expired now; everything expired an hour from now.
    assert dp1.gc_conntrack() == 0
    tracked = len(settled_conntrack(dp1))
    assert tracked > 0
    assert M.gc_conntrack(dp1.maps, time.monotonic_ns() + 3600 * 10**9) == tracked
    assert dp1.maps.dump(L.CT) == {}


def test_policy_drops_with_cilium_reasons(cluster, servers):
    a, b, c = (cluster.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    servers(c.netns, 8080)
    servers(b.netns, 8080)
    dp2 = cluster.datapaths["node-2"]
    dp1 = cluster.datapaths["node-1"]
    assert tcp_roundtrip(a.netns, c.ip, 8080) == b"ping"

    # Ingress policy enforced on pod-c, nothing allowed: POLICY_DENIED (133).
    M.apply(dp2.maps, [M.endpoint_entry(c.host_ifindex, 21, 1003, c.ip, policy_ingress=True)])
    with pytest.raises(OSError):
        tcp_connect(a.netns, c.ip, 8080, timeout=0.7)
    # (Match the SYN: a late ACK of the earlier connection may be dropped too,
    # since forward packets of established flows are re-checked against policy.)
    ev = cluster.events.wait_for(lambda e: e.drop_reason == L.DROP_POLICY
                                 and L.ip4_str(e.daddr) == c.ip and e.tcp_flags & 0x02)
    assert ev.type == L.EVENT_DROP and ev.verdict == L.VERDICT_DROPPED
    assert ev.direction == L.DIR_INGRESS and ev.src_identity == 1001 and ev.ct_state == L.CT_NEW
    assert cluster.metric("pod-c", L.DROP_POLICY, L.DIR_INGRESS) >= 1

    # Allow identity 1001 on tcp/8080.
    M.apply(dp2.maps, [M.policy_entry(1003, 1001, 8080, "tcp", "ingress", rule_ref=7)])
    assert tcp_roundtrip(a.netns, c.ip, 8080, b"allowed") == b"allowed"

    # A deny entry (here: any peer, any port) beats the allow: POLICY_DENY (181).
    before = cluster.metric("pod-c", L.DROP_POLICY_DENY, L.DIR_INGRESS)
    M.apply(dp2.maps, [M.policy_entry(1003, 0, 0, "tcp", "ingress", deny=True, rule_ref=9)])
    with pytest.raises(OSError):
        tcp_connect(a.netns, c.ip, 8080, timeout=0.7)
    ev = cluster.events.wait_for(lambda e: e.drop_reason == L.DROP_POLICY_DENY
                                 and L.ip4_str(e.daddr) == c.ip and e.tcp_flags & 0x02)
    assert ev.rule_ref == 9
    assert cluster.metric("pod-c", L.DROP_POLICY_DENY, L.DIR_INGRESS) > before

    # Egress deny on pod-a towards pod-b (same node) with audit: forwarded, reported as audit.
    M.apply(dp1.maps, [
        M.endpoint_entry(a.host_ifindex, 11, 1001, a.ip, policy_egress=True),
        M.policy_entry(1001, 1002, 8080, "tcp", "egress", deny=True, audit=True, rule_ref=5),
    ])
    assert tcp_roundtrip(a.netns, b.ip, 8080, b"audited") == b"audited"
    ev = cluster.events.wait_for(lambda e: e.verdict == L.VERDICT_AUDIT
                                 and L.ip4_str(e.daddr) == b.ip)
    assert ev.drop_reason == L.DROP_POLICY_DENY and ev.direction == L.DIR_EGRESS
    assert ev.rule_ref == 5


def test_service_dnat_and_reverse_nat(cluster, servers):
    a, b, c = (cluster.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    servers(b.netns, 8080, reply_prefix=b"b:")
    servers(c.netns, 8080, reply_prefix=b"c:")
    dns = servers(c.netns, 5353, udp=True, reply_prefix=b"ans:")
    dp1 = cluster.datapaths["node-1"]
    M.apply(dp1.maps, [
        M.lb_backend_entry(1, b.ip, 8080, "tcp"),
        M.lb_backend_entry(2, c.ip, 8080, "tcp"),
        M.lb_backend_entry(3, c.ip, 5353, "udp"),
        M.lb_revnat_entry(1, VIP, 80),
        M.lb_revnat_entry(2, VIP, 53),
        *M.lb_service_entries(VIP, 80, "tcp", rev_nat_id=1, backend_ids=[1, 2]),
        *M.lb_service_entries(VIP, 53, "udp", rev_nat_id=2, backend_ids=[3]),
    ])

    seen = set()
    for i in range(16):
        with tcp_connect(a.netns, VIP, 80) as s:
            assert s.getpeername() == (VIP, 80)
            s.sendall(b"q%d" % i)
            first = s.recv(100)
            assert first.endswith(b"q%d" % i) and first[:2] in (b"b:", b"c:")
            for j in range(2):  # the flow sticks to its backend
                s.sendall(b"r%d" % j)
                assert s.recv(100) == first[:2] + b"r%d" % j
            seen.add(first[:2])
    assert seen == {b"b:", b"c:"}, "random backend selection should hit both in 16 flows"

    ev = cluster.events.wait_for(lambda e: L.ip4_str(e.orig_daddr) == VIP
                                 and e.direction == L.DIR_EGRESS and e.ct_state == L.CT_NEW)
    assert L.port_int(ev.orig_dport) == 80 and L.ip4_str(ev.daddr) in (b.ip, c.ip)
    assert L.port_int(ev.dport) == 8080

    # UDP service on :53 with DNS-visible payload in both directions.
    data, addr = udp_roundtrip(a.netns, VIP, 53, b"\x12\x34query-example")
    assert data == b"ans:\x12\x34query-example" and addr == (VIP, 53)
    assert dns.peers and dns.peers[-1][0] == a.ip  # no SNAT: the backend sees the pod
    q = cluster.events.wait_for(lambda e: e.direction == L.DIR_EGRESS and e.payload_len > 0
                                and L.ip4_str(e.orig_daddr) == VIP)
    assert q.payload_bytes() == b"\x12\x34query-example"
    r = cluster.events.wait_for(lambda e: e.direction == L.DIR_INGRESS and e.is_reply
                                and e.payload_len > 0 and L.ip4_str(e.saddr) == VIP)
    assert r.payload_bytes() == b"ans:\x12\x34query-example" and L.port_int(r.sport) == 53


def _roundtrip_from_port(netns: str, src_port: int, ip: str, port: int) -> tuple[tuple[str, int], bytes]:
    def run() -> tuple[tuple[str, int], bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # close with RST: no TIME_WAIT, so the same 4-tuple can connect again at once
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.settimeout(2.0)
            s.bind(("0.0.0.0", src_port))
            s.connect((ip, port))
            s.sendall(b"x")
            return s.getpeername(), s.recv(100)

    return N.run_in_netns(netns, run)


def test_service_reuses_tuple_of_a_direct_connection(cluster, servers):
    """A VIP connection whose post-DNAT tuple matches a recent direct connection (same
    client port) is still reverse-NATed, and a direct one after it is not."""
    a, b = cluster.pods["pod-a"], cluster.pods["pod-b"]
    servers(b.netns, 8080, reply_prefix=b"b:")
    M.apply(cluster.datapaths["node-1"].maps, [
        M.lb_backend_entry(5, b.ip, 8080, "tcp"),
        M.lb_revnat_entry(5, "10.96.0.12", 80),
        *M.lb_service_entries("10.96.0.12", 80, "tcp", rev_nat_id=5, backend_ids=[5]),
    ])
    assert _roundtrip_from_port(a.netns, 40999, b.ip, 8080) == ((b.ip, 8080), b"b:x")
    assert _roundtrip_from_port(a.netns, 40999, "10.96.0.12", 80) == (("10.96.0.12", 80), b"b:x")
    assert _roundtrip_from_port(a.netns, 40999, b.ip, 8080) == ((b.ip, 8080), b"b:x")


def test_two_services_share_a_backend_and_a_client_port(cluster, servers):
    """Connections from one client port to two VIPs with the same backend, one after the
    other: each reply carries its own VIP."""
    a, b = cluster.pods["pod-a"], cluster.pods["pod-b"]
    servers(b.netns, 8080, reply_prefix=b"b:")
    M.apply(cluster.datapaths["node-1"].maps, [
        M.lb_backend_entry(6, b.ip, 8080, "tcp"),
        M.lb_revnat_entry(6, "10.96.0.13", 80),
        M.lb_revnat_entry(7, "10.96.0.14", 80),
        *M.lb_service_entries("10.96.0.13", 80, "tcp", rev_nat_id=6, backend_ids=[6]),
        *M.lb_service_entries("10.96.0.14", 80, "tcp", rev_nat_id=7, backend_ids=[6]),
    ])
    for vip in ("10.96.0.13", "10.96.0.14", "10.96.0.13"):
        assert _roundtrip_from_port(a.netns, 41999, vip, 80) == ((vip, 80), b"b:x")


def test_service_without_backends_drops(cluster):
    a = cluster.pods["pod-a"]
    dp1 = cluster.datapaths["node-1"]
    M.apply(dp1.maps, [*M.lb_service_entries("10.96.0.11", 80, "tcp", 3, backend_ids=[]),
                       M.lb_revnat_entry(3, "10.96.0.11", 80)])
    with pytest.raises(OSError):
        tcp_connect(a.netns, "10.96.0.11", 80, timeout=0.7)
    ev = cluster.events.wait_for(lambda e: e.drop_reason == L.DROP_NO_SERVICE)
    assert L.ip4_str(ev.orig_daddr) == "10.96.0.11" and L.port_int(ev.orig_dport) == 80
    assert ev.direction == L.DIR_EGRESS and ev.ep_id == 11
    assert cluster.metric("pod-a", L.DROP_NO_SERVICE, L.DIR_EGRESS) >= 1


def test_spoofed_source_dropped_and_detach_unmanages(cluster, servers):
    a, b = cluster.pods["pod-a"], cluster.pods["pod-b"]
    udp = servers(b.netns, 9999, udp=True)
    send_spoofed_udp(a.netns, "10.200.1.99", b.ip, 9999)
    ev = cluster.events.wait_for(lambda e: e.drop_reason == L.DROP_INVALID_SIP)
    assert L.ip4_str(ev.saddr) == "10.200.1.99" and ev.direction == L.DIR_EGRESS
    assert ev.ep_id == 11 and cluster.metric("pod-a", L.DROP_INVALID_SIP, L.DIR_EGRESS) == 1
    assert udp.peers == []

    # Detached: no program on pod-a's veth any more; traffic flows untracked there.
    dp1 = cluster.datapaths["node-1"]
    dp1.detach(a.host_ifname)
    dp1.detach(a.host_ifname)  # idempotent
    servers(b.netns, 8080)
    assert tcp_roundtrip(a.netns, b.ip, 8080, b"bare") == b"bare"
    flows = [(k.flags, L.ip4_str(k.saddr)) for k in dp1.maps.dump(L.CT)
             if L.port_int(k.dport) == 8080]
    assert flows == [(L.DIR_INGRESS, a.ip)]  # tracked at pod-b's to_container only


def _loader_spec(topology) -> dict:
    nodes = []
    for node, net in topology.nodes.items():
        eps = []
        for ep in topology.pods_on(node):
            spec = topology.specs[ep.pod]
            eps.append(dict(ifname=ep.host_ifname, ifindex=ep.host_ifindex, ep_id=spec.ep_id,
                            identity=spec.identity, ip=ep.ip))
        nodes.append(dict(name=node, netns=net.netns, endpoints=eps))
    return dict(cluster=topology.cluster, pin_root=PIN_ROOT, map_sizes=SMALL_MAPS, nodes=nodes,
                ipcache=[dict(cidr=f"{s.ip}/32", identity=s.identity)
                         for s in topology.specs.values()])


def test_datapath_survives_loader_sigkill(topology, servers):
    from services.node.datapath import Datapath, MapSizes

    a, b, c = (topology.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    servers(c.netns, 8080)
    servers(b.netns, 8080)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/e2e/datapath_loader.py"),
                             json.dumps(_loader_spec(topology))],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "ready"
        persistent = tcp_connect(a.netns, c.ip, 8080)
        ok, failed = [0], []
        stop = threading.Event()

        def loop() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    persistent.sendall(b"p%d" % i)
                    assert persistent.recv(100) == b"p%d" % i
                    assert tcp_roundtrip(a.netns, b.ip, 8080, b"n%d" % i) == b"n%d" % i
                    ok[0] += 1
                except Exception as e:  # recorded, asserted below
                    failed.append(repr(e))
                time.sleep(0.02)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        time.sleep(0.3)
        before_kill = ok[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        time.sleep(0.6)
        stop.set()
        t.join(timeout=5)
        assert not failed, failed[:3]
        assert before_kill > 0 and ok[0] > before_kill + 5, (before_kill, ok[0])

        # A new agent finds the state the dead one left (restore before reconcile).
        dp = Datapath(topology.cluster, "node-1", topology.nodes["node-1"].netns,
                      pin_root=PIN_ROOT, map_sizes=MapSizes(**SMALL_MAPS))
        try:
            dp.load()
            want = {e.key: e.value for e in topology.desired_entries("node-1")}
            lxc, ipc = dp.maps.dump(L.LXC), dp.maps.dump(L.IPCACHE)
            assert {**lxc, **ipc} == want
            assert any(L.ip4_str(k.daddr) == c.ip and k.flags == L.DIR_EGRESS
                       for k in dp.maps.dump(L.CT))
            # Replacing the programs keeps the established connection (conntrack is pinned).
            dp.attach(a.host_ifname)
            dp.attach(b.host_ifname)
            persistent.sendall(b"after-reattach")
            assert persistent.recv(100) == b"after-reattach"
            assert tcp_roundtrip(a.netns, b.ip, 8080, b"new") == b"new"
        finally:
            dp.close()
            persistent.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def settled_conntrack(dp: Any, quiet_s: float = 0.2, timeout_s: float = 5.0) -> dict[Any, Any]:
    """The conntrack map once packets stopped updating it: the last connections' teardown
    packets still update entries, and a dump taken while an LRU entry is replaced can miss
    a key."""
    deadline = time.monotonic() + timeout_s
    last = dp.maps.dump(L.CT)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = dp.maps.dump(L.CT)
        if now.keys() == last.keys():
            return now
        last = now
    return last
