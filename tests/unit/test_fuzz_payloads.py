"""Fuzzed bus payloads at each consumer's decoder: arbitrary bytes, msgpack of any shape and
records of the right shape with wrong values give a value or the one error its caller
turns into a logged rejection — never anything else. (``tests/integration/test_fuzz_bus.py``
sends such payloads to the running services.)"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from ciliary import dnswire, schema
from services.flows.decode import decode_raw_batch
from services.identity.casstore import decode_identity, decode_ipcache
from tests.unit.fuzz_strategies import FUZZ, HUGE, json_values, strings

# every record a service decodes from a bucket or a subject
CONSUMED: list[type] = [
    schema.ResourceRecord, schema.StatusRecord, schema.IdentityRecord, schema.IdentityLabelsRecord,
    schema.IPCacheRecord, schema.LBFrontend, schema.PolicyMapRecord, schema.RawEventBatch,
    schema.FlowQuery, schema.FlowMetricsRequest, schema.IdentityExplainRequest,
    schema.IdentityReportRequest, schema.PolicyTraceRequest, schema.EndpointRegistration,
    schema.NodeDebugRequest, schema.FlowBatch, schema.HealthReport, schema.MeshRemote,
    schema.MeshCluster, schema.MeshNode, schema.MeshService, schema.MeshRemoteStatus,
]


def packed(value: Any) -> bytes:
    """msgpack of ``value`` (an integer msgpack cannot carry goes as its text)."""
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:
        return msgspec.msgpack.encode(repr(value))


def field_names(type_: type) -> list[str]:
    info = msgspec.inspect.type_info(type_)
    return [f.encode_name for f in info.fields] if isinstance(info, msgspec.inspect.StructType) else []


def payloads(type_: type) -> st.SearchStrategy[bytes]:
    """Bytes for ``type_``: anything, msgpack of anything, or a mapping of its own fields
    holding values of any type."""
    fields = field_names(type_) or ["x"]
    shaped = st.dictionaries(st.one_of(st.sampled_from(fields), strings), json_values(), max_size=len(fields) + 2)
    return st.one_of(
        st.binary(max_size=200),
        json_values().map(packed),
        shaped.map(packed),
    )


@FUZZ
@given(st.one_of([st.tuples(st.just(t), payloads(t)) for t in CONSUMED]))
def test_every_record_decodes_or_is_a_decode_error(case: tuple[type, bytes]) -> None:
    type_, data = case
    try:
        schema.decode(data, type_)
    except msgspec.DecodeError:  # ValidationError included: Mirror and Bus.subscribe log these
        pass


addresses = st.one_of(st.sampled_from(["", "0.0.0.0", "10.0.0.1", "::1", "fd00::1", "999.1.1.1", "x"]), strings)
ints = st.one_of(st.sampled_from([n for n in HUGE if -(2**63) <= n < 2**64]), st.integers(-(2**63), 2**64 - 1))
events = st.fixed_dictionaries({"ts_ns": ints, "saddr": addresses, "daddr": addresses}, optional={
    name: ints for name in ("sport", "dport", "src_identity", "dst_identity", "ep_id", "ifindex",
                            "rule_ref", "orig_dport", "pkt_len", "type", "verdict", "drop_reason",
                            "direction", "proto", "tcp_flags", "ct_state", "icmp_type")
} | {"orig_daddr": addresses, "payload": st.binary(max_size=64), "is_reply": st.booleans()})
batches = st.fixed_dictionaries({"cluster": strings, "node": strings}, optional={
    "events": st.lists(events, max_size=4), "seq": ints, "lost": ints, "boot_time_ns": ints,
}).map(packed)


@FUZZ
@given(st.one_of(batches, payloads(schema.RawEventBatch)))
def test_the_flows_service_decodes_any_raw_batch_or_drops_it(data: bytes) -> None:
    result = decode_raw_batch(data)
    assert result is None or len(result.flows) >= 0


@FUZZ
@given(st.sampled_from(["id.1", "id.", "labels.abc", "labels.", "other", ""]), st.one_of(
    payloads(schema.IdentityRecord), payloads(schema.IdentityLabelsRecord), payloads(schema.IPCacheRecord)))
def test_the_identity_service_reads_its_buckets_or_skips(key: str, data: bytes) -> None:
    for decode in (decode_identity, decode_ipcache):
        try:
            decode(key, data)
        except (msgspec.DecodeError, ValueError):  # what BusCasStore.observe logs and skips
            pass


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda name, qtype, extra: dnswire.build_query(name, qtype) + extra,
              st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True),
              st.integers(0, 65535), st.binary(max_size=40)),
    st.builds(lambda head, tail: head + tail, st.binary(min_size=12, max_size=12),
              st.lists(st.sampled_from([b"\xc0\x0c", b"\xc0\xff", b"\x3f", b"\x00", b"\x01a", b"\xff" * 4]),
                       max_size=20).map(b"".join)),
))
def test_the_dns_parser_takes_any_packet(packet: bytes) -> None:
    msg: Any = dnswire.parse_dns(packet)
    assert msg is None or isinstance(msg, dnswire.DNSMessage)
