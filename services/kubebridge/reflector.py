"""List + watch one kind from the API server into an in-memory view.

Invariants:
- ``accepted`` holds, per bucket key, the record of the newest version of every live
  object that passed validation; an object whose newest version is rejected keeps its last
  accepted record (as ``apply`` leaves the stored object alone) and is listed in
  ``rejected`` with the reason. A deleted object leaves both.
- A list is paginated (``limit`` + ``continue``); a continue token that expired (410)
  restarts the list. After a list the view is exactly the listed objects: objects deleted
  while the bridge was not watching are dropped then (``relists`` counts lists after the
  first). ``synced`` is true from the first complete list on.
- A watch resumes from the last resourceVersion seen (an event's or a BOOKMARK's); it asks
  for bookmarks. An ERROR event with code 410, or a 410 answer, means the version is too
  old: the next step is a fresh list. A stream the server ended (its timeout, a restart, a
  dropped connection) is re-watched from the same version.
- A 429 (or 503) waits its ``Retry-After`` before the next request; other failures wait
  the shared backoff (``ciliary.backoff``, 100 ms doubling to 10 s), reset by a
  successful list, a watch the server ended cleanly, or a watch that delivered events or
  bookmarks before it failed (so occasional broken watches never add up).
- A kind the API server does not serve (404 on the list: a cluster without the Cilium
  CRDs) counts as listed and empty, and is listed again every ``NOT_SERVED_RETRY`` seconds.
- ``on_change`` is called after every change of ``accepted`` or ``rejected`` (and after
  each list), on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from ciliary import backoff

from .client import ApiError, KubeClient
from .kinds import WatchedKind
from .settings import BridgeSettings
from .translate import Translated, bucket_key, object_ref, translate

log = logging.getLogger(__name__)


NOT_SERVED_RETRY = 30.0  # seconds between lists of a kind the API server does not serve


class Gone(Exception):
    """The resourceVersion to watch from is too old (HTTP 410)."""


class Reflector:
    def __init__(self, client: KubeClient, kind: WatchedKind, settings: BridgeSettings,
                 on_change: Callable[[WatchedKind], None]) -> None:
        self.client = client
        self.kind = kind
        self.settings = settings
        self.on_change = on_change
        self.accepted: dict[str, bytes] = {}
        self.rejected: dict[str, Translated] = {}
        self.latest: dict[str, Translated] = {}  # key -> newest translation (refs, uids)
        self.resource_version = ""
        self.synced = False
        self.served = True
        self.counters = {"lists": 0, "relists": 0, "pages": 0, "watches": 0, "events": 0,
                         "bookmarks": 0, "gone": 0, "throttled": 0, "errors": 0}
        self.last_error = ""

    # ---------------------------------------------------------------- the view

    def _apply(self, item: Translated) -> None:
        self.latest[item.key] = item
        if item.data is not None:
            self.accepted[item.key] = item.data
            self.rejected.pop(item.key, None)
        else:
            self.rejected[item.key] = item

    def _drop(self, key: str) -> None:
        self.latest.pop(key, None)
        self.accepted.pop(key, None)
        self.rejected.pop(key, None)

    # ---------------------------------------------------------------- the loop

    async def run(self) -> None:
        attempts = 0
        need_list = True
        while True:
            events_before = self._delivered()
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    attempts = 0
                if not self.served:
                    await asyncio.sleep(NOT_SERVED_RETRY)
                    need_list = True
                    continue
                await self._watch()
                attempts = 0
            except Gone:
                self.counters["gone"] += 1
                need_list = True
            except ApiError as err:
                self.last_error = str(err)
                if err.status in (429, 503) and err.retry_after is not None:
                    self.counters["throttled"] += 1
                    await asyncio.sleep(err.retry_after)
                    continue
                self.counters["errors"] += 1
                attempts = self._failed_attempt(attempts, events_before)
                log.warning("%s: %s", self.kind.kind, err)
                await asyncio.sleep(backoff.backoff_delay(attempts, cap=backoff.PASS_CAP))
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as err:
                self.last_error = f"{type(err).__name__}: {err}"
                self.counters["errors"] += 1
                attempts = self._failed_attempt(attempts, events_before)
                log.info("%s: connection: %s", self.kind.kind, self.last_error)
                await asyncio.sleep(backoff.backoff_delay(attempts, cap=backoff.PASS_CAP))

    def _failed_attempt(self, attempts: int, events_before: int) -> int:
        """The failure count after one more failure: a watch that delivered events before
        it failed was healthy, so the count starts again (the backoff never creeps up over
        a long-lived process's occasional broken watches)."""
        return 1 if self._delivered() != events_before else attempts + 1

    def _delivered(self) -> int:
        return self.counters["events"] + self.counters["bookmarks"]

    async def _list(self) -> None:
        items: dict[str, Translated] = {}
        token = ""
        while True:
            query = {"limit": self.settings.page_size, "continue": token}
            try:
                page = await self.client.request("GET", self.kind.collection, query=query)
            except ApiError as err:
                if err.status == 410 and token:  # the continue token expired: start over
                    items, token = {}, ""
                    continue
                if err.status == 404 and not token:  # the kind is not served here
                    self.served = False
                    version = ""
                    break
                raise
            self.served = True
            self.counters["pages"] += 1
            for obj in page.get("items") or []:
                if isinstance(obj, dict):
                    item = translate(self.kind, obj)
                    items[item.key] = item
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                version = str(meta.get("resourceVersion") or "")
                break
        for key in [k for k in self.latest if k not in items]:
            self._drop(key)  # deleted while nobody watched
        for item in items.values():
            self._apply(item)
        self.resource_version = version
        self.counters["relists" if self.synced else "lists"] += 1
        self.synced = True
        self.on_change(self.kind)

    async def _watch(self) -> None:
        self.counters["watches"] += 1
        query = {"resourceVersion": self.resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": self.settings.watch_timeout}
        try:
            stream = self.client.watch(self.kind.collection, query,
                                       read_timeout=self.settings.watch_timeout + 30)
            async for event in stream:
                self._event(event)
        except ApiError as err:
            if err.status == 410:
                raise Gone() from None
            raise

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            raise ApiError(int(code or 500), str(obj.get("message") or obj),
                           reason=str(obj.get("reason") or ""))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            self.counters["bookmarks"] += 1
            if version:
                self.resource_version = version
            return
        self.counters["events"] += 1
        if kind in ("ADDED", "MODIFIED"):
            self._apply(translate(self.kind, obj))
        elif kind == "DELETED":  # only its key: a deleted object is not validated or encoded
            ref = object_ref(self.kind, obj)
            self._drop(bucket_key(self.kind.kind, ref.namespace, ref.name))
        if version:
            self.resource_version = version
        self.on_change(self.kind)

    def detail(self) -> dict[str, Any]:
        return {"objects": len(self.latest), "rejected": len(self.rejected),
                "served": self.served,
                "resourceVersion": self.resource_version, "synced": self.synced,
                **self.counters, **({"last_error": self.last_error} if self.last_error else {})}
