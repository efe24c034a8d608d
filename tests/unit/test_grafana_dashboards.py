"""The Grafana dashboards in deploy/grafana/: every query names only metrics the project
exports (the set comes from the code that renders /metrics), and the files are what
deploy/grafana/dashboards.py writes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ciliary import healthmetrics
from services.flows.l7store import FAMILIES as L7_FAMILIES
from services.flows.metrics import FAMILIES as HUBBLE_FAMILIES

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
FILES = sorted(GRAFANA.glob("*.json"))

PROMQL_WORDS = {
    # aggregations, functions and keywords that may appear without "(" right after them
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
    "inf", "nan",
}


def exported() -> set[str]:
    """Every series name /metrics can carry: counters and gauges as named, histograms as
    their _bucket/_sum/_count series."""
    names = set(HUBBLE_FAMILIES)
    for name, (kind, _) in {**healthmetrics.FAMILIES, **L7_FAMILIES}.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a ``label_values(metric, label)`` variable query)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", "0", text)  # numbers (1e-9)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,[^)]*\)", r"\1", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if text[max(0, match.start() - 1)] == "$":  # a Grafana variable
            continue
        names.add(word)
    return names


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    found += [(f"variable {v['name']}", v["definition"]) for v in board["templating"]["list"]
              if v["type"] == "query"]
    return found


def test_the_parser_finds_metric_names() -> None:
    expr = ('histogram_quantile(0.95, sum by (service, le) (rate(a_b_bucket{x="c_d",le!=""}[5m]))) '
            '/ clamp_min(sum(rate(e_total[$__rate_interval])), 1e-9) + on(node) group_left(map_name) f')
    assert metric_names(expr) == {"a_b_bucket", "e_total", "f"}
    assert metric_names("label_values(ciliary_bpf_map_pressure, node)") == {"ciliary_bpf_map_pressure"}


def test_there_are_dashboards() -> None:
    assert [f.name for f in FILES] == ["ciliary-control-plane.json", "ciliary-flows.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_query_names_only_exported_metrics(path: Path) -> None:
    board = json.loads(path.read_text())
    known = exported()
    found = queries(board)
    assert found
    for title, expr in found:
        names = metric_names(expr)
        assert names, f"{path.name} {title!r}: no metric in {expr!r}"
        assert names <= known, f"{path.name} {title!r}: {sorted(names - known)} are not exported"


def test_the_dashboards_cover_the_issue_topics() -> None:
    used = {n for path in FILES for _, e in queries(json.loads(path.read_text())) for n in metric_names(e)}
    for needed in ("hubble_flows_processed_total", "hubble_drop_total", "hubble_policy_verdicts_total",
                   "hubble_dns_responses_total", "ciliary_bpf_map_pressure",
                   "ciliary_controlplane_pass_duration_seconds_bucket", "hubble_http_requests_total",
                   "hubble_http_request_duration_seconds_bucket"):
        assert needed in used


def test_files_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("grafana_dashboards", GRAFANA / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, build in module.DASHBOARDS.items():
        assert (GRAFANA / name).read_text() == module.render(build), f"run: python deploy/grafana/dashboards.py ({name})"
        ids = [p["id"] for p in build()["panels"]]
        assert len(ids) == len(set(ids))
