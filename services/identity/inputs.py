"""The identity service's inputs: mirrored objects decoded into what identities need.

Holds the mirrored ``resources`` (Pods, Namespaces, Nodes, policies) and ``status``
(Pods, Nodes) entries and turns them into ``PodInfo``s, policy CIDR references, node
addresses and toFQDNs selectors.

Invariants:
- Pure over the mirrored entries: no bus, no clock. Each decode is cached by KV revision
  (a pod's by its own, its status' and its namespace's revision; the CIDRs and toFQDNs
  selectors a policy names by its revision), so a pass re-decodes only what changed;
  caches drop keys no mirror holds any more.
- Pods are re-derived only when touched (`touch_pod`: the Pod or its status changed;
  `touch_all`: a sync or a Namespace change), so a pass costs what changed, not the
  number of pods; the result equals deriving every pod afresh. `changed` names the pods
  whose derived `PodInfo` is another object (or gone) since the previous `update_pods`.
- `label_refs` (label set -> number of pods) is kept by the same deltas and always equals
  counting `pods`; `take_label_changes` names every label set whose count changed since
  it was last called. `pods` is built only when read.
- The policy CIDR references and the toFQDNs selectors are recomputed only when a policy
  mirror changed (its size or its newest revision: KV revisions only grow).
- A policy matters to identities only through the CIDRs and toFQDNs selectors it names:
  `on_policy` tells whether one event changed them.
- A payload that does not decode, or a pod whose identity cannot be derived, is logged
  and left out; it never fails a pass.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from ciliary import schema
from ciliary.kv import KVEntry, entries_version

from . import fqdn
from .labels import LabelFilter
from .model import PodInfo, node_addresses, pod_info, policy_cidrs

log = logging.getLogger(__name__)

POLICY_KINDS = ("NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


class IdentityInputs:
    """Mirrored objects → pods, policy CIDRs, node addresses, toFQDNs selectors."""

    def __init__(self, label_filter: LabelFilter, cluster: str) -> None:
        self.filter = label_filter
        self.cluster = cluster
        self.resources: dict[str, dict[str, KVEntry]] = {}
        self.status: dict[str, dict[str, KVEntry]] = {"Pod": {}, "Node": {}}
        self._pod_list: list[PodInfo] | None = []  # None: to be rebuilt from `_pods`
        self.label_refs: dict[tuple[str, ...], int] = {}
        self._label_changes: set[tuple[str, ...]] = set()
        self._decoded: dict[str, tuple[int, Any]] = {}
        self._pods: dict[str, tuple[tuple[int, int, int], PodInfo | None]] = {}
        self._dirty: set[str] | None = None  # Pod keys touched since compute_pods; None: all
        self.changed: set[str] = set()  # Pod keys whose PodInfo changed in the last compute_pods
        self._decoded_floor = 64  # size of the decode cache after its last sweep
        self._cidr_refs: tuple[Any, dict[str, int]] = ((), {})
        self._fqdn_policies: tuple[tuple[int, int], ...] = ()
        # policy key -> (revision, CIDRs, toFQDNs selectors) it names
        self._facts: dict[str, tuple[int, frozenset[str], frozenset[Any]]] = {}

    def record(self, entry: KVEntry) -> schema.ResourceRecord | None:
        cached = self._decoded.get(entry.key)
        if cached is not None and cached[0] == entry.revision:
            return cached[1]
        try:
            assert entry.value is not None
            record = schema.decode(entry.value, schema.ResourceRecord)
        except (msgspec.DecodeError, AssertionError) as err:
            log.warning("resources/%s: skipping bad payload: %s", entry.key, err)
            record = None
        self._decoded[entry.key] = (entry.revision, record)
        return record

    def status_of(self, kind: str, key: str) -> tuple[dict[str, Any] | None, int]:
        entry = self.status[kind].get(key)
        if entry is None or entry.value is None:
            return None, 0
        cached = self._decoded.get("status:" + key)
        if cached is not None and cached[0] == entry.revision:
            return cached[1], entry.revision
        try:
            status = schema.decode(entry.value, schema.StatusRecord).status
        except msgspec.DecodeError as err:
            log.warning("status/%s: skipping bad payload: %s", key, err)
            status = None
        self._decoded["status:" + key] = (entry.revision, status)
        return status, entry.revision

    def namespace_labels(self) -> dict[str, tuple[int, dict[str, str]]]:
        out: dict[str, tuple[int, dict[str, str]]] = {}
        for entry in list(self.resources.get("Namespace", {}).values()):
            record = self.record(entry)
            if record is None:
                continue
            labels = (record.manifest.get("metadata") or {}).get("labels") or {}
            out[record.name] = (entry.revision, {str(k): str(v) for k, v in labels.items()})
        return out

    def touch_pod(self, key: str) -> None:
        """A Pod or its status changed: the next `compute_pods` re-derives it."""
        if self._dirty is not None:
            self._dirty.add(key)

    def touch_all(self) -> None:
        """Anything may have changed (a sync, a Namespace): re-check every pod."""
        self._dirty = None

    def compute_pods(self) -> list[PodInfo]:
        """Every endpoint, after `update_pods`."""
        self.update_pods()
        return self.pods

    @property
    def pods(self) -> list[PodInfo]:
        """Every endpoint as of the last `update_pods`."""
        if self._pod_list is None:
            self._pod_list = [info for _, info in self._pods.values() if info is not None]
        return self._pod_list

    @property
    def endpoints(self) -> int:
        return sum(self.label_refs.values()) if self._pod_list is None else len(self._pod_list)

    def take_label_changes(self) -> set[tuple[str, ...]]:
        """The label sets whose `label_refs` count changed since the last call."""
        changes, self._label_changes = self._label_changes, set()
        return changes

    def _set_pod(self, key: str, version: tuple[int, int, int], info: PodInfo | None) -> None:
        held = self._pods.get(key)
        self._pods[key] = (version, info)
        self._count(held[1] if held is not None else None, info)

    def _drop_pod(self, key: str) -> PodInfo | None:
        held = self._pods.pop(key, None)
        gone = held[1] if held is not None else None
        self._count(gone, None)
        return gone

    def _count(self, old: PodInfo | None, new: PodInfo | None) -> None:
        if old is new:
            return
        self._pod_list = None
        if old is not None and new is not None and old.labels == new.labels:
            return
        refs = self.label_refs
        if old is not None:
            left = refs[old.labels] - 1
            if left:
                refs[old.labels] = left
            else:
                del refs[old.labels]
            self._label_changes.add(old.labels)
        if new is not None:
            refs[new.labels] = refs.get(new.labels, 0) + 1
            self._label_changes.add(new.labels)

    def update_pods(self) -> None:
        """Re-derive the pods touched since the last call (all of them after `touch_all`,
        and on the first call)."""
        namespaces = self.namespace_labels()
        mirror = self.resources.get("Pod", {})
        changed: set[str] = set()
        if self._dirty is None:
            keys: Any = list(mirror)
            for key in [k for k in self._pods if k not in mirror]:
                if self._drop_pod(key) is not None:
                    changed.add(key)
        else:
            keys = self._dirty
        self._dirty = set()
        for key in keys:
            entry = mirror.get(key)
            if entry is None:
                if self._drop_pod(key) is not None:
                    changed.add(key)
                continue
            status, status_rev = self.status_of("Pod", key)
            ns = key.split(".", 2)[1]
            ns_rev, ns_labels = namespaces.get(ns, (0, {}))
            version = (entry.revision, status_rev, ns_rev)
            cached = self._pods.get(key)
            if cached is not None and cached[0] == version:
                continue
            record = self.record(entry)
            info = None
            if record is not None:
                try:
                    info = pod_info(self.filter, self.cluster, key, record.manifest, entry.revision,
                                    ns_labels, status, status_rev)
                except (AttributeError, TypeError, ValueError) as err:
                    log.warning("resources/%s: cannot derive identity: %s", key, err)
            if info is not None and cached is not None and cached[1] == info:
                info = cached[1]  # an equal derivation keeps its object: nothing changed
            elif info is not None or (cached is not None and cached[1] is not None):
                changed.add(key)
            self._set_pod(key, version, info)
        if len(self._decoded) > 2 * self._decoded_floor:
            live = self._live_keys()
            for key in [k for k in self._decoded if k.split(":", 1)[-1] not in live]:
                self._decoded.pop(key, None)
            self._decoded_floor = max(64, len(self._decoded))
        self.changed = changed

    def pod(self, key: str) -> PodInfo | None:
        """The endpoint Pod ``key`` stands for as of the last `compute_pods`."""
        held = self._pods.get(key)
        return held[1] if held is not None else None

    def _live_keys(self) -> set[str]:
        live = set()
        for kind_state in self.resources.values():
            live.update(kind_state)
        for kind_state in self.status.values():
            live.update(kind_state)
        return live

    def policy_version(self) -> tuple[tuple[int, int], ...]:
        """Changes whenever a policy mirror changed: per kind, its size and newest revision."""
        return entries_version(self.resources.get(kind, {}) for kind in POLICY_KINDS)

    def compute_cidrs(self) -> dict[str, int]:
        """Policy CIDR -> number of policies naming it (a fresh dict the caller may change)."""
        version = self.policy_version()
        if self._cidr_refs[0] != version:
            self._cidr_refs = (version, self._count_cidrs())
        return dict(self._cidr_refs[1])

    def _count_cidrs(self) -> dict[str, int]:
        refs: dict[str, int] = {}
        live: set[str] = set()
        for kind in POLICY_KINDS:
            for entry in list(self.resources.get(kind, {}).values()):
                live.add(entry.key)
                for prefix in self._policy_facts(kind, entry)[1]:
                    refs[prefix] = refs.get(prefix, 0) + 1
        for stale in [k for k in self._facts if k not in live]:
            del self._facts[stale]
        return refs

    def on_policy(self, kind: str, entry: KVEntry) -> bool:
        """Record one policy event; whether it can change identities, i.e. whether the
        CIDRs or toFQDNs selectors it names changed (appeared, went or differ)."""
        old = self._facts.get(entry.key)
        if entry.deleted or entry.value is None:
            self._facts.pop(entry.key, None)
            return old is None or bool(old[1] or old[2])
        new = self._policy_facts(kind, entry)
        if old is None:
            return bool(new[1] or new[2])
        return (old[1], old[2]) != (new[1], new[2])

    def _policy_facts(self, kind: str, entry: KVEntry) -> tuple[int, frozenset[str], frozenset[Any]]:
        """(revision, CIDRs, toFQDNs selectors) of a policy entry, cached by revision."""
        cached = self._facts.get(entry.key)
        if cached is None or cached[0] != entry.revision:
            record = self.record(entry)
            if record is None:
                cached = (entry.revision, frozenset(), frozenset())
            else:
                cached = (entry.revision, frozenset(policy_cidrs(kind, record.manifest)),
                          frozenset(fqdn.policy_selectors(kind, record.manifest)))
            self._facts[entry.key] = cached
        return cached

    def compute_nodes(self) -> dict[str, list[str]]:
        nodes: dict[str, list[str]] = {}
        for key, entry in list(self.resources.get("Node", {}).items()):
            record = self.record(entry)
            if record is None:
                continue
            status, _ = self.status_of("Node", key)
            prefixes = node_addresses(record.manifest, status)
            if prefixes:
                nodes[record.name] = prefixes
        return nodes

    def fqdn_selectors(self, matcher: fqdn.SelectorMatcher) -> frozenset[fqdn.FQDNSelector]:
        """The toFQDNs selectors of every policy (recomputed when a policy changed)."""
        version = self.policy_version()
        if version != self._fqdn_policies:
            found: set[fqdn.FQDNSelector] = set()
            for kind in POLICY_KINDS:
                for entry in list(self.resources.get(kind, {}).values()):
                    record = self.record(entry)
                    if record is not None:
                        found |= fqdn.policy_selectors(kind, record.manifest)
            matcher.set_selectors(found)
            self._fqdn_policies = version
        return matcher.selectors

    def pod_source(self, namespace: str, pod: str) -> tuple[dict[str, str], str] | None:
        """A pod's labels and service account, as its identity is derived from them."""
        entry = self.resources.get("Pod", {}).get(f"Pod.{namespace}.{pod}")
        record = self.record(entry) if entry is not None else None
        if record is None:
            return None
        meta = record.manifest.get("metadata") or {}
        spec = record.manifest.get("spec") or {}
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        return labels, str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
