"""End-to-end: the policy verdict of allowed connections in the real BPF datapath.

Same sandbox as test_datapath (node-1: pod-a 1001, pod-b 1002; node-2: pod-c 1003, all in
``ciliary-t<hex>-*`` namespaces). pod-c enforces ingress with one entry per lookup step of
lib/policy.h, each found by its own connection, so every match type comes from the kernel.
"""

from __future__ import annotations

import socket

import pytest

from services.node import layouts as L
from services.node import maps as M
from services.node import netns as N

from .podnet import tcp_connect

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# Cilium POLICY_MATCH_* (bpf/lib/types.h)
NONE, L3_ONLY, L3_L4, L4_ONLY, ALL, L3_PROTO, PROTO_ONLY = range(7)
EP_C = 21  # pod-c's endpoint id (conftest PODS)
EP_A = 11


def tcp_exchange(netns: str, ip: str, port: int) -> int:
    """One TCP connection with a request and its echo, closed by the client; its source port."""
    with tcp_connect(netns, ip, port) as s:
        sport = s.getsockname()[1]
        s.sendall(b"ping")
        assert s.recv(2048) == b"ping"
    return sport


def udp_exchange(netns: str, ip: str, port: int) -> int:
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with s:
        s.settimeout(2)
        s.bind(("0.0.0.0", 0))
        s.sendto(b"ping", (ip, port))
        assert s.recvfrom(2048)[0] == b"ping"
        return s.getsockname()[1]


def test_allowed_connections_carry_their_match_type_once(cluster, servers):
    a, b, c = (cluster.pods[n] for n in ("pod-a", "pod-b", "pod-c"))
    for port in (8080, 8081, 8082, 8083, 8084):
        servers(c.netns, port)
    servers(c.netns, 9000, udp=True)
    dp2 = cluster.datapaths["node-2"]
    M.apply(dp2.maps, [
        M.endpoint_entry(c.host_ifindex, EP_C, 1003, c.ip, policy_ingress=True),
        M.policy_entry(1003, 1001, 8080, "tcp", "ingress", rule_ref=11),   # step 1 {peer, port, proto}
        M.policy_entry(1003, 1001, 0, "tcp", "ingress", rule_ref=12),      # step 2 {peer, *, proto}
        M.policy_entry(1003, 1001, 0, 0, "ingress", rule_ref=13),          # step 3 {peer, *, *}
        M.policy_entry(1003, 0, 8082, "tcp", "ingress", rule_ref=14),      # step 4 {*, port, proto}
        M.policy_entry(1003, 0, 0, "tcp", "ingress", rule_ref=15),         # step 5 {*, *, proto}
        M.policy_entry(1003, 0, 0, 0, "ingress", rule_ref=16),             # step 6 {*, *, *}
        M.policy_entry(1003, 1002, 8084, "tcp", "ingress", deny=True, rule_ref=17),
    ])
    cases = [
        ("a tcp/8080", tcp_exchange(a.netns, c.ip, 8080), L3_L4, 11),
        ("a tcp/8081", tcp_exchange(a.netns, c.ip, 8081), L3_PROTO, 12),
        ("a udp/9000", udp_exchange(a.netns, c.ip, 9000), L3_ONLY, 13),
        ("b tcp/8082", tcp_exchange(b.netns, c.ip, 8082), L4_ONLY, 14),
        ("b tcp/8083", tcp_exchange(b.netns, c.ip, 8083), PROTO_ONLY, 15),
        ("b udp/9000", udp_exchange(b.netns, c.ip, 9000), ALL, 16),
    ]

    def at_c(sport: int):
        return lambda e: (e.ep_id == EP_C and e.direction == L.DIR_INGRESS
                          and L.port_int(e.sport) == sport and not e.is_reply)

    for name, sport, match, ref in cases:
        ev = cluster.events.wait_for(lambda e, s=sport: at_c(s)(e) and e.flags & L.EVENT_F_POLICY_VERDICT)
        assert (ev.policy_match, ev.rule_ref) == (match, ref), name
        assert (ev.type, ev.verdict, ev.ct_state) == (L.EVENT_TRACE, L.VERDICT_FORWARDED, L.CT_NEW), name

    # once per connection: the FIN of the first one is checked against the same entry
    # (the event says which) but gives no second verdict
    sport = cases[0][1]
    fin = cluster.events.wait_for(lambda e: at_c(sport)(e) and e.tcp_flags & 0x01)
    assert fin.ct_state == L.CT_ESTABLISHED and fin.flags == 0
    assert (fin.policy_match, fin.rule_ref) == (L3_L4, 11)
    with cluster.events.cond:
        flagged = [e for e in cluster.events.events if at_c(sport)(e) and e.flags]
        # pod-a does not enforce egress: no verdict at its own hook
        at_a = [e for e in cluster.events.events if e.ep_id == EP_A and L.port_int(e.sport) == sport]
    assert len(flagged) == 1
    assert at_a and all(e.flags == 0 and e.policy_match == NONE for e in at_a)

    # a deny entry: the drop names it (L3-L4, rule 17); no allowed verdict
    with pytest.raises(OSError):
        tcp_connect(b.netns, c.ip, 8084, timeout=0.7)
    drop = cluster.events.wait_for(lambda e: e.ep_id == EP_C and e.drop_reason == L.DROP_POLICY_DENY
                                   and L.port_int(e.dport) == 8084)
    assert (drop.policy_match, drop.rule_ref, drop.flags) == (L3_L4, 17, 0)
