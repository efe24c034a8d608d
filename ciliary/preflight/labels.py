"""Label hygiene of a pod list: how many identities it makes under a label filter, which
labels multiply them, the count under a suggested filter, and the identity ceiling.

Pure. Identity labels come from ``ciliary.identitylabels`` and the per-label analysis from
``ciliary.identityreport``, the code the identity service itself runs, so preflight and
``ciliary identity report`` flag the same labels.

Invariants:
- ``identities`` is the number of distinct identity label sets over the endpoints (pods
  that get an identity), under the filter of ``label_patterns`` (Cilium's ``labels``
  syntax on top of Cilium's defaults, as ``CILIARY_IDENTITY_LABELS``).
- The suggested filter adds one exclusion ``k8s:!<key>$`` per flagged label key;
  ``identities_suggested`` is the count under it (equal to ``identities`` when nothing
  is flagged).
- The ceiling is the size of the cluster's identity range in the layout of
  ``ciliary.schema.identity``: cluster-scoped identities carry the cluster ID in bits 16-23,
  so every cluster of a mesh has its own 16 bits (65,536 identities; 65,280 for cluster 0,
  which starts above the reserved range) and a mesh holds at most 255 clusters. Every node
  of a mesh sees the identities of all its clusters (``mesh_identities``).
- ``status``: ``fail`` when the identities exceed the ceiling or a label is flagged,
  ``warn`` above half the ceiling, else ``ok``; ``reasons`` say why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ciliary import schema
from ciliary.identitylabels import LabelFilter, identity_labels
from ciliary.identityreport import cardinality_report
from ciliary.preflight.pods import PodFacts

OK, WARN, FAIL = "ok", "warn", "fail"
HALF = 0.5


@dataclass(frozen=True)
class Ceiling:
    per_cluster: int  # identities this cluster may allocate
    cluster_id: int
    clusters: int
    note: str = ""


def identity_ceiling(cluster_id: int, clusters: int = 1) -> Ceiling:
    """The identity range of ``cluster_id`` in a mesh of ``clusters`` clusters."""
    low, high = schema.identity_cluster_range(cluster_id)
    note = (f"cluster ID bits 16-23: each cluster has its own range ({high - low + 1:,} for "
            f"cluster {cluster_id}); a mesh of {clusters} clusters puts up to "
            f"{clusters * (high - low + 1):,} identities in every node's ipcache")
    if clusters > schema.IDENTITY_CLUSTER_ID_MAX:
        note = (f"a mesh of {clusters} clusters does not fit: the identity layout has 8 cluster-ID "
                f"bits, at most {schema.IDENTITY_CLUSTER_ID_MAX} clusters")
        return Ceiling(0, cluster_id, clusters, note)
    return Ceiling(high - low + 1, cluster_id, clusters, note if clusters > 1 else "")


@dataclass
class LabelHygiene:
    pods: int
    endpoints: int
    identities: int
    ceiling: Ceiling
    labels: list[schema.LabelCardinality] = field(default_factory=list)
    suggested_patterns: list[str] = field(default_factory=list)
    identities_suggested: int = 0
    advice: list[str] = field(default_factory=list)
    status: str = OK
    reasons: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[schema.LabelCardinality]:
        return [row for row in self.labels if row.flagged]

    @property
    def mesh_identities(self) -> int:
        return self.identities * max(1, self.ceiling.clusters)


def exclusion_for(key: str) -> str:
    """``k8s:!<key>$`` for an identity label key ``k8s:<key>``."""
    source, sep, bare = key.partition(":")
    if not sep:
        source, bare = "k8s", key
    return f"{source}:!{re.escape(bare)}$"


def label_sets(pods: Sequence[PodFacts], namespace_labels: Mapping[str, Mapping[str, str]],
               flt: LabelFilter, cluster: str) -> list[tuple[str, ...]]:
    """The identity label set of every endpoint."""
    return [
        identity_labels(flt, p.labels, p.namespace, namespace_labels.get(p.namespace, {}),
                        p.service_account, cluster)
        for p in pods if p.endpoint
    ]


def analyse(pods: Sequence[PodFacts], namespace_labels: Mapping[str, Mapping[str, str]], *,
            label_patterns: Sequence[str] = (), cluster: str = schema.DEFAULT_CLUSTER_NAME,
            cluster_id: int = schema.DEFAULT_CLUSTER_ID, clusters: int = 1,
            top: int = 10, min_pods: int = 5) -> LabelHygiene:
    """Label hygiene of ``pods``; raises ``PatternError`` for a bad pattern."""
    flt = LabelFilter.from_config(label_patterns)
    sets = label_sets(pods, namespace_labels, flt, cluster)
    ceiling = identity_ceiling(cluster_id, clusters)
    report = cardinality_report(sets, cluster=cluster, cluster_id=cluster_id, allocated=0,
                                limit=ceiling.per_cluster, top=max(1, top), min_pods=min_pods)
    out = LabelHygiene(pods=len(pods), endpoints=len(sets), identities=report.identities_estimated,
                       ceiling=ceiling, labels=list(report.labels), advice=list(report.advice))
    out.suggested_patterns = [exclusion_for(row.key) for row in out.flagged]
    out.identities_suggested = out.identities
    if out.suggested_patterns:
        suggested = LabelFilter.from_config([*label_patterns, *out.suggested_patterns])
        out.identities_suggested = len(set(label_sets(pods, namespace_labels, suggested, cluster)))
    judge(out)
    return out


def judge(h: LabelHygiene) -> None:
    """Set ``status`` and ``reasons`` of ``h``."""
    limit = h.ceiling.per_cluster
    reasons: list[str] = []
    status = OK
    if limit <= 0:
        status = FAIL
        reasons.append(h.ceiling.note)
    elif h.identities > limit:
        status = FAIL
        reasons.append(f"{h.identities:,} identities exceed the cluster's {limit:,}-identity range")
    if h.flagged:
        status = FAIL
        keys = ", ".join(row.key for row in h.flagged)
        reasons.append(f"labels that multiply identities: {keys}; with them excluded "
                       f"{h.identities:,} -> {h.identities_suggested:,} identities")
    if status == OK and limit and h.identities > HALF * limit:
        status = WARN
        reasons.append(f"{h.identities:,} identities use over half of the {limit:,}-identity range")
    h.status, h.reasons = status, reasons
