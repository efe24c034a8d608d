"""A preflight report for people (aligned tables) and machines (one JSON object).

Pure: ``Findings`` (everything preflight found) in, text or plain data out.

Invariants:
- The JSON has the keys ``kernel``, ``labels``, ``sizing``, ``live``, ``operations``,
  ``decision`` and ``notes``; a part that was not examined is ``null`` (``kernel`` with
  ``--no-kernel``, ``labels`` without pods, ``live`` and ``operations`` without a running
  instance). Every check and feature is listed in the JSON.
- The text shows every feature, only the checks that are not ok (all with ``verbose``),
  the flagged and top labels, every map, the live fill of the fullest node per map with
  its band (every node's in the JSON), each operations check, then the verdict with its
  reasons and the answer to each question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ciliary import mappressure, output
from ciliary.preflight import decision as D
from ciliary.preflight import kernel as K
from ciliary.preflight.labels import LabelHygiene
from ciliary.preflight.sizing import Scale, SizingReport


@dataclass
class Findings:
    release: str
    machine: str
    checks: dict[str, K.CheckResult] | None
    features: list[K.FeatureVerdict] | None
    pods_source: str  # where the pod list came from, "" when none
    hygiene: LabelHygiene | None
    scale: Scale
    sizing: SizingReport
    live: list[mappressure.MapFill] | None
    operations: list[D.OpsCheck] | None
    decision: D.Decision
    notes: list[str] = field(default_factory=list)


def _pct(fill: float | None) -> str:
    return "-" if fill is None else f"{fill:.1%}"


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:,.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n} B"


def to_json(f: Findings) -> dict[str, Any]:
    kernel = None
    if f.checks is not None:
        kernel = {
            "release": f.release, "machine": f.machine,
            "features": [{"name": v.name, "title": v.title, "status": v.status, "core": v.core,
                          "reasons": list(v.reasons)} for v in f.features or []],
            "checks": [{"name": c.name, "title": c.title, "status": f.checks[c.name].status,
                        "detail": f.checks[c.name].detail, "brings": c.brings}
                       for c in K.CHECKS if c.name in f.checks],
        }
    labels = None
    if f.hygiene is not None:
        h = f.hygiene
        labels = {
            "source": f.pods_source, "pods": h.pods, "endpoints": h.endpoints,
            "identities": h.identities, "identities_suggested": h.identities_suggested,
            "suggested_patterns": h.suggested_patterns, "status": h.status, "reasons": h.reasons,
            "ceiling": {"per_cluster": h.ceiling.per_cluster, "cluster_id": h.ceiling.cluster_id,
                        "clusters": h.ceiling.clusters, "note": h.ceiling.note},
            "mesh_identities": h.mesh_identities,
            "labels": [{"key": r.key, "pods": r.pods, "values": r.values, "uniqueness": r.uniqueness,
                        "identities_without": r.identities_without, "flagged": r.flagged,
                        "reason": r.reason, "examples": list(r.examples)} for r in h.labels],
            "advice": h.advice,
        }
    s = f.sizing
    sizing = {
        "scale": {k: getattr(f.scale, k) for k in f.scale.__dataclass_fields__},
        "maps": [{"name": m.name, "kind": m.kind, "holds": m.holds, "expected": m.expected,
                  "max_entries": m.max_entries, "fill": None if m.fill is None else round(m.fill, 6),
                  "band": m.band, "setting": m.setting, "suggested": m.suggested,
                  "memory_bytes": m.memory, "memory_suggested_bytes": m.memory_suggested} for m in s.maps],
        "limits": s.limits, "settings": s.settings,
        "memory_bytes": s.memory, "memory_suggested_bytes": s.memory_suggested,
    }
    live = None
    if f.live is not None:
        live = {
            "thresholds": {"warn": mappressure.WARN, "critical": mappressure.CRITICAL},
            "maps": [{"node": m.node, "map": m.map, "entries": m.entries, "max_entries": m.max_entries,
                      "fill": round(m.fill, 6), "band": m.band} for m in f.live],
        }
    operations = None if f.operations is None else [
        {"name": c.name, "status": c.status, "detail": c.detail} for c in f.operations]
    d = f.decision
    return {
        "kernel": kernel, "labels": labels, "sizing": sizing, "live": live, "operations": operations,
        "decision": {
            "verdict": d.verdict, "title": d.title, "reasons": d.reasons,
            "questions": {k: {"question": D.QUESTIONS[k], "answer": a.answer, "reasons": a.reasons}
                          for k, a in d.answers.items()},
        },
        "notes": f.notes,
    }


def text(f: Findings, *, verbose: bool = False) -> str:
    out: list[str] = []
    if f.checks is None:
        out.append("KERNEL: not probed (--no-kernel)")
    else:
        results = f.checks
        bad = [c for c in K.CHECKS if c.name in results and results[c.name].status != K.OK]
        out.append(f"KERNEL {f.release} {f.machine}: {len(results)} checks, {len(results) - len(bad)} ok")
        out.append(output.table(["FEATURE", "STATUS", "WHY"], [
            [v.name + (" *" if v.core else ""), v.status, (v.reasons[0] if v.reasons else "")
             + (f" (+{len(v.reasons) - 1} more)" if len(v.reasons) > 1 else "")]
            for v in f.features or []]))
        out.append("  * core: ciliary cannot replace the incumbent data plane without it")
        shown = [c for c in K.CHECKS if c.name in results] if verbose else bad
        if shown:
            out.append("")
            out.append(output.table(["CHECK", "STATUS", "DETAIL", "BROUGHT BY"], [
                [c.name, results[c.name].status, results[c.name].detail,
                 c.brings if results[c.name].status != K.OK else ""] for c in shown]))
    out.append("")
    if f.hygiene is None:
        out.append("LABELS: no pod list (give --pods FILE or run against an instance)")
    else:
        h = f.hygiene
        out.append(f"LABELS from {f.pods_source}: {h.pods:,} pods, {h.endpoints:,} endpoints -> "
                   f"{h.identities:,} identities (ceiling {h.ceiling.per_cluster:,} for cluster "
                   f"{h.ceiling.cluster_id}): {h.status}")
        if h.ceiling.note:
            out.append(f"  {h.ceiling.note}")
        if h.labels:
            out.append(output.table(["LABEL", "PODS", "VALUES", "UNIQUE", "IDS-WITHOUT", "", "WHY / EXAMPLES"], [
                [r.key, f"{r.pods:,}", f"{r.values:,}", f"{r.uniqueness:.2f}", f"{r.identities_without:,}",
                 "FLAG" if r.flagged else "", r.reason or ", ".join(r.examples)] for r in h.labels]))
        for line in h.reasons:
            out.append(f"  {line}")
        if h.suggested_patterns:
            out.append(f"  suggested: CILIARY_IDENTITY_LABELS=\"{' '.join(h.suggested_patterns)}\" -> "
                       f"{h.identities_suggested:,} identities")
    out.append("")
    scale = f.scale
    out.append(f"MAPS per node for {_num(scale.services)} services x {_num(scale.backends)} backends x "
               f"{scale.ports} port{'' if scale.ports == 1 else 's'}, {_num(scale.endpoints)} endpoints ({_num(scale.endpoints_per_node)} on "
               f"the busiest node), {_num(scale.identities)} identities, {_num(scale.policy_entries)} policy "
               f"entries per identity")
    out.append(output.table(["MAP", "TYPE", "EXPECTED", "MAX", "FILL", "BAND", "SETTING", "SUGGESTED", "MEMORY"], [
        [m.name, m.kind, _num(m.expected), f"{m.max_entries:,}", _pct(m.fill), m.band, m.setting or "(fixed)",
         _num(m.suggested), _bytes(m.memory) + (f" -> {_bytes(m.memory_suggested)}" if m.memory_suggested else "")]
        for m in f.sizing.maps]))
    out.append(f"  map memory per node: {_bytes(f.sizing.memory)}"
               + (f" -> {_bytes(f.sizing.memory_suggested)} with the suggested settings"
                  if f.sizing.settings else ""))
    for line in f.sizing.limits:
        out.append(f"  limit: {line}")
    out.append("")
    if f.live is None:
        out.append("LIVE MAP FILL: no running instance")
    else:
        nodes = len({m.node for m in f.live})
        out.append(f"LIVE MAP FILL of {nodes} nodes, the fullest node per map "
                   f"(warn {mappressure.WARN:.0%}, critical {mappressure.CRITICAL:.0%})")
        fullest: dict[str, mappressure.MapFill] = {}
        for m in f.live:
            if m.map not in fullest or m.fill > fullest[m.map].fill:
                fullest[m.map] = m
        out.append(output.table(["MAP", "NODE", "ENTRIES", "MAX", "FILL", "BAND"], [
            [m.map, m.node, f"{m.entries:,}", f"{m.max_entries:,}", _pct(m.fill), m.band]
            for m in sorted(fullest.values(), key=lambda m: m.map)]))
    out.append("")
    if f.operations is None:
        out.append("OPERATIONS: no running instance to check")
    else:
        out.append("OPERATIONS")
        out.append(output.table(["CHECK", "RESULT", "DETAIL"], [[c.name, c.status, c.detail] for c in f.operations]))
    out.append("")
    d = f.decision
    out.append(f"VERDICT: {d.title}")
    out += [f"  - {r}" for r in d.reasons]
    out.append("")
    out.append(output.table(["QUESTION", "ANSWER"], [[D.QUESTIONS[k], a.answer] for k, a in d.answers.items()]))
    for note in f.notes:
        out.append(f"note: {note}")
    return "\n".join(out)
