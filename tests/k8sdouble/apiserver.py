"""An API-server double on aiohttp that speaks the Kubernetes wire protocol.

What a client sees is what a kube-apiserver sends: JSON lists with
``metadata.resourceVersion`` and ``continue`` tokens (``limit``), items without
``kind``/``apiVersion``; ``?watch=1`` as a chunked stream of newline-delimited
``{"type", "object"}`` events resumed from ``resourceVersion``, BOOKMARK events with
``allowWatchBookmarks``, an ERROR event carrying a 410 ``Status`` for a version older
than the compaction point (and a 410 answer for an expired continue token); ``Status``
objects for errors (404, 409 Conflict / AlreadyExists, 401); 429 with ``Retry-After``;
create/update with resourceVersion preconditions (PUT with a stale version → 409);
merge-patch of the ``status`` subresource; ``generateName``. Bearer-token authentication.

Not a real API server: one global resourceVersion counter, no field/label selectors, no
admission. The test-side controls (``compact``, ``fail_watches``, ``drop_watches``,
``throttle``, ``restart``) act on the server, never on the client under test.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

TOKEN = "ciliary-test-token"

# plural -> (group/version, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("v1", "Namespace", False),
    "nodes": ("v1", "Node", False),
    "pods": ("v1", "Pod", True),
    "services": ("v1", "Service", True),
    "events": ("v1", "Event", True),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", True),
    "networkpolicies": ("networking.k8s.io/v1", "NetworkPolicy", True),
    "ciliumnetworkpolicies": ("cilium.io/v2", "CiliumNetworkPolicy", True),
    "ciliumclusterwidenetworkpolicies": ("cilium.io/v2", "CiliumClusterwideNetworkPolicy", False),
    "leases": ("coordination.k8s.io/v1", "Lease", True),
}
KIND_PLURAL = {kind: plural for plural, (_, kind, _) in RESOURCES.items()}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@dataclass
class Watcher:
    plural: str
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    status: int
    at: float = field(default_factory=time.monotonic)  # when it was answered


class ApiServerDouble:
    def __init__(self, *, bookmark_interval: float = 1.0) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in RESOURCES}
        self.log: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, plural, type, object
        self.rv = 100
        self.compacted = 0  # versions at or below this are gone for watches
        self.bookmark_interval = bookmark_interval
        self.watchers: list[Watcher] = []
        self.requests: list[Request] = []
        self.throttled = 0  # requests still to answer with 429
        self.unserved: set[str] = set()  # plurals answered 404 (a CRD that is not installed)
        self.retry_after = 1
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._responses: set[web.StreamResponse] = set()

    # ---------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{path:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", port)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, down_for: float = 0.5) -> None:
        """Stop (every connection dropped), stay down a while, listen again on the same port."""
        port = self.port
        await self.stop()
        await asyncio.sleep(down_for)
        await self.start(port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "bridge", "user": {"token": TOKEN}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "bridge"}}],
        }))
        return path

    # ---------------------------------------------------------------- test-side controls

    def compact(self) -> None:
        """Forget the event history: a watch from any version seen so far gets 410."""
        self.compacted = self.rv
        self.log = []

    async def drop_watches(self) -> None:
        """Cut every open watch connection (as a dying API server or a proxy does)."""
        for response in list(self._responses):
            transport = response._req.transport if response._req else None  # type: ignore[attr-defined]
            if transport is not None:
                transport.close()
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(None)
        await asyncio.sleep(0)

    def fail_watches(self) -> None:
        """Send every open watch an ERROR event with a 410 Status (and end it)."""
        for watcher in list(self.watchers):
            watcher.queue.put_nowait({"type": "ERROR", "object": status_object(
                410, "Expired", "too old resource version")})
            watcher.queue.put_nowait(None)

    def throttle(self, count: int, retry_after: int = 1) -> None:
        self.throttled = count
        self.retry_after = retry_after

    # ---------------------------------------------------------------- object operations

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": kind, "object": copy.deepcopy(obj)}
        self.log.append((rv, plural, kind, event["object"]))
        for watcher in self.watchers:
            if watcher.plural == plural:
                watcher.queue.put_nowait(event)

    def put_object(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace (no precondition) an object: what a controller would do."""
        plural = KIND_PLURAL[obj["kind"]]
        group_version, kind, namespaced = RESOURCES[plural]
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = group_version, kind
        meta = obj.setdefault("metadata", {})
        ns = meta.get("namespace", "default") if namespaced else ""
        if namespaced:
            meta["namespace"] = ns
        old = self.objects[plural].get((ns, meta["name"]))
        meta["uid"] = old["metadata"]["uid"] if old else meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = (old["metadata"]["creationTimestamp"] if old
                                     else meta.get("creationTimestamp") or now())
        if "spec" in obj and kind not in ("Pod", "Service", "Node", "Namespace", "Lease"):
            meta["generation"] = (old["metadata"].get("generation", 0) + 1) if old else 1
        meta["resourceVersion"] = self._bump()
        self.objects[plural][(ns, meta["name"])] = obj
        self._emit(plural, "MODIFIED" if old else "ADDED", obj)
        return obj

    def delete_object(self, kind: str, namespace: str, name: str) -> bool:
        plural = KIND_PLURAL[kind]
        obj = self.objects[plural].pop((namespace if RESOURCES[plural][2] else "", name), None)
        if obj is None:
            return False
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit(plural, "DELETED", obj)
        return True

    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        plural = KIND_PLURAL[kind]
        return self.objects[plural].get((namespace if RESOURCES[plural][2] else "", name))

    def items(self, kind: str) -> list[dict[str, Any]]:
        return list(self.objects[KIND_PLURAL[kind]].values())

    # ---------------------------------------------------------------- HTTP

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            response: web.StreamResponse = self._status(401, "Unauthorized", "Unauthorized")
        elif self.throttled > 0:
            self.throttled -= 1
            response = self._status(429, "TooManyRequests", "too many requests, retry later")
            response.headers["Retry-After"] = str(self.retry_after)
        else:
            response = await handler(request)
        self.requests.append(Request(request.method, request.path, dict(request.query),
                                     response.status))
        return response

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status_object(code, reason, message), status=code)

    def _route(self, path: str) -> tuple[str, str, str, str] | None:
        """``(plural, namespace, name, subresource)`` of an API path."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            rest = parts[3:]
        else:
            return None
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or rest[0] not in RESOURCES:
            return None
        return rest[0], ns, rest[1] if len(rest) > 1 else "", rest[2] if len(rest) > 2 else ""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        if route is None:
            return self._status(404, "NotFound", f"the server could not find {request.path}")
        plural, ns, name, sub = route
        if plural in self.unserved:
            return self._status(404, "NotFound", "the server could not find the requested resource")
        if request.method == "GET" and not name:
            if request.query.get("watch") in ("1", "true"):
                return await self._watch(request, plural, ns)
            return self._list(request, plural, ns)
        if request.method == "GET":
            obj = self.objects[plural].get((ns, name))
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return web.json_response(obj)
        body = await request.json() if request.can_read_body else {}
        if request.method == "POST" and not name:
            return self._create(plural, ns, body)
        if request.method == "PUT" and name:
            return self._update(plural, ns, name, body)
        if request.method == "PATCH" and name and sub == "status":
            return self._patch_status(plural, ns, name, body)
        if request.method == "DELETE" and name:
            if not self.delete_object(RESOURCES[plural][1], ns, name):
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return web.json_response(status_object(200, "", "deleted") | {"status": "Success"})
        return self._status(405, "MethodNotAllowed", f"{request.method} {request.path}")

    def _list(self, request: web.Request, plural: str, ns: str) -> web.Response:
        group_version, kind, _ = RESOURCES[plural]
        limit = int(request.query.get("limit") or 0)
        token = request.query.get("continue") or ""
        if token:
            state = json.loads(base64.b64decode(token))
            if state["rv"] <= self.compacted:
                return self._status(410, "Expired", "The provided continue parameter is too old")
            rv, offset = state["rv"], state["offset"]
        else:
            rv, offset = self.rv, 0
        objs = sorted((o for (o_ns, _), o in self.objects[plural].items() if not ns or o_ns == ns),
                      key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        page = objs[offset:offset + limit] if limit else objs[offset:]
        items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and offset + limit < len(objs):
            meta["continue"] = base64.b64encode(json.dumps(
                {"rv": rv, "offset": offset + limit}).encode()).decode()
            meta["remainingItemCount"] = len(objs) - offset - limit
        return web.json_response({"kind": f"{kind}List", "apiVersion": group_version,
                                  "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, plural: str, ns: str) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self._responses.add(response)
        watcher = Watcher(plural)
        try:
            if since and since < self.compacted:
                await self._send(response, {"type": "ERROR", "object": status_object(
                    410, "Expired", f"too old resource version: {since} ({self.compacted})")})
                return response
            self.watchers.append(watcher)
            for rv, p, _, obj in list(self.log):
                if p == plural and rv > since and (not ns or obj["metadata"].get("namespace") == ns):
                    await self._send(response, {"type": _, "object": obj})
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                wait = min(self.bookmark_interval, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(0.01, wait))
                except TimeoutError:
                    if bookmarks:
                        _, kind, _ = RESOURCES[plural]
                        await self._send(response, {"type": "BOOKMARK", "object": {
                            "kind": kind, "apiVersion": RESOURCES[plural][0],
                            "metadata": {"resourceVersion": str(self.rv)}}})
                    continue
                if event is None:
                    break
                obj = event["object"]
                if ns and obj.get("metadata", {}).get("namespace") != ns:
                    continue
                await self._send(response, event)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if watcher in self.watchers:
                self.watchers.remove(watcher)
            self._responses.discard(response)
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
        await response.write(json.dumps(event).encode() + b"\n")

    def _create(self, plural: str, ns: str, body: dict[str, Any]) -> web.Response:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if RESOURCES[plural][2]:
            meta["namespace"] = ns or meta.get("namespace") or "default"
        key = (meta.get("namespace", "") if RESOURCES[plural][2] else "", meta.get("name", ""))
        if key in self.objects[plural]:
            return self._status(409, "AlreadyExists", f'{plural} "{key[1]}" already exists')
        body["kind"] = RESOURCES[plural][1]
        return web.json_response(self.put_object(body), status=201)

    def _update(self, plural: str, ns: str, name: str, body: dict[str, Any]) -> web.Response:
        old = self.objects[plural].get((ns, name))
        if old is None:
            return self._status(404, "NotFound", f'{plural} "{name}" not found')
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            return self._status(409, "Conflict", f'Operation cannot be fulfilled on {plural} '
                                f'"{name}": the object has been modified; please apply your '
                                f'changes to the latest version and try again')
        body["kind"] = RESOURCES[plural][1]
        body.setdefault("metadata", {})["name"] = name
        return web.json_response(self.put_object(body))

    def _patch_status(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> web.Response:
        old = self.objects[plural].get((ns, name))
        if old is None:
            return self._status(404, "NotFound", f'{plural} "{name}" not found')
        obj = copy.deepcopy(old)
        obj["status"] = merge_patch(obj.get("status"), patch.get("status"))
        obj["metadata"]["resourceVersion"] = self._bump()
        self.objects[plural][(ns, name)] = obj
        self._emit(plural, "MODIFIED", obj)
        return web.json_response(obj)
