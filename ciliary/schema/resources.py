"""Source objects and their status: the records of buckets ``resources`` and ``status``.

Invariants:
- Both buckets are keyed by ``ciliary.store.kv_key``: ``<Kind>.<namespace>.<name>``,
  namespace ``_`` for cluster-scoped kinds.
- Bucket ``resources`` holds one ``ResourceRecord`` per source object; its writers are
  the sources (``ciliary apply``, the Kubernetes bridge, node registration). The KV
  revision of an entry is the object's resourceVersion and is not stored in the value.
- Bucket ``status`` holds one ``StatusRecord`` per object that has a status, under the
  object's own key. It is written by the service that owns that object's status (the
  node executor for Pods, servicelb for Services, the policy service for policies);
  deleting the object through the store deletes its status too.
"""

from __future__ import annotations

from typing import Any

from .wire import Record

__all__ = ["ResourceRecord", "StatusRecord"]


class ResourceRecord(Record):
    """One source object in bucket ``resources``.

    ``manifest`` is the object as the user wrote it (metadata.namespace defaulted,
    uid/creationTimestamp/generation filled). The KV revision of the entry is the
    object's resourceVersion; it is not stored inside the value.
    """

    kind: str
    api_version: str
    namespace: str  # "" for cluster-scoped kinds
    name: str
    uid: str
    generation: int
    created: str  # RFC 3339
    manifest: dict[str, Any]


class StatusRecord(Record):
    """The status of one object in bucket ``status``, keyed like the object itself."""

    reporter: str  # service instance that wrote it, e.g. "node/node-1"
    observed_generation: int = 0
    status: dict[str, Any] = {}
    updated: str = ""
