"""Prometheus metrics from the services' health reports: node gauges and control-plane latency (pure).

What ``ciliary status`` reads from every service's health report, as metrics: map
pressure per BPF map and node (``ciliary_bpf_map_pressure``, named like Cilium's
``cilium_bpf_map_pressure`` with its ``map_name`` label), map fill, endpoints and
identities, service health, and how long the control-plane passes take
(``ciliary_controlplane_pass_duration_seconds``, a histogram of every pass the reports
listed in ``recent_passes``; ``ciliary_controlplane_last_pass_seconds`` for the last one), and each process's cyclic
garbage-collector pauses per generation (``ciliary_gc_*``, from the report's ``gc``).

Invariants:
- ``FAMILIES`` is every family ``render`` can write (name -> type, help); the dashboards
  test derives the exported names from it.
- ``PassHistograms.observe`` counts each pass once: per reporting instance, only passes
  that started after the newest one it already counted (a report lists the last
  ``watch.RECENT_PASSES``; passes that scrolled out between two observations are not
  counted, so the histogram is a sample when passes come faster than refreshes). It
  remembers at most ``max_instances`` instances (default 1024: without
  ``CILIARY_INSTANCE`` an instance is named after its process, so every restart is a new
  one); beyond that the one whose newest counted pass is oldest is
  forgotten first (``evicted``), so only an instance silent for longest could have its
  last passes counted again.
- ``render`` writes the text exposition format 0.0.4 that ``promtool check metrics``
  accepts: HELP and TYPE for every family, label values escaped, stable order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ciliary import schema

FAMILIES: dict[str, tuple[str, str]] = {
    "ciliary_bpf_map_pressure": ("gauge", "Fill ratio (0..1) of a BPF map the node executor writes"),
    "ciliary_bpf_map_entries": ("gauge", "Entries in a BPF map the node executor writes"),
    "ciliary_bpf_map_max_entries": ("gauge", "Capacity (max_entries) of a BPF map the node executor writes"),
    "ciliary_endpoint": ("gauge", "Endpoints managed by the node executor"),
    "ciliary_identity": ("gauge", "Security identities allocated"),
    "ciliary_service_healthy": ("gauge", "1 when a service instance reports healthy, else 0"),
    "ciliary_controlplane_last_pass_seconds": ("gauge", "Duration of a control-plane service's last pass"),
    "ciliary_controlplane_pass_duration_seconds": (
        "histogram", "Duration of control-plane passes (dirty -> recompute -> write)"),
    "ciliary_events_published_total": ("counter", "Messages a service published on the public event API"),
    "ciliary_gc_collections_total": ("counter", "Cyclic garbage collections of a service process, per generation"),
    "ciliary_gc_pause_seconds_total": ("counter", "Time a service process spent paused in cyclic garbage collection"),
    "ciliary_gc_pause_seconds_max": ("gauge", "Longest cyclic garbage collection pause of a service process"),
}
GC_FAMILIES = (  # family, key in the report's ``gc`` detail, scale to the family's unit
    ("ciliary_gc_collections_total", "collections", 1.0),
    ("ciliary_gc_pause_seconds_total", "pause_ms_total", 0.001),
    ("ciliary_gc_pause_seconds_max", "pause_ms_max", 0.001),
)

PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAST_PASS_KEYS = ("last_pass_ms", "last_reconcile_ms")  # identity/policy, servicelb


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class PassHistograms:
    """Per service: pass counts per bucket, sum, count; the newest pass start counted per instance."""

    def __init__(self, buckets: tuple[float, ...] = PASS_BUCKETS, max_instances: int = 1024) -> None:
        self.buckets = buckets
        self.max_instances = max_instances
        self.evicted = 0
        self.counts: dict[str, list[int]] = {}  # service -> per bucket (not cumulative), +Inf last
        self.sums: dict[str, float] = {}
        self.newest: dict[str, float] = {}  # instance -> start of the newest pass counted

    def add(self, service: str, seconds: float) -> None:
        counts = self.counts.setdefault(service, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self.sums[service] = self.sums.get(service, 0.0) + seconds

    def observe(self, reports: Iterable[schema.HealthReport]) -> None:
        for report in reports:
            passes = report.detail.get("recent_passes")
            if not isinstance(passes, list):
                continue
            newest = self.newest.get(report.instance, 0.0)
            for p in passes:
                if not isinstance(p, Mapping):
                    continue
                start, ms = p.get("start"), p.get("ms")
                if not isinstance(start, (int, float)) or not isinstance(ms, (int, float)) or start <= newest:
                    continue
                self.add(report.service, ms / 1000)
                self.newest[report.instance] = max(self.newest.get(report.instance, 0.0), float(start))
        if len(self.newest) > self.max_instances:
            for instance, _ in sorted(self.newest.items(), key=lambda kv: kv[1])[:len(self.newest) - self.max_instances]:
                del self.newest[instance]
                self.evicted += 1

    def samples(self) -> list[str]:
        name = "ciliary_controlplane_pass_duration_seconds"
        lines = []
        for service in sorted(self.counts):
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), self.counts[service], strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{name}_bucket{{service="{_escape(service)}",le="{le}"}} {running}')
            lines.append(f'{name}_sum{{service="{_escape(service)}"}} {_number(round(self.sums[service], 6))}')
            lines.append(f'{name}_count{{service="{_escape(service)}"}} {running}')
        return lines


def samples(reports: Iterable[schema.HealthReport]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every gauge and counter sample the reports give, by family (histograms apart)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in FAMILIES}
    for report in reports:
        detail: Mapping[str, Any] = report.detail
        out["ciliary_service_healthy"].append((
            {"service": report.service, "instance": report.instance, "node": report.node},
            1.0 if report.healthy else 0.0))
        for key in LAST_PASS_KEYS:
            if isinstance(detail.get(key), (int, float)):
                out["ciliary_controlplane_last_pass_seconds"].append((
                    {"service": report.service, "instance": report.instance}, round(detail[key] / 1000, 9)))
                break
        events = detail.get("events")
        if isinstance(events, Mapping) and isinstance(events.get("published"), int):
            out["ciliary_events_published_total"].append((
                {"service": report.service, "instance": report.instance}, float(events["published"])))
        _gc_samples(out, report)
        if report.service == "identity" and isinstance(detail.get("identities"), int):
            out["ciliary_identity"].append(({"cluster": report.cluster, "instance": report.instance}, float(detail["identities"])))
        if report.service != "node":
            continue
        maps = detail.get("maps") or {}
        for name, m in sorted(maps.items()):
            if not isinstance(m, Mapping):
                continue
            labels = {"map_name": name, "node": report.node}
            out["ciliary_bpf_map_pressure"].append((labels, float(m.get("fill") or 0.0)))
            if isinstance(m.get("entries"), int):
                out["ciliary_bpf_map_entries"].append((labels, float(m["entries"])))
            if isinstance(m.get("max"), int):
                out["ciliary_bpf_map_max_entries"].append((labels, float(m["max"])))
        if isinstance(detail.get("endpoints"), int):
            out["ciliary_endpoint"].append(({"node": report.node}, float(detail["endpoints"])))
    return out


def _gc_samples(out: dict[str, list[tuple[dict[str, str], float]]], report: schema.HealthReport) -> None:
    pauses = report.detail.get("gc")
    if not isinstance(pauses, Mapping):
        return
    for family, key, scale in GC_FAMILIES:
        values = pauses.get(key)
        if not isinstance(values, list):
            continue
        for generation, value in enumerate(values):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[family].append(({"service": report.service, "instance": report.instance,
                                     "generation": str(generation)}, round(value * scale, 9)))


def render(reports: Iterable[schema.HealthReport], passes: PassHistograms | None = None) -> str:
    """The families of ``FAMILIES`` in Prometheus text format (a family without samples
    keeps its HELP and TYPE lines)."""
    found = samples(reports)
    lines: list[str] = []
    for name, (kind, help_text) in FAMILIES.items():
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        if kind == "histogram":
            lines += passes.samples() if passes is not None else []
            continue
        for labels, value in sorted(found[name], key=lambda s: sorted(s[0].items())):
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"
