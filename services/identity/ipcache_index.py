"""The desired ``ipcache`` kept current by deltas: every claim on a prefix, and its winner.

Pure: no bus, no clock. The identity service feeds it what changed in a pass (pods
re-derived or whose label set got another identity, the node addresses, the policy CIDRs'
identities, the connected clusters' pod entries) and compares only the keys it reports.

Invariants:
- After any sequence of calls, ``desired`` equals ``model.desired_ipcache`` over the
  same current inputs: one record per key, the highest-ranked claim (the ``*_claim``
  functions of ``model``) wins (a seeded property test checks this against the from-scratch function).
- ``take_touched`` returns every key whose winner may have changed since the last call
  (a superset is allowed, a missed key is not), then forgets them.
- A pod claims at most one key: its IP's, with the identity of its label set; a pod with
  no IP or no identity (allocation pending or failed) claims nothing.
- Record objects are built once per claim and kept while the claim is unchanged, so an
  unchanged winner compares equal to what a previous pass wrote without re-encoding.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

from ciliary import schema

from .model import PodInfo, Rank, cidr_claim, node_claim, pod_claim, remote_claim, world_claim


class IpcacheIndex:
    """Claims per ``ipcache`` key and the winning record of each."""

    def __init__(self, cluster: str, cluster_id: int) -> None:
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.claims: dict[str, dict[Hashable, tuple[Rank, schema.IPCacheRecord]]] = {}
        self.desired: dict[str, schema.IPCacheRecord] = {}
        self._touched: set[str] = set()
        self._pods: dict[str, tuple[PodInfo, int, str]] = {}  # pod key -> (info, identity, ipcache key)
        self._by_labels: dict[tuple[str, ...], set[str]] = {}  # label set -> pod keys claiming
        self._nodes: dict[str, list[str]] = {}
        self._cidrs: dict[str, int] = {}
        self._remote: dict[Hashable, tuple[str, schema.IPCacheRecord]] = {}
        self._put(("world",), *world_claim(cluster, cluster_id))

    # ---------------------------------------------------------------- claims

    def _put(self, claimant: Hashable, rank: Rank, record: schema.IPCacheRecord) -> str:
        key = schema.ipcache_key(record.prefix)
        self.claims.setdefault(key, {})[claimant] = (rank, record)
        self._touched.add(key)
        return key

    def _drop(self, claimant: Hashable, key: str) -> None:
        claims = self.claims.get(key)
        if claims is not None and claims.pop(claimant, None) is not None:
            if not claims:
                del self.claims[key]
            self._touched.add(key)

    # ---------------------------------------------------------------- inputs

    def set_pod(self, key: str, info: PodInfo | None, identity: int) -> None:
        """Pod ``key`` is now ``info`` (None: gone or no endpoint) with ``identity``."""
        held = self._pods.get(key)
        if held is not None:
            if info is held[0] and identity == held[1]:
                return
            self._drop(("pod", key), held[2])
            holders = self._by_labels.get(held[0].labels)
            if holders is not None:
                holders.discard(key)
                if not holders:
                    del self._by_labels[held[0].labels]
            del self._pods[key]
        if info is None:
            return
        self._by_labels.setdefault(info.labels, set()).add(key)
        ipkey = ""
        if info.ip and identity:
            ipkey = self._put(("pod", key), *pod_claim(info, identity, self.cluster, self.cluster_id))
        self._pods[key] = (info, identity, ipkey)

    def pods_with(self, labels: tuple[str, ...]) -> Iterable[str]:
        """Keys of the pods (with or without a claim) whose label set is ``labels``."""
        return tuple(self._by_labels.get(labels, ()))

    def pod_keys(self) -> list[str]:
        """Keys of every pod the index holds."""
        return list(self._pods)

    def set_nodes(self, nodes: Mapping[str, list[str]]) -> None:
        if nodes == self._nodes:
            return
        for name, prefixes in self._nodes.items():
            for prefix in prefixes:
                if prefix not in nodes.get(name, ()):
                    self._drop(("node", name, prefix), schema.ipcache_key(prefix))
        for name, prefixes in nodes.items():
            for prefix in prefixes:
                if prefix not in self._nodes.get(name, ()):
                    self._put(("node", name, prefix), *node_claim(name, prefix, self.cluster, self.cluster_id))
        self._nodes = {name: list(prefixes) for name, prefixes in nodes.items()}

    def set_cidrs(self, identities: Mapping[str, int]) -> None:
        if identities == self._cidrs:
            return
        for prefix, ident in self._cidrs.items():
            if identities.get(prefix) != ident:
                self._drop(("cidr", prefix), schema.ipcache_key(prefix))
        for prefix, ident in identities.items():
            if self._cidrs.get(prefix) != ident:
                self._put(("cidr", prefix), *cidr_claim(prefix, ident, self.cluster, self.cluster_id))
        self._cidrs = dict(identities)

    def set_remote(self, records: Iterable[schema.IPCacheRecord]) -> None:
        """The connected clusters' pod entries (each kept as its cluster wrote it)."""
        wanted = {(record.cluster_id, record.cluster, record.prefix): record for record in records}
        for claimant, (key, record) in list(self._remote.items()):
            if wanted.get(claimant[1:]) != record:  # type: ignore[index]
                self._drop(claimant, key)
                del self._remote[claimant]
        for ident, record in wanted.items():
            claimant = ("remote", *ident)
            if claimant not in self._remote:
                self._remote[claimant] = (self._put(claimant, *remote_claim(record)), record)

    # ---------------------------------------------------------------- output

    def take_touched(self) -> set[str]:
        """Settle the winner of every key touched since the last call; return those keys."""
        touched, self._touched = self._touched, set()
        for key in touched:
            claims = self.claims.get(key)
            if not claims:
                self.desired.pop(key, None)
                continue
            self.desired[key] = max(claims.values(), key=_rank)[1]
        return touched


def _rank(claim: tuple[Rank, schema.IPCacheRecord]) -> Rank:
    return claim[0]
