"""Address plan of an embedded cluster: node index → underlay address and pod CIDR.

Invariants:
- A node's index (1..254) is claimed once in bucket ``allocations`` under
  ``node-index.<n>`` with compare-and-set and never changes for that node name.
- The underlay address of node index ``n`` is ``172.30.<cluster id>.<n>/24``: unique per
  cluster, so clusters of one machine can later share an underlay for ClusterMesh.
- The pod CIDR is the Node's ``spec.podCIDR`` when set, else the ``n``-th /24 of the
  cluster CIDR (``CILIARY_CLUSTER_CIDR``, default ``10.<cluster id>.0.0/16``:
  ``ciliary.clusters.default_pod_cidr``). The first address of a pod CIDR is the node's
  own and never given to a pod.
"""

from __future__ import annotations

import ipaddress

NODE_INDEX_PREFIX = "node-index"
MAX_NODES = 254


def underlay_cidr(cluster_id: int, index: int) -> str:
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"node index {index} out of range 1..{MAX_NODES}")
    return f"172.30.{cluster_id % 256}.{index}/24"


def underlay_ip(cluster_id: int, index: int) -> str:
    return underlay_cidr(cluster_id, index).split("/")[0]


def pod_cidr(cluster_cidr: str, index: int, prefixlen: int = 24) -> str:
    net = ipaddress.IPv4Network(cluster_cidr, strict=True)
    count = 1 << (prefixlen - net.prefixlen) if prefixlen >= net.prefixlen else 0
    if not 1 <= index < count:
        raise ValueError(f"node index {index} does not fit {cluster_cidr} in /{prefixlen} pod CIDRs")
    first = int(net.network_address) + index * (1 << (32 - prefixlen))
    return f"{ipaddress.IPv4Address(first)}/{prefixlen}"


def node_index_key(index: int) -> str:
    return f"{NODE_INDEX_PREFIX}.{index}"
