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
  already made are rolled back to what was there before (each roll-back write again a
  compare-and-set, so a newer write by someone else is never undone). Reads and writes
  are pipelined: existing objects are read in bulk, writes and roll-back writes go out
  with a bounded number in flight, in no promised order among different keys.
- Status lives in bucket ``status`` under the same key, written by the owning service;
  readers merge it into ``status`` of the object.
- An apply that failed on a NATS timeout (``timed_out``) may be run again as a whole: it
  changed nothing (rolled back) or, where a write's answer was lost, wrote exactly what
  was asked, which the next run reads back as ``unchanged``; its compare-and-sets never
  overwrite a newer write by someone else.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from ciliary import schema
from ciliary.bus import Bus, BusError, KVEntry, PutManyError, RevisionMismatch
from ciliary.resources import Resource

T = TypeVar("T")

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


def timed_out(err: BaseException) -> bool:
    """Whether ``err`` or an error it was raised from is a NATS timeout (``BusTimeout``, or
    nats' own timeout error): the server did not answer, e.g. while a replicated bus
    elects a new JetStream leader after losing a server."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, TimeoutError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")


def _content(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest the user owns (server-filled metadata and status removed).
    Shares everything but the top level and ``metadata`` with ``manifest``."""
    body = dict(manifest)
    body.pop("status", None)
    meta = body.get("metadata")
    if isinstance(meta, dict) and any(field in meta for field in _SERVER_FIELDS):
        body["metadata"] = {k: v for k, v in meta.items() if k not in _SERVER_FIELDS}
    return body


def _ref(kind: str, namespace: str, name: str) -> str:
    """How messages name an object: ``Service default/web``, ``Namespace shop``."""
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


async def _each(items: list[T], work: Callable[[T], Awaitable[None]], *, concurrency: int) -> None:
    """``work(item)`` for every item, up to ``concurrency`` at a time; the first error
    raised is raised once all started work has ended."""
    pending = iter(items)
    errors: list[BaseException] = []

    async def worker() -> None:
        for item in pending:
            if errors:
                return
            try:
                await work(item)
            except Exception as err:  # re-raised below, after the others stopped
                errors.append(err)

    await asyncio.gather(*(worker() for _ in range(min(max(1, concurrency), len(items)))))
    if errors:
        raise errors[0]


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


# Objects of one kind and namespace from which one kv_list reads them all. A list costs
# what the namespace holds, pipelined gets what is applied: 100 EndpointSlices applied into
# a namespace of 50,000 took 0.9 s listed; 1,000 objects into a small namespace take 0.15 s
# longer as gets than listed (bench/apply.py, bench/servicelb.py --kv-sizes 50000).
READ_BY_LIST_MIN = 256
WRITE_CONCURRENCY = 256  # writes (and reads, roll-back writes) in flight during an apply

Progress = Callable[[int, int], None]  # (writes done, writes planned)


@dataclass(frozen=True)
class _Write:
    resource: Resource
    old: schema.ResourceRecord | None
    revision: int  # read revision the write is a compare-and-set against (0: absent)
    data: bytes  # the encoded new record


class ResourceStore:
    """Apply, delete and read resources over the bus."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def apply(
        self, resources: Iterable[Resource], *, concurrency: int = WRITE_CONCURRENCY,
        progress: Progress | None = None,
    ) -> list[ApplyResult]:
        """Create or update every object, all or nothing; results in input order.

        The existing objects are read in bulk (one ``kv_list`` per kind and namespace
        with at least ``READ_BY_LIST_MIN`` objects, else one ``kv_get`` each), the writes
        go out with up to ``concurrency`` in flight, each a compare-and-set against the
        revision read. If any write fails, every write that succeeded is rolled back and
        ``BusError`` names the object that failed. ``progress(done, planned)`` follows
        the writes."""
        resources = list(resources)
        keys = [kv_key(r.kind, r.namespace, r.name) for r in resources]
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                raise BusError(f"apply failed, nothing changed: {_ref(*split_kv_key(key))} "
                               f"is given twice")
            seen.add(key)
        existing = await self._read(resources, keys, concurrency)
        created = now_rfc3339()
        writes: dict[str, _Write] = {}
        results: list[ApplyResult] = []
        for res, key in zip(resources, keys, strict=True):
            found = existing.get(key)
            content = _content(res.manifest)
            if found is None or found[0] is None:
                record = schema.ResourceRecord(
                    kind=res.kind, api_version=res.api_version, namespace=res.namespace,
                    name=res.name, uid=str(uuid.uuid4()), generation=1, created=created,
                    manifest=content,
                )
                marker = found[1] if found is not None else 0
                writes[key] = _Write(res, None, marker, schema.encode(record))
                results.append(ApplyResult(res.kind, res.namespace, res.name, "created"))
                continue
            old, revision = found
            if content == _content(old.manifest) and old.api_version == res.api_version:
                results.append(ApplyResult(res.kind, res.namespace, res.name, "unchanged"))
                continue
            record = schema.ResourceRecord(
                kind=res.kind, api_version=res.api_version, namespace=res.namespace,
                name=res.name, uid=old.uid, generation=old.generation + 1, created=old.created,
                manifest=content,
            )
            writes[key] = _Write(res, old, revision, schema.encode(record))
            results.append(ApplyResult(res.kind, res.namespace, res.name, "configured"))

        if not writes:
            return results
        total = len(writes)
        try:
            await self.bus.kv_put_many(
                schema.BUCKET_RESOURCES,
                ((key, w.data, w.revision) for key, w in writes.items()),
                concurrency=concurrency,
                progress=None if progress is None else lambda done: progress(done, total),
            )
        except PutManyError as err:
            written = dict(err.written)
            uncertain = [key for key, failure in err.failed.items()
                         if not isinstance(failure, RevisionMismatch)]  # they may have been stored

            async def check(key: str) -> None:
                stored = await self._stored_revision(key, writes[key].data)
                if stored is not None:
                    written[key] = stored

            await _each(uncertain, check, concurrency=concurrency)
            await self._roll_back(writes, written, concurrency)
            failed = writes[err.key].resource
            reason = ("it changed since it was read (written by someone else meanwhile)"
                      if isinstance(err.__cause__, RevisionMismatch) else str(err.__cause__))
            raise BusError(f"apply failed, nothing changed: "
                           f"{_ref(failed.kind, failed.namespace, failed.name)}: {reason}") from err
        return results

    async def _read(
        self, resources: list[Resource], keys: list[str], concurrency: int
    ) -> dict[str, tuple[schema.ResourceRecord | None, int]]:
        """The stored records of ``keys`` with their revisions (absent keys left out;
        deleted ones as ``(None, revision of the delete marker)`` where it is known)."""
        groups: dict[str, list[str]] = {}
        for res, key in zip(resources, keys, strict=True):
            groups.setdefault(kind_pattern(res.kind, res.namespace), []).append(key)
        listed = [(pattern, set(group)) for pattern, group in groups.items()
                  if len(group) >= READ_BY_LIST_MIN]
        single = [key for group in groups.values() if len(group) < READ_BY_LIST_MIN for key in group]
        entries: dict[str, KVEntry] = {}

        async def read_pattern(item: tuple[str, set[str]]) -> None:
            pattern, wanted = item
            for key, entry in (await self.bus.kv_list(schema.BUCKET_RESOURCES, pattern)).items():
                if key in wanted:
                    entries[key] = entry

        async def read_key(key: str) -> None:
            entry = await self.bus.kv_get(schema.BUCKET_RESOURCES, key, deleted=True)
            if entry is not None:
                entries[key] = entry

        await _each(listed, read_pattern, concurrency=8)
        await _each(single, read_key, concurrency=concurrency)
        out: dict[str, tuple[schema.ResourceRecord | None, int]] = {}
        for key, entry in entries.items():
            if entry.value is None:  # a delete marker: a create writes over its revision
                out[key] = (None, entry.revision)
                continue
            try:
                out[key] = (schema.decode(entry.value, schema.ResourceRecord), entry.revision)
            except msgspec.DecodeError as err:  # a foreign writer stored something else
                raise BusError(f"apply failed, nothing changed: the stored "
                               f"{_ref(*split_kv_key(key))} cannot be read: {err}") from err
        return out

    async def _stored_revision(self, key: str, data: bytes) -> int | None:
        """The revision of ``key`` if it holds ``data`` (a write whose answer was lost)."""
        try:
            entry = await self.bus.kv_get(schema.BUCKET_RESOURCES, key)
        except BusError:
            return None
        return entry.revision if entry is not None and entry.value == data else None

    async def _roll_back(
        self, writes: dict[str, _Write], written: dict[str, int], concurrency: int
    ) -> None:
        """Put back what was there before each write in ``written`` (key -> the revision
        it made), each a compare-and-set against that revision, with ``concurrency`` in
        flight. A key changed since by someone else keeps their newer value."""

        async def undo(item: tuple[str, int]) -> None:
            key, revision = item
            old = writes[key].old
            try:
                if old is None:
                    await self.bus.kv_delete(schema.BUCKET_RESOURCES, key, last_revision=revision)
                else:
                    await self.bus.kv_put(schema.BUCKET_RESOURCES, key, old, last_revision=revision)
            except BusError:
                pass  # someone else changed it since; theirs is the newer truth

        await _each(list(written.items()), undo, concurrency=concurrency)

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
        # the status stays with its writer (node, policy, servicelb, kube bridge), which
        # removes it once the object is gone: the CLI's user may not write statuses
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
