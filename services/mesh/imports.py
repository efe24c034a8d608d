"""What this cluster imports from its remotes: pure, from what each follower heard.

Invariants:
- A remote contributes its exported entries to the ``mesh`` bucket, keyed under its
  name, only while it is usable: configured, its export heard within the TTL, and it
  does not collide with this cluster (same name, same id, overlapping pod CIDRs) nor
  contradict its configuration (the export names another cluster or id). Otherwise only
  its ``status.<name>`` key remains, with the reason among its errors.
- Each entry is checked against the remote it came from: an identity must lie in that
  cluster's identity range and name that cluster; an ipcache entry must name that cluster
  and an identity in its range; services and nodes must name that cluster. An entry that
  fails is left out and counted in the status errors (first few named).
- A remote service whose namespace/name has a ServiceImport here is marked ``imported``
  (the MCS API's way of asking for it; servicelb then uses it like a global Service's).
- The result depends only on the arguments (``now`` and ``ttl`` included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ciliary import clusters, schema

MAX_ERRORS = 5


@dataclass
class RemoteView:
    """What the follower of one remote knows right now."""

    config: schema.MeshRemote
    entries: dict[str, Any] = field(default_factory=dict)  # export key -> decoded record
    heard_at: float = 0.0  # unix time of the last export event (or sync) heard
    reachable: bool = False  # its NATS connection is up
    synced: bool = False  # the export was read in full at least once
    errors: list[str] = field(default_factory=list)  # connection and decoding errors
    # export key -> (entry as heard, imported flag, mesh key, mesh record or None, problem):
    # an entry that is the very object checked before is not checked again
    checked: dict[str, tuple[Any, bool, str, Any, str | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalCluster:
    name: str
    cluster_id: int
    pod_cidr: str


def collisions(local: LocalCluster, remote: schema.MeshRemote | schema.MeshCluster) -> list[str]:
    """Why ``remote`` cannot join ``local`` in a mesh (each naming both), or none."""
    problems = []
    if remote.name == local.name:
        problems.append(f"cluster {remote.name} has the same name as this cluster {local.name}")
    if remote.cluster_id == local.cluster_id:
        problems.append(f"cluster {remote.name} has the same cluster id {remote.cluster_id} "
                        f"as this cluster {local.name}")
    if remote.pod_cidr and local.pod_cidr and clusters.overlap(remote.pod_cidr, local.pod_cidr):
        problems.append(f"pod CIDR {remote.pod_cidr} of cluster {remote.name} overlaps pod CIDR "
                        f"{local.pod_cidr} of this cluster {local.name}")
    return problems


def _entry_error(name: str, cluster_id: int, key: str, value: Any) -> str | None:
    low, high = schema.identity_cluster_range(cluster_id)
    if isinstance(value, schema.IdentityRecord):
        if value.cluster != name or not low <= value.id <= high:
            return f"identity {value.id} of {value.cluster or '?'} is not in cluster {name}'s range"
    elif isinstance(value, schema.IPCacheRecord):
        if value.cluster != name or not low <= value.identity <= high:
            return f"ipcache {value.prefix}: identity {value.identity} of {value.cluster or '?'} is not cluster {name}'s"
    elif isinstance(value, schema.MeshService | schema.MeshNode):
        if value.cluster != name:
            return f"{key} names cluster {value.cluster!r}, not {name}"
    elif isinstance(value, schema.MeshCluster):
        return None
    else:
        return f"{key}: unexpected record"
    return None


def imported_state(local: LocalCluster, remotes: Mapping[str, RemoteView], now: float,
                   ttl: float, service_imports: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
                   ) -> dict[str, Any]:
    """``mesh`` key -> record for every remote (see the module invariants);
    ``service_imports``: ``(namespace, name)`` of this cluster's ServiceImports."""
    out: dict[str, Any] = {}
    for name in sorted(remotes):
        view = remotes[name]
        cfg = view.config
        errors = list(view.errors)
        errors += collisions(local, cfg)
        info = view.entries.get(schema.MESH_CLUSTER_KEY)
        if isinstance(info, schema.MeshCluster):
            if info.name != cfg.name or info.cluster_id != cfg.cluster_id:
                errors.append(f"the export at {cfg.nats_url} is cluster {info.name} (id {info.cluster_id}), "
                              f"connected as {cfg.name} (id {cfg.cluster_id})")
            errors += [e for e in collisions(local, info) if e not in errors]
        elif view.synced:
            errors.append(f"cluster {name} exports nothing (is its mesh service running?)")
        fresh = view.synced and view.heard_at > 0 and now - view.heard_at <= ttl
        if view.synced and not fresh:
            errors.append(f"cluster {name}: nothing heard for {now - view.heard_at:.1f}s (TTL {ttl:g}s); "
                          "its state is withdrawn")
        usable = fresh and not errors[len(view.errors):]
        counts = {schema.MESH_NODE_PREFIX: 0, schema.MESH_IPCACHE_PREFIX: 0,
                  schema.MESH_IDENTITY_PREFIX: 0, schema.MESH_SERVICE_PREFIX: 0}
        bad = 0
        if usable:
            checked = view.checked
            for key, value in view.entries.items():
                if key == schema.MESH_CLUSTER_KEY:
                    continue
                wanted = isinstance(value, schema.MeshService) and (value.namespace, value.name) in service_imports
                held = checked.get(key)
                if held is None or held[0] is not value or held[1] != wanted:
                    problem = _entry_error(name, cfg.cluster_id, key, value)
                    prefix, rest = key.split(".", 1)
                    record = msgspec.structs.replace(value, imported=True) if wanted and not problem else value
                    held = (value, wanted, f"{prefix}.{name}.{rest}", None if problem else record, problem)
                    checked[key] = held
                if held[4]:
                    bad += 1
                    if bad <= MAX_ERRORS:
                        errors.append(held[4])
                    continue
                prefix = key.split(".", 1)[0]
                counts[prefix] = counts.get(prefix, 0) + 1
                out[held[2]] = held[3]
            if len(checked) + (schema.MESH_CLUSTER_KEY in view.entries) > len(view.entries):  # some went
                for key in [k for k in checked if k not in view.entries]:
                    del checked[key]
        if bad > MAX_ERRORS:
            errors.append(f"{bad - MAX_ERRORS} more entries of cluster {name} left out")
        out[schema.mesh_key(schema.MESH_STATUS_PREFIX, name)] = schema.MeshRemoteStatus(
            name=name, cluster_id=cfg.cluster_id, connected=usable and view.reachable,
            last_sync=round(view.heard_at, 3), nodes=counts[schema.MESH_NODE_PREFIX],
            endpoints=counts[schema.MESH_IPCACHE_PREFIX], identities=counts[schema.MESH_IDENTITY_PREFIX],
            services=counts[schema.MESH_SERVICE_PREFIX], errors=errors,
        )
    return out
