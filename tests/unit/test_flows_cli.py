"""``ciliary observe`` / ``ciliary metrics`` without NATS: parser, query building, output."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from ciliary import flowfilter, schema
from ciliary.bus import Message
from ciliary.cli import common, flowrender, observe
from ciliary.cli.common import CliError
from ciliary.testing import FakeBus
from services.flows.service import start_metrics_server
from services.flows.wire import reply_chunks
from tests.unit.test_flows_scenario import scenario_flows

FLOWS = scenario_flows()
NOW = 1_800_000_000 * 10**9


NODE_HEALTH = schema.HealthReport(
    service="node", instance="node-node-1", pid=1, version="0", started=0.0, healthy=True,
    node="node-1", detail={"maps": {"ciliary_policy": {"entries": 4, "max": 16, "fill": 0.25}},
                           "endpoints": 2},
)


async def serve_flows(bus: FakeBus, reply: Any) -> None:
    """A flows service that answers a flow query with ``reply`` (one record, or the chunks
    as given; nothing for None or []) and a metrics request with ``reply``, and one node
    executor that answers health requests. What was asked is kept in ``bus.requests``."""

    async def on_query(msg: Message) -> None:
        bus.requests.append((msg.subject, schema.decode(msg.data, schema.FlowQuery)))  # type: ignore[attr-defined]
        chunks = reply if isinstance(reply, list) else [] if reply is None else [reply]
        for chunk in chunks:
            await msg.respond(chunk)

    async def on_metrics(msg: Message) -> None:
        bus.requests.append((msg.subject, msg.data))  # type: ignore[attr-defined]
        await msg.respond(reply)

    async def on_health(msg: Message) -> None:
        await msg.respond(NODE_HEALTH)

    await bus.subscribe_raw(schema.SUBJECT_FLOWS_QUERY, on_query)
    await bus.subscribe_raw(schema.SUBJECT_FLOWS_METRICS, on_metrics)
    await bus.subscribe_raw(schema.SUBJECT_HEALTH_ALL, on_health)


def parser() -> argparse.ArgumentParser:
    common_parent = argparse.ArgumentParser(add_help=False)
    common_parent.add_argument("--data-dir")
    p = argparse.ArgumentParser(prog="ciliary")
    sub = p.add_subparsers(dest="command", required=True)
    observe.add_commands(sub, common_parent)
    return p


def run(argv: list[str], reply: Any) -> tuple[int, FakeBus]:
    bus = FakeBus()
    bus.requests = []  # type: ignore[attr-defined]
    args = parser().parse_args(argv)

    async def with_services(work: Any) -> Any:
        await serve_flows(bus, reply)
        return await work(bus)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "run_with_bus", lambda args, work: asyncio.run(with_services(work)))
        return args.func(args), bus


def query_of(argv: list[str]) -> schema.FlowQuery:
    args = parser().parse_args(["observe", *argv])
    return observe.build_query(args, now_ns=NOW)


@pytest.mark.parametrize(("argv", "white", "black", "number", "first", "since"), [
    ([], "[]", "[]", 20, False, 0),
    (["--last", "5"], "[]", "[]", 5, False, 0),
    (["--first", "3"], "[]", "[]", 3, True, 0),
    (["--all"], "[]", "[]", 0, False, 0),
    (["-f"], "[]", "[]", 0, False, 0),
    (["-f", "--last", "10"], "[]", "[]", 10, False, 0),
    (["--since", "5m"], "[]", "[]", 0, False, NOW - 300 * 10**9),
    (["--from-pod", "default/checkout", "--to-pod", "payments"],
     '[{"source_pod":["default/checkout"],"destination_pod":["payments"]}]', "[]", 20, False, 0),
    (["--pod", "checkout"], '[{"source_pod":["checkout"]},{"destination_pod":["checkout"]}]', "[]", 20, False, 0),
    (["-n", "kube-system", "--protocol", "dns"],
     '[{"source_pod":["kube-system/"],"protocol":["dns"]},{"destination_pod":["kube-system/"],"protocol":["dns"]}]',
     "[]", 20, False, 0),
    (["-l", "app=x", "--not", "--verdict", "FORWARDED"],
     '[{"source_label":["app=x"]},{"destination_label":["app=x"]}]', '[{"verdict":["FORWARDED"]}]', 20, False, 0),
    (["--from-identity", "1234", "--to-ip", "10.0.0.0/8", "--to-port", "80", "--traffic-direction", "egress"],
     '[{"source_identity":[1234],"destination_ip":["10.0.0.0/8"],"traffic_direction":["EGRESS"],"destination_port":["80"]}]',
     "[]", 20, False, 0),
    (["--drop-reason-desc", "POLICY_DENIED", "-t", "drop", "--node-name", "default/node-1"],
     '[{"drop_reason_desc":["POLICY_DENIED"],"event_type":[{"type":1}],"node_name":["default/node-1"]}]',
     "[]", 20, False, 0),
])
def test_flags_build_the_query(argv: list[str], white: str, black: str, number: int, first: bool,
                               since: int) -> None:
    q = query_of(argv)
    assert flowfilter.filters_json(q.whitelist) == white
    assert flowfilter.filters_json(q.blacklist) == black
    assert (q.number, q.first, q.since_ns) == (number, first, since)


def test_first_and_last_conflict() -> None:
    with pytest.raises(flowfilter.FilterError):
        query_of(["--first", "1", "--last", "1"])


def test_observe_prints_compact(capsys: pytest.CaptureFixture[str]) -> None:
    code, bus = run(["observe", "--verdict", "DROPPED"], schema.FlowQueryReply(flows=FLOWS[4:7]))
    assert code == 0
    subject, query = bus.requests[0]
    assert subject == schema.SUBJECT_FLOWS_QUERY
    assert query.whitelist == [schema.FlowFilter(verdict=["DROPPED"])]
    assert capsys.readouterr().out == flowrender.render(FLOWS[4:7], "compact")


@pytest.mark.parametrize("output", ["json", "jsonpb", "dict", "table"])
def test_observe_outputs(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(["observe", "-o", output], schema.FlowQueryReply(flows=FLOWS))
    assert capsys.readouterr().out == flowrender.render(FLOWS, output)


def test_observe_error_reply_and_bad_flags() -> None:
    with pytest.raises(CliError, match="nope"):
        run(["observe"], schema.FlowQueryReply(ok=False, error="nope"))
    with pytest.raises(CliError, match="cannot be combined"):
        run(["observe", "--pod", "a", "--from-pod", "b"], schema.FlowQueryReply())


def test_observe_prints_every_chunk_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    chunks = reply_chunks(FLOWS, 2048, seen=99)
    assert len(chunks) > 3
    run(["observe", "--all", "-o", "jsonpb"], chunks)
    assert capsys.readouterr().out == flowrender.render(FLOWS, "jsonpb")


def test_observe_missing_chunk_is_an_error() -> None:
    chunks = reply_chunks(FLOWS, 2048)
    with pytest.raises(CliError, match="chunk 1 is missing"):
        run(["observe", "--all"], [chunks[0], *chunks[2:]])


def test_observe_without_an_answer_times_out() -> None:
    with pytest.raises(CliError, match="no answer on ciliary.flows.query"):
        run(["observe", "--timeout", "0.05"], [])
    with pytest.raises(CliError, match="stopped after 1 chunks"):
        run(["observe", "--all", "--timeout", "0.05"], reply_chunks(FLOWS, 2048)[:1])


def test_reply_chunks_reassemble() -> None:
    chunks = observe.ReplyChunks()
    got = [f for data in reply_chunks(FLOWS, 4096, seen=7, lost=2) for f in chunks.feed(data)]
    assert got == FLOWS and chunks.done
    assert chunks.final is not None and (chunks.final.seen, chunks.final.lost) == (7, 2)
    with pytest.raises(observe.QueryError, match="bad answer"):
        observe.ReplyChunks().feed(b"\xc1")


def test_metrics_command_prints_the_served_text(capsys: pytest.CaptureFixture[str]) -> None:
    text = 'hubble_x 1\nciliary_bpf_map_pressure{map_name="ciliary_policy",node="node-1"} 0.25\n'
    code, bus = run(["metrics"], schema.FlowMetricsReply(text=text))
    assert code == 0 and bus.requests[0][0] == schema.SUBJECT_FLOWS_METRICS
    assert capsys.readouterr().out == text


def test_metrics_http_endpoint() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        server = await start_metrics_server(0, lambda: "hubble_x 1\n", host="127.0.0.1")
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            got = await reader.read()
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\n\r\n")
            bad = await reader.read()
            writer.close()
        return got, bad

    got, bad = asyncio.run(scenario())
    assert got.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"text/plain; version=0.0.4" in got
    assert got.endswith(b"\r\n\r\nhubble_x 1\n")
    assert bad.startswith(b"HTTP/1.0 405")


def test_print_raw_filters(capsys: pytest.CaptureFixture[str]) -> None:
    code, bus = run(["observe", "--pod", "a", "--not", "--verdict", "DROPPED", "--print-raw-filters"], None)
    assert code == 0 and bus.requests == []
    assert capsys.readouterr().out == (
        "allowlist:\n"
        "    - '{\"source_pod\":[\"a\"]}'\n"
        "    - '{\"destination_pod\":[\"a\"]}'\n"
        "denylist:\n"
        "    - '{\"verdict\":[\"DROPPED\"]}'\n"
    )
