"""The resource store: Kubernetes-style objects in KV bucket ``resources``.

Invariants:
- Key of an object: ``<Kind>.<namespace>.<name>`` with ``_`` as the namespace of
  cluster-scoped kinds. Kind and namespace never contain dots, so ``Pod.>`` selects a kind
  and ``Pod.default.>`` a namespace, while names may contain dots.
- The KV revision of an entry is the object's ``metadata.resourceVersion``; ``generation``
  grows by one on every change of the object's content; ``uid`` and
  ``creationTimestamp`` are fixed at creation.
- ``apply`` is all-or-nothing: every object was validated before it gets here, each write
  is a compare-and-set against the revision read, and if any write fails the writes
  already made are rolled back to what was there before.
- Status lives in bucket ``status`` under the same key, written by the owning service;
  readers merge it into ``status`` of the object.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ciliary import schema
from ciliary.bus import Bus, BusError, RevisionMismatch
from ciliary.resources import Resource

CLUSTER_SCOPE = "_"


def kv_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}.{namespace or CLUSTER_SCOPE}.{name}"


def split_kv_key(key: str) -> tuple[str, str, str]:
    kind, namespace, name = key.split(".", 2)
    return kind, "" if namespace == CLUSTER_SCOPE else namespace, name


def kind_pattern(kind: str, namespace: str | None = None) -> str:
    if namespace is None:
        return f"{kind}.>"
    return f"{kind}.{namespace or CLUSTER_SCOPE}.>"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")


def _content(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest the user owns (server-filled metadata and status removed)."""
    body = copy.deepcopy(manifest)
    body.pop("status", None)
    meta = body.get("metadata") or {}
    for field in _SERVER_FIELDS:
        meta.pop(field, None)
    return body


@dataclass(frozen=True)
class ApplyResult:
    kind: str
    namespace: str
    name: str
    action: str  # created | configured | unchanged | deleted | not found

    def __str__(self) -> str:
        ref = f"{self.kind.lower()}/{self.name}"
        if self.namespace:
            ref = f"{ref} -n {self.namespace}"
        return f"{ref} {self.action}"


@dataclass(frozen=True)
class StoredObject:
    record: schema.ResourceRecord
    revision: int
    status: dict[str, Any] | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The object as ``get -o json`` shows it: manifest + server metadata + status."""
        manifest = copy.deepcopy(self.record.manifest)
        meta = manifest.setdefault("metadata", {})
        meta["uid"] = self.record.uid
        meta["resourceVersion"] = str(self.revision)
        meta["generation"] = self.record.generation
        meta["creationTimestamp"] = self.record.created
        if self.status is not None:
            manifest["status"] = self.status
        return manifest


class ResourceStore:
    """Apply, delete and read resources over the bus."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def apply(self, resources: Iterable[Resource]) -> list[ApplyResult]:
        resources = list(resources)
        planned: list[tuple[str, schema.ResourceRecord | None, int, schema.ResourceRecord]] = []
        results: list[ApplyResult] = []
        for res in resources:
            key = kv_key(res.kind, res.namespace, res.name)
            existing = await self.bus.kv_get_record(schema.BUCKET_RESOURCES, key, schema.ResourceRecord)
            if existing is None:
                record = schema.ResourceRecord(
                    kind=res.kind,
                    api_version=res.api_version,
                    namespace=res.namespace,
                    name=res.name,
                    uid=str(uuid.uuid4()),
                    generation=1,
                    created=now_rfc3339(),
                    manifest=_content(res.manifest),
                )
                planned.append((key, None, 0, record))
                results.append(ApplyResult(res.kind, res.namespace, res.name, "created"))
                continue
            old, revision = existing
            new_content = _content(res.manifest)
            if new_content == _content(old.manifest) and old.api_version == res.api_version:
                results.append(ApplyResult(res.kind, res.namespace, res.name, "unchanged"))
                continue
            record = schema.ResourceRecord(
                kind=res.kind,
                api_version=res.api_version,
                namespace=res.namespace,
                name=res.name,
                uid=old.uid,
                generation=old.generation + 1,
                created=old.created,
                manifest=new_content,
            )
            planned.append((key, old, revision, record))
            results.append(ApplyResult(res.kind, res.namespace, res.name, "configured"))

        done: list[tuple[str, schema.ResourceRecord | None, int]] = []
        try:
            for key, old, revision, record in planned:
                new_revision = await self.bus.kv_put(
                    schema.BUCKET_RESOURCES, key, record, last_revision=revision
                )
                done.append((key, old, new_revision))
        except (BusError, RevisionMismatch) as err:
            await self._roll_back(done)
            raise BusError(f"apply failed, nothing changed: {err}") from err
        return results

    async def _roll_back(self, done: list[tuple[str, schema.ResourceRecord | None, int]]) -> None:
        for key, old, new_revision in reversed(done):
            try:
                if old is None:
                    await self.bus.kv_delete(schema.BUCKET_RESOURCES, key, last_revision=new_revision)
                else:
                    await self.bus.kv_put(
                        schema.BUCKET_RESOURCES, key, old, last_revision=new_revision
                    )
            except BusError:
                pass  # someone else changed it since; theirs is the newer truth

    async def create_if_absent(self, resource: Resource) -> bool:
        """Create ``resource`` unless an object with its key exists. True when created."""
        key = kv_key(resource.kind, resource.namespace, resource.name)
        record = schema.ResourceRecord(
            kind=resource.kind,
            api_version=resource.api_version,
            namespace=resource.namespace,
            name=resource.name,
            uid=str(uuid.uuid4()),
            generation=1,
            created=now_rfc3339(),
            manifest=_content(resource.manifest),
        )
        try:
            await self.bus.kv_put(schema.BUCKET_RESOURCES, key, record, last_revision=0)
        except RevisionMismatch:
            return False
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> ApplyResult:
        key = kv_key(kind, namespace, name)
        existing = await self.bus.kv_get(schema.BUCKET_RESOURCES, key)
        if existing is None:
            return ApplyResult(kind, namespace, name, "not found")
        await self.bus.kv_delete(schema.BUCKET_RESOURCES, key)
        await self.bus.kv_delete(schema.BUCKET_STATUS, key)
        return ApplyResult(kind, namespace, name, "deleted")

    async def get(self, kind: str, namespace: str, name: str) -> StoredObject | None:
        key = kv_key(kind, namespace, name)
        found = await self.bus.kv_get_record(schema.BUCKET_RESOURCES, key, schema.ResourceRecord)
        if found is None:
            return None
        status = await self.bus.kv_get_record(schema.BUCKET_STATUS, key, schema.StatusRecord)
        return StoredObject(found[0], found[1], status[0].status if status else None)

    async def list(self, kind: str, namespace: str | None = None) -> list[StoredObject]:
        """Objects of ``kind`` (in ``namespace``, or all when None), sorted by namespace/name."""
        pattern = kind_pattern(kind, namespace)
        entries = await self.bus.kv_list(schema.BUCKET_RESOURCES, pattern)
        statuses = await self.bus.kv_list(schema.BUCKET_STATUS, pattern)
        objects: list[StoredObject] = []
        for key, entry in entries.items():
            assert entry.value is not None
            try:
                record = schema.decode(entry.value, schema.ResourceRecord)
            except Exception:  # a foreign writer stored garbage: skip, don't crash the reader
                continue
            status = None
            if key in statuses and statuses[key].value is not None:
                try:
                    status = schema.decode(statuses[key].value, schema.StatusRecord).status
                except Exception:
                    status = None
            objects.append(StoredObject(record, entry.revision, status))
        objects.sort(key=lambda o: (o.record.namespace, o.record.name))
        return objects

    async def report_status(
        self, kind: str, namespace: str, name: str, reporter: str, status: dict[str, Any],
        observed_generation: int = 0,
    ) -> None:
        await self.bus.kv_put(
            schema.BUCKET_STATUS,
            kv_key(kind, namespace, name),
            schema.StatusRecord(
                reporter=reporter,
                observed_generation=observed_generation,
                status=status,
                updated=now_rfc3339(),
            ),
        )
