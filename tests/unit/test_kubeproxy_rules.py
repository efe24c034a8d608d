"""bench/kubeproxy_rules.py: the kube-proxy iptables ruleset the servicelb benchmark loads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import kubeproxy_rules as K  # noqa: E402


def test_chain_names_match_kube_proxy_goldens():
    # The values kube-proxy's own proxier_test.go expects for ns1/svc1:p80 and its endpoint.
    assert K.service_chain("ns1/svc1:p80", "tcp") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert K.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert len(K.port_proto_hash("a/b", "udp")) == 16
    # every chain name fits iptables' 28-character limit
    assert len(K.service_chain("x" * 300, "sctp")) <= 28


def test_probability_format():
    assert [K.probability(n) for n in (3, 2)] == ["0.3333333333", "0.5000000000"]
    assert K.probability(7) == "0.1428571429"
    assert K.probability(1) == "1.0000000000"


def test_masquerade_mark_is_gos_percent_hash_08x():
    assert K.Options().masquerade_mark == "0x00004000"


GOLDEN_TWO = """\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
:{svc2} - [0:0]
:{sep2a} - [0:0]
:{sep2b} - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -m comment --comment "ns2/svc2 cluster IP" -m udp -p udp -d 172.30.0.42 --dport 53 -j {svc2}
-A {svc2} -m comment --comment "ns2/svc2 cluster IP" -m udp -p udp -d 172.30.0.42 --dport 53 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A {svc2} -m comment --comment "ns2/svc2 -> 10.180.0.2:5353" -m statistic --mode random --probability 0.5000000000 -j {sep2a}
-A {svc2} -m comment --comment "ns2/svc2 -> 10.180.0.3:5353" -j {sep2b}
-A {sep2a} -m comment --comment ns2/svc2 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A {sep2a} -m comment --comment ns2/svc2 -m udp -p udp -j DNAT --to-destination 10.180.0.2:5353
-A {sep2b} -m comment --comment ns2/svc2 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A {sep2b} -m comment --comment ns2/svc2 -m udp -p udp -j DNAT --to-destination 10.180.0.3:5353
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"""


def two_services() -> list[K.ServicePort]:
    return [
        K.ServicePort("ns1", "svc1", "172.30.0.41", 80, (("10.180.0.1", 80),), port_name="p80"),
        K.ServicePort("ns2", "svc2", "172.30.0.42", 53, (("10.180.0.2", 5353), ("10.180.0.3", 5353)),
                      protocol="UDP"),
    ]


def test_golden_two_services():
    golden = GOLDEN_TWO.format(
        svc2=K.service_chain("ns2/svc2", "udp"),
        sep2a=K.endpoint_chain("ns2/svc2", "udp", "10.180.0.2:5353"),
        sep2b=K.endpoint_chain("ns2/svc2", "udp", "10.180.0.3:5353"))
    assert K.restore_input(two_services()) == golden


@pytest.mark.parametrize("n", [1, 10, 400])
def test_structure_n_services_times_3(n):
    text = K.restore_input(K.synthetic_services(n))
    c = K.counts(text)
    # nat: 4 top-level chains + per service 1 SVC + 3 SEP chains
    assert c["nat"]["chains"] == 4 + 4 * n
    # nat rules: 4 static + nodeports tail + per service (1 KUBE-SERVICES + 1 masq + 3 ladder + 3*2 SEP)
    assert c["nat"]["rules"] == 5 + 11 * n
    assert c["filter"] == {"chains": 6, "rules": 4, "deleted_chains": 0}
    assert len(re.findall(r"^:KUBE-SVC-[A-Z2-7]{16} - \[0:0\]$", text, re.M)) == n
    assert len(re.findall(r"^:KUBE-SEP-[A-Z2-7]{16} - \[0:0\]$", text, re.M)) == 3 * n
    assert text.count("--probability 0.3333333333") == n
    assert text.count("--probability 0.5000000000") == n
    # the nodeports jump is the last rule of KUBE-SERVICES
    svc_rules = [line for line in text.splitlines() if line.startswith("-A KUBE-SERVICES")]
    assert "KUBE-NODEPORTS" in svc_rules[-1] and len(svc_rules) == n + 1
    # chain names unique within each table
    filt, nat = text.split("*nat")
    for part in (filt, nat):
        chains = [line for line in part.splitlines() if line.startswith(":")]
        assert len(set(chains)) == len(chains)


def test_probability_ladder_and_last_rule_unconditional():
    svc = K.ServicePort("a", "b", "10.96.0.9", 80, tuple((f"10.1.0.{i}", 80) for i in range(1, 5)))
    ladder = [line for line in K.restore_input([svc]).splitlines()
              if line.startswith(f"-A {K.service_chain('a/b', 'tcp')}") and "KUBE-SEP-" in line]
    assert [re.search(r"--probability (\S+)", x).group(1) if "--probability" in x else None for x in ladder] == [
        "0.2500000000", "0.3333333333", "0.5000000000", None]


def test_large_cluster_mode_drops_endpoint_comments_only():
    small = K.build(K.synthetic_services(333))  # 999 endpoints
    large = K.build(K.synthetic_services(334))  # 1002 endpoints > 1000
    assert not small.large_cluster_mode and large.large_cluster_mode
    sep_rules = [r for r in large.nat_rules if r.startswith("-A KUBE-SEP-")]
    assert sep_rules and not any("--comment" in r for r in sep_rules)
    ladder = [r for r in large.nat_rules if r.startswith("-A KUBE-SVC-") and "KUBE-SEP-" in r]
    assert ladder and not any("--comment" in r for r in ladder)
    cip = [r for r in large.nat_rules if r.startswith("-A KUBE-SERVICES") and "cluster IP" in r]
    assert len(cip) == 334


def test_partial_sync_rewrites_kube_services_and_changed_chains_only():
    svcs = K.synthetic_services(50)
    changed = svcs[7]
    text = K.restore_input(svcs, changed=[changed.port_name_string])
    c = K.counts(text)
    assert c["nat"]["chains"] == 4 + 4
    assert c["nat"]["rules"] == 5 + 50 + 10
    for chain in K.service_chains(changed):
        assert f":{chain} - [0:0]" in text
    for chain in K.service_chains(svcs[8]):
        assert f":{chain} - [0:0]" not in text


def test_stale_chains_are_flushed_and_deleted():
    text = K.restore_input(K.synthetic_services(2), stale_chains=["KUBE-SEP-AAAAAAAAAAAAAAAA"])
    assert ":KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]" in text and "-X KUBE-SEP-AAAAAAAAAAAAAAAA" in text
    assert K.counts(text)["nat"]["deleted_chains"] == 1


def test_no_endpoints_rejects_in_filter():
    svc = K.ServicePort("a", "b", "10.96.0.9", 80, ())
    text = K.restore_input([svc])
    assert '-A KUBE-SERVICES -m comment --comment "a/b has no endpoints" -m tcp -p tcp -d 10.96.0.9 --dport 80 -j REJECT' in text
    assert "KUBE-SVC-" not in text


def test_bootstrap_jumps():
    text = K.bootstrap_input()
    assert '-I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in text
    assert '-I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING' in text
    assert K.counts(text) == {"filter": {"chains": 6, "rules": 11, "deleted_chains": 0},
                              "nat": {"chains": 2, "rules": 3, "deleted_chains": 0}}


def test_synthetic_services_real_backends():
    svcs = K.synthetic_services(5, real_backends={4: ["10.200.1.11", "10.200.1.12", "10.200.1.13"]})
    assert svcs[0].cluster_ip == "10.96.0.1" and svcs[4].cluster_ip == "10.96.0.5"
    assert svcs[1].endpoints[0] == ("10.208.0.4", 8080)
    assert [ip for ip, _ in svcs[4].endpoints] == ["10.200.1.11", "10.200.1.12", "10.200.1.13"]
    ips = [ip for s in svcs[:4] for ip, _ in s.endpoints]
    assert len(set(ips)) == 12
