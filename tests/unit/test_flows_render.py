"""Printers vs golden files (tests/unit/data/flows/); set UPDATE_GOLDEN=1 to rewrite them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ciliary import hubble, schema
from ciliary.cli import flowrender
from tests.unit.test_flows_scenario import scenario_flows

DATA = Path(__file__).parent / "data" / "flows"
FLOWS = scenario_flows()
GOLDEN = {
    "compact": "scenario.compact.txt",
    "dict": "scenario.dict.txt",
    "table": "scenario.table.txt",
    "jsonpb": "scenario.jsonpb.jsonl",
}


@pytest.mark.parametrize("output", sorted(GOLDEN))
def test_golden(output: str) -> None:
    path = DATA / GOLDEN[output]
    text = flowrender.render(FLOWS, output)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_json_is_jsonpb() -> None:
    assert flowrender.render(FLOWS, "json") == flowrender.render(FLOWS, "jsonpb")


def test_compact_with_node_name() -> None:
    line = flowrender.format_compact(FLOWS[0], node_name=True)
    assert line.startswith("Nov 26 05:44:56.123 [default/node-1]: default/checkout-")


def test_compact_line_matches_hubble_format() -> None:
    assert flowrender.format_compact(FLOWS[0]) == (
        "Nov 26 05:44:56.123: default/checkout-7d9f8b6c5-x2x9q:43210 (ID:1234) -> "
        "default/payments-5c6d7f9b8-abcde:8080 (ID:5678) from-endpoint FORWARDED (TCP Flags: SYN)"
    )
    assert flowrender.format_compact(FLOWS[5]).endswith(
        "<> default/payments-5c6d7f9b8-abcde:8080 (ID:5678) Policy denied DROPPED (TCP Flags: SYN)"
    )
    assert "policy-verdict:none INGRESS DENIED (TCP Flags: SYN)" in flowrender.format_compact(FLOWS[4])


def test_jsonpb_shape() -> None:
    for line in flowrender.render(FLOWS, "jsonpb").splitlines():
        obj = json.loads(line)
        assert list(obj) == ["flow", "node_name", "time"]
        flow = obj["flow"]
        assert flow["time"] == obj["time"] and flow["node_name"] == obj["node_name"]
        assert flow["Type"] in ("L3_L4", "L7")
        assert flow["IP"]["ipVersion"] == "IPv4"
        assert flow["verdict"] in hubble.VERDICT_NAMES
        assert "Summary" in flow and "uuid" in flow
        assert {"source", "destination", "event_type"} <= set(flow)
    drop = json.loads(hubble.format_jsonpb(FLOWS[5]))["flow"]
    assert drop["drop_reason"] == 133 and drop["drop_reason_desc"] == "POLICY_DENIED"
    assert "is_reply" not in drop
    dns = json.loads(hubble.format_jsonpb(FLOWS[10]))["flow"]
    assert dns["l7"]["type"] == "RESPONSE" and dns["l7"]["dns"]["ips"] == ["10.96.0.20"]


def test_json_round_trips_to_flow() -> None:
    for flow in FLOWS:
        data = json.dumps(hubble.response_dict(flow)["flow"]).encode()
        assert schema.msgspec.json.decode(data, type=schema.Flow) == flow


def test_go_json_escapes_html() -> None:
    flow = schema.Flow(summary="a<b>&c")
    assert '"Summary":"a\\u003cb\\u003e\\u0026c"' in hubble.format_jsonpb(flow)


def test_unset_time_prints_na() -> None:
    assert flowrender.format_compact(schema.Flow()).startswith("N/A: ")


def test_table_is_aligned() -> None:
    lines = flowrender.render(FLOWS, "table").splitlines()
    assert lines[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    col = lines[0].index("SOURCE")
    assert all(line[col - 3 : col] == "   " and line[col] != " " for line in lines)


def test_printer_streams_and_buffers_table() -> None:
    printer = flowrender.FlowPrinter("table")
    assert printer.write(FLOWS[0]) is None
    assert printer.close().startswith("TIMESTAMP")
    assert printer.close() is None
    with pytest.raises(ValueError):
        flowrender.FlowPrinter("yaml")


def test_rfc3339_precision_like_protojson() -> None:
    assert hubble.rfc3339_nano(0) == "1970-01-01T00:00:00Z"
    assert hubble.rfc3339_nano(1_500_000_000) == "1970-01-01T00:00:01.500Z"
    assert hubble.rfc3339_nano(1_000_001_000) == "1970-01-01T00:00:01.000001Z"
    assert hubble.rfc3339_nano(1_000_000_001) == "1970-01-01T00:00:01.000000001Z"
    assert hubble.parse_rfc3339("1970-01-01T00:00:01.000000001Z") == 1_000_000_001


def test_stamp_milli_pads_day_like_go() -> None:
    assert flowrender.stamp_milli("2026-11-05T01:02:03.004Z") == "Nov  5 01:02:03.004"
