"""The public event API's pure parts (subjects, setting, leases, payloads) and its
publisher over the in-memory bus: leases switch publishing on and off, bucket changes
become change events only while leased."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest

from ciliary import hubble, schema
from ciliary.events import interest, payloads, subjects
from ciliary.events.changes import start_change_events
from ciliary.events.publisher import EventPublisher
from ciliary.testing import FakeBus
from tests.unit.test_flows_scenario import scenario_flows

# ---------------------------------------------------------------- subjects and setting


def test_subjects_are_one_token_per_name() -> None:
    assert subjects.subject("flows", "default", "node-1") == "ciliary.events.flows.default.node-1"
    assert subjects.subject("services", "c.1") == "ciliary.events.services.c_1"
    assert subjects.subject("endpoints", "c", "") == "ciliary.events.endpoints.c._"
    assert subjects.topic_of("ciliary.events.policy.c") == "policy"
    assert subjects.topic_of("flows.enriched.c.n") == ""


@pytest.mark.parametrize(("text", "always", "leases"), [
    ("", set(), True),
    ("interest", set(), True),
    ("OFF", set(), False),
    ("always", set(subjects.TOPICS), True),
    ("flows, services", {"flows", "services"}, True),
])
def test_setting(text: str, always: set[str], leases: bool) -> None:
    setting, problem = subjects.parse_setting(text)
    assert problem == ""
    assert setting.always == always and setting.leases is leases


def test_bad_setting_names_the_variable_and_falls_back() -> None:
    setting, problem = subjects.parse_setting("flows,flowz")
    assert setting == subjects.EventsSetting()
    assert "CILIARY_EVENTS" in problem and "'flowz'" in problem


# ---------------------------------------------------------------- leases


def test_lease_requests() -> None:
    assert interest.parse_request(b"") == (subjects.TOPICS, interest.DEFAULT_TTL_S)
    assert interest.parse_request(b'{"topics":["flows","flows"],"ttl_s":5}') == (("flows",), 5)
    assert interest.parse_request(b"{}") == (subjects.TOPICS, interest.DEFAULT_TTL_S)


@pytest.mark.parametrize(("body", "names"), [
    (b'{"topics":["flows","flowz"]}', "topics[1]: unknown topic 'flowz'"),
    (b'{"topics":"flows"}', "$.topics"),
    (b'{"ttl_s":0}', "ttl_s"),
    (b'{"ttl":5}', "ttl"),
    (b"[1]", "Expected `object`"),
    (b"{", "not a JSON object"),
])
def test_bad_lease_requests_name_the_field(body: bytes, names: str) -> None:
    with pytest.raises(interest.InterestError, match="interest request") as err:
        interest.parse_request(body)
    assert names in str(err.value)


def test_leases_only_extend() -> None:
    leases = interest.Leases()
    assert leases.grant(["flows"], 10, now=100) == ["flows"]
    assert leases.grant(["flows", "policy"], 2, now=101) == ["policy"]
    assert leases.leased("flows", 109.9) and not leases.leased("flows", 110)
    assert not leases.leased("policy", 103)
    assert leases.grant(["policy"], 1, now=103) == ["policy"]


# ---------------------------------------------------------------- payloads


def test_flow_line_is_the_observe_json_line() -> None:
    flows = scenario_flows()
    odd = msgspec.structs.replace(flows[0], node_name="c/<n>&", time="", source_names=["a<b>.example"])
    for flow in [*flows, odd, schema.Flow()]:
        assert payloads.flow_line(flow) == hubble.format_jsonpb(flow).encode() + b"\n"


def test_flow_messages_are_observe_json_lines() -> None:
    flows = scenario_flows()
    lines = [hubble.format_jsonpb(f) for f in flows]
    whole = payloads.flow_messages(flows, 1 << 20)
    assert whole.messages == [("\n".join(lines) + "\n").encode()]
    limit = max(len(line) for line in lines) + 1
    split = payloads.flow_messages(flows, limit)
    assert len(split.messages) > 1 and all(len(m) <= limit for m in split.messages)
    assert b"".join(split.messages) == whole.messages[0]
    assert [json.loads(x) for m in split.messages for x in m.splitlines()] == [json.loads(x) for x in lines]
    tiny = payloads.flow_messages(flows, 10)
    assert tiny.messages == [] and tiny.too_large == len(flows)


def identity(i: int, labels: list[str]) -> schema.IdentityRecord:
    return schema.IdentityRecord(id=i, labels=labels, scope="cluster", cluster="c1", cluster_id=1)


def test_identity_events() -> None:
    a = identity(1000, ["k8s:app=web"])
    added = payloads.identity_event(None, a)
    assert added == {"version": 1, "kind": "identity", "change": "added", "cluster": "c1",
                     "identity": {"id": 1000, "labels": ["k8s:app=web"], "scope": "cluster"}}
    assert payloads.identity_event(a, a) is None
    assert payloads.identity_event(a, None)["change"] == "removed"  # type: ignore[index]


def ipcache(prefix: str, ident: int, source: str = "pod") -> schema.IPCacheRecord:
    return schema.IPCacheRecord(prefix=prefix, identity=ident, source=source, cluster="c1", cluster_id=1,
                                node="node-2", namespace="shop", pod="web-1")


def test_endpoint_events_are_pods_only() -> None:
    e = payloads.endpoint_event(ipcache("10.0.1.5/32", 1000), ipcache("10.0.1.5/32", 1001))
    assert e is not None and e["change"] == "updated"
    assert e["endpoint"] == {"namespace": "shop", "pod": "web-1", "node": "node-2", "ip": "10.0.1.5",
                             "identity": 1001}
    assert payloads.endpoint_event(None, ipcache("0.0.0.0/0", 2, "world")) is None
    assert payloads.endpoint_node(None, ipcache("10.0.1.5/32", 1)) == "node-2"


def policy(entries: list[schema.PolicyEntryRecord], **kw: object) -> schema.PolicyMapRecord:
    return schema.PolicyMapRecord(identity=1000, cluster="c1", cluster_id=1, ingress_enforced=True,
                                  egress_enforced=False, entries=entries,
                                  rules={7: "CiliumNetworkPolicy/shop/web spec[0].ingress[0]"}, **kw)


ALLOW_80 = schema.PolicyEntryRecord(peer=1001, port=80, proto=6, direction="ingress", verdict="allow", rule_ref=7)
DENY_22 = schema.PolicyEntryRecord(peer=0, port=22, proto=6, direction="ingress", verdict="deny", rule_ref=7)


def test_policy_events_carry_verdict_changes() -> None:
    e = payloads.policy_event(policy([ALLOW_80]), policy([ALLOW_80, DENY_22]))
    assert e is not None and e["change"] == "updated" and e["identity"] == 1000
    assert e["removed"] == []
    assert e["added"] == [{"direction": "ingress", "peer_identity": 0, "port": 22, "end_port": 0, "protocol": 6,
                           "verdict": "deny", "audit": False,
                           "rule": "CiliumNetworkPolicy/shop/web spec[0].ingress[0]"}]
    assert payloads.policy_event(policy([ALLOW_80]), policy([ALLOW_80])) is None
    gone = payloads.policy_event(policy([ALLOW_80]), None)
    assert gone is not None and gone["change"] == "removed" and len(gone["removed"]) == 1
    flags = payloads.policy_event(policy([ALLOW_80]), policy([ALLOW_80], audit_ingress=True))
    assert flags is not None and flags["audit_ingress"] and flags["added"] == flags["removed"] == []


def frontend(backends: list[schema.LBBackend]) -> schema.LBFrontend:
    return schema.LBFrontend(namespace="shop", name="web", type="ClusterIP", address="10.96.0.20", port=80,
                             proto="TCP", service_id=3, rev_nat_id=3, backends=backends, cluster="c1")


def test_service_events() -> None:
    b = schema.LBBackend(id=1, ip="10.0.1.5", port=8080, proto="TCP", pod="shop/web-1", node="node-2")
    e = payloads.service_event(frontend([]), frontend([b]))
    assert e is not None and e["change"] == "updated"
    assert e["service"]["name"] == "web" and e["frontend"] == {"address": "10.96.0.20", "port": 80,
                                                               "protocol": "TCP", "node": ""}
    assert e["backends"] == [{"ip": "10.0.1.5", "port": 8080, "protocol": "TCP", "state": "active",
                              "node": "node-2", "pod": "shop/web-1"}]


# ---------------------------------------------------------------- publisher over the in-memory bus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def ask(bus: FakeBus, body: bytes) -> dict:
    replies = await bus.request_many(subjects.SUBJECT_INTEREST, body, timeout=1, quiet=0.01)
    assert len(replies) == 1
    return json.loads(replies[0])


async def test_flows_only_while_leased() -> None:
    bus, clock = FakeBus(), Clock()
    pub = EventPublisher(bus, "c1", (subjects.FLOWS,), subjects.EventsSetting(), clock)
    await pub.start()
    assert not pub.active("flows")
    reply = await ask(bus, b'{"topics":["flows"],"ttl_s":10}')
    assert reply == {"version": 1, "topics": ["flows"], "ttl_s": 10.0}
    assert pub.active("flows")
    clock.now += 10
    assert not pub.active("flows")
    bad = await ask(bus, b'{"topics":["nope"]}')
    assert "topics[0]" in bad["error"] and not pub.active("flows")
    assert pub.stats["bad_requests"] == 1


async def test_off_ignores_leases_and_always_needs_none() -> None:
    bus = FakeBus()
    off = EventPublisher(bus, "c1", (subjects.FLOWS,), subjects.parse_setting("off")[0])
    always = EventPublisher(bus, "c1", (subjects.FLOWS,), subjects.parse_setting("flows")[0])
    await off.start()
    assert always.active("flows")
    await bus.publish(subjects.SUBJECT_INTEREST, b"")
    await settle()
    assert not off.active("flows")


async def test_bucket_changes_are_published_only_while_leased() -> None:
    bus = FakeBus()
    await bus.kv_put(schema.BUCKET_IDENTITIES, "id.1000", identity(1000, ["k8s:app=web"]))
    try:
        await _leased_changes(bus)
    except* Done:
        pass


class Done(Exception):
    pass


async def _leased_changes(bus: FakeBus) -> None:
    published = lambda: [json.loads(d) for s, d in bus.published if s == "ciliary.events.identities.c1"]  # noqa: E731
    async with asyncio.TaskGroup() as tg:
        await start_change_events(bus, "c1", tg, (subjects.IDENTITIES,))
        await settle()
        await bus.kv_put(schema.BUCKET_IDENTITIES, "id.1001", identity(1001, ["k8s:app=db"]))
        await settle()
        assert [s for s, _ in bus.published if s.startswith("ciliary.events.")] == []

        await bus.publish(subjects.SUBJECT_INTEREST, b'{"topics":["identities"],"ttl_s":1}')
        await settle()
        await bus.kv_put(schema.BUCKET_IDENTITIES, "id.1002", identity(1002, ["k8s:app=cache"]))
        await bus.kv_delete(schema.BUCKET_IDENTITIES, "id.1000")
        await settle()
        events = published()
        assert [(e["change"], e["identity"]["id"]) for e in events] == [("added", 1002), ("removed", 1000)]
        assert events[1]["identity"]["labels"] == ["k8s:app=web"]  # a removal carries the last state

        await asyncio.sleep(1.1)  # the lease ends: the watch stops, nothing more is published
        await bus.kv_put(schema.BUCKET_IDENTITIES, "id.1003", identity(1003, ["k8s:app=x"]))
        await settle()
        assert len(published()) == 2
        raise Done


def test_each_topic_has_one_publishing_service() -> None:
    published = [t for topics in subjects.SERVICE_TOPICS.values() for t in topics]
    assert sorted(published) == sorted(subjects.TOPICS)
    assert subjects.publish_patterns("identity", "c1") == (
        "ciliary.events.identities.c1", "ciliary.events.identities.c1.>",
        "ciliary.events.endpoints.c1", "ciliary.events.endpoints.c1.>")
    assert subjects.publish_patterns("mesh", "c1") == ()


def test_the_asyncapi_document_lists_every_subject() -> None:
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml").read_text())
    channels = set(doc["channels"])
    assert subjects.SUBJECT_INTEREST in channels
    per_node = {subjects.FLOWS, subjects.ENDPOINTS}
    assert channels - {subjects.SUBJECT_INTEREST} == {
        f"ciliary.events.{t}.{{cluster}}" + (".{node}" if t in per_node else "") for t in subjects.TOPICS}
    lease = doc["components"]["messages"]["Lease"]["payload"]["properties"]
    assert lease["topics"]["items"]["enum"] == list(subjects.TOPICS)
    assert (lease["ttl_s"]["minimum"], lease["ttl_s"]["maximum"], lease["ttl_s"]["default"]) == (
        interest.MIN_TTL_S, interest.MAX_TTL_S, interest.DEFAULT_TTL_S)
