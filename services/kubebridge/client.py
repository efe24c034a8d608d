"""The bridge's connection to a Kubernetes API server (kubernetes-asyncio underneath).

Invariants:
- Configuration comes from a kubeconfig (path and optional context) or, without one,
  from the pod's in-cluster service account; authentication, TLS and the server URL are
  kubernetes-asyncio's. Bodies are read raw and decoded with msgspec, as plain dicts:
  no generated model classes on the hot path.
- Every non-2xx answer becomes `ApiError` with the HTTP status, the API ``Status``
  reason/message when there is one, and ``retry_after`` (seconds) from a 429/503's
  ``Retry-After``; transport failures stay ``aiohttp.ClientError``/``TimeoutError``.
- `watch` yields the events of one watch stream (newline-delimited JSON objects
  ``{"type", "object"}``) until the server ends it; a line that is not JSON ends the
  stream with `ApiError` (status 0), so the caller re-watches from its last version.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig

from .settings import BridgeSettings

REQUEST_TIMEOUT = 30.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, reason: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class KubeClient:
    """JSON requests and watch streams against one API server."""

    def __init__(self, api: kclient.ApiClient) -> None:
        self.api = api

    @classmethod
    async def connect(cls, settings: BridgeSettings) -> KubeClient:
        configuration = kclient.Configuration()
        if settings.kubeconfig:
            await kconfig.load_kube_config(config_file=settings.kubeconfig,
                                           context=settings.context or None,
                                           client_configuration=configuration,
                                           persist_config=False)
        else:
            kconfig.load_incluster_config(client_configuration=configuration)
        return cls(kclient.ApiClient(configuration=configuration))

    @property
    def host(self) -> str:
        return str(self.api.configuration.host)

    async def close(self) -> None:
        await self.api.close()

    async def _call(self, method: str, path: str, *, query: dict[str, Any] | None = None,
                    body: Any = None, content_type: str = "application/json",
                    timeout: Any = REQUEST_TIMEOUT) -> aiohttp.ClientResponse:
        response = await self.api.call_api(
            path, method,
            query_params=[(k, v) for k, v in (query or {}).items() if v not in (None, "")],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body, auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=timeout,
        )
        return response  # type: ignore[no-any-return]

    @staticmethod
    async def _error(response: aiohttp.ClientResponse) -> ApiError:
        raw = await response.read()
        message, reason = raw.decode(errors="replace")[:500], ""
        try:
            status = msgspec.json.decode(raw)
            if isinstance(status, dict):
                message = str(status.get("message") or message)
                reason = str(status.get("reason") or "")
        except msgspec.DecodeError:
            pass
        return ApiError(response.status, message, reason=reason,
                        retry_after=_retry_after(response.headers.get("Retry-After")))

    async def request(self, method: str, path: str, *, query: dict[str, Any] | None = None,
                      body: Any = None, content_type: str = "application/json") -> Any:
        """One request; the decoded JSON answer, or `ApiError`."""
        response = await self._call(method, path, query=query, body=body,
                                    content_type=content_type)
        try:
            if not 200 <= response.status <= 299:
                raise await self._error(response)
            raw = await response.read()
        finally:
            response.release()
        return msgspec.json.decode(raw) if raw else None

    async def watch(self, path: str, query: dict[str, Any], *, read_timeout: float
                    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch stream (see the module invariants)."""
        timeout = aiohttp.ClientTimeout(connect=REQUEST_TIMEOUT, sock_connect=REQUEST_TIMEOUT,
                                        sock_read=read_timeout)
        response = await self._call("GET", path, query={**query, "watch": "1"}, timeout=timeout)
        try:
            if response.status != 200:
                raise await self._error(response)
            while True:
                line = await response.content.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = msgspec.json.decode(line)
                except msgspec.DecodeError as err:
                    raise ApiError(0, f"watch stream sent a line that is not JSON: {err}") from None
                if isinstance(event, dict):
                    yield event
        finally:
            response.close()

