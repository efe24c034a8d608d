"""Flows as OTel log records: attribute names and values, the setting, severities."""

from __future__ import annotations

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

from ciliary import schema, telemetry
from ciliary import tracing_flows as TF

DROP = schema.Flow(
    time="2026-12-06T10:00:01.123456789Z", uuid="u-1", verdict="DROPPED", drop_reason=133,
    drop_reason_desc="POLICY_DENIED", flow_type="L3_L4", node_name="c1/node-1",
    traffic_direction="INGRESS", is_reply=False, summary="TCP Flags: SYN",
    ip=schema.FlowIP(source="10.1.1.10", destination="10.1.2.20", ipVersion="IPv4"),
    l4=schema.FlowLayer4(TCP=schema.FlowTCP(source_port=41000, destination_port=8080)),
    source=schema.FlowEndpoint(identity=1001, namespace="shop", pod_name="checkout-1",
                               workloads=[schema.FlowWorkload(name="checkout", kind="Deployment")]),
    destination=schema.FlowEndpoint(identity=1002, namespace="shop", pod_name="payments-1"),
    destination_service=schema.FlowService(name="payments", namespace="shop"),
    ingress_denied_by=[schema.FlowPolicy(name="lock", namespace="shop")],
)

DNS = schema.Flow(
    verdict="FORWARDED", flow_type="L7",
    ip=schema.FlowIP(source="10.1.1.10", destination="10.1.0.53", ipVersion="IPv4"),
    l4=schema.FlowLayer4(UDP=schema.FlowUDP(source_port=5353, destination_port=53)),
    l7=schema.FlowLayer7(type="RESPONSE", dns=schema.FlowDNS(query="payments.shop.", rcode=3)),
)


def test_a_drop_has_the_documented_attributes() -> None:
    assert TF.flow_attributes(DROP) == {
        "ciliary.flow.verdict": "DROPPED", "ciliary.flow.drop_reason": "POLICY_DENIED",
        "ciliary.flow.type": "L3_L4", "ciliary.flow.traffic_direction": "INGRESS",
        "ciliary.flow.is_reply": False, "ciliary.flow.node": "c1/node-1", "ciliary.flow.uuid": "u-1",
        "source.address": "10.1.1.10", "destination.address": "10.1.2.20", "network.type": "ipv4",
        "source.port": 41000, "destination.port": 8080, "network.transport": "tcp",
        "ciliary.flow.source.namespace": "shop", "ciliary.flow.source.pod": "checkout-1",
        "ciliary.flow.source.identity": 1001, "ciliary.flow.source.workload": "checkout",
        "ciliary.flow.destination.namespace": "shop", "ciliary.flow.destination.pod": "payments-1",
        "ciliary.flow.destination.identity": 1002, "ciliary.flow.destination.service": "shop/payments",
        "ciliary.flow.policies": ["shop/lock"],
    }


def test_a_dns_answer_carries_query_and_rcode_and_nothing_unset() -> None:
    attrs = TF.flow_attributes(DNS)
    assert attrs["ciliary.flow.dns.query"] == "payments.shop."
    assert attrs["ciliary.flow.dns.rcode"] == 3
    assert attrs["network.transport"] == "udp"
    assert "ciliary.flow.source.pod" not in attrs and "ciliary.flow.uuid" not in attrs
    for flow in (DROP, DNS):
        assert set(TF.flow_attributes(flow)) <= set(TF.ATTRIBUTES)


def test_flow_time_keeps_nanoseconds() -> None:
    assert TF.flow_time_ns(DROP) == 1796551201_123456789
    assert TF.flow_time_ns(schema.Flow(time="garbage")) is None
    assert TF.flow_time_ns(schema.Flow()) is None


@pytest.mark.parametrize(("env", "protocol"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),  # the setting is off
    ({TF.ENV_FLOW_LOGS: "1"}, None),  # no endpoint
    ({TF.ENV_FLOW_LOGS: "1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http/protobuf"),
    ({TF.ENV_FLOW_LOGS: "1", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c:4317",
      "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc"}, "grpc"),
    ({TF.ENV_FLOW_LOGS: "1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_LOGS_EXPORTER": "none"}, None),
])
def test_flow_logs_setting(env: dict[str, str], protocol: str | None) -> None:
    assert TF.logs_protocol(env) == protocol


def test_a_bad_protocol_turns_flow_logs_off_with_a_message(caplog: pytest.LogCaptureFixture) -> None:
    env = {TF.ENV_FLOW_LOGS: "1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(telemetry.TracingSettingError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        TF.logs_protocol(env)
    assert TF.FlowLogs.from_env("flows", env=env) is None
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='http/json'" in caplog.text


def test_records_have_severity_time_body_and_resource() -> None:
    exporter = InMemoryLogRecordExporter()
    logs = TF.FlowLogs.from_env("flows", cluster="c1", env={}, exporter=exporter)
    assert logs is not None
    logs.emit([DROP, DNS])
    logs.shutdown()
    records = [r.log_record for r in exporter.get_finished_logs()]
    assert [r.severity_text for r in records] == ["WARN", "INFO"]
    assert records[0].timestamp == 1796551201_123456789
    assert records[0].body == "TCP Flags: SYN"
    assert records[1].body == "FORWARDED"  # no summary: the verdict
    assert records[0].event_name == TF.EVENT_NAME
    resource = exporter.get_finished_logs()[0].resource.attributes
    assert resource["service.name"] == "ciliary-flows" and resource["ciliary.cluster"] == "c1"
    assert logs.emitted == 2
