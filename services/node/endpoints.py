"""The endpoints registered on this node, as recorded in ``<state dir>/endpoints.json``.

Invariants:
- One ``LocalEndpoint`` per container id. Endpoint ids are unique on the node: a new
  container gets the lowest free id in 1..65535, a re-registered one keeps its id.
- ``save`` writes the whole book atomically (temporary file, then rename); ``restore``
  of a missing or unreadable file yields no endpoints.
- No kernel and no bus: attaching programs to an endpoint is the caller's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ciliary import schema

MAX_ENDPOINT_ID = 65535


@dataclass
class LocalEndpoint:
    container_id: str
    namespace: str
    pod: str
    ip: str
    host_ifname: str
    host_ifindex: int
    ep_id: int


class EndpointBook:
    """The node's endpoints by container id, persisted under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.by_container: dict[str, LocalEndpoint] = {}

    @property
    def path(self) -> Path:
        return self.state_dir / "endpoints.json"

    def __iter__(self) -> Iterator[LocalEndpoint]:
        return iter(list(self.by_container.values()))

    def __len__(self) -> int:
        return len(self.by_container)

    def restore(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        self.by_container = {k: LocalEndpoint(**v) for k, v in data.items()}

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: vars(v) for k, v in self.by_container.items()}, indent=1))
        tmp.replace(self.path)

    def add(self, reg: schema.EndpointRegistration) -> LocalEndpoint:
        existing = self.by_container.get(reg.container_id)
        ep = LocalEndpoint(reg.container_id, reg.pod_namespace, reg.pod_name, reg.ip,
                           reg.host_ifname, reg.host_ifindex,
                           existing.ep_id if existing else self._free_id())
        self.by_container[reg.container_id] = ep
        return ep

    def remove(self, container_id: str) -> None:
        self.by_container.pop(container_id, None)

    def _free_id(self) -> int:
        used = {ep.ep_id for ep in self.by_container.values()}
        return next(i for i in range(1, MAX_ENDPOINT_ID + 1) if i not in used)


__all__ = ["EndpointBook", "LocalEndpoint", "MAX_ENDPOINT_ID"]
