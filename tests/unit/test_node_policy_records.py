"""The node executor's policy view: heads decode every record cheaply, full records are
decoded only when asked for, once per entry, and a bad full payload reads as absent."""

from __future__ import annotations

import msgspec
import pytest

from ciliary import schema
from ciliary.bus import KVEntry
from services.node.policyrecords import FullPolicyRecords


def entry(identity: int, revision: int, peers: int = 3, value: bytes | None = None) -> KVEntry:
    record = schema.PolicyMapRecord(
        identity=identity, cluster="c", cluster_id=1, ingress_enforced=True, egress_enforced=False,
        entries=[schema.PolicyEntryRecord(peer=1000 + p, port=80, proto=6, direction="ingress",
                                          verdict="allow", rule_ref=7) for p in range(peers)],
        rules={7: "CiliumNetworkPolicy/default/web spec[0].ingress[0]"})
    return KVEntry(schema.BUCKET_POLICY, schema.policy_key(identity), revision,
                   schema.encode(record) if value is None else value)


def test_a_head_is_the_records_flags_and_rules_without_entries() -> None:
    e = entry(300, 1)
    head = schema.decode(e.value, schema.PolicyMapHead)
    full = schema.decode(e.value, schema.PolicyMapRecord)
    assert (head.identity, head.ingress_enforced, head.egress_enforced, head.rules) == (
        full.identity, full.ingress_enforced, full.egress_enforced, full.rules)


def test_full_records_are_decoded_once_per_entry_and_only_when_asked() -> None:
    entries = {schema.policy_key(i): entry(i, i) for i in (300, 301)}
    records = FullPolicyRecords(entries)
    assert records.decoded() == 0 and len(records) == 2 and set(records) == set(entries)
    first = records[schema.policy_key(300)]
    assert [e.peer for e in first.entries] == [1000, 1001, 1002]
    assert records[schema.policy_key(300)] is first and records.decoded() == 1
    entries[schema.policy_key(300)] = entry(300, 9, peers=1)  # a new entry: decoded anew
    assert [e.peer for e in records[schema.policy_key(300)].entries] == [1000]
    assert records.get(schema.policy_key(302)) is None
    records[schema.policy_key(301)]
    records.retain([schema.policy_key(301)])
    assert records.decoded() == 1


def test_a_bad_full_payload_reads_as_absent() -> None:
    head_only = schema.encode(schema.PolicyMapHead(identity=300, ingress_enforced=True, egress_enforced=False))
    records = FullPolicyRecords({schema.policy_key(300): entry(300, 1, value=head_only)})
    with pytest.raises(KeyError):
        records[schema.policy_key(300)]
    assert records.get(schema.policy_key(300)) is None


def test_entries_travel_as_arrays_and_entries_written_as_maps_still_read() -> None:
    e = entry(300, 1, peers=2)
    raw = msgspec.msgpack.decode(e.value)
    assert raw["entries"][0] == [1000, 80, 6, "ingress", "allow", 0, False, 7]
    # the same record as an older policy service wrote it: every entry a map of its fields
    legacy = msgspec.msgpack.encode({**raw, "entries": [
        dict(zip(schema.PolicyEntryRecord.__struct_fields__, fields, strict=True)) for fields in raw["entries"]]})
    assert len(legacy) > len(e.value)
    expected = schema.decode(e.value, schema.PolicyMapRecord)
    assert schema.decode_policy_map_record(legacy) == expected
    records = FullPolicyRecords({schema.policy_key(300): entry(300, 1, value=legacy)})
    assert records[schema.policy_key(300)] == expected
    assert schema.decode(legacy, schema.PolicyMapHead).rules == expected.rules
    with pytest.raises(msgspec.ValidationError):
        schema.decode_policy_map_record(msgspec.msgpack.encode({**raw, "entries": [{"peer": "x"}]}))
