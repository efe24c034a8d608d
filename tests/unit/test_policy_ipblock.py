"""NetworkPolicy ipBlock as Kubernetes means it (also pod IPs) vs Cilium's CIDR rules."""

from __future__ import annotations

import ipaddress
from typing import Any

from ciliary import schema
from ciliary.testing import FakeBus
from services.policy.podaddresses import PodAddressLabels, address_of, ipblock_networks
from services.policy.resolve import ResolveOptions, normalize_all, policy_cidrs
from services.policy.rules import normalize
from services.policy.selectors import (
    CIDR_IDENTITY_FLAG,
    ID_WORLD,
    IdentityView,
    SelectorCache,
    cidr_selector,
    ipblock_selector,
)

from .test_policy_service import identity, pod_labels, resource, running, wait_for

SERVER = 65800
OTHER = 65801
CLIENT = 65802


def netpol(name: str, *peers: dict[str, Any], subject: str = "client") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": subject}},
                     "policyTypes": ["Egress"], "egress": [{"to": list(peers)}]}}


def cnp(name: str, cidr: str) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                     "egress": [{"toCIDR": [cidr]}]}}


def pod_view(ident: int, *addresses: str) -> IdentityView:
    return IdentityView(ident, frozenset(pod_labels("x") + [f"podip:{a}" for a in addresses]))


def test_networkpolicy_ipblock_translates_to_an_ipblock_selector_cnp_cidr_stays_cidr() -> None:
    np_pol = normalize(netpol("np", {"ipBlock": {"cidr": "10.0.0.0/24",
                                                 "except": ["10.0.0.5/32"]}}))
    [section] = np_pol.rules[0].sections
    assert section.peers == (ipblock_selector("10.0.0.0/24", ["10.0.0.5/32"]),)
    assert str(section.peers[0]) == "ipblock 10.0.0.0/24 except 10.0.0.5/32"
    cnp_pol = normalize(cnp("c", "10.0.0.0/24"))
    assert cnp_pol.rules[0].sections[0].peers == (cidr_selector("10.0.0.0/24"),)
    # both still ask the identity service for CIDR identities of what they name
    assert policy_cidrs(normalize_all([netpol("np", {"ipBlock": {
        "cidr": "10.0.0.0/24", "except": ["10.0.0.5/32"]}})], ResolveOptions())) == [
        "10.0.0.0/24", "10.0.0.5/32"]


def test_ipblock_selects_pod_identities_whose_addresses_all_lie_inside() -> None:
    block = ipblock_selector("10.0.0.0/24", ["10.0.0.5/32"])
    cidr = cidr_selector("10.0.0.0/24", ["10.0.0.5/32"])
    inside = pod_view(SERVER, "10.0.0.7")
    excepted = pod_view(OTHER, "10.0.0.5")
    straddling = pod_view(CLIENT, "10.0.0.8", "10.0.1.8")
    no_addresses = pod_view(65803)
    assert block.matches(inside) and not cidr.matches(inside)
    assert not block.matches(excepted)
    assert not block.matches(straddling)  # one replica outside: the identity is not named
    assert not block.matches(no_addresses)
    assert not block.matches(pod_view(65804, "fd00::7"))  # other family
    # CIDR identities: as the cidr selector
    cidr_ident = IdentityView(CIDR_IDENTITY_FLAG | 1,
                              frozenset({"reserved:world", "cidr:10.0.0.0/25"}))
    assert block.matches(cidr_ident) and cidr.matches(cidr_ident)
    world = IdentityView(ID_WORLD, frozenset())
    assert ipblock_selector("0.0.0.0/0").matches(world)
    assert ipblock_selector("0.0.0.0/0").matches(inside)
    assert not cidr_selector("0.0.0.0/0").matches(inside)


def test_selector_cache_follows_pod_address_labels() -> None:
    block = ipblock_selector("10.0.0.0/24")
    cache = SelectorCache({SERVER: pod_labels("server")})
    assert cache.add_selector(block) == frozenset()
    changed = cache.update({SERVER: pod_labels("server") + ["podip:10.0.0.7"]}, ())
    assert changed == {block} and cache.selections(block) == {SERVER}
    cache.update({SERVER: pod_labels("server") + ["podip:10.0.0.7", "podip:10.9.0.1"]}, ())
    assert cache.selections(block) == frozenset()


def test_pod_address_labels_only_for_identities_touching_a_block() -> None:
    labels = PodAddressLabels()
    addresses = {"10.0.0.7/32": SERVER, "10.0.0.9/32": OTHER, "10.0.1.9/32": OTHER,
                 "10.0.2.1/32": CLIENT}
    assert labels.update(addresses, ()) == set()  # no ipBlock: nobody pays
    blocks = (ipaddress.ip_network("10.0.0.0/24"),)
    assert labels.update(addresses, blocks) == {SERVER, OTHER}
    assert labels.extra(SERVER) == {"podip:10.0.0.7"}
    assert labels.extra(OTHER) == {"podip:10.0.0.9", "podip:10.0.1.9"}  # every address
    assert labels.extra(CLIENT) == frozenset()
    assert labels.update(addresses, blocks) == set()  # nothing changed: nothing reported
    del addresses["10.0.0.9/32"]
    assert labels.update(addresses, blocks) == {OTHER}  # OTHER left the block
    assert labels.extra(OTHER) == frozenset()
    assert labels.update(addresses, ()) == {SERVER}
    assert address_of("10.0.0.0/24") is None and address_of("junk") is None
    assert str(address_of("fd00::1/128")) == "fd00::1"


def test_ipblock_networks_lists_networkpolicy_blocks_only() -> None:
    pols = normalize_all([netpol("np", {"ipBlock": {"cidr": "10.0.0.0/24"}},
                                 {"ipBlock": {"cidr": "192.168.0.0/16"}}),
                          cnp("c", "172.16.0.0/12")], ResolveOptions())
    assert [str(n) for n in ipblock_networks(pols)] == ["10.0.0.0/24", "192.168.0.0/16"]


def ipcache_pod(bus: FakeBus, ip: str, ident: int, pod: str) -> None:
    bus.put(schema.BUCKET_IPCACHE, schema.ipcache_key(f"{ip}/32"), schema.IPCacheRecord(
        prefix=f"{ip}/32", identity=ident, source="pod", cluster="default", cluster_id=1,
        namespace="default", pod=pod))


def client_peers(bus: FakeBus) -> list[int]:
    value = bus.data[schema.BUCKET_POLICY][schema.policy_key(CLIENT)][1]
    return sorted({e.peer for e in schema.decode(value, schema.PolicyMapRecord).entries
                   if e.direction == "egress"})


async def test_service_ipblock_allows_the_pod_inside_and_follows_its_address() -> None:
    """Upstream's "egress to server in CIDR block" and its except clause, at the service:
    the server's identity becomes an egress peer of the client while its IP is inside the
    block, and stops being one when the except names it."""
    bus = FakeBus()
    identity(bus, CLIENT, pod_labels("client"))
    identity(bus, SERVER, pod_labels("server"))
    identity(bus, OTHER, pod_labels("other"))
    ipcache_pod(bus, "10.0.0.7", SERVER, "server")
    ipcache_pod(bus, "10.0.0.9", OTHER, "other")
    ipcache_pod(bus, "10.0.5.1", CLIENT, "client")
    key = resource(bus, netpol("to-server", {"ipBlock": {"cidr": "10.0.0.7/32"}}))
    async with running(bus) as svc:
        await wait_for(lambda: schema.policy_key(CLIENT) in bus.data.get(schema.BUCKET_POLICY, {}))
        await wait_for(lambda: SERVER in client_peers(bus))
        assert OTHER not in client_peers(bus)
        reply = svc.answer_trace(schema.PolicyTraceRequest(
            from_labels=pod_labels("client"), from_identity=CLIENT,
            to_labels=pod_labels("server"), to_identity=SERVER, port=80, proto="TCP"))
        assert reply.verdict == "allow"
        reply = svc.answer_trace(schema.PolicyTraceRequest(
            from_labels=pod_labels("client"), from_identity=CLIENT,
            to_labels=pod_labels("other"), to_identity=OTHER, port=80, proto="TCP"))
        assert reply.verdict == "deny"
        # the server's pod moves out of the block (a new address): no longer a peer
        bus.delete(schema.BUCKET_IPCACHE, schema.ipcache_key("10.0.0.7/32"))
        ipcache_pod(bus, "10.0.9.7", SERVER, "server")
        await wait_for(lambda: SERVER not in client_peers(bus))
        # the except clause: the /24 minus the other pod's address
        resource(bus, netpol("to-server", {"ipBlock": {"cidr": "10.0.0.0/24",
                                                       "except": ["10.0.0.9/32"]}}))
        ipcache_pod(bus, "10.0.0.7", SERVER, "server")
        bus.delete(schema.BUCKET_IPCACHE, schema.ipcache_key("10.0.9.7/32"))
        await wait_for(lambda: SERVER in client_peers(bus))
        assert OTHER not in client_peers(bus)
        # a second peer naming the excepted address allows it (upstream's overlap case)
        resource(bus, netpol("to-server", {"ipBlock": {"cidr": "10.0.0.0/24",
                                                       "except": ["10.0.0.9/32"]}},
                             {"ipBlock": {"cidr": "10.0.0.9/32"}}))
        await wait_for(lambda: OTHER in client_peers(bus))
        # the policy goes: no identity keeps pod-address labels
        bus.delete(schema.BUCKET_RESOURCES, key)
        await wait_for(lambda: not schema.decode(bus.data[schema.BUCKET_POLICY][schema.policy_key(CLIENT)][1],
                                                 schema.PolicyMapRecord).egress_enforced)
        await wait_for(lambda: not any(
            x.startswith("podip:") for v in svc.identities.values() for x in v.labels))


async def test_service_cnp_cidr_keeps_ciliums_meaning() -> None:
    bus = FakeBus()
    identity(bus, CLIENT, pod_labels("client"))
    identity(bus, SERVER, pod_labels("server"))
    ipcache_pod(bus, "10.0.0.7", SERVER, "server")
    resource(bus, cnp("to-net", "10.0.0.0/24"))
    async with running(bus) as svc:
        await wait_for(lambda: schema.policy_key(CLIENT) in bus.data.get(schema.BUCKET_POLICY, {}))
        await wait_for(lambda: svc.counters["passes"] >= 1 and not svc.loop.dirty.is_set())
        assert SERVER not in client_peers(bus)
        assert not any(x.startswith("podip:") for v in svc.identities.values() for x in v.labels)
