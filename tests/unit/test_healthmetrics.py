"""Node gauges and control-plane latency from health reports, as Prometheus text that
``promtool check metrics`` accepts."""

from __future__ import annotations

import shutil
import subprocess

from ciliary import healthmetrics, schema


def report(service: str, instance: str, node: str = "", healthy: bool = True, **detail: object) -> schema.HealthReport:
    return schema.HealthReport(service=service, instance=instance, pid=1, version="0", started=0.0,
                               healthy=healthy, cluster="c1", node=node, detail=detail)


def passes(*pairs: tuple[float, float]) -> list[dict[str, float]]:
    return [{"start": start, "ms": ms, "inputs": ms / 2} for start, ms in pairs]


NODE = report("node", "node-node-1", "node-1", endpoints=3, maps={
    "ciliary_policy": {"entries": 4096, "max": 16384, "fill": 0.25},
    "ciliary_lb4_services": {"entries": 1, "max": 65536, "fill": 1.5e-05},
})
REPORTS = [
    report("identity", "identity", identities=12, last_pass_ms=3.5, recent_passes=passes((10.0, 3.0), (11.0, 3.5)),
           events={"published": 4}),
    report("policy", "policy", healthy=False, last_pass_ms=40.0, recent_passes=passes((10.5, 40.0))),
    report("servicelb", "servicelb", last_reconcile_ms=1.25,
           gc={"collections": [40, 3, 1], "pause_ms_total": [2.0, 1.5, 35.0], "pause_ms_max": [0.5, 0.75, 35.0]}),
    NODE,
]


def test_gauges() -> None:
    text = healthmetrics.render(REPORTS)
    assert 'ciliary_bpf_map_pressure{map_name="ciliary_policy",node="node-1"} 0.25\n' in text
    assert 'ciliary_bpf_map_entries{map_name="ciliary_policy",node="node-1"} 4096\n' in text
    assert 'ciliary_bpf_map_max_entries{map_name="ciliary_policy",node="node-1"} 16384\n' in text
    assert 'ciliary_endpoint{node="node-1"} 3\n' in text
    assert 'ciliary_identity{cluster="c1",instance="identity"} 12\n' in text
    assert 'ciliary_service_healthy{service="policy",instance="policy",node=""} 0\n' in text
    assert 'ciliary_controlplane_last_pass_seconds{service="servicelb",instance="servicelb"} 0.00125\n' in text
    assert 'ciliary_events_published_total{service="identity",instance="identity"} 4\n' in text
    gc_labels = 'service="servicelb",instance="servicelb",generation'
    assert f'ciliary_gc_collections_total{{{gc_labels}="2"}} 1\n' in text
    assert f'ciliary_gc_pause_seconds_total{{{gc_labels}="0"}} 0.002\n' in text
    assert f'ciliary_gc_pause_seconds_max{{{gc_labels}="2"}} 0.035\n' in text
    assert "ciliary_gc_collections_total{service=\"identity\"" not in text  # no ``gc`` detail, no sample


def test_pass_histogram_counts_each_pass_once() -> None:
    hist = healthmetrics.PassHistograms()
    hist.observe(REPORTS)
    hist.observe(REPORTS)  # the same passes again: nothing new
    later = report("identity", "identity", recent_passes=passes((11.0, 3.5), (12.0, 700.0)))
    hist.observe([later])
    text = healthmetrics.render(REPORTS, hist)
    name = "ciliary_controlplane_pass_duration_seconds"
    assert f'{name}_bucket{{service="identity",le="0.0025"}} 0\n' in text
    assert f'{name}_bucket{{service="identity",le="0.005"}} 2\n' in text
    assert f'{name}_bucket{{service="identity",le="0.5"}} 2\n' in text
    assert f'{name}_bucket{{service="identity",le="1.0"}} 3\n' in text
    assert f'{name}_bucket{{service="identity",le="+Inf"}} 3\n' in text
    assert f'{name}_count{{service="identity"}} 3\n' in text
    assert f'{name}_sum{{service="identity"}} 0.7065\n' in text
    assert f'{name}_count{{service="policy"}} 1\n' in text


def test_every_family_is_declared_and_promtool_accepts_the_text() -> None:
    hist = healthmetrics.PassHistograms()
    hist.observe(REPORTS)
    text = healthmetrics.render(REPORTS, hist)
    for name, (kind, _) in healthmetrics.FAMILIES.items():
        assert f"# TYPE {name} {kind}\n" in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup.sh"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reports_without_detail_give_only_headers_and_health() -> None:
    text = healthmetrics.render([report("mesh", "mesh")])
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert samples == ['ciliary_service_healthy{service="mesh",instance="mesh",node=""} 1']


def test_pass_histogram_remembers_a_bounded_number_of_instances() -> None:
    hist = healthmetrics.PassHistograms(max_instances=3)
    for i in range(10):  # ten restarts of identity: ten instances, one pass each
        hist.observe([report("identity", f"identity-{i}", recent_passes=passes((100.0 + i, 1.0)))])
    assert sorted(hist.newest) == ["identity-7", "identity-8", "identity-9"] and hist.evicted == 7
    name = "ciliary_controlplane_pass_duration_seconds"
    assert f'{name}_count{{service="identity"}} 10\n' in healthmetrics.render([], hist)
    # a remembered instance still counts each pass once
    hist.observe([report("identity", "identity-9", recent_passes=passes((109.0, 1.0)))])
    assert f'{name}_count{{service="identity"}} 10\n' in healthmetrics.render([], hist)
