"""``ciliary-cni``: the CNI 1.0 plugin, invoked by a container runtime (or the pod runner).

Invariants:
- ADD wires the runtime's named network namespace to the node (``netns.wire_endpoint``;
  with ``"mode": "host"`` the node is the namespace the plugin runs in),
  takes an address from host-local IPAM, and registers the endpoint with the node
  executor over NATS when the configuration names ``natsUrl`` (authenticated with the
  credential file ``natsCreds`` names, when it names one); if any step fails,
  what was done is undone and a CNI error is printed — never a half-wired endpoint.
- DEL is idempotent: an unknown container, a vanished namespace or an unreachable
  executor still succeed, and the address is released.
- CHECK verifies links, the address and the IPAM record; it changes nothing.
- Output is exactly one JSON document on stdout; exit code 0 on success, 1 on error.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ciliary import schema
from services.node import netns
from services.node.cni_protocol import (
    ERR_CHECK_FAILED,
    ERR_INTERFACE,
    ERR_INVALID_ENV,
    ERR_IO,
    ERR_IPAM,
    ERR_TRY_AGAIN,
    ERR_UNKNOWN_CONTAINER,
    CNIError,
    Request,
    add_result,
    parse_request,
    version_result,
)
from services.node.ipam import HostLocalIPAM, IPAMError

NETNS_DIRS = ("/var/run/netns", "/run/netns")
REGISTRATION_TIMEOUT = 5.0


def netns_name(path: str) -> str:
    """The name of a namespace given as ``/var/run/netns/<name>`` (or ``/run/netns``)."""
    parent, name = os.path.split(path.rstrip("/"))
    if parent not in NETNS_DIRS or not name:
        raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS must be a named namespace under /var/run/netns, got {path!r}")
    return name


def _ipam(req: Request) -> HostLocalIPAM:
    return HostLocalIPAM(Path(req.conf.ipam_dir) / req.conf.cluster / req.conf.node, req.conf.subnet)


def _host_ifname(req: Request) -> str:
    return netns.link_name(req.conf.cluster, req.conf.node, req.container_id)


async def _register(req: Request, registration: schema.EndpointRegistration) -> schema.EndpointReply:
    from ciliary import natscreds
    from ciliary.bus import Bus

    credential = natscreds.read_credential(req.conf.nats_creds) if req.conf.nats_creds else None
    bus = await Bus.connect(req.conf.nats_url, "ciliary-cni", allow_reconnect=False, credential=credential)
    try:
        subject = schema.SUBJECT_NODE_ENDPOINT.format(cluster=req.conf.cluster, node=req.conf.node)
        return await bus.request(subject, registration, schema.EndpointReply, timeout=REGISTRATION_TIMEOUT)
    finally:
        await bus.close()


def register(req: Request, registration: schema.EndpointRegistration) -> schema.EndpointReply:
    if not req.conf.nats_url:
        return schema.EndpointReply(ok=True)
    try:
        return asyncio.run(_register(req, registration))
    except Exception as err:  # unreachable executor, timeout, bad reply
        return schema.EndpointReply(ok=False, error=str(err))


def cmd_add(req: Request) -> dict[str, Any]:
    pns = netns_name(req.netns)
    if not os.path.exists(req.netns):
        raise CNIError(ERR_INVALID_ENV, f"CNI_NETNS {req.netns} does not exist")
    ipam = _ipam(req)
    try:
        ip = ipam.allocate(req.container_id, req.ifname)
    except IPAMError as err:
        raise CNIError(ERR_IPAM, f"IPAM: {err}") from err
    host_if = _host_ifname(req)
    try:
        ep = netns.wire_endpoint(req.conf.cluster, req.conf.node, req.container_id, pns, host_if, req.ifname, ip,
                                 host=req.conf.host_mode)
    except Exception as err:
        netns.unwire_endpoint(req.conf.cluster, req.conf.node, host_if, host=req.conf.host_mode)
        ipam.release(req.container_id)
        raise CNIError(ERR_INTERFACE, f"wiring {req.ifname} in {pns}: {err}") from err
    reply = register(req, schema.EndpointRegistration(
        op="add", container_id=req.container_id, pod_namespace=req.pod_namespace,
        pod_name=req.pod_name, netns=pns, ifname=req.ifname, host_ifname=host_if,
        host_ifindex=ep.host_ifindex, ip=ip, mac=ep.pod_mac,
    ))
    if not reply.ok:
        netns.unwire_endpoint(req.conf.cluster, req.conf.node, host_if, host=req.conf.host_mode)
        ipam.release(req.container_id)
        raise CNIError(ERR_TRY_AGAIN, f"node executor did not accept the endpoint: {reply.error}")
    return add_result(
        req.conf.cni_version, host_ifname=host_if, host_mac=ep.host_mac, ifname=req.ifname,
        pod_mac=ep.pod_mac, sandbox=req.netns, ip=ip, gateway=netns.GATEWAY_IP,
    )


def cmd_del(req: Request) -> None:
    ipam = _ipam(req)
    ip = ipam.lookup(req.container_id) or ""
    register(req, schema.EndpointRegistration(
        op="del", container_id=req.container_id, pod_namespace=req.pod_namespace,
        pod_name=req.pod_name, ifname=req.ifname, host_ifname=_host_ifname(req), ip=ip,
    ))
    netns.unwire_endpoint(req.conf.cluster, req.conf.node, _host_ifname(req), host=req.conf.host_mode)
    ipam.release(req.container_id)


def cmd_check(req: Request) -> None:
    pns = netns_name(req.netns)
    ip = _ipam(req).lookup(req.container_id)
    if ip is None:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"container {req.container_id} has no address")
    links = netns.endpoint_links(req.conf.cluster, req.conf.node, _host_ifname(req), pns, req.ifname,
                                 host=req.conf.host_mode)
    if links is None:
        raise CNIError(ERR_CHECK_FAILED, f"interfaces of container {req.container_id} are missing")
    if ip not in links["addresses"]:
        raise CNIError(ERR_CHECK_FAILED, f"{req.ifname} in {pns} lacks address {ip}")


def run(env: Mapping[str, str], stdin: str) -> tuple[int, dict[str, Any] | None]:
    """Execute one CNI call; returns (exit code, JSON document to print or None)."""
    version = "1.0.0"
    try:
        try:
            version = json.loads(stdin).get("cniVersion", version) if stdin.strip() else version
        except (json.JSONDecodeError, AttributeError):
            pass
        req = parse_request(env, stdin)
        if req.command == "VERSION":
            return 0, version_result(version if isinstance(version, str) else "1.0.0")
        if req.command == "ADD":
            return 0, cmd_add(req)
        if req.command == "DEL":
            cmd_del(req)
            return 0, None
        cmd_check(req)
        return 0, None
    except CNIError as err:
        return 1, err.to_json(version if isinstance(version, str) else "1.0.0")
    except OSError as err:
        return 1, CNIError(ERR_IO, f"I/O failure: {err}").to_json()
    except Exception as err:  # never a traceback on the runtime's stdout
        return 1, CNIError(ERR_TRY_AGAIN, f"{type(err).__name__}: {err}").to_json()


def main() -> None:
    try:
        stdin = sys.stdin.read()
    except OSError:
        stdin = ""
    code, document = run(os.environ, stdin)
    if document is not None:
        sys.stdout.write(json.dumps(document) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
