"""What ``trace show`` and ``diagnose`` read over the bus: flows, L7 spans, pods, services.

Invariants:
- Read-only: flow queries (``ciliary.flows.query``, every chunk of the answer), L7 span
  queries (``ciliary.flows.l7``), KV reads of pods, their status and services, the
  policy service's trace and the nodes' health; nothing is written.
- A service that does not answer is a ``CliError`` naming the subject, never a hang:
  every request has a timeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ciliary import schema
from ciliary.bus import Bus, BusError, NoReply
from ciliary.cli import common
from ciliary.status import gather_health

SIDECAR_ANNOTATION = "sidecar.istio.io/inject"


async def flows(bus: Bus, whitelist: Sequence[schema.FlowFilter], *, since_ns: int = 0,
                until_ns: int = 0, number: int = 0, timeout: float = 5.0) -> list[schema.Flow]:
    query = schema.FlowQuery(whitelist=list(whitelist), since_ns=since_ns, until_ns=until_ns, number=number)
    out: list[schema.Flow] = []
    expected = 0
    try:
        async for data in bus.request_stream(schema.SUBJECT_FLOWS_QUERY, query, timeout=timeout):
            reply = schema.decode(data, schema.FlowQueryReply)
            if not reply.ok:
                raise common.CliError(f"flows service: {reply.error}")
            if reply.chunk != expected:
                raise common.CliError("the flows answer arrived incomplete; try again")
            expected += 1
            out.extend(reply.flows)
            if not reply.more:
                break
    except NoReply as err:
        raise common.CliError(f"no answer on {schema.SUBJECT_FLOWS_QUERY}: is the flows service running?") from err
    return out


async def spans(bus: Bus, query: schema.L7Query, timeout: float = 5.0) -> schema.L7QueryReply:
    try:
        reply = await bus.request(schema.SUBJECT_L7_QUERY, query, schema.L7QueryReply, timeout=timeout)
    except BusError as err:
        raise common.CliError(f"no answer on {schema.SUBJECT_L7_QUERY}: is the flows service running? ({err})") from err
    if not reply.ok:
        raise common.CliError(f"flows service: {reply.error}")
    return reply


@dataclass(frozen=True)
class Pod:
    ref: str  # namespace/name
    ip: str
    labels: dict[str, str]
    sidecar: bool
    in_node_cgroup: bool  # its sockets belong to the node cgroup (socket-LB's scope)
    node: str = ""


async def pod(bus: Bus, ref: str) -> Pod:
    namespace, _, name = ref.rpartition("/")
    namespace = namespace or "default"
    record = await bus.kv_get_record(schema.BUCKET_RESOURCES, f"Pod.{namespace}.{name}", schema.ResourceRecord)
    if record is None:
        raise common.CliError(f"pod {namespace}/{name} not found")
    status = await bus.kv_get_record(schema.BUCKET_STATUS, f"Pod.{namespace}.{name}", schema.StatusRecord)
    st: dict[str, Any] = status[0].status if status else {}
    meta = record[0].manifest.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    return Pod(f"{namespace}/{name}", st.get("podIP", ""), dict(meta.get("labels") or {}),
               str(annotations.get(SIDECAR_ANNOTATION, "")).lower() == "true",
               bool((st.get("ciliary") or {}).get("cgroup")), str((st.get("ciliary") or {}).get("node") or ""))


async def socket_lb_mode(bus: Bus, node: str) -> str:
    """The socket-LB mode node ``node`` reports in its health ("" when it does not answer)."""
    for report in await gather_health(bus, timeout=1.0):
        if report.service == "node" and report.node == node:
            mode = (report.detail.get("socket_lb") or {}).get("mode")
            return str(mode or "")
    return ""


async def service_ips(bus: Bus, ref: str) -> list[str] | None:
    """The ClusterIPs of Service ``namespace/name``; None when there is no such Service."""
    namespace, _, name = ref.partition("/")
    record = await bus.kv_get_record(schema.BUCKET_RESOURCES, f"Service.{namespace}.{name}", schema.ResourceRecord)
    if record is None:
        return None
    spec = record[0].manifest.get("spec") or {}
    ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"]
    return ips


async def policy_trace(bus: Bus, flow: schema.Flow, port: int, proto: str) -> schema.PolicyTraceReply | None:
    src, dst = flow.source or schema.FlowEndpoint(), flow.destination or schema.FlowEndpoint()
    req = schema.PolicyTraceRequest(
        from_labels=list(src.labels), from_identity=src.identity, to_labels=list(dst.labels),
        to_identity=dst.identity, port=port, proto=proto,
        **({"from_cidr": f"{flow.ip.source}/32"} if not src.labels and flow.ip else {}),
        **({"to_cidr": f"{flow.ip.destination}/32"} if not dst.labels and flow.ip else {}))
    try:
        return await bus.request(schema.SUBJECT_POLICY_TRACE, req, schema.PolicyTraceReply, timeout=3.0)
    except BusError as err:
        return schema.PolicyTraceReply(ok=False, error=f"the policy service did not answer: {err}")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
