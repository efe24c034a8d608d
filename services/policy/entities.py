"""Cilium entities (``fromEntities`` / ``toEntities``) as selectors.

Invariants (Cilium ``pkg/policy/api/entity.go``):
- ``host`` → ``reserved:host``; ``remote-node`` → ``reserved:remote-node``;
  ``kube-apiserver`` → ``reserved:kube-apiserver``; ``health``, ``init``, ``unmanaged``,
  ``ingress`` → their reserved label.
- ``cluster`` → host, remote-node, init, health, unmanaged, ingress, plus every identity
  labelled ``k8s:io.cilium.k8s.policy.cluster=<local cluster name>``.
- ``world`` → the world identity and every CIDR identity; ``world-ipv4`` / ``world-ipv6``
  restrict the CIDR identities to one family.
- ``all`` → the wildcard (peer 0); ``none`` → nothing.
"""

from __future__ import annotations

from .selectors import ALL, LABEL_CLUSTER, NONE, Requirement, Selector, labels_selector

_RESERVED_ENTITIES = ("host", "remote-node", "kube-apiserver", "health", "init", "unmanaged",
                      "ingress")
_CLUSTER_RESERVED = ("host", "remote-node", "init", "health", "unmanaged", "ingress")


def reserved(name: str) -> Selector:
    return labels_selector([Requirement("reserved", name, "In", ("",))])


def entity_selectors(entity: str, cluster_name: str) -> list[Selector]:
    """The selectors an entity stands for; unknown entities select nothing."""
    if entity == "all":
        return [ALL]
    if entity == "none":
        return [NONE]
    if entity == "world":
        return [Selector("world")]
    if entity == "world-ipv4":
        return [Selector("world", family=4)]
    if entity == "world-ipv6":
        return [Selector("world", family=6)]
    if entity == "cluster":
        return [reserved(n) for n in _CLUSTER_RESERVED] + [
            labels_selector([Requirement("k8s", LABEL_CLUSTER, "In", (cluster_name,))])
        ]
    if entity in _RESERVED_ENTITIES:
        return [reserved(entity)]
    return [NONE]
