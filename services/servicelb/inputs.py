"""The servicelb service's inputs: mirrored entries decoded into the model's inputs.

Two ways in: `InputDecoder.inputs` turns every mirrored entry into a ``model.Inputs``
(the first pass, resyncs); `resource`/`status` turn one changed key into what it gives
the model now and what it gave before (passes in between).

Invariants:
- Each entry is decoded once per KV revision and value: the same entry yields the same
  input (the same manifest dict, which ``model.DecodeMemo`` and the incremental engine
  rely on), so a pass re-decodes only what changed; the cache holds exactly the keys the
  last `inputs` saw, updated by every `resource`/`status` since.
- A resource gives ``(ref, manifest, generation)`` (ref = name for a Node), a status
  ``(ref, status values)`` (a Pod's ``nodeName`` falls back to its ``node/<name>``
  reporter).
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

# (bucket, key) -> (revision, value, what the entry gives the model)
Cache = dict[tuple[str, str], tuple[int, bytes, Any]]


class InputDecoder:
    """Mirrored ``resources``/``status`` entries → the model's inputs, with decode caches."""

    def __init__(self, problem: Callable[[str], None]) -> None:
        self.problem = problem
        self.records: Cache = {}
        self.memo = model.DecodeMemo()

    def inputs(self, resources: Mapping[str, Mapping[str, KVEntry]],
               status: Mapping[str, Mapping[str, KVEntry]]) -> model.Inputs:
        """The model's inputs from the mirrored ``resources`` and ``status`` entries."""
        inputs = model.Inputs(memo=self.memo)
        live: Cache = {}
        for kind, entries in resources.items():
            for entry in entries.values():
                item = self._cached(entry, live, self._resource(kind))
                if item is None:
                    continue
                ref, manifest, generation = item
                if kind == "Service":
                    inputs.services[ref] = (manifest, generation)
                elif kind == "EndpointSlice":
                    inputs.slices[ref] = manifest
                elif kind == "Pod":
                    inputs.pods[ref] = manifest
                elif kind == "Node":
                    inputs.nodes[ref] = manifest
        for kind, entries in status.items():
            for entry in entries.values():
                item = self._cached(entry, live, self._status(kind))
                if item is None:
                    continue
                ref, values = item
                if kind == "Pod":
                    inputs.pod_status[ref] = values
                else:
                    inputs.node_status[ref] = values
        self.records = live
        return inputs

    def resource(self, kind: str, key: str, entry: KVEntry | None) -> tuple[Any, Any]:
        """One resource key changed (``entry`` None: deleted): what it gave before and what
        it gives now, each ``(ref, manifest, generation)`` or None."""
        return self._change((schema.BUCKET_RESOURCES, key), entry, self._resource(kind))

    def status(self, kind: str, key: str, entry: KVEntry | None) -> tuple[Any, Any]:
        """One status key changed: before and now, each ``(ref, status values)`` or None."""
        return self._change((schema.BUCKET_STATUS, key), entry, self._status(kind))

    # ------------------------------------------------------------------ decoding

    def _change(self, slot: tuple[str, str], entry: KVEntry | None,
                derive: Callable[[KVEntry], Any]) -> tuple[Any, Any]:
        before = self.records.get(slot)
        live: Cache = {}
        now = self._cached(entry, live, derive) if entry is not None else None
        if slot in live:
            self.records[slot] = live[slot]
        else:
            self.records.pop(slot, None)
        return (before[2] if before is not None else None), now

    def _cached(self, entry: KVEntry, live: Cache, derive: Callable[[KVEntry], Any]) -> Any:
        """What ``entry`` gives the model, derived once per KV revision and value."""
        slot = (entry.bucket, entry.key)
        hit = self.records.get(slot)
        if hit is not None and hit[0] == entry.revision and hit[1] == entry.value:
            live[slot] = hit
            return hit[2]
        item = derive(entry)
        if item is not None and entry.value is not None:
            live[slot] = (entry.revision, entry.value, item)
        return item

    def _resource(self, kind: str) -> Callable[[KVEntry], Any]:
        def derive(entry: KVEntry) -> Any:
            record = self.decode(entry, schema.ResourceRecord)
            if record is None:
                return None
            ref = record.name if kind == "Node" else (record.namespace, record.name)
            return ref, record.manifest, record.generation

        return derive

    def _status(self, kind: str) -> Callable[[KVEntry], Any]:
        def derive(entry: KVEntry) -> Any:
            record = self.decode(entry, schema.StatusRecord)
            if record is None:
                return None
            try:
                _, namespace, name = entry.key.split(".", 2)
            except ValueError:
                return None
            values = dict(record.status)
            if kind != "Pod":
                return name, values
            if not values.get("nodeName") and record.reporter.startswith("node/"):
                values["nodeName"] = record.reporter.split("/", 1)[1]
            return (namespace, name), values

        return derive

    def decode(self, entry: KVEntry, type_: Any) -> Any:
        try:
            assert entry.value is not None
            return schema.decode(entry.value, type_)
        except (msgspec.DecodeError, AssertionError) as err:
            self.problem(f"{entry.bucket}/{entry.key}@{entry.revision}: undecodable: {err}")
            return None
