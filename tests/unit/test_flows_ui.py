"""The service map: the pure builder, the HTTP routes and the self-contained page."""

from __future__ import annotations

import asyncio
import json
import re

import msgspec

from ciliary import schema
from ciliary.hubble import rfc3339_nano
from services.flows.core import FlowsCore
from services.flows.http import parse_target, start_http_server
from services.flows.servicemap import build_service_map, endpoint_node, verdict_class
from services.flows.settings import ENV_METRICS_PORT, ENV_UI_PORT, http_plan
from services.flows.ui import PAGE
from tests.unit.test_flows_scenario import BOOT_NS, LOOKUPS, TS0, ev, scenario_batch, scenario_flows

FLOWS = scenario_flows()


def edges_of(m: dict) -> dict[tuple[str, str, str], dict]:
    return {(e["source"], e["destination"], e["verdict"]): e for e in m["edges"]}


def test_scenario_service_map() -> None:
    m = build_service_map(FLOWS)
    ids = [n["id"] for n in m["nodes"]]
    assert ids == sorted(ids, key=lambda i: (next(n["namespace"] for n in m["nodes"] if n["id"] == i), i))
    assert "default/checkout" in ids and "default/payments" in ids and "world" in ids
    assert m["namespaces"] == ["", "default", "kube-system"]
    edges = edges_of(m)
    fwd = edges[("default/checkout", "default/payments", "forwarded")]
    assert fwd["colour"] == "#2e9d4f" and fwd["ports"] == ["8080/TCP"]
    assert fwd["services"] == ["default/payments"] and fwd["flows"] >= 1
    drop = edges[("default/frontend-6b8c9d7e4-zzzzz", "default/payments", "dropped")]
    assert drop["colour"] == "#d93636" and drop["drop_reasons"] == {"POLICY_DENIED": 1}
    assert drop["flows"] == 1  # the policy-verdict flow of the same packet is not counted again
    audit = edges[("default/frontend-6b8c9d7e4-zzzzz", "default/checkout", "audit")]
    assert audit["colour"] == "#e0a100" and audit["flows"] == 1
    assert ("default/frontend-6b8c9d7e4-zzzzz", "default/checkout", "forwarded") not in edges
    # an allowed connection's policy-verdict flow is not counted, its trace flow is
    assert edges[("world", "default/frontend-6b8c9d7e4-zzzzz", "forwarded")]["flows"] == 1
    # a drop before load balancing lands on the Service it was addressed to
    assert edges[("default/checkout", "default/svc/empty", "dropped")]["drop_reasons"] == {
        "SERVICE_BACKEND_NOT_FOUND": 1}
    # DNS request and responses (via the VIP) are attributed to the backend's edge
    dns = edges[("default/checkout", "kube-system/coredns-5d78c9869d-q8w7e", "forwarded")]
    assert dns["l7"]["dns-request"] == 1 and dns["l7"]["dns-response"] == 2 and dns["l7"]["dns-rcode-3"] == 1
    t = m["totals"]
    assert t["flows"] == t["forwarded"] + t["dropped"] + t["audit"] == sum(e["flows"] for e in m["edges"])


def test_pure_and_json_ready() -> None:
    a = build_service_map(FLOWS, now_ns=5, seen=20, lost=1)
    b = build_service_map(list(FLOWS), now_ns=5, seen=20, lost=1)
    assert a == b and a["seen"] == 20 and a["lost"] == 1
    assert json.loads(json.dumps(a)) == a


def test_replies_and_policy_verdict_denies_not_counted() -> None:
    reply = schema.Flow(verdict="FORWARDED", is_reply=True, event_type=schema.FlowEventType(type=4))
    deny = schema.Flow(verdict="DROPPED", event_type=schema.FlowEventType(type=5))
    assert verdict_class(reply) is None and verdict_class(deny) is None
    assert verdict_class(schema.Flow(verdict="DROPPED", event_type=schema.FlowEventType(type=1, sub_type=133))) \
        == "dropped"
    assert build_service_map([reply, deny])["edges"] == []


def test_since_window() -> None:
    late = TS0 + 6 * 1_000_000 + BOOT_NS
    m = build_service_map(FLOWS, since_ns=late)
    assert m["totals"]["flows"] < build_service_map(FLOWS)["totals"]["flows"]
    assert all(e["last_ns"] >= late for e in m["edges"])


def test_endpoint_nodes() -> None:
    world = endpoint_node(schema.FlowEndpoint(identity=2, labels=["reserved:world"]))
    assert (world.id, world.namespace, world.kind) == ("world", "", "reserved")
    host = endpoint_node(schema.FlowEndpoint(identity=1, labels=["reserved:host"]))
    assert host.id == "host"
    pod = endpoint_node(schema.FlowEndpoint(identity=9, namespace="ns", pod_name="p-1"))
    assert (pod.id, pod.kind) == ("ns/p-1", "Pod")
    dep = endpoint_node(schema.FlowEndpoint(identity=9, namespace="ns", pod_name="p-1",
                                            workloads=[schema.FlowWorkload("web", "Deployment")]))
    assert (dep.id, dep.kind, dep.pods) == ("ns/web", "Deployment", {"p-1"})
    anon = endpoint_node(schema.FlowEndpoint(identity=77))
    assert anon.id == "identity:77"


def test_two_pods_of_one_workload_are_one_node() -> None:
    def flow(pod: str) -> schema.Flow:
        return schema.Flow(
            time=rfc3339_nano(BOOT_NS + TS0), verdict="FORWARDED", node_name="c/n",
            event_type=schema.FlowEventType(type=4), is_reply=False,
            source=schema.FlowEndpoint(identity=5, namespace="a", pod_name=pod,
                                       workloads=[schema.FlowWorkload("web", "Deployment")]),
            destination=schema.FlowEndpoint(identity=2, labels=["reserved:world"]),
        )

    m = build_service_map([flow("web-1"), flow("web-2")])
    assert [n["pods"] for n in m["nodes"] if n["id"] == "a/web"] == [["web-1", "web-2"]]
    assert m["edges"][0]["flows"] == 2


def test_core_service_map_and_routes() -> None:
    core = FlowsCore("default")
    core.enrichment = _lookups_state()
    core.ingest(schema.encode(scenario_batch()))
    assert core.metrics.value("hubble_lost_events_total", source="decode") == 0
    m = core.service_map()
    assert m["seen"] == core.store.seen and m["edges"]
    routes = core.http_routes()
    assert set(routes) == {"/", "/index.html", "/api/servicemap", "/healthz", "/metrics"}
    body = json.loads(routes["/api/servicemap"]({}).body)
    assert body["edges"] == msgspec.json.decode(msgspec.json.encode(m["edges"]))
    assert routes["/"]({}).content_type.startswith("text/html")
    assert b"hubble_flows_processed_total" in routes["/metrics"]({}).body
    assert set(core.http_routes(ui=False)) == {"/metrics"}


def _lookups_state():
    class State:
        def ip(self, a):  # noqa: ANN001, ANN202
            return LOOKUPS.ip(a)

        def labels(self, i):  # noqa: ANN001, ANN202
            return LOOKUPS.labels(i)

        def frontend(self, a, p, pr):  # noqa: ANN001, ANN202
            return LOOKUPS.frontend(a, p, pr)

        def policy(self, i, ref):  # noqa: ANN001, ANN202
            return LOOKUPS.policy(i, ref)

    return State()


def test_http_plan() -> None:
    assert http_plan({}) == {}
    assert http_plan({ENV_METRICS_PORT: "9965"}) == {9965: (True, True)}
    assert http_plan({ENV_METRICS_PORT: "9965", ENV_UI_PORT: "0"}) == {9965: (True, False)}
    assert http_plan({ENV_METRICS_PORT: "9965", ENV_UI_PORT: "12000"}) == {9965: (True, False),
                                                                          12000: (False, True)}
    assert http_plan({ENV_UI_PORT: "12000"}) == {12000: (False, True)}


def test_parse_target() -> None:
    assert parse_target(b"/api/servicemap?since=5m&x=1") == ("/api/servicemap", {"since": "5m", "x": "1"})
    assert parse_target(b"/") == ("/", {})


def test_http_server_routes() -> None:
    core = FlowsCore("default")
    core.ingest(schema.encode(scenario_batch()))

    async def get(port: int, target: str, method: str = "GET") -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        return data

    async def scenario() -> dict[str, bytes]:
        server = await start_http_server(0, core.http_routes(), "127.0.0.1")
        port = server.sockets[0].getsockname()[1]
        async with server:
            return {
                "page": await get(port, "/"),
                "map": await get(port, "/api/servicemap?since=1h"),
                "bad": await get(port, "/api/servicemap?since=yesterday-ish"),
                "missing": await get(port, "/nope"),
                "post": await get(port, "/", "POST"),
                "metrics": await get(port, "/metrics"),
            }

    got = asyncio.run(scenario())
    assert got["page"].startswith(b"HTTP/1.0 200 OK\r\n") and b"<svg" in got["page"]
    head, _, body = got["map"].partition(b"\r\n\r\n")
    assert b"application/json" in head and "edges" in json.loads(body)
    assert got["bad"].startswith(b"HTTP/1.0 400")
    assert got["missing"].startswith(b"HTTP/1.0 404")
    assert got["post"].startswith(b"HTTP/1.0 405")
    assert b"hubble_lost_events_total" in got["metrics"]


def test_page_is_self_contained() -> None:
    # no external scripts, styles, fonts or images; the only fetch is the same-origin API
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", PAGE)
    assert "@import" not in PAGE and "url(http" not in PAGE
    assert re.findall(r"""fetch\(("[^"]*")""", PAGE) == ['"/api/servicemap"']
    urls = set(re.findall(r"https?://[^\s\"'<>]+", PAGE))
    assert urls == {"http://www.w3.org/2000/svg"}  # an XML namespace name, never fetched
    for colour in ("#2e9d4f", "#d93636", "#e0a100"):
        assert colour in PAGE


def test_ev_helper_still_available() -> None:
    assert ev(0, saddr="1.1.1.1", daddr="2.2.2.2").ts_ns == TS0
