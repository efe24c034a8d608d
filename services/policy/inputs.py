"""The policy service's inputs: mirrored entries decoded into what resolution needs.

Invariants:
- Pure over the mirrored entries: no bus, no clock. Policies are decoded and normalized
  once per KV revision; caches drop keys no mirror holds. While no policy mirror changed
  (its size and newest revision: KV revisions only grow), `policies` returns the very
  objects of its previous call, so a caller can tell "unchanged" by identity. Pods come as events
  (`on_pod`), decoded once per revision; the named-port table is recomputed only when
  a pod's named container ports (or name) or the ipcache's pod identities changed, and
  an unchanged table is returned as the same object.
- Identity and ipcache payloads are decoded leniently (only ``id``/``labels`` and
  ``prefix``/``identity``/``source``/``namespace``/``pod`` are read), so a newer writer's
  extra fields never stop resolution; a payload that does not decode is logged and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import msgspec

from ciliary import schema
from ciliary.kv import KVEntry, entries_version

from .records import named_ports_from_pods
from .resolve import ResolveOptions
from .rules import POLICY_KINDS, NormPolicy, PolicyKey, normalize

log = logging.getLogger(__name__)


def decode_identity(entry: KVEntry) -> tuple[int, frozenset[str]] | None:
    if not entry.key.startswith(schema.IDENTITY_ID_PREFIX) or entry.value is None:
        return None
    try:
        raw = msgspec.msgpack.decode(entry.value)
        return int(raw["id"]), frozenset(str(x) for x in raw.get("labels") or [])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as err:
        log.warning("identities/%s: skipping bad payload: %s", entry.key, err)
        return None


def decode_pod_ip(entry: KVEntry) -> tuple[str, int] | None:
    if entry.value is None:
        return None
    try:
        raw = msgspec.msgpack.decode(entry.value)
        if raw.get("source") != "pod" or not raw.get("pod"):
            return None
        return f"{raw.get('namespace') or 'default'}/{raw['pod']}", int(raw["identity"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        log.warning("ipcache/%s: skipping bad payload: %s", entry.key, err)
        return None


def decode_ipcache_prefix(entry: KVEntry) -> tuple[str, int] | None:
    """``(prefix, identity)`` of any ipcache record (trace resolves addresses with it)."""
    if entry.value is None:
        return None
    try:
        raw = msgspec.msgpack.decode(entry.value)
        return str(raw["prefix"]), int(raw["identity"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        log.warning("ipcache/%s: skipping bad payload: %s", entry.key, err)
        return None


class PolicyInputs:
    """Mirrored policies and pods → normalized policies, status keys, named ports."""

    def __init__(self, options: ResolveOptions) -> None:
        self.options = options
        self.resources: dict[str, dict[str, KVEntry]] = {}
        self._decoded: dict[str, tuple[int, NormPolicy | None, int]] = {}
        # Pod key -> revision, namespace/name, manifest, named container ports (`on_pod`)
        self._pods: dict[str, tuple[int, str, dict[str, Any], tuple[Any, ...]]] = {}
        self._pods_version = 0  # counts changes of what named ports are made of
        self._named: tuple[Any, dict[int, dict[str, tuple[int, int]]]] | None = None
        self._policies: tuple[Any, tuple[list[NormPolicy], dict[PolicyKey, str], dict[PolicyKey, int]]] | None = None

    def policies(self) -> tuple[list[NormPolicy], dict[PolicyKey, str], dict[PolicyKey, int]]:
        """Normalized policies (sorted by KV key within each kind), their KV keys and
        generations; the previous call's objects while no policy mirror changed."""
        version = entries_version(self.resources.get(kind, {}) for kind in POLICY_KINDS)
        if self._policies is not None and self._policies[0] == version:
            return self._policies[1]
        result = self._collect_policies()
        self._policies = (version, result)
        return result

    def _collect_policies(self) -> tuple[list[NormPolicy], dict[PolicyKey, str], dict[PolicyKey, int]]:
        norm: list[NormPolicy] = []
        keys: dict[PolicyKey, str] = {}
        generations: dict[PolicyKey, int] = {}
        for kind in POLICY_KINDS:
            for key, entry in sorted(self.resources.get(kind, {}).items()):
                cached = self._decoded.get(key)
                if cached is None or cached[0] != entry.revision:
                    pol, gen = self._decode_policy(kind, key, entry)
                    cached = (entry.revision, pol, gen)
                    self._decoded[key] = cached
                _, pol, gen = cached
                if pol is None:
                    continue
                norm.append(pol)
                keys[pol.key] = key
                generations[pol.key] = gen
        live = {k for kind in POLICY_KINDS for k in self.resources.get(kind, {})}
        for stale in [k for k in self._decoded if k not in live]:
            del self._decoded[stale]
        return norm, keys, generations

    def _decode_policy(self, kind: str, key: str, entry: KVEntry) -> tuple[NormPolicy | None, int]:
        try:
            assert entry.value is not None
            record = schema.decode(entry.value, schema.ResourceRecord)
        except (msgspec.DecodeError, AssertionError) as err:
            log.warning("resources/%s: skipping bad payload: %s", key, err)
            return None, 0
        pol = normalize(record.manifest, self.options.cluster_name,
                        self.options.local_cluster_only)
        return pol, record.generation

    def on_pod(self, entry: KVEntry) -> bool:
        """Record one Pod event; whether it can change the named-port table (a pod with
        named container ports appeared, went, or changed its name or those ports)."""
        old = self._pods.get(entry.key)
        if entry.deleted or entry.value is None:
            self._pods.pop(entry.key, None)
            changed = old is not None and bool(old[3])
        else:
            if old is not None and old[0] == entry.revision:
                return False
            try:
                record = schema.decode(entry.value, schema.ResourceRecord)
            except msgspec.DecodeError:
                self._pods.pop(entry.key, None)
                return old is not None and bool(old[3])
            ref = f"{record.namespace}/{record.name}"
            ports = pod_named_ports(record.manifest)
            self._pods[entry.key] = (entry.revision, ref, record.manifest, ports)
            changed = bool(ports) if old is None else (old[1], old[3]) != (ref, ports)
        if changed:
            self._pods_version += 1
        return changed

    def named_ports(self, ipcache_pods: Iterable[tuple[str, int]]) -> dict[int, dict[str, tuple[int, int]]]:
        """Named container ports per identity, for the pods the ipcache maps to one
        (recomputed only when a pod's named ports or the ipcache's pods changed)."""
        pod_identity = dict(ipcache_pods)
        version = (self._pods_version, tuple(sorted(pod_identity.items())))
        if self._named is not None and self._named[0] == version:
            return self._named[1]
        pods = [(ref, manifest) for _, ref, manifest, _ in self._pods.values()]
        table = named_ports_from_pods(pods, pod_identity)
        if self._named is not None and self._named[1] == table:
            table = self._named[1]  # unchanged: the same object, so callers can tell by identity
        self._named = (version, table)
        return table


def pod_named_ports(manifest: dict[str, Any]) -> tuple[tuple[Any, Any, Any], ...]:
    """The container ports with a name, as the manifest gives them (what the named-port
    table is made of)."""
    spec = manifest.get("spec") or {}
    return tuple(
        (port.get("name"), port.get("containerPort"), port.get("protocol"))
        for container in spec.get("containers") or [] if isinstance(container, dict)
        for port in container.get("ports") or [] if isinstance(port, dict) and port.get("name")
    )
