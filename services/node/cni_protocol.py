"""The CNI 1.0 protocol, without side effects: requests in, results and errors out.

Invariants:
- A request is built only from the CNI_* environment and the network configuration on
  stdin; any problem raises ``CNIError`` with a spec error code (1 incompatible version,
  4 invalid environment variables, 6 decoding failure, 7 invalid network configuration,
  11 try again later; 100+ are ciliary's own).
- Results and errors serialise to the JSON shapes of the CNI 1.0 spec and carry the
  ``cniVersion`` the runtime asked for.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_IPAM = 101
ERR_INTERFACE = 102
ERR_CHECK_FAILED = 103
ERR_REGISTRATION = 104


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = "1.0.0") -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class NetConf:
    """The part of the network configuration ciliary reads."""

    cni_version: str
    name: str
    cluster: str
    node: str
    node_netns: str  # namespace holding the node side ("" = the caller's own namespace)
    subnet: str
    ipam_dir: str
    nats_url: str = ""
    nats_creds: str = ""  # the node executor's NATS credential file ("" = none)
    host_mode: bool = False  # "mode": "host": the node side is the plugin's own namespace
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str
    conf: NetConf

    @property
    def pod_namespace(self) -> str:
        """``K8S_POD_NAMESPACE``; a named pod without one (podman passes it empty) is in
        ``default``, as in Kubernetes."""
        return self.args.get("K8S_POD_NAMESPACE") or ("default" if self.pod_name else "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


def parse_cni_args(value: str) -> dict[str, str]:
    """``K=V;K2=V2`` as passed in CNI_ARGS."""
    out: dict[str, str] = {}
    for part in filter(None, value.split(";")):
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise CNIError(ERR_INVALID_ENV, f"CNI_ARGS: malformed entry {part!r}")
        out[key] = val
    return out


def parse_netconf(stdin: str) -> NetConf:
    try:
        raw = json.loads(stdin)
    except json.JSONDecodeError as err:
        raise CNIError(ERR_DECODE, f"network configuration is not JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CNIError(ERR_DECODE, "network configuration must be a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(ERR_INVALID_CONFIG, "network configuration: cniVersion is required")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version}; supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    ipam = raw.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise CNIError(ERR_INVALID_CONFIG, "network configuration: ipam must be an object")
    subnet = ipam.get("subnet", "")
    try:
        ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as err:
        raise CNIError(ERR_INVALID_CONFIG, f"network configuration: ipam.subnet {subnet!r}: {err}") from err
    for key in ("cluster", "node"):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            raise CNIError(ERR_INVALID_CONFIG, f"network configuration: {key} is required")
    mode = raw.get("mode", "sandbox")
    if mode not in ("sandbox", "host"):
        raise CNIError(ERR_INVALID_CONFIG, f"network configuration: mode must be 'sandbox' or 'host', got {mode!r}")
    return NetConf(
        cni_version=version,
        name=str(raw.get("name", "ciliary")),
        cluster=raw["cluster"],
        node=raw["node"],
        node_netns=str(raw.get("nodeNetns", "")),
        subnet=subnet,
        ipam_dir=str(ipam.get("dataDir", "/var/lib/ciliary/ipam")),
        nats_url=str(raw.get("natsUrl", "")),
        nats_creds=str(raw.get("natsCreds", "")),
        host_mode=mode == "host",
        raw=raw,
    )


def parse_request(env: Mapping[str, str], stdin: str) -> Request:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(ERR_INVALID_ENV, f"CNI_COMMAND: expected one of {', '.join(COMMANDS)}, got {command!r}")
    if command == "VERSION":
        return Request(command, "", "", "", {}, "", NetConf("1.0.0", "", "", "", "", "", ""))
    missing = [
        name for name in ("CNI_CONTAINERID", "CNI_IFNAME")
        if not env.get(name)
    ]
    if command != "DEL" and not env.get("CNI_NETNS"):
        missing.append("CNI_NETNS")
    if missing:
        raise CNIError(ERR_INVALID_ENV, f"missing environment variables: {', '.join(missing)}")
    conf = parse_netconf(stdin)
    return Request(
        command=command,
        container_id=env["CNI_CONTAINERID"],
        netns=env.get("CNI_NETNS", ""),
        ifname=env["CNI_IFNAME"],
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        path=env.get("CNI_PATH", ""),
        conf=conf,
    )


def version_result(cni_version: str = "1.0.0") -> dict[str, Any]:
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(
    cni_version: str, *, host_ifname: str, host_mac: str, ifname: str, pod_mac: str,
    sandbox: str, ip: str, gateway: str,
) -> dict[str, Any]:
    return {
        "cniVersion": cni_version,
        "interfaces": [
            {"name": host_ifname, "mac": host_mac},
            {"name": ifname, "mac": pod_mac, "sandbox": sandbox},
        ],
        "ips": [{"address": f"{ip}/32", "gateway": gateway, "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
        "dns": {},
    }
