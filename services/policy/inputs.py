"""The policy service's inputs: mirrored entries decoded into what resolution needs.

Invariants:
- Pure over the mirrored entries: no bus, no clock. Policies are decoded and normalized
  once per KV revision, pods once per revision; caches drop keys no mirror holds.
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
from ciliary.kv import KVEntry

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
        self._pods: dict[str, tuple[int, str, dict[str, Any]]] = {}  # key -> rev, ref, manifest

    def policies(self) -> tuple[list[NormPolicy], dict[PolicyKey, str], dict[PolicyKey, int]]:
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

    def named_ports(self, ipcache_pods: Iterable[tuple[str, int]]) -> dict[int, dict[str, tuple[int, int]]]:
        """Named container ports per identity, for the pods the ipcache maps to one."""
        pod_identity = dict(ipcache_pods)
        pods = []
        live = self.resources.get("Pod", {})
        for key, entry in live.items():
            cached = self._pods.get(key)
            if cached is None or cached[0] != entry.revision:
                try:
                    assert entry.value is not None
                    record = schema.decode(entry.value, schema.ResourceRecord)
                except (msgspec.DecodeError, AssertionError):
                    continue
                cached = (entry.revision, f"{record.namespace}/{record.name}", record.manifest)
                self._pods[key] = cached
            pods.append((cached[1], cached[2]))
        for stale in [k for k in self._pods if k not in live]:
            del self._pods[stale]
        return named_ports_from_pods(pods, pod_identity)
