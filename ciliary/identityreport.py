"""Label hygiene: which identity labels multiply identities.

Pure code. Input is the identity label set of every current pod; output estimates the
identity cardinality and, per label key, how many identities would remain if that key
were excluded.

Invariants:
- ``identities_estimated`` is the number of distinct identity label sets over the pods.
- A key is flagged when it is on at least ``min_pods`` pods and its values are nearly
  unique per pod (``values / pods >= 0.9``), or look like generated names (UUIDs, hashes,
  pod-name suffixes) on at least half the pods that carry it. Flagged keys come first,
  ordered by identities saved; the advice also gives the estimate with every flagged key
  excluded at once (two unique keys each hide the other's effect).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ciliary import schema

UNIQUE_RATIO = 0.9
GENERATED_RATIO = 0.5
_GENERATED = re.compile(
    r"^("
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # uuid
    r"|[0-9a-f]{8,}"  # hex hash
    r"|.*-[0-9a-f]{8,10}-[a-z0-9]{5}"  # deployment pod name
    r"|.*-[a-z0-9]{5}"  # generated name suffix
    r"|\d{9,}"  # timestamp-like
    r")$"
)


def looks_generated(value: str) -> bool:
    return bool(_GENERATED.match(value))


def _split(label: str) -> tuple[str, str]:
    key, _, value = label.partition("=")
    return key, value


def cardinality_report(
    label_sets: Sequence[tuple[str, ...]],
    *,
    cluster: str,
    cluster_id: int,
    allocated: int,
    limit: int,
    top: int = 20,
    min_pods: int = 5,
) -> schema.IdentityReportReply:
    estimated = len(set(label_sets))
    per_key: dict[str, dict[str, int]] = {}
    for labels in label_sets:
        for label in labels:
            key, value = _split(label)
            per_key.setdefault(key, {})
            per_key[key][value] = per_key[key].get(value, 0) + 1
    rows: list[schema.LabelCardinality] = []
    for key, values in per_key.items():
        pods = sum(values.values())
        distinct = len(values)
        if distinct <= 1:
            continue  # one value everywhere: cannot multiply identities
        without = len({tuple(lab for lab in labels if _split(lab)[0] != key) for labels in label_sets})
        uniqueness = distinct / pods if pods else 0.0
        generated = sum(n for v, n in values.items() if looks_generated(v))
        reason = ""
        if pods >= min_pods:
            if uniqueness >= UNIQUE_RATIO:
                reason = f"{distinct} values on {pods} pods: nearly one identity per pod"
            elif generated >= GENERATED_RATIO * pods:
                reason = f"values look generated (uuid/hash/pod name) on {generated} of {pods} pods"
        examples = sorted(values, key=lambda v: -values[v])[:3]
        rows.append(schema.LabelCardinality(
            key=key, pods=pods, values=distinct, uniqueness=round(uniqueness, 3),
            identities_without=without, flagged=bool(reason), reason=reason, examples=examples,
        ))
    rows.sort(key=lambda r: (not r.flagged, r.identities_without - estimated, -r.values, r.key))
    advice = []
    for row in rows:
        if row.flagged:
            bare = row.key.split(":", 1)[1] if ":" in row.key else row.key
            advice.append(
                f"exclude {row.key}: {estimated} -> {row.identities_without} identities; "
                f"set CILIARY_IDENTITY_LABELS=\"k8s:!{re.escape(bare)}$\" on the identity service"
            )
    flagged = {row.key for row in rows if row.flagged}
    if len(flagged) > 1:
        together = len({tuple(lab for lab in labels if _split(lab)[0] not in flagged) for labels in label_sets})
        advice.append(f"excluding all {len(flagged)} flagged labels: {estimated} -> {together} identities")
    if limit and estimated > 0.5 * limit:
        advice.append(f"{estimated} identities use over half of the cluster's {limit}-identity range")
    return schema.IdentityReportReply(
        cluster=cluster, cluster_id=cluster_id, pods=len(label_sets),
        identities_estimated=estimated, identities_allocated=allocated, limit=limit,
        labels=rows[:top], advice=advice,
    )
