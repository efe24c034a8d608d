"""The debug order of ``ciliary diagnose`` over recorded flows, DNS lookups, spans and policy traces."""

from __future__ import annotations

from ciliary import schema
from ciliary.diagnose import (
    LAYER_DNS,
    LAYER_HEALTHY,
    LAYER_L7,
    LAYER_NETWORK,
    LAYER_NO_FLOW,
    LAYER_POLICY,
    LAYER_SIDECAR,
    Evidence,
    diagnose,
)


def tcp(verdict: str = "FORWARDED", reason: str = "", denied_by: str = "") -> schema.Flow:
    denied = [schema.FlowPolicy(name=denied_by, namespace="shop", kind="CiliumNetworkPolicy")] if denied_by else []
    return schema.Flow(
        time="2026-12-06T11:00:00.000000000Z", verdict=verdict, drop_reason_desc=reason, node_name="t1/node-1",
        ip=schema.FlowIP(source="10.1.0.5", destination="10.1.1.7"),
        l4=schema.FlowLayer4(TCP=schema.FlowTCP(source_port=40000, destination_port=8080)),
        source=schema.FlowEndpoint(identity=1001), destination=schema.FlowEndpoint(identity=1002),
        egress_denied_by=denied)


def dns(kind: str, rcode: int = 0, ips: tuple[str, ...] = ()) -> schema.Flow:
    return schema.Flow(
        time="2026-12-06T11:00:00.000000000Z", verdict="FORWARDED", node_name="t1/node-1",
        ip=schema.FlowIP(source="10.96.0.10" if kind == "RESPONSE" else "10.1.0.5",
                         destination="10.1.0.5" if kind == "RESPONSE" else "10.96.0.10"),
        l7=schema.FlowLayer7(type=kind, dns=schema.FlowDNS(query="payments.shop.", rcode=rcode, ips=list(ips))))


def span(status: int = 200, flags: str = "", upstream: str = "10.96.0.20:8080", attempts: str = "1") -> schema.L7Span:
    return schema.L7Span(trace_id="ab" * 16, span_id="01" * 8, direction="outbound", status_code=status,
                         attributes={"upstream.attempts": attempts},
                         response_flags=flags, upstream_address=upstream, upstream_cluster="PassthroughCluster",
                         canonical_service="checkout", verdict="FORWARDED")


BASE = {"source": "shop/checkout-1", "destination": "shop/payments", "port": 8080}


def test_dns_failure_names_the_rcode_and_server() -> None:
    d = diagnose(Evidence(**{**BASE, "destination": "payments.shop"}, dns_name="payments.shop",
                          dns_flows=[dns("REQUEST"), dns("RESPONSE", rcode=3)], flows=[tcp()]))
    assert d.layer == LAYER_DNS and "NXDOMAIN" in d.summary and "10.96.0.10" in d.summary
    assert d.details["rcode"] == "NXDOMAIN"


def test_dns_timeout_when_no_answer_came() -> None:
    d = diagnose(Evidence(**BASE, dns_name="payments.shop", dns_flows=[dns("REQUEST")]))
    assert d.layer == LAYER_DNS and d.details["rcode"] == "TIMEOUT"


def test_resolved_name_moves_on_to_the_flows() -> None:
    d = diagnose(Evidence(**BASE, dns_name="payments.shop",
                          dns_flows=[dns("REQUEST"), dns("RESPONSE", ips=("10.96.0.20",))]))
    assert d.layer == LAYER_NO_FLOW and d.looked_at["flows"] == 0


def test_policy_drop_names_the_policy_and_carries_the_trace() -> None:
    trace = schema.PolicyTraceReply(verdict="deny", egress=schema.PolicyTraceStep(
        direction="egress", verdict="deny", reason="rule", rules=["shop/deny-payments"]))
    d = diagnose(Evidence(**BASE, flows=[tcp("DROPPED", "POLICY_DENIED", denied_by="deny-payments")],
                          policy_trace=trace))
    assert d.layer == LAYER_POLICY and "shop/deny-payments" in d.summary
    assert any("policy trace egress: DENY (rule): shop/deny-payments" in line for line in d.evidence)
    assert d.details["source_identity"] == 1001


def test_default_deny_without_a_denying_policy() -> None:
    d = diagnose(Evidence(**BASE, flows=[tcp("DROPPED", "POLICY_DENIED")]))
    assert d.layer == LAYER_POLICY and "default deny" in d.summary


def test_other_drops_are_network() -> None:
    d = diagnose(Evidence(**BASE, flows=[tcp("DROPPED", "SERVICE_BACKEND_NOT_FOUND")]))
    assert d.layer == LAYER_NETWORK and "SERVICE_BACKEND_NOT_FOUND" in d.summary


def test_sidecar_bypass_by_socket_lb_or_missing_redirection() -> None:
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True, socket_lb_in_pods=True))
    assert d.layer == LAYER_SIDECAR and "socket-LB" in d.summary
    # seen in the spans: Envoy's upstream is a backend, not the Service's ClusterIP
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True, spans=[span(upstream="10.1.1.7:8080")],
                          service_ips=["10.96.0.20"]))
    assert d.layer == LAYER_SIDECAR and "10.1.1.7:8080" in d.summary and d.details["upstreams"] == ["10.1.1.7:8080"]
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True, spans=[span()], service_ips=["10.96.0.20"]))
    assert d.layer == LAYER_HEALTHY
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True))
    assert d.layer == LAYER_SIDECAR and "redirection" in d.summary


def test_l7_failure_reports_status_flags_and_upstream() -> None:
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True, spans=[span(), span(503, "URX", attempts="3")]))
    assert d.layer == LAYER_L7
    assert "status 503" in d.summary and "URX" in d.summary and "10.96.0.20:8080" in d.summary
    assert "retry limit exceeded" in d.summary and "2 retries" in d.summary
    assert d.details["response_flags"] == ["URX"] and d.details["status"] == 503 and d.details["retries"] == 2


def test_healthy() -> None:
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True, spans=[span()]))
    assert d.layer == LAYER_HEALTHY and d.looked_at == {"flows": 1, "spans": 1, "dns_flows": 0}


def test_l7_failure_prefers_the_callers_view_of_the_upstream() -> None:
    inbound = schema.L7Span(trace_id="cd" * 16, direction="inbound", status_code=503,
                            upstream_address="127.0.0.1:8080", upstream_cluster="inbound|8080||")
    d = diagnose(Evidence(**BASE, flows=[tcp()], sidecar=True, spans=[span(503), inbound]))
    assert d.layer == LAYER_L7 and d.details["upstream"] == "10.96.0.20:8080"
