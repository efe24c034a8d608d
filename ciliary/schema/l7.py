"""L7 records: Envoy/OpenTelemetry spans as the flows service stores them, and their queries.

Invariants:
- An ``L7Span`` keeps the span's identity (hex trace and span ids), its timing (unix ns),
  the Envoy/OTel attributes the debug order reads (status code, upstream cluster and host,
  response flags, canonical service, the connection's addresses) and every other
  attribute as text in ``attributes``.
- The join's fields (``verdict``, identities, ``policies``, ``node``, ``flow_uuids``) are
  empty until a flow of the same connection is found; ``joined`` says whether one was.
"""

from __future__ import annotations

from .wire import Record

__all__ = ["L7Query", "L7QueryReply", "L7Span"]


class L7Span(Record, gc=False):
    trace_id: str = ""  # 32 hex digits
    span_id: str = ""  # 16 hex digits
    parent_span_id: str = ""
    name: str = ""
    service: str = ""  # resource service.name
    kind: str = ""  # SERVER | CLIENT | INTERNAL | PRODUCER | CONSUMER
    start_ns: int = 0
    end_ns: int = 0
    direction: str = ""  # istio.direction: inbound | outbound
    canonical_service: str = ""  # istio.canonical_service
    namespace: str = ""
    pod: str = ""
    method: str = ""
    url: str = ""
    status_code: int = 0  # http.response.status_code (Envoy: http.status_code)
    response_flags: str = ""  # Envoy: UF, UH, URX, NR, UT, ... ("-" means none)
    upstream_cluster: str = ""
    upstream_address: str = ""  # ip:port Envoy connected to
    upstream_local_address: str = ""  # ip:port Envoy connected from
    downstream_remote_address: str = ""  # ip:port of the client
    downstream_local_address: str = ""  # ip:port the client connected to (original destination)
    error: bool = False
    attributes: dict[str, str] = {}
    # the join
    joined: bool = False
    flow_uuids: list[str] = []
    verdict: str = ""
    source_identity: int = 0
    destination_identity: int = 0
    source_workload: str = ""  # namespace/pod
    destination_workload: str = ""
    policies: list[str] = []  # namespace/name of the policies that decided
    node: str = ""


class L7Query(Record):
    trace_id: str = ""  # "" = any
    workload: str = ""  # namespace/pod, matches source or destination
    number: int = 0  # the last N (0 = all held)


class L7QueryReply(Record):
    ok: bool = True
    error: str = ""
    spans: list[L7Span] = []
    flows: list[bytes] = []  # msgpack Flow records of the same trace (the join)
