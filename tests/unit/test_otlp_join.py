"""OTLP decoding, the bounded L7 store, Hubble's HTTP metrics and the span/flow join."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from ciliary import schema
from ciliary.hubble import rfc3339_nano
from services.flows.join import JoinIndex, flow_key, span_key
from services.flows.l7core import L7Core
from services.flows.l7store import L7Store
from services.flows.otlp import OTLPError, decode_traces

T0 = 1_700_000_000 * 10**9
TRACE = "ab" * 16


def envoy_request(trace_id: bytes = bytes.fromhex(TRACE), status: str = "503", flags: str = "URX") -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="checkout.shop")))
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name, span.kind = trace_id, b"\x01" * 8, "egress", 3
    span.start_time_unix_nano, span.end_time_unix_nano = T0, T0 + 3_000_000
    for key, value in (("http.status_code", status), ("response_flags", flags), ("http.method", "GET"),
                       ("upstream_cluster", "PassthroughCluster"), ("istio.direction", "outbound"),
                       ("upstream.local_address", "10.1.0.5:40000"), ("upstream.remote_address", "10.96.0.10:8080"),
                       ("k8s.pod.name", "checkout-1"), ("k8s.namespace.name", "shop")):
        span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return req.SerializeToString()


def test_envoy_tags_become_span_fields() -> None:
    [span] = decode_traces(envoy_request(), "application/x-protobuf")
    assert (span.trace_id, span.kind, span.status_code, span.response_flags) == (TRACE, "CLIENT", 503, "URX")
    assert (span.upstream_address, span.upstream_local_address) == ("10.96.0.10:8080", "10.1.0.5:40000")
    assert span_key(span) == ("10.1.0.5", 40000)
    [clean] = decode_traces(envoy_request(status="200", flags="-"), "application/x-protobuf")
    assert clean.response_flags == ""


@pytest.mark.parametrize("body,kind", [
    (b"\x0a\x05junk", "application/x-protobuf"),
    (envoy_request(trace_id=b"\x01" * 8), "application/x-protobuf"),
    (envoy_request(trace_id=bytes(16)), "application/x-protobuf"),
    (b"[]", "application/json"),
    (b"{}", "application/grpc"),
])
def test_malformed_requests_raise(body: bytes, kind: str) -> None:
    with pytest.raises(OTLPError):
        decode_traces(body, kind)


def test_store_is_bounded_and_its_trace_index_follows() -> None:
    store = L7Store(capacity=3)
    spans = [schema.L7Span(trace_id=f"{i % 2:032x}", span_id=f"{i:016x}", start_ns=i) for i in range(5)]
    store.add(spans)
    assert len(store) == 3 and store.overwritten == 2
    assert [s.span_id for s in store.trace(f"{0:032x}")] == [f"{2:016x}", f"{4:016x}"]
    assert [s.span_id for s in store.trace(f"{1:032x}")] == [f"{3:016x}"]


def flow(src: str, sport: int, dst: str, dport: int, t_ns: int, *, reply: bool = False, node: str = "t1/node-1",
         verdict: str = "FORWARDED", uuid: str = "", policy: str = "") -> schema.Flow:
    allowed = [schema.FlowPolicy(name=policy, namespace="shop")] if policy else []
    return schema.Flow(
        time=rfc3339_nano(t_ns), uuid=uuid or f"u-{sport}-{t_ns}", verdict=verdict, is_reply=reply,
        ip=schema.FlowIP(source=src, destination=dst),
        l4=schema.FlowLayer4(TCP=schema.FlowTCP(source_port=sport, destination_port=dport)),
        source=schema.FlowEndpoint(identity=1001, namespace="shop", pod_name="checkout-1"),
        destination=schema.FlowEndpoint(identity=1002, namespace="shop", pod_name="payments-1"),
        node_name=node, egress_allowed_by=allowed)


def test_flow_key_is_the_client_socket_on_both_directions() -> None:
    assert flow_key(flow("10.1.0.5", 40000, "10.1.1.7", 8080, T0)) == ("10.1.0.5", 40000)
    assert flow_key(flow("10.1.1.7", 8080, "10.1.0.5", 40000, T0, reply=True)) == ("10.1.0.5", 40000)


def test_span_joins_flows_of_its_connection_before_or_after_it_arrives() -> None:
    l7 = L7Core()
    # the translated flows (backend 10.1.1.7) of the connection, before the span
    l7.on_flows([flow("10.1.0.5", 40000, "10.1.1.7", 8080, T0 - 10**6, uuid="syn", policy="allow-checkout"),
                 flow("10.1.0.5", 40001, "10.1.1.7", 8080, T0, uuid="other-connection")])
    l7.accept(decode_traces(envoy_request(), "application/x-protobuf"))
    [span] = l7.store.trace(TRACE)
    assert span.joined and span.flow_uuids == ["syn"] and span.verdict == "FORWARDED"
    assert (span.source_identity, span.destination_identity) == (1001, 1002)
    assert (span.source_workload, span.destination_workload) == ("shop/checkout-1", "shop/payments-1")
    assert span.policies == ["shop/allow-checkout"] and span.node == "t1/node-1"
    # a reply flow arriving later joins too, and both flows carry the trace id
    l7.on_flows([flow("10.1.1.7", 8080, "10.1.0.5", 40000, T0 + 2 * 10**6, reply=True, uuid="synack",
                      node="t1/node-2")])
    [span] = l7.store.trace(TRACE)
    assert span.flow_uuids == ["syn", "synack"]
    assert span.node == "t1/node-1" and span.policies == ["shop/allow-checkout"]  # kept from the first flows
    assert l7.trace_of_flow("syn") == l7.trace_of_flow("synack") == TRACE
    assert l7.trace_of_flow("other-connection") == ""
    reply = l7.query(schema.encode(schema.L7Query(trace_id=TRACE)))
    assert [schema.decode(f, schema.Flow).uuid for f in reply.flows] == ["syn", "synack"]
    assert 'destination="shop/payments-1"' in l7.metrics.render()


def test_flows_outside_the_window_or_of_a_reused_port_do_not_join() -> None:
    index = JoinIndex()
    index.add_flows([flow("10.1.0.5", 40000, "10.1.1.7", 8080, T0 - 10**12)])  # 1000 s earlier
    [span] = decode_traces(envoy_request(), "application/x-protobuf")
    assert not index.join_span(span).joined


def test_join_memory_is_bounded() -> None:
    index = JoinIndex(max_keys=10, max_traces=5)
    index.add_flows([flow("10.1.0.5", 30000 + i, "10.1.1.7", 8080, T0) for i in range(50)])
    assert len(index._flows) == 10
    for i in range(8):
        span = schema.L7Span(trace_id=f"{i + 1:032x}", direction="inbound", start_ns=T0, end_ns=T0,
                             downstream_remote_address=f"10.1.0.5:{30040 + i}")
        index.join_span(span)
    assert len(index.trace_of_flow) == 5
    assert sum(len(v) for v in index.flows_of_trace.values()) == 5


def test_joined_flows_carry_the_trace_id_and_observe_filters_by_it() -> None:
    from ciliary import flowfilter
    from services.flows.store import FlowStore

    store = FlowStore()
    l7 = L7Core()
    flows = [flow("10.1.0.5", 40000, "10.1.1.7", 8080, T0 - 10**6, uuid="syn"),
             flow("10.1.0.5", 40001, "10.1.1.7", 8080, T0, uuid="other")]
    store.extend(flows)
    l7.on_flows(flows)
    l7.accept(decode_traces(envoy_request(), "application/x-protobuf"))
    links = l7.drain_links()
    assert links == {("t1/node-1", TRACE): {"syn"}} and l7.drain_links() == {}
    for (node, trace_id), uuids in links.items():
        assert store.set_trace(node, uuids, trace_id) == 1
    whitelist, blacklist = flowfilter.build_filters([("trace-id", TRACE.upper())])
    [found] = store.query(schema.FlowQuery(whitelist=whitelist, blacklist=blacklist))
    assert found.uuid == "syn" and found.trace_context.parent.trace_id == TRACE
    assert '"trace_context":{"parent":{"trace_id":"' + TRACE in schema.to_json(found).decode()
    with pytest.raises(flowfilter.FilterError, match="--trace-id"):
        flowfilter.build_filters([("trace-id", "xyz")])


def test_unjoined_spans_are_counted_by_direction_with_the_service_of_a_clusterip() -> None:
    l7 = L7Core(resolve=lambda address: "shop/payments" if address == "10.96.0.10:8080" else "")
    l7.accept(decode_traces(envoy_request(), "application/x-protobuf"))
    text = l7.metrics.render()
    assert ('hubble_http_requests_total{destination="shop/payments",method="GET",protocol="HTTP/1.1",'
            'reporter="client",source="shop/checkout-1",status="503"} 1') in text


def test_a_bad_query_is_one_error_reply() -> None:
    reply = L7Core().query(b"\xc1not msgpack")
    assert not reply.ok and reply.error and not reply.spans


def test_join_holds_at_most_max_flows_in_all() -> None:
    index = JoinIndex(max_flows=20)
    index.add_flows([flow("10.1.0.5", 30000 + i, "10.1.1.7", 8080, T0) for i in range(50)])
    assert index.held == 20 and len(index._flows) == 20 and index.evicted_keys == 30
    # one busy connection: its ring keeps PER_KEY flows, the oldest connections make room
    index.add_flows([flow("10.1.0.9", 40000, "10.1.1.7", 8080, T0 + i) for i in range(40)])
    assert index.held == 20 and len(index._flows[("10.1.0.9", 40000)]) == 16
    assert len(index._flows) == 5 and index.evicted_keys == 30 + 16
    core = L7Core()
    assert core.stats()["join"] == {"size": 0, "cap": 16384, "evicted": 0}
