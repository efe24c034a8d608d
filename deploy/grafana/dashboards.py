"""Writes the Grafana dashboards of this directory (stdlib only): ``python deploy/grafana/dashboards.py``.

Two dashboards over one Prometheus data source: ``ciliary-flows.json`` (Hubble's flow
metrics: flows by type and verdict, drops by reason, policy verdicts, DNS, TCP flags, lost
events, L7 request rate, error ratio and latency from Envoy's spans) and ``ciliary-control-plane.json`` (map pressure with the warn/critical bands of
``ciliary.mappressure``, map fill, endpoints, identities, service health, control-plane
pass latency, event API traffic). tests/unit/test_grafana_dashboards.py checks that the
files are what this script writes and that every query names only exported metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 24


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          width: int = 12, height: int = 8, description: str = "", **defaults: Any) -> dict[str, Any]:
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": unit, **defaults}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]}}
        if kind == "timeseries" else {},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": WIDTH, "h": 1}, "panels": []}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids and positions, left to right, top to bottom."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > WIDTH or p["type"] == "row":
            x, y, line_h = 0, y + line_h, 0
        p["id"] = i
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, line_h = x + w, max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return panels


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard(uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]],
              description: str) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["ciliary"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "utc",
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
             "current": {}, "hide": 0},
            *variables]},
        "annotations": {"list": []},
        "panels": layout(panels),
    }


def flows() -> dict[str, Any]:
    rate = "[$__rate_interval]"
    return dashboard("ciliary-flows", "ciliary / flows (Hubble metrics)", [
        row("Flows"),
        panel("Flows processed by type", [
            (f"sum by (type, subtype) (rate(hubble_flows_processed_total{rate}))", "{{type}} {{subtype}}")],
            "ops", width=12),
        panel("Flows by verdict", [
            (f"sum by (verdict) (rate(hubble_flows_processed_total{rate}))", "{{verdict}}")], "ops", width=12),
        row("Drops"),
        panel("Drops by reason", [
            (f"sum by (reason, protocol) (rate(hubble_drop_total{rate}))", "{{reason}} {{protocol}}")],
            "pps", width=16, description="hubble_drop_total: every DROPPED flow by the datapath's drop reason"),
        panel("Drops in range", [("sum by (reason) (increase(hubble_drop_total[$__range]))", "{{reason}}")],
              "short", kind="bargauge", width=8),
        row("Policy verdicts"),
        panel("Policy verdicts", [
            (f"sum by (action, direction) (rate(hubble_policy_verdicts_total{rate}))",
             "{{action}} {{direction}}")], "ops", width=12),
        panel("Policy verdicts by match", [
            (f"sum by (match) (rate(hubble_policy_verdicts_total{rate}))", "{{match}}")], "ops", width=12),
        row("DNS"),
        panel("DNS queries and responses", [
            (f"sum by (qtypes) (rate(hubble_dns_queries_total{rate}))", "queries {{qtypes}}"),
            (f"sum by (rcode) (rate(hubble_dns_responses_total{rate}))", "responses {{rcode}}")], "ops",
            width=12),
        panel("DNS errors ratio", [
            (f'sum(rate(hubble_dns_responses_total{{rcode!="No Error"}}{rate})) '
             f"/ clamp_min(sum(rate(hubble_dns_responses_total{rate})), 1e-9)", "errors")],
            "percentunit", width=6, min=0, max=1),
        panel("DNS response record types", [
            (f"sum by (type) (rate(hubble_dns_response_types_total{rate}))", "{{type}}")], "ops", width=6),
        row("TCP and visibility"),
        panel("TCP flags", [
            (f"sum by (flag, family) (rate(hubble_tcp_flags_total{rate}))", "{{flag}} {{family}}")], "ops",
            width=12),
        panel("Lost events", [
            (f"sum by (source) (rate(hubble_lost_events_total{rate}))", "{{source}}")], "ops", width=12,
            description="Events the ring buffer, the bus or the decoder lost: flows missing from the counts"),
        row("L7 (Envoy sidecars)"),
        panel("HTTP requests by source and destination", [
            (f"sum by (source, destination) (rate(hubble_http_requests_total{{reporter=\"server\"}}{rate}))",
             "{{source}} -> {{destination}}")], "reqps", width=12,
            description="Requests the destination's sidecar served (OTLP spans from Envoy, docs/istio.md)"),
        panel("HTTP error ratio (5xx)", [
            (f'sum by (destination) (rate(hubble_http_requests_total{{reporter="server",status=~"5.."}}{rate})) '
             f'/ clamp_min(sum by (destination) (rate(hubble_http_requests_total{{reporter="server"}}{rate})), 1e-9)',
             "{{destination}}")], "percentunit", width=6, min=0, max=1),
        panel("HTTP latency p95", [
            (f"histogram_quantile(0.95, sum by (le, destination) "
             f"(rate(hubble_http_request_duration_seconds_bucket{{reporter=\"server\"}}{rate})))",
             "{{destination}}")], "s", width=6),
    ], [], "Hubble's flow metrics as the flows service serves them on /metrics (docs/metrics.md).")


def control_plane() -> dict[str, Any]:
    node = 'node=~"$node"'
    rate = "[$__rate_interval]"
    thresholds = {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                {"color": "orange", "value": 0.8},
                                                {"color": "red", "value": 0.95}]}
    return dashboard("ciliary-control-plane", "ciliary / control plane and maps", [
        row("BPF map pressure"),
        panel("Map pressure (fill ratio)", [
            (f"ciliary_bpf_map_pressure{{{node}}}", "{{node}} {{map_name}}")], "percentunit", width=16,
            min=0, max=1, thresholds=thresholds,
            custom={"thresholdsStyle": {"mode": "line"}},
            description="warn from 0.8, critical from 0.95 (ciliary status uses the same bands)"),
        panel("Fullest maps", [
            (f"topk(10, ciliary_bpf_map_pressure{{{node}}})", "{{node}} {{map_name}}")], "percentunit",
            kind="bargauge", width=8, min=0, max=1, thresholds=thresholds),
        panel("Map entries", [
            (f"ciliary_bpf_map_entries{{{node}}}", "{{node}} {{map_name}}"),
        ], "short", width=12),
        panel("Map capacity (max_entries)", [
            (f"ciliary_bpf_map_max_entries{{{node}}}", "{{node}} {{map_name}}")], "short", kind="table",
            width=12),
        row("Endpoints and identities"),
        panel("Endpoints per node", [(f"ciliary_endpoint{{{node}}}", "{{node}}")], "short", width=12),
        panel("Identities", [("sum by (cluster) (ciliary_identity)", "{{cluster}}")], "short", width=12),
        row("Control-plane latency"),
        panel("Pass duration p50 / p95 / p99", [
            (f"histogram_quantile(0.5, sum by (service, le) (rate(ciliary_controlplane_pass_duration_seconds_bucket{rate})))",
             "p50 {{service}}"),
            (f"histogram_quantile(0.95, sum by (service, le) (rate(ciliary_controlplane_pass_duration_seconds_bucket{rate})))",
             "p95 {{service}}"),
            (f"histogram_quantile(0.99, sum by (service, le) (rate(ciliary_controlplane_pass_duration_seconds_bucket{rate})))",
             "p99 {{service}}")], "s", width=12,
            description="dirty -> recompute -> write passes of identity and policy"),
        panel("Passes per second", [
            (f"sum by (service) (rate(ciliary_controlplane_pass_duration_seconds_count{rate}))", "{{service}}"),
        ], "ops", width=6),
        panel("Mean pass duration", [
            (f"sum by (service) (rate(ciliary_controlplane_pass_duration_seconds_sum{rate})) / "
             f"clamp_min(sum by (service) (rate(ciliary_controlplane_pass_duration_seconds_count{rate})), 1e-9)",
             "{{service}}")], "s", width=6),
        panel("Last pass", [("ciliary_controlplane_last_pass_seconds", "{{service}} {{instance}}")], "s",
              width=12),
        row("Services and events"),
        panel("Service health", [("ciliary_service_healthy", "{{service}} {{instance}}")], "short",
              kind="stat", width=12,
              mappings=[{"type": "value", "options": {"0": {"text": "unhealthy", "color": "red"},
                                                        "1": {"text": "healthy", "color": "green"}}}]),
        panel("Event API messages published", [
            (f"sum by (service) (rate(ciliary_events_published_total{rate}))", "{{service}}")], "ops", width=12,
            description="ciliary.events.> messages; zero while no subscriber holds a lease"),
    ], [variable("node", "label_values(ciliary_bpf_map_pressure, node)", "Node")],
        "BPF map pressure, endpoints, identities and control-plane latency from the services' health "
        "(docs/metrics.md).")


DASHBOARDS = {"ciliary-flows.json": flows, "ciliary-control-plane.json": control_plane}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
