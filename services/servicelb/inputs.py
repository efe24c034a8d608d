"""The servicelb service's inputs: mirrored entries decoded into ``model.Inputs``.

Invariants:
- Each entry is decoded once per KV revision and value: the same entry yields the same
  record object (and so the same manifest dict, which ``model.DecodeMemo`` relies on),
  so a pass re-decodes only what changed; records of keys no mirror holds are dropped.
- A payload that does not decode is reported through ``problem`` (once per revision, by
  the caller's choice) and left out of the inputs; it never fails a pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ciliary import schema
from ciliary.kv import KVEntry
from services.servicelb import model


class InputDecoder:
    """Mirrored ``resources``/``status`` entries → ``model.Inputs``, with decode caches."""

    def __init__(self, problem: Callable[[str], None]) -> None:
        self.problem = problem
        # (bucket, key) -> (revision, value, record): what the previous pass decoded
        self.records: dict[tuple[str, str], tuple[int, bytes, Any]] = {}
        self.memo = model.DecodeMemo()

    def inputs(self, resources: Mapping[str, Mapping[str, KVEntry]],
               status: Mapping[str, Mapping[str, KVEntry]]) -> model.Inputs:
        """The model's inputs from the mirrored ``resources`` and ``status`` entries."""
        inputs = model.Inputs(memo=self.memo)
        live: dict[tuple[str, str], tuple[int, bytes, Any]] = {}
        for kind, entries in resources.items():
            for entry in entries.values():
                record = self._decode_cached(entry, schema.ResourceRecord, live)
                if record is None:
                    continue
                ref = (record.namespace, record.name)
                if kind == "Service":
                    inputs.services[ref] = (record.manifest, record.generation)
                elif kind == "EndpointSlice":
                    inputs.slices[ref] = record.manifest
                elif kind == "Pod":
                    inputs.pods[ref] = record.manifest
                elif kind == "Node":
                    inputs.nodes[record.name] = record.manifest
        for kind, entries in status.items():
            for key, entry in entries.items():
                status = self._decode_cached(entry, schema.StatusRecord, live)
                if status is None:
                    continue
                try:
                    _, namespace, name = key.split(".", 2)
                except ValueError:
                    continue
                values = dict(status.status)
                if kind == "Pod":
                    if not values.get("nodeName") and status.reporter.startswith("node/"):
                        values["nodeName"] = status.reporter.split("/", 1)[1]
                    inputs.pod_status[(namespace, name)] = values
                else:
                    inputs.node_status[name] = values
        self.records = live
        return inputs

    def _decode_cached(self, entry: KVEntry, type_: Any,
                       live: dict[tuple[str, str], tuple[int, bytes, Any]]) -> Any:
        """``decode`` once per KV revision and value: the same entry yields the same record
        object (and so the same manifest dict, which ``DecodeMemo`` relies on)."""
        slot = (entry.bucket, entry.key)
        hit = self.records.get(slot)
        if hit is not None and hit[0] == entry.revision and hit[1] == entry.value:
            live[slot] = hit
            return hit[2]
        record = self.decode(entry, type_)
        if record is not None and entry.value is not None:
            live[slot] = (entry.revision, entry.value, record)
        return record

    def decode(self, entry: KVEntry, type_: Any) -> Any:
        try:
            assert entry.value is not None
            return schema.decode(entry.value, type_)
        except (msgspec.DecodeError, AssertionError) as err:
            self.problem(f"{entry.bucket}/{entry.key}@{entry.revision}: undecodable: {err}")
            return None
