"""Hubble metrics from the scenario flows, in Prometheus text exposition format."""

from __future__ import annotations

from pathlib import Path

from ciliary import schema
from services.flows.core import FlowsCore
from services.flows.metrics import FlowMetrics, flow_protocol
from tests.unit.test_flows_scenario import scenario_batch, scenario_flows

DATA = Path(__file__).parent / "data" / "flows"


def scenario_metrics() -> FlowMetrics:
    m = FlowMetrics()
    for flow in scenario_flows():
        m.process(flow)
    m.lost("perf_event_ring_buffer", 3)
    m.lost("decode", 0)
    return m


def test_counters() -> None:
    m = scenario_metrics()
    v = m.value
    assert v("hubble_flows_processed_total", type="Trace", subtype="to-endpoint", verdict="FORWARDED") == 9
    assert v("hubble_flows_processed_total", type="Trace", subtype="from-endpoint", verdict="FORWARDED") == 6
    assert v("hubble_flows_processed_total", type="Drop", subtype="", verdict="DROPPED") == 4
    assert v("hubble_flows_processed_total", type="PolicyVerdict", subtype="", verdict="DROPPED") == 3
    assert v("hubble_flows_processed_total", type="PolicyVerdict", subtype="", verdict="AUDIT") == 1
    assert v("hubble_flows_processed_total", type="PolicyVerdict", subtype="", verdict="FORWARDED") == 3
    assert v("hubble_flows_processed_total", type="L7", subtype="DNS", verdict="FORWARDED") == 3
    assert v("hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 1
    assert v("hubble_drop_total", reason="SERVICE_BACKEND_NOT_FOUND", protocol="TCP") == 1
    assert v("hubble_drop_total", reason="POLICY_DENY", protocol="UDP") == 1
    assert v("hubble_drop_total", reason="POLICY_DENY", protocol="TCP") == 1
    assert v("hubble_dns_queries_total", rcode="", qtypes="A", ips_returned="") == 1
    assert v("hubble_dns_responses_total", rcode="No Error", qtypes="A", ips_returned="1") == 1
    assert v("hubble_dns_responses_total", rcode="Non-Existent Domain", qtypes="AAAA", ips_returned="0") == 1
    assert v("hubble_dns_response_types_total", type="A", qtypes="A") == 1
    assert v("hubble_tcp_flags_total", flag="SYN", family="IPv4") == 5  # trace flows only
    assert v("hubble_tcp_flags_total", flag="SYN-ACK", family="IPv4") == 1
    assert v("hubble_tcp_flags_total", flag="FIN", family="IPv4") == 2
    assert v("hubble_tcp_flags_total", flag="RST", family="IPv4") == 1
    assert v("hubble_lost_events_total", source="perf_event_ring_buffer") == 3
    assert v("hubble_lost_events_total", source="decode") == 0
    # Hubble's policy metric: one per policy-verdict flow
    pv = "hubble_policy_verdicts_total"
    assert v(pv, action="forwarded", direction="ingress", match="l3-l4") == 1
    assert v(pv, action="forwarded", direction="ingress", match="l4-only") == 1
    assert v(pv, action="forwarded", direction="egress", match="l3-proto") == 1
    assert v(pv, action="dropped", direction="egress", match="l3-only") == 1
    assert v(pv, action="dropped", direction="egress", match="none") == 1
    assert v(pv, action="dropped", direction="ingress", match="none") == 1
    assert v(pv, action="audit", direction="ingress", match="none") == 1
    assert sum(m.counters[pv].values()) == 7


def test_policy_verdicts_from_the_host_or_health_are_not_counted() -> None:
    m = FlowMetrics()
    pv = schema.FlowEventType(type=5)

    def verdict(src: int, dst: int) -> schema.Flow:
        return schema.Flow(verdict="FORWARDED", event_type=pv, traffic_direction="INGRESS", policy_match_type=4,
                           source=schema.FlowEndpoint(identity=src), destination=schema.FlowEndpoint(identity=dst))

    m.process_many([verdict(1, 1234), verdict(4, 1234), verdict(1234, 4), verdict(2, 1234)])
    assert m.counters["hubble_policy_verdicts_total"] == {
        (("action", "forwarded"), ("direction", "ingress"), ("match", "all")): 1}


def test_exposition_golden() -> None:
    text = scenario_metrics().render()
    path = DATA / "scenario.metrics.txt"
    import os

    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_exposition_format() -> None:
    text = scenario_metrics().render()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name_labels, value = line.rsplit(" ", 1)
        assert float(value) >= 0
        assert name_labels.startswith("hubble_") and name_labels.endswith("}")
    assert '# TYPE hubble_flows_processed_total counter' in text
    assert 'hubble_drop_total{protocol="TCP",reason="POLICY_DENIED"} 1' in text


def test_label_values_are_escaped() -> None:
    m = FlowMetrics()
    m.inc("hubble_drop_total", {"reason": 'a"b\\c\nd', "protocol": "TCP"})
    assert 'reason="a\\"b\\\\c\\nd"' in m.render()


def test_flow_protocol() -> None:
    assert flow_protocol(schema.Flow()) == "Unknown flow"
    assert flow_protocol(schema.Flow(ip=schema.FlowIP(ipVersion="IPv4"))) == "IPv4"


def test_core_counts_undecodable_payloads_as_lost() -> None:
    core = FlowsCore("default")
    assert core.ingest(b"not msgpack") == []
    batch = scenario_batch()
    batch = schema.RawEventBatch(cluster=batch.cluster, node=batch.node, events=batch.events,
                                 boot_time_ns=batch.boot_time_ns, lost=7, seq=2)
    flows = core.ingest(schema.encode(batch))
    assert len(flows) == 29 and len(core.store) == 29
    assert core.metrics.value("hubble_lost_events_total", source="decode") == 1
    assert core.metrics.value("hubble_lost_events_total", source="perf_event_ring_buffer") == 7
    reply = core.query(schema.encode(schema.FlowQuery(number=2)))
    assert reply.ok and len(reply.flows) == 2 and reply.seen == 29 and reply.lost == 8
    bad = core.query(schema.encode(schema.FlowQuery(whitelist=[schema.FlowFilter(source_ip=["x/99"])])))
    assert not bad.ok and "invalid IP" in bad.error
    assert not core.query(b"\xff").ok
