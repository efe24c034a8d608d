"""Loader and renderer for the table-driven policy cases in tests/unit/data/policy/.

A case file is YAML: ``cases:`` is a list of
``{name, doc, policies, options?, identities?, named_ports?, expect, flows?, status?,
counters?}``. ``expect`` maps each local identity (by name) that must be in the result to
``{enforced: [directions], entries: [rendered entries], audit?: bool, error?: substring}``;
no other identity may be in the result. Entries render as
``<direction> <peer|*> <port[-end]>/<PROTO> <allow|deny>[ audit] <rule>``, rules as
``CNP/<ns>/<name>[@<spec>] <section>[<index>]`` (``CCNP/<name>``, ``NP/<ns>/<name>``).
``flows`` are ``"<from|IP> -> <to|IP> <port>/<PROTO> <allow|deny>"``; each is checked through
`trace` and through `lookup` on the resolved entries, which must agree.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ciliary.resources import decode
from services.policy.resolve import (
    IdentityPolicy,
    PolicyEntry,
    Resolution,
    ResolveOptions,
    lookup,
    resolve_policy,
)
from services.policy.rules import PROTO_NAMES, PROTOCOLS, PolicyKey, RuleRef
from services.policy.selectors import ID_WORLD, IdentityView
from services.policy.trace import TraceResult, trace

DATA = Path(__file__).parent / "data" / "policy"
ABBR = {"CiliumNetworkPolicy": "CNP", "CiliumClusterwideNetworkPolicy": "CCNP",
        "NetworkPolicy": "NP"}


@dataclass
class Universe:
    identities: dict[int, frozenset[str]]
    names: dict[str, int]
    named_ports: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)

    def name(self, ident: int) -> str:
        if ident == 0:
            return "*"
        for name, value in self.names.items():
            if value == ident:
                return name
        return str(ident)


def load_universe(raw: dict[str, Any] | None = None) -> Universe:
    raw = raw or yaml.safe_load((DATA / "identities.yaml").read_text())
    namespaces = raw.get("namespaces", {})
    identities: dict[int, frozenset[str]] = {}
    names: dict[str, int] = {}
    for name, spec in raw["identities"].items():
        labels = set(spec.get("raw", []))
        if "ns" in spec:
            ns = spec["ns"]
            labels.add(f"k8s:io.kubernetes.pod.namespace={ns}")
            labels.add(f"k8s:io.cilium.k8s.policy.cluster={spec.get('cluster', 'default')}")
            labels.add(f"k8s:io.cilium.k8s.policy.serviceaccount="
                       f"{spec.get('serviceaccount', 'default')}")
            ns_labels = {"kubernetes.io/metadata.name": ns, **namespaces.get(ns, {})}
            for k, v in ns_labels.items():
                labels.add(f"k8s:io.cilium.k8s.namespace.labels.{k}={v}")
            for k, v in spec.get("labels", {}).items():
                labels.add(f"k8s:{k}={v}")
        identities[spec["id"]] = frozenset(labels)
        names[name] = spec["id"]
    named_ports = {
        names[n]: {p: (int(v[0]), PROTOCOLS[v[1]]) for p, v in ports.items()}
        for n, ports in raw.get("named_ports", {}).items()
    }
    return Universe(identities, names, named_ports)


def render_ref(ref: RuleRef) -> str:
    if not ref.kind:
        return ref.section
    spec = f"@{ref.spec}" if ref.spec else ""
    where = f"{ref.namespace}/{ref.name}" if ref.namespace else ref.name
    return f"{ABBR[ref.kind]}/{where}{spec} {ref.section}[{ref.index}]"


def render_key(key: PolicyKey) -> str:
    where = f"{key.namespace}/{key.name}" if key.namespace else key.name
    return f"{ABBR[key.kind]}/{where}"


def render_entry(e: PolicyEntry, u: Universe) -> str:
    port = f"{e.port}-{e.end_port}" if e.end_port else str(e.port)
    audit = " audit" if e.audit else ""
    return (f"{e.direction} {u.name(e.peer)} {port}/{PROTO_NAMES[e.proto]} "
            f"{e.verdict}{audit} {render_ref(e.rule)}")


def manifests(case: dict[str, Any]) -> list[Any]:
    out = []
    for doc in case.get("policies", []):
        meta = doc.setdefault("metadata", {})
        if doc["kind"] != "CiliumClusterwideNetworkPolicy":
            meta.setdefault("namespace", "default")
        out.append(decode(doc["kind"], doc))
    return out


def options(case: dict[str, Any], u: Universe) -> ResolveOptions:
    """The case's options; ``allow_localhost`` defaults to off here so that expectations
    show only what the rules produce (cases about it turn it on)."""
    raw = {"allow_localhost": False, **case.get("options", {})}
    if "audit_identities" in raw:
        raw["audit_identities"] = frozenset(u.names[n] for n in raw["audit_identities"])
    return ResolveOptions(**raw)


def case_universe(case: dict[str, Any]) -> Universe:
    u = load_universe()
    for name, ports in case.get("named_ports", {}).items():
        u.named_ports[u.names[name]] = {p: (int(v[0]), PROTOCOLS[v[1]])
                                        for p, v in ports.items()}
    return u


def run_resolution(case: dict[str, Any]) -> tuple[Universe, list[Any], Resolution]:
    u = case_universe(case)
    pols = manifests(case)
    res = resolve_policy(pols, u.identities, u.named_ports, options(case, u))
    return u, pols, res


def identity_for_ip(u: Universe, ip: str) -> int:
    """The identity the ipcache would give `ip`: its most specific CIDR identity, else world."""
    addr = ipaddress.ip_network(ip, strict=False)
    best: tuple[int, int] | None = None
    for ident, labels in u.identities.items():
        prefix = IdentityView(ident, labels).prefix
        if prefix is not None and prefix.version == addr.version and addr.subnet_of(prefix):  # type: ignore[arg-type]
            if best is None or prefix.prefixlen > best[0]:
                best = (prefix.prefixlen, ident)
    return best[1] if best else ID_WORLD


@dataclass
class FlowCheck:
    text: str
    expected: str
    traced: TraceResult
    looked_up: str


def check_flow(flow: str, u: Universe, pols: list[Any], res: Resolution,
               opts: ResolveOptions) -> FlowCheck:
    lhs, _, rest = flow.partition("->")
    src = lhs.strip()
    dst, portproto, expected = rest.split()
    port_s, _, proto_s = portproto.partition("/")
    port, proto = int(port_s), PROTOCOLS[proto_s]
    src_ip = src[0].isdigit() or ":" in src
    sid = identity_for_ip(u, src) if src_ip else u.names[src]
    is_ip = dst[0].isdigit() or ":" in dst
    did = identity_for_ip(u, dst) if is_ip else u.names[dst]
    every: dict[str, set[tuple[int, int]]] = {}
    for ports in u.named_ports.values():
        for name, value in ports.items():
            every.setdefault(name, set()).add(value)
    traced = trace(
        src if src_ip else u.identities[sid], dst if is_ip else u.identities[did], port,
        proto, pols, from_identity=None if src_ip else sid, to_identity=None if is_ip else did,
        named_ports=u.named_ports.get(did, {}), all_named_ports=every, options=opts,
    )
    egress = _verdict(res.identities.get(sid), did, port, proto, "egress")
    ingress = _verdict(res.identities.get(did), sid, port, proto, "ingress")
    looked_up = "allow" if egress and ingress else "deny"
    return FlowCheck(flow, expected, traced, looked_up)


def _verdict(policy: IdentityPolicy | None, peer: int, port: int, proto: int,
             direction: str) -> bool:
    verdict, entries = lookup(policy, peer, port, proto, direction)
    if verdict == "allow":
        return True
    return bool(policy and policy.audit)


def load_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in sorted(DATA.glob("cases_*.yaml")):
        data = yaml.safe_load(path.read_text())
        for case in data["cases"]:
            cases.append((f"{path.stem}:{case['name']}", case))
    return cases


def test_universe_expands_pod_labels() -> None:
    u = load_universe()
    web = u.identities[u.names["web"]]
    assert "k8s:app=web" in web
    assert "k8s:io.kubernetes.pod.namespace=default" in web
    assert "k8s:io.cilium.k8s.namespace.labels.team=shop" in web
    assert "k8s:io.cilium.k8s.policy.cluster=default" in web
    assert u.named_ports[u.names["web"]]["http"] == (8080, 6)


def test_identity_for_ip_picks_most_specific_prefix() -> None:
    u = load_universe()
    assert identity_for_ip(u, "10.97.0.1") == u.names["net-10-96"]
    assert identity_for_ip(u, "10.1.0.1") == u.names["net-10"]
    assert identity_for_ip(u, "8.8.8.8") == ID_WORLD
