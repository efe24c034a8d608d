"""``ciliary clustermesh connect|disconnect|status``: joining clusters into a mesh.

Invariants:
- ``connect --to DIR`` (another instance's data dir on this machine) connects both
  directions: each cluster gets a ``mesh-remotes`` entry naming the other. ``connect
  --url URL`` (a remote not on this machine, optionally with ``--credentials``) writes
  only this side; the remote's operator connects the other direction.
- A connect is refused, before anything is written, when the two clusters share a name
  or an id, when their pod CIDRs overlap, or when another connected remote already has
  that name, id or an overlapping pod CIDR; the error names both clusters.
- ``disconnect --from NAME`` removes this side's entry and, when the remote is reachable,
  the remote's entry for this cluster; the mesh services withdraw what they imported.
- ``connect`` waits (``--timeout``) until this cluster's mesh reports the remote
  connected, showing progress; ``status`` has ``-o json``: ``{"cluster", "remotes":
  [{"name", "connected", "last_sync", "nodes", "endpoints", "identities", "services",
  "errors", ...}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from ciliary import clusters, config, natsauth, natscreds, output, schema
from ciliary.bus import BucketMissing, Bus, BusError
from ciliary.cli import common

EXPORT_WAIT = 15.0  # seconds to wait for a cluster's mesh service to export its identity


async def _cluster_info(bus: Bus, where: str, timeout: float) -> schema.MeshCluster:
    """The ``cluster`` record a mesh service exports (name, id, pod CIDR)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = await bus.kv_get_record(schema.BUCKET_MESH_EXPORT, schema.MESH_CLUSTER_KEY, schema.MeshCluster)
        except BucketMissing:  # the cluster's services are still starting
            found = None
        if found is not None:
            return found[0]
        if time.monotonic() >= deadline:
            raise common.CliError(f"{where} exports no cluster record: is its mesh service running? "
                                  "(ciliary status)")
        await asyncio.sleep(0.2)


MeshRecord = TypeVar("MeshRecord", schema.MeshRemote, schema.MeshRemoteStatus)


async def _records_by_name(bus: Bus, bucket: str, prefix: str, record_type: type[MeshRecord]) -> dict[str, MeshRecord]:
    """Every decodable ``record_type`` under ``prefix`` in ``bucket``, by its name."""
    entries = await bus.kv_list(bucket, f"{prefix}.>")
    out = {}
    for entry in entries.values():
        if entry.value:
            try:
                record = schema.decode(entry.value, record_type)
            except schema.msgspec.MsgspecError:
                continue
            out[record.name] = record
    return out


async def _remotes(bus: Bus) -> dict[str, schema.MeshRemote]:
    return await _records_by_name(bus, schema.BUCKET_MESH_REMOTES, schema.MESH_REMOTE_PREFIX, schema.MeshRemote)


def refusals(local: schema.MeshCluster, remote: schema.MeshCluster,
             others: dict[str, schema.MeshRemote]) -> list[str]:
    """Why ``remote`` may not be connected to ``local`` (which already has ``others``)."""
    problems = []
    if local.name == remote.name:
        problems.append(f"both clusters are named {local.name}")
    if local.cluster_id == remote.cluster_id:
        problems.append(f"cluster {local.name} and cluster {remote.name} both have cluster id {local.cluster_id}")
    if local.pod_cidr and remote.pod_cidr and clusters.overlap(local.pod_cidr, remote.pod_cidr):
        problems.append(f"pod CIDR {local.pod_cidr} of cluster {local.name} overlaps pod CIDR "
                        f"{remote.pod_cidr} of cluster {remote.name}")
    for other in others.values():
        if other.name == remote.name:
            continue  # reconnecting the same cluster
        if other.cluster_id == remote.cluster_id:
            problems.append(f"cluster {remote.name} has cluster id {remote.cluster_id}, as connected "
                            f"cluster {other.name} has")
        if other.pod_cidr and remote.pod_cidr and clusters.overlap(other.pod_cidr, remote.pod_cidr):
            problems.append(f"pod CIDR {remote.pod_cidr} of cluster {remote.name} overlaps pod CIDR "
                            f"{other.pod_cidr} of connected cluster {other.name}")
    name_error = clusters.name_error(remote.name)
    if name_error:
        problems.append(name_error)
    return problems


async def _bus(url: str, data_dir: Path | None, *, credentials: str = "") -> Bus:
    """A connection as the CLI user of the instance in ``data_dir`` (or with the credential
    file ``credentials``; neither: no authentication)."""
    if credentials:
        try:
            credential = natscreds.read_credential(credentials)
        except natscreds.CredentialError as err:
            raise common.CliError(f"--credentials: {err}") from None
    else:
        credential = common.cli_credential(data_dir) if data_dir is not None else None
    return await Bus.connect(url, "ciliary-cli-mesh", allow_reconnect=False, credential=credential)


def _follower_credentials(remote_dir: Path | None, given: str) -> str:
    """What the mesh service presents to the remote: the remote instance's read-only
    ``remote`` credential when it runs on this machine, else the one given."""
    if remote_dir is not None:
        path = config.nats_credential_path(remote_dir, natsauth.REMOTE)
        return str(path) if path.exists() else ""
    return str(Path(given).expanduser().resolve()) if given else ""


def _entry(info: schema.MeshCluster, url: str, data_dir: str = "", credentials: str = "") -> schema.MeshRemote:
    return schema.MeshRemote(name=info.name, cluster_id=info.cluster_id, nats_url=url, pod_cidr=info.pod_cidr,
                             data_dir=data_dir, credentials=credentials, connected_at=round(time.time(), 3))


async def _connect(args: argparse.Namespace, local_url: str) -> dict[str, Any]:
    if args.to:
        remote_dir = Path(args.to).expanduser().resolve()
        if remote_dir == args.data_dir_path:
            raise common.CliError(f"--to {remote_dir} is this instance's own data dir")
        remote_url = common.running_instance(remote_dir).nats_url
        where = f"the instance in {remote_dir}"
    else:
        remote_dir, remote_url, where = None, args.url, f"NATS at {args.url}"
    local_bus = await _bus(local_url, args.data_dir_path)
    try:
        try:
            remote_bus = await _bus(remote_url, remote_dir, credentials="" if remote_dir else args.credentials)
        except BusError as err:
            raise common.CliError(f"cannot reach {where}: {err}") from err
        try:
            local = await _cluster_info(local_bus, "this instance", EXPORT_WAIT)
            remote = await _cluster_info(remote_bus, where, EXPORT_WAIT)
            problems = refusals(local, remote, await _remotes(local_bus))
            if remote_dir is not None:
                problems += [p for p in refusals(remote, local, await _remotes(remote_bus)) if p not in problems]
            if problems:
                raise common.CliError(f"cannot connect cluster {local.name} and cluster {remote.name}: "
                                      + "; ".join(problems))
            await local_bus.kv_put(schema.BUCKET_MESH_REMOTES, schema.mesh_key(schema.MESH_REMOTE_PREFIX, remote.name),
                                   _entry(remote, remote_url, str(remote_dir or ""),
                                          _follower_credentials(remote_dir, args.credentials)))
            if remote_dir is not None:
                await remote_bus.kv_put(schema.BUCKET_MESH_REMOTES,
                                        schema.mesh_key(schema.MESH_REMOTE_PREFIX, local.name),
                                        _entry(local, local_url, str(args.data_dir_path),
                                               _follower_credentials(args.data_dir_path, "")))
        finally:
            await remote_bus.close()
        status = await _wait_connected(local_bus, remote.name, args.timeout)
    finally:
        await local_bus.close()
    return {"local": local.name, "remote": remote.name, "both_directions": remote_dir is not None,
            "status": status}


async def _wait_connected(bus: Bus, name: str, timeout: float) -> schema.MeshRemoteStatus | None:
    progress = common.Progress(sys.stderr, enabled=sys.stderr.isatty(), min_interval=0.2)
    deadline = time.monotonic() + timeout
    status = None
    try:
        while time.monotonic() < deadline:
            found = await bus.kv_get_record(schema.BUCKET_MESH, schema.mesh_key(schema.MESH_STATUS_PREFIX, name),
                                            schema.MeshRemoteStatus)
            status = found[0] if found else None
            if status is not None and status.connected:
                return status
            progress.show(f"waiting for the mesh to sync cluster {name}: "
                          + ("; ".join(status.errors) if status and status.errors else "not yet heard"))
            await asyncio.sleep(0.2)
    finally:
        progress.clear()
    return status


def cmd_connect(args: argparse.Namespace) -> int:
    if bool(args.to) == bool(args.url):
        raise common.CliError("name the other cluster with exactly one of --to DIR or --url URL")
    state = common.running_instance(args.data_dir_path)
    result = asyncio.run(_connect(args, state.nats_url))
    status: schema.MeshRemoteStatus | None = result["status"]
    arrow = "<->" if result["both_directions"] else "->"
    if status is None or not status.connected:
        errors = "; ".join(status.errors) if status and status.errors else "nothing heard yet"
        print(f"cluster {result['local']} {arrow} {result['remote']}: connected, not yet synced after "
              f"{args.timeout:g}s ({errors}); see: ciliary clustermesh status")
        return 1
    print(f"cluster {result['local']} {arrow} {result['remote']}: connected; synced {status.nodes} nodes, "
          f"{status.endpoints} endpoints, {status.identities} identities, {status.services} services")
    return 0


async def _disconnect(args: argparse.Namespace, local_url: str) -> list[str]:
    notes = []
    bus = await _bus(local_url, args.data_dir_path)
    try:
        remotes = await _remotes(bus)
        remote = remotes.get(args.from_)
        if remote is None:
            known = ", ".join(sorted(remotes)) or "none"
            raise common.CliError(f"cluster {args.from_} is not connected (connected: {known})")
        local = await _cluster_info(bus, "this instance", 2.0)
        await bus.kv_delete(schema.BUCKET_MESH_REMOTES, schema.mesh_key(schema.MESH_REMOTE_PREFIX, remote.name))
        if remote.data_dir:
            try:
                other = await _bus(remote.nats_url, Path(remote.data_dir))
            except (BusError, common.CliError) as err:
                notes.append(f"cluster {remote.name} is not reachable ({err}); its side stays until it "
                             f"disconnects: ciliary clustermesh disconnect --from {local.name}")
            else:
                try:
                    await other.kv_delete(schema.BUCKET_MESH_REMOTES,
                                          schema.mesh_key(schema.MESH_REMOTE_PREFIX, local.name))
                finally:
                    await other.close()
    finally:
        await bus.close()
    return notes


def cmd_disconnect(args: argparse.Namespace) -> int:
    state = common.running_instance(args.data_dir_path)
    for note in asyncio.run(_disconnect(args, state.nats_url)):
        print(f"note: {note}", file=sys.stderr)
    print(f"cluster {state.cluster} disconnected from {args.from_}")
    return 0


async def _status(bus: Bus) -> tuple[dict[str, schema.MeshRemote], dict[str, schema.MeshRemoteStatus]]:
    remotes = await _remotes(bus)
    statuses = await _records_by_name(bus, schema.BUCKET_MESH, schema.MESH_STATUS_PREFIX, schema.MeshRemoteStatus)
    return remotes, statuses


def status_rows(remotes: dict[str, schema.MeshRemote],
                statuses: dict[str, schema.MeshRemoteStatus]) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(set(remotes) | set(statuses)):
        remote, status = remotes.get(name), statuses.get(name)
        errors = list(status.errors) if status else []
        if remote is None:
            errors.append("disconnected; withdrawing")
        elif status is None:
            errors.append("not yet followed by the mesh service")
        rows.append({
            "name": name,
            "cluster_id": remote.cluster_id if remote else (status.cluster_id if status else 0),
            "nats_url": remote.nats_url if remote else "",
            "connected": bool(remote and status and status.connected),
            "last_sync": status.last_sync if status else 0.0,
            "nodes": status.nodes if status else 0,
            "endpoints": status.endpoints if status else 0,
            "identities": status.identities if status else 0,
            "services": status.services if status else 0,
            "errors": errors,
        })
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    state = common.running_instance(args.data_dir_path)
    remotes, statuses = common.run_with_bus(args, _status)
    rows = status_rows(remotes, statuses)
    if args.output == "json":
        print(output.to_json({"cluster": state.cluster, "cluster_id": state.cluster_id, "remotes": rows}))
        return 0
    print(f"cluster {state.cluster} (id {state.cluster_id}): {len(rows)} remote cluster(s)")
    if rows:
        now = time.time()
        print(output.table(
            ["CLUSTER", "ID", "CONNECTED", "LAST SYNC", "NODES", "ENDPOINTS", "IDENTITIES", "SERVICES", "ERRORS"],
            [[r["name"], r["cluster_id"], "yes" if r["connected"] else "no",
              output.age(now - r["last_sync"]) + " ago" if r["last_sync"] else "never",
              r["nodes"], r["endpoints"], r["identities"], r["services"], "; ".join(r["errors"]) or "-"]
             for r in rows]))
    return 0


def add_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``clustermesh connect|disconnect|status`` to the ``ciliary`` parser."""
    group = subparsers.add_parser("clustermesh", help="connect clusters: global services, identities, policy")
    sub = group.add_subparsers(dest="mesh_command", required=True, parser_class=type(group))
    p = sub.add_parser("connect", parents=[common_parent], help="connect this cluster with another")
    p.add_argument("--to", default="", metavar="DIR", help="the other instance's data dir (both directions)")
    p.add_argument("--url", default="", help="NATS URL of a remote cluster (this direction only)")
    p.add_argument("--credentials", default="", help="NATS credentials file for --url (read access)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the first sync")
    p.set_defaults(func=cmd_connect)
    p = sub.add_parser("disconnect", parents=[common_parent], help="disconnect a connected cluster")
    p.add_argument("--from", dest="from_", required=True, metavar="NAME")
    p.set_defaults(func=cmd_disconnect)
    p = sub.add_parser("status", parents=[common_parent], help="connected clusters and what was synced")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)


