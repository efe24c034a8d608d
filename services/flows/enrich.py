"""The cluster view flows are enriched from, kept current from KV entries (pure).

Invariants:
- ``EnrichmentState`` implements ``decode.Lookups``; it is fed decoded records (or
  ``None`` for a deleted key) and never talks to the bus itself.
- IP lookups prefer the ipcache (exact address, then the longest matching prefix) and
  fall back to Pods' status IPs; pod names, namespaces, labels and workloads fill in
  what the ipcache entry lacks. An IP neither knows is left to the decoder (world).
- ``endpoint_cache`` (used by the decoder) is emptied by every ``apply_*`` call, so a
  cached endpoint never outlives the state it was computed from.
- Identity labels come from the ``identities`` bucket; a pod-derived entry carries the
  pod's own labels (``k8s:`` source plus the namespace label) for when identities are absent.
- Policies behind a ``rule_ref`` come from bucket ``policy``: each ``id.<identity>``
  record's ``rules`` table (rule_ref -> ``Kind/[namespace/]name spec[i].section[j]``,
  written by the policy service). A ref is resolved in the table of the identity whose
  entry decided, then in any table (a record may be replaced meanwhile); an unknown ref
  resolves to no policy. The revision reported is the KV revision of that record.
- With a ``EndpointNameCache``, an address a Pod no longer has (deleted Pod, changed status) is
  forgotten there too, so a pod that reuses it does not inherit the old pod's names.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ciliary import schema

from .decode import IPInfo
from .names import EndpointNameCache


def pod_labels(namespace: str, labels: dict[str, str]) -> tuple[str, ...]:
    out = [f"k8s:{k}={v}" for k, v in labels.items()]
    out.append(f"k8s:io.kubernetes.pod.namespace={namespace}")
    return tuple(sorted(out))


def pod_workloads(manifest: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Hubble-style workloads: a ReplicaSet owner with the template hash becomes its Deployment."""
    meta = manifest.get("metadata") or {}
    labels = meta.get("labels") or {}
    out: list[tuple[str, str]] = []
    for owner in meta.get("ownerReferences") or []:
        kind, name = str(owner.get("kind", "")), str(owner.get("name", ""))
        if not kind or not name:
            continue
        pth = labels.get("pod-template-hash")
        if kind == "ReplicaSet" and pth and name.endswith("-" + pth):
            kind, name = "Deployment", name[: -len(pth) - 1]
        out.append((name, kind))
    return tuple(out)


POLICY_LABEL_DERIVED_FROM = "k8s:io.cilium.k8s.policy.derived-from"
POLICY_LABEL_NAME = "k8s:io.cilium.k8s.policy.name"
POLICY_LABEL_NAMESPACE = "k8s:io.cilium.k8s.policy.namespace"


def flow_policy(rule: str, revision: int = 0) -> schema.FlowPolicy | None:
    """Hubble's ``flow.Policy`` for a rule text of a ``policy`` record
    (``CiliumNetworkPolicy/default/payments-ingress spec[0].ingress[0]``); ``None`` for
    text that names no policy object (``ingress-default-allow``, ``allow-localhost``)."""
    obj = rule.split(" ", 1)[0]
    parts = obj.split("/")
    if len(parts) == 3:
        kind, namespace, name = parts
    elif len(parts) == 2:
        kind, namespace, name = parts[0], "", parts[1]
    else:
        return None
    if not kind or not name:
        return None
    labels = [f"{POLICY_LABEL_DERIVED_FROM}={kind}", f"{POLICY_LABEL_NAME}={name}"]
    if namespace:
        labels.append(f"{POLICY_LABEL_NAMESPACE}={namespace}")
    return schema.FlowPolicy(name=name, namespace=namespace, labels=labels,
                             revision=str(revision) if revision else "", kind=kind)


class EnrichmentState:
    def __init__(self, cluster: str = schema.DEFAULT_CLUSTER_NAME, names: EndpointNameCache | None = None) -> None:
        self.cluster = cluster
        self.names = names
        self.ipcache: dict[str, schema.IPCacheRecord] = {}  # prefix -> record
        self._exact: dict[str, schema.IPCacheRecord] = {}
        self._prefixes: dict[str, tuple[Any, schema.IPCacheRecord]] = {}
        self.identities: dict[int, list[str]] = {}
        self.frontends: dict[str, tuple[tuple[str, int, str], tuple[str, str]]] = {}
        self._frontend_index: dict[tuple[str, int, str], tuple[str, str]] = {}
        self.pod_manifests: dict[str, dict[str, Any]] = {}  # "ns/name" -> manifest
        self.pod_status: dict[str, dict[str, Any]] = {}  # "ns/name" -> status
        self._pod_ips: dict[str, str] = {}  # ip -> "ns/name"
        # decode._endpoint memoises endpoints here; every change below clears it
        self.endpoint_cache: dict[tuple[str, int, int, str], Any] = {}
        self.policy_rules: dict[int, tuple[dict[int, str], int]] = {}  # identity -> (rules, revision)
        self._any_rule: dict[int, tuple[str, int]] | None = None  # rule_ref -> (text, revision)
        self._policy_cache: dict[tuple[int, int], list[schema.FlowPolicy]] = {}

    # ------------------------------------------------------------ feeding

    def apply_ipcache(self, key: str, record: schema.IPCacheRecord | None) -> None:
        self.endpoint_cache.clear()
        prefix = schema.ipcache_prefix(key) if record is None else record.prefix
        old = self.ipcache.pop(prefix, None)
        if old is not None:
            self._exact.pop(old.prefix.split("/")[0], None)
            self._prefixes.pop(old.prefix, None)
        if record is None:
            return
        self.ipcache[prefix] = record
        try:
            net = ipaddress.ip_network(record.prefix, strict=False)
        except ValueError:
            return
        if net.prefixlen == net.max_prefixlen:
            self._exact[str(net.network_address)] = record
        else:
            self._prefixes[record.prefix] = (net, record)

    def apply_identity(self, key: str, record: schema.IdentityRecord | None) -> None:
        self.endpoint_cache.clear()
        if not key.startswith(schema.IDENTITY_ID_PREFIX):
            return
        try:
            ident = int(key[len(schema.IDENTITY_ID_PREFIX):])
        except ValueError:
            return
        if record is None:
            self.identities.pop(ident, None)
        else:
            self.identities[ident] = sorted(record.labels)

    def apply_frontend(self, key: str, record: schema.LBFrontend | None) -> None:
        self.endpoint_cache.clear()
        old = self.frontends.pop(key, None)
        if old is not None:
            self._frontend_index.pop(old[0], None)
        if record is None:
            return
        fe = (record.address, record.port, record.proto)
        svc = (record.namespace, record.name)
        self.frontends[key] = (fe, svc)
        self._frontend_index[fe] = svc

    def apply_policy(self, key: str, record: schema.PolicyMapHead | schema.PolicyMapRecord | None,
                     revision: int = 0) -> None:
        """A ``policy`` bucket entry (``id.<identity>``); ``revision`` is its KV revision."""
        if not key.startswith(schema.POLICY_ID_PREFIX):
            return
        try:
            ident = int(key[len(schema.POLICY_ID_PREFIX):])
        except ValueError:
            return
        self._any_rule = None
        self._policy_cache.clear()
        if record is None:
            self.policy_rules.pop(ident, None)
        else:
            self.policy_rules[ident] = (dict(record.rules), revision)

    def apply_pod(self, ref: str, manifest: dict[str, Any] | None) -> None:
        self.endpoint_cache.clear()
        if manifest is None:
            self.pod_manifests.pop(ref, None)
        else:
            self.pod_manifests[ref] = manifest
        self._reindex_pod(ref)

    def apply_pod_status(self, ref: str, status: dict[str, Any] | None) -> None:
        self.endpoint_cache.clear()
        if status is None:
            self.pod_status.pop(ref, None)
        else:
            self.pod_status[ref] = status
        self._reindex_pod(ref)

    def _reindex_pod(self, ref: str) -> None:
        old = [ip for ip, owner in self._pod_ips.items() if owner == ref]
        for ip in old:
            del self._pod_ips[ip]
        self._index_pod(ref)
        if self.names is not None:
            for ip in old:
                if ip not in self._pod_ips:
                    self.names.forget_ip(ip)

    def _index_pod(self, ref: str) -> None:
        manifest = self.pod_manifests.get(ref) or {}
        status = self.pod_status.get(ref) or manifest.get("status") or {}
        if (manifest.get("spec") or {}).get("hostNetwork"):
            return
        ips = [status.get("podIP")] + [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)]
        for ip in ips:
            if isinstance(ip, str) and ip:
                self._pod_ips[ip] = ref

    # ------------------------------------------------------------ Lookups

    def _pod_info(self, ref: str, identity: int = 0) -> IPInfo:
        namespace, _, name = ref.partition("/")
        manifest = self.pod_manifests.get(ref) or {}
        meta = manifest.get("metadata") or {}
        return IPInfo(
            identity=identity,
            namespace=namespace,
            pod=name,
            node=(manifest.get("spec") or {}).get("nodeName", ""),
            cluster=self.cluster,
            labels=pod_labels(namespace, meta.get("labels") or {}),
            workloads=pod_workloads(manifest),
        )

    def ip(self, address: str) -> IPInfo | None:
        record = self._exact.get(address)
        if record is None and self._prefixes:
            try:
                addr = ipaddress.ip_address(address)
            except ValueError:
                addr = None
            best = -1
            if addr is not None:
                for net, rec in self._prefixes.values():
                    if net.version == addr.version and net.prefixlen > best and addr in net:
                        best, record = net.prefixlen, rec
        pod_ref = self._pod_ips.get(address)
        if record is None:
            return self._pod_info(pod_ref) if pod_ref else None
        if record.pod and record.namespace:
            ref = f"{record.namespace}/{record.pod}"
            info = self._pod_info(ref, record.identity) if ref in self.pod_manifests else None
            return IPInfo(
                identity=record.identity,
                namespace=record.namespace,
                pod=record.pod,
                node=record.node,
                cluster=record.cluster,
                labels=info.labels if info else (),
                workloads=info.workloads if info else (),
            )
        if pod_ref is not None and record.source in ("world", "cidr"):
            return self._pod_info(pod_ref)
        if record.source in ("world", "cidr"):
            return IPInfo(identity=record.identity)
        return IPInfo(identity=record.identity, node=record.node, cluster=record.cluster)

    def labels(self, identity: int) -> list[str] | None:
        return self.identities.get(identity)

    def frontend(self, address: str, port: int, proto: str) -> tuple[str, str] | None:
        return self._frontend_index.get((address, port, proto))

    def policy(self, identity: int, rule_ref: int) -> list[schema.FlowPolicy]:
        key = (identity, rule_ref)
        hit = self._policy_cache.get(key)
        if hit is not None:
            return hit
        text, revision = "", 0
        own = self.policy_rules.get(identity)
        if own is not None and rule_ref in own[0]:
            text, revision = own[0][rule_ref], own[1]
        elif rule_ref:
            if self._any_rule is None:
                self._any_rule = {ref: (t, rev) for rules, rev in self.policy_rules.values()
                                  for ref, t in rules.items()}
            text, revision = self._any_rule.get(rule_ref, ("", 0))
        pol = flow_policy(text, revision) if text else None
        out = [pol] if pol is not None else []
        if len(self._policy_cache) >= 65536:
            self._policy_cache.clear()
        self._policy_cache[key] = out
        return out
