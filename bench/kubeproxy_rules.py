"""kube-proxy's iptables-mode ruleset, regenerated in Python (pure; used by bench/servicelb.py).

Produces the ``iptables-restore`` input that kube-proxy's iptables proxier
(``pkg/proxy/iptables/proxier.go``, ``syncProxyRules``, v1.28+ layout with
MinimizeIPTablesRestore) writes for ClusterIP services with Cluster traffic policy,
so the head-to-head benchmark loads the ruleset a real node would carry:

- ``*filter``: KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-FORWARD, KUBE-NODEPORTS,
  KUBE-PROXY-FIREWALL, KUBE-FIREWALL (localhost nodeports), the KUBE-FORWARD rules
  (ctstate INVALID drop unless conntrack is TCP-liberal, mark accept, RELATED/ESTABLISHED
  accept) and the "block incoming localnet connections" rule.
- ``*nat``: KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ; per service
  port a ``KUBE-SVC-<hash>`` chain, per endpoint a ``KUBE-SEP-<hash>`` chain; the
  ``"<ns>/<name>:<port> cluster IP"`` rule in KUBE-SERVICES, the off-cluster masquerade rule
  (``! -s <cluster CIDR> -j KUBE-MARK-MASQ``), the ``-m statistic --mode random
  --probability`` ladder 1/n, 1/(n-1), ... (``%0.10f``), the last rule unconditional;
  per endpoint the hairpin ``-s <ip> -j KUBE-MARK-MASQ`` and the ``DNAT --to-destination``;
  and last the KUBE-NODEPORTS tail-call.
- Chain names: ``base32(sha256(servicePortName + protocol))[:16]`` (``portProtoHash``) and
  ``base32(sha256(servicePortName + protocol + "ip:port"))[:16]``; protocol lower case.
- The per-endpoint comments (``appendServiceCommentLocked``) are dropped once the node has
  more than 1,000 endpoints (``largeClusterEndpointsThreshold``), as kube-proxy does; the
  KUBE-SERVICES comments stay.
- The masquerade mark is Go's ``fmt.Sprintf("%#08x", 1<<14)`` = ``0x00004000``.

kube-proxy writes this with ``iptables-restore --noflush --counters`` (every declared chain
is flushed and rewritten; built-in chains keep their other rules). The jump rules from the
built-in chains (PREROUTING → KUBE-SERVICES ...) are not part of the restore input;
kube-proxy inserts them one by one with ``iptables -I``; ``bootstrap_input`` renders them as
restore input with ``-I`` so a sandbox can install them in one call.

Partial sync (``changed=``): as with MinimizeIPTablesRestore, KUBE-SERVICES and the static
chains are always written in full, but the SVC/SEP chains only of the changed services.

Differences from kube-proxy, on purpose: services are written in the given order (kube-proxy
iterates a Go map, so a service's position in KUBE-SERVICES is random per sync); only
ClusterIP, Cluster traffic policy, no session affinity (what the benchmark uses).

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

FILTER_TOP_CHAINS = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                     "KUBE-PROXY-FIREWALL")
NAT_TOP_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
KUBELET_FIREWALL_CHAIN = "KUBE-FIREWALL"

# (table, built-in chain, kube-proxy chain, comment, extra args): iptablesJumpChains and
# iptablesKubeletJumpChains, in kube-proxy's order (each is *prepended*, so the last one
# inserted ends up first).
JUMP_CHAINS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", "FORWARD", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", "INPUT", "KUBE-NODEPORTS", "kubernetes health check service ports", ()),
    ("filter", "FORWARD", "KUBE-SERVICES", "kubernetes service portals",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules", ()),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall",
     ("-m", "conntrack", "--ctstate", "NEW")),
    ("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals", ()),
    ("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals", ()),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules", ()),
    ("filter", "INPUT", KUBELET_FIREWALL_CHAIN, "", ()),
    ("filter", "OUTPUT", KUBELET_FIREWALL_CHAIN, "", ()),
)


@dataclass(frozen=True)
class ServicePort:
    """One port of a ClusterIP Service with its ready endpoints (``(ip, port)``, in order)."""

    namespace: str
    name: str
    cluster_ip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]
    port_name: str = ""
    protocol: str = "TCP"

    @property
    def port_name_string(self) -> str:
        """``ServicePortName.String()``: ``ns/name`` plus ``:port`` when the port is named."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def proto(self) -> str:
        return self.protocol.lower()


@dataclass(frozen=True)
class Options:
    cluster_cidr: str | None = "10.0.0.0/8"  # --cluster-cidr (local detector); None = not implemented
    masquerade_all: bool = False
    masquerade_bit: int = 14
    random_fully: bool = True  # iptables >= 1.6.2 has MASQUERADE --random-fully
    localhost_nodeports: bool = True
    conntrack_tcp_liberal: bool = False
    large_cluster_threshold: int = LARGE_CLUSTER_ENDPOINTS_THRESHOLD

    @property
    def masquerade_mark(self) -> str:
        # Go's %#08x pads the digits (not the prefix) to 8: "0x00004000".
        return "0x" + format(1 << self.masquerade_bit, "08x")


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def service_chain(service_port_name: str, protocol: str) -> str:
    """``servicePortPolicyClusterChain``: KUBE-SVC-<16 base32 chars>."""
    return "KUBE-SVC-" + port_proto_hash(service_port_name, protocol)


def endpoint_chain(service_port_name: str, protocol: str, endpoint: str) -> str:
    """``servicePortEndpointChainName``: KUBE-SEP-<16 base32 chars>; endpoint is ``ip:port``."""
    digest = hashlib.sha256((service_port_name + protocol + endpoint).encode()).digest()
    return "KUBE-SEP-" + base64.b32encode(digest).decode()[:16]


def probability(n: int) -> str:
    """kube-proxy's ``proxier.probability``: ``fmt.Sprintf("%0.10f", 1.0/float64(n))``."""
    return "%0.10f" % (1.0 / n)


def chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


def _endpoint_string(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass
class Ruleset:
    """The pieces of one sync; ``text`` is the iptables-restore input."""

    filter_chains: list[str] = field(default_factory=list)
    filter_rules: list[str] = field(default_factory=list)
    nat_chains: list[str] = field(default_factory=list)
    nat_rules: list[str] = field(default_factory=list)
    large_cluster_mode: bool = False

    @property
    def text(self) -> str:
        return "\n".join(["*filter", *self.filter_chains, *self.filter_rules, "COMMIT",
                          "*nat", *self.nat_chains, *self.nat_rules, "COMMIT"]) + "\n"


def build(services: Sequence[ServicePort], opts: Options = Options(), *,
          changed: Iterable[str] | None = None, stale_chains: Iterable[str] = ()) -> Ruleset:
    """The restore input of one ``syncProxyRules``.

    ``changed`` None is a full sync; otherwise a partial sync that rewrites only the SVC/SEP
    chains of the services whose ``port_name_string`` is listed (KUBE-SERVICES is always
    complete). ``stale_chains`` are service chains that exist in the kernel but are no longer
    wanted: kube-proxy flushes and deletes them (``:CHAIN`` + ``-X CHAIN``), on every full sync
    unless in large-cluster mode, where it does so only once per sync period (the caller decides).
    """
    rs = Ruleset()
    mark = opts.masquerade_mark
    changed_set = None if changed is None else set(changed)
    rs.filter_chains += [chain_line(c) for c in FILTER_TOP_CHAINS]
    rs.nat_chains += [chain_line(c) for c in NAT_TOP_CHAINS]
    rs.nat_rules.append(f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN")
    rs.nat_rules.append(f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}")
    rs.nat_rules.append('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
                        " -j MASQUERADE" + (" --random-fully" if opts.random_fully else ""))
    rs.nat_rules.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")
    if opts.localhost_nodeports:
        rs.filter_chains.append(chain_line(KUBELET_FIREWALL_CHAIN))
        rs.filter_rules.append(
            f'-A {KUBELET_FIREWALL_CHAIN} -m comment --comment "block incoming localnet connections"'
            " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")

    total_endpoints = sum(len(s.endpoints) for s in services)
    rs.large_cluster_mode = total_endpoints > opts.large_cluster_threshold

    def comment(text: str) -> str:
        return "" if rs.large_cluster_mode else f" -m comment --comment {text}"

    not_local = ""
    if opts.cluster_cidr:
        not_local = f" ! -s {ipaddress.ip_network(opts.cluster_cidr)}"

    for svc in services:
        name = svc.port_name_string
        proto = svc.proto
        svc_chain = service_chain(name, proto)
        match = f"-m {proto} -p {proto} -d {svc.cluster_ip} --dport {svc.port}"
        cip_comment = f'-m comment --comment "{name} cluster IP"'
        if not svc.endpoints:
            rs.filter_rules.append(
                f'-A KUBE-SERVICES -m comment --comment "{name} has no endpoints" {match} -j REJECT')
            continue
        rs.nat_rules.append(f"-A KUBE-SERVICES {cip_comment} {match} -j {svc_chain}")
        if changed_set is not None and name not in changed_set:
            continue  # partial sync: this service's chains are unchanged
        chains, rules = rs.nat_chains, rs.nat_rules
        if opts.masquerade_all:
            rules.append(f"-A {svc_chain} {cip_comment} {match} -j KUBE-MARK-MASQ")
        elif not_local:
            rules.append(f"-A {svc_chain} {cip_comment} {match}{not_local} -j KUBE-MARK-MASQ")
        chains.append(chain_line(svc_chain))
        eps = [(_endpoint_string(ip, port), ip, endpoint_chain(name, proto, _endpoint_string(ip, port)))
               for ip, port in svc.endpoints]
        n = len(eps)
        for i, (ep, _ip, sep) in enumerate(eps):
            stat = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
            rules.append(f'-A {svc_chain}{comment(chr(34) + name + " -> " + ep + chr(34))}{stat} -j {sep}')
        for ep, ip, sep in eps:
            chains.append(chain_line(sep))
            rules.append(f"-A {sep}{comment(name)} -s {ip} -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep}{comment(name)} -m {proto} -p {proto} -j DNAT --to-destination {ep}")

    for chain in stale_chains:
        rs.nat_chains.append(chain_line(chain))
        rs.nat_rules.append(f"-X {chain}")

    dst = "-m addrtype --dst-type LOCAL" + ("" if opts.localhost_nodeports else " ! -d 127.0.0.0/8")
    rs.nat_rules.append('-A KUBE-SERVICES -m comment --comment '
                        '"kubernetes service nodeports; NOTE: this must be the last rule in this chain" '
                        f"{dst} -j KUBE-NODEPORTS")
    if not opts.conntrack_tcp_liberal:
        rs.filter_rules.append("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
    rs.filter_rules.append('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
                           f"-m mark --mark {mark}/{mark} -j ACCEPT")
    rs.filter_rules.append('-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
                           "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    return rs


def restore_input(services: Sequence[ServicePort], opts: Options = Options(), *,
                  changed: Iterable[str] | None = None, stale_chains: Iterable[str] = ()) -> str:
    return build(services, opts, changed=changed, stale_chains=stale_chains).text


def service_chains(svc: ServicePort) -> list[str]:
    """The nat chains one service owns (its SVC chain and one SEP chain per endpoint)."""
    name, proto = svc.port_name_string, svc.proto
    return [service_chain(name, proto)] + [endpoint_chain(name, proto, _endpoint_string(ip, port))
                                          for ip, port in svc.endpoints]


def bootstrap_input() -> str:
    """Restore input (for ``--noflush``) that creates kube-proxy's top-level chains and the jump
    rules from the built-in chains, as its ``EnsureChain``/``EnsureRule(Prepend)`` calls do."""
    out: list[str] = []
    for table in ("filter", "nat"):
        out.append(f"*{table}")
        targets = []
        for t, _src, dst, _c, _x in JUMP_CHAINS:
            if t == table and dst not in targets:
                targets.append(dst)
        out += [chain_line(c) for c in targets]
        for t, src, dst, cmt, extra in JUMP_CHAINS:
            if t != table:
                continue
            args = list(extra)
            if cmt:
                args += ["-m", "comment", "--comment", f'"{cmt}"']
            out.append(" ".join(["-I", src, "1", *args, "-j", dst]))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def flush_input() -> str:
    """Restore input (without ``--noflush``) that empties both tables and deletes user chains."""
    return "*filter\nCOMMIT\n*nat\nCOMMIT\n"


def counts(text: str) -> dict[str, dict[str, int]]:
    """Chains declared and rules appended per table in a restore input."""
    out: dict[str, dict[str, int]] = {}
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            out.setdefault(table, {"chains": 0, "rules": 0, "deleted_chains": 0})
        elif table is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            out[table]["chains"] += 1
        elif line.startswith(("-A ", "-I ")):
            out[table]["rules"] += 1
        elif line.startswith("-X "):
            out[table]["deleted_chains"] += 1
    return out


def synthetic_services(n: int, *, endpoints_per_service: int = 3, namespace: str = "bench",
                       cluster_ip_base: str = "10.96.0.1", backend_base: str = "10.208.0.1",
                       port: int = 80, target_port: int = 8080,
                       real_backends: dict[int, Sequence[str]] | None = None) -> list[ServicePort]:
    """``n`` services ``svc-00000`` ... with consecutive cluster IPs and distinct backend IPs;
    ``real_backends`` replaces the backend IPs of the given service indices."""
    cip = int(ipaddress.IPv4Address(cluster_ip_base))
    bip = int(ipaddress.IPv4Address(backend_base))
    real_backends = real_backends or {}
    out = []
    for i in range(n):
        ips = real_backends.get(i) or [str(ipaddress.IPv4Address(bip + i * endpoints_per_service + j))
                                       for j in range(endpoints_per_service)]
        out.append(ServicePort(namespace, f"svc-{i:05d}", str(ipaddress.IPv4Address(cip + i)), port,
                               tuple((ip, target_port) for ip in ips), port_name="http"))
    return out


def replace_endpoint(svc: ServicePort, rep: int) -> tuple[ServicePort, str]:
    """``svc`` with its third endpoint replaced by a fresh unrouted address (never probed),
    above the ``10.208.0.1 + 3n`` ones of ``synthetic_services``; ``rep`` picks which."""
    new_ip = f"10.208.{200 + rep // 250}.{rep % 250 + 1}"
    eps = (*svc.endpoints[:2], (new_ip, svc.endpoints[2][1]))
    return ServicePort(svc.namespace, svc.name, svc.cluster_ip, svc.port, eps, svc.port_name,
                       svc.protocol), new_ip


__all__ = [
    "JUMP_CHAINS", "LARGE_CLUSTER_ENDPOINTS_THRESHOLD", "Options", "Ruleset", "ServicePort",
    "bootstrap_input", "build", "chain_line", "counts", "endpoint_chain", "flush_input",
    "port_proto_hash", "probability", "replace_endpoint", "restore_input", "service_chain", "service_chains",
    "synthetic_services",
]
