"""Cluster names, cluster ids and pod CIDRs: what lets clusters run side by side and mesh.

Pure functions (no I/O). Invariants:
- A cluster name follows Cilium's rule: 1..32 characters of ``[a-z0-9-]``, starting and
  ending with a letter or digit. The embedded sandbox names its network namespaces
  ``ciliary-<cluster>-<node>`` and finds a cluster's namespaces by that prefix, so a
  cluster run by ``ciliary up`` on this machine needs a name without ``-`` of at most 16
  characters (``sandbox_name_error``); a remote cluster may use any valid name.
- A cluster id is 1..255 (Cilium's ClusterMesh range; it fills identity bits 16-23 and the
  third octet of the node underlay ``172.30.<id>.<n>``).
- The default pod CIDR of cluster ``id`` is ``10.<id>.0.0/16`` (``default_pod_cidr``), so
  clusters with distinct ids never overlap; a pod CIDR is IPv4 and large enough for a /24
  per node plus the unused first /24.
- Every error message names the value and the rule it breaks.
"""

from __future__ import annotations

import ipaddress
import re

NAME_MAX = 32
ID_MIN = 1
ID_MAX = 255
NODE_PREFIXLEN = 24  # every node gets a /24 of the pod CIDR

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SANDBOX_RE = re.compile(r"^[a-z0-9]{1,16}$")


def name_error(name: str) -> str | None:
    """Why ``name`` is not a valid cluster name, or None."""
    if not name:
        return "cluster name must not be empty"
    if len(name) > NAME_MAX:
        return f"cluster name {name!r} is {len(name)} characters; at most {NAME_MAX} are allowed"
    if not _NAME_RE.match(name):
        return (f"cluster name {name!r} may only hold lower-case letters, digits and '-', "
                "and must start and end with a letter or digit")
    return None


def sandbox_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a cluster running in this machine's sandbox, or None."""
    error = name_error(name)
    if error:
        return error
    if not _SANDBOX_RE.match(name):
        return (f"cluster name {name!r}: a cluster run by `ciliary up` names its network "
                "namespaces after it, so it may hold at most 16 letters and digits (no '-')")
    return None


def id_error(cluster_id: int) -> str | None:
    """Why ``cluster_id`` is not a valid cluster id, or None."""
    if not ID_MIN <= cluster_id <= ID_MAX:
        return f"cluster id {cluster_id} is out of range {ID_MIN}..{ID_MAX}"
    return None


def default_pod_cidr(cluster_id: int) -> str:
    """``10.<id>.0.0/16``: the pod CIDR of a cluster that names none."""
    error = id_error(cluster_id)
    if error:
        raise ValueError(error)
    return f"10.{cluster_id}.0.0/16"


def pod_cidr_error(cidr: str, nodes: int = 1) -> str | None:
    """Why ``cidr`` cannot be the pod CIDR of a cluster of ``nodes`` nodes, or None."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as err:
        return f"pod CIDR {cidr!r} is not an IPv4 network ({err})"
    room = 1 << (NODE_PREFIXLEN - net.prefixlen) if net.prefixlen <= NODE_PREFIXLEN else 0
    if room < nodes + 1:
        return (f"pod CIDR {cidr} holds {max(room - 1, 0)} node /24s (the first is never used); "
                f"{nodes} node(s) need a prefix of at most /{NODE_PREFIXLEN - (nodes).bit_length()}")
    return None


def overlap(a: str, b: str) -> bool:
    """Whether two CIDRs share an address."""
    return ipaddress.ip_network(a, strict=False).overlaps(ipaddress.ip_network(b, strict=False))
