"""Flows as OpenTelemetry log records: one record per flow, with stable attribute names.

Off unless ``CILIARY_FLOWS_OTEL_LOGS=1`` *and* the standard OTLP environment names an
endpoint for logs (``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``;
protocol from ``OTEL_EXPORTER_OTLP_LOGS_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``,
``http/protobuf`` or ``grpc``).

Invariants:
- ``flow_attributes`` is pure: the same flow gives the same attributes, and only set
  fields appear (no empty strings, no zero ports or identities). The names are the ones
  of ``ATTRIBUTES`` and docs/tracing.md; OTel's semantic conventions where one exists
  (``source.address``, ``network.transport``, ...), ``ciliary.flow.*`` otherwise.
- A record's timestamp is the flow's kernel time, its body the flow's summary, its
  severity INFO for forwarded flows and WARN for drops and errors.
- ``FlowLogs.emit`` only queues: a batch processor's thread encodes and exports, and
  drops what its bounded queue cannot hold (the flow path never waits for the backend).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ciliary import schema, telemetry

log = logging.getLogger(__name__)

ENV_FLOW_LOGS = "CILIARY_FLOWS_OTEL_LOGS"
EVENT_NAME = "ciliary.flow"

# attribute names (stable)
A_VERDICT = "ciliary.flow.verdict"  # FORWARDED, DROPPED, ...
A_DROP_REASON = "ciliary.flow.drop_reason"  # POLICY_DENIED, ...
A_TYPE = "ciliary.flow.type"  # L3_L4 | L7
A_DIRECTION = "ciliary.flow.traffic_direction"  # INGRESS | EGRESS
A_OBSERVATION = "ciliary.flow.observation_point"  # TO_ENDPOINT, ...
A_IS_REPLY = "ciliary.flow.is_reply"
A_NODE = "ciliary.flow.node"  # <cluster>/<node>
A_UUID = "ciliary.flow.uuid"
A_SRC_ADDR = "source.address"
A_SRC_PORT = "source.port"
A_DST_ADDR = "destination.address"
A_DST_PORT = "destination.port"
A_TRANSPORT = "network.transport"  # tcp | udp | icmp | sctp
A_NETWORK = "network.type"  # ipv4 | ipv6
A_SRC_NAMESPACE = "ciliary.flow.source.namespace"
A_SRC_POD = "ciliary.flow.source.pod"
A_SRC_IDENTITY = "ciliary.flow.source.identity"
A_SRC_WORKLOAD = "ciliary.flow.source.workload"
A_SRC_SERVICE = "ciliary.flow.source.service"
A_DST_NAMESPACE = "ciliary.flow.destination.namespace"
A_DST_POD = "ciliary.flow.destination.pod"
A_DST_IDENTITY = "ciliary.flow.destination.identity"
A_DST_WORKLOAD = "ciliary.flow.destination.workload"
A_DST_SERVICE = "ciliary.flow.destination.service"
A_POLICIES = "ciliary.flow.policies"  # namespace/name of the policies that allowed or denied
A_DNS_QUERY = "ciliary.flow.dns.query"
A_DNS_RCODE = "ciliary.flow.dns.rcode"
ATTRIBUTES = (A_VERDICT, A_DROP_REASON, A_TYPE, A_DIRECTION, A_OBSERVATION, A_IS_REPLY, A_NODE, A_UUID,
              A_SRC_ADDR, A_SRC_PORT, A_DST_ADDR, A_DST_PORT, A_TRANSPORT, A_NETWORK,
              A_SRC_NAMESPACE, A_SRC_POD, A_SRC_IDENTITY, A_SRC_WORKLOAD, A_SRC_SERVICE,
              A_DST_NAMESPACE, A_DST_POD, A_DST_IDENTITY, A_DST_WORKLOAD, A_DST_SERVICE,
              A_POLICIES, A_DNS_QUERY, A_DNS_RCODE)

_WARN_VERDICTS = frozenset({"DROPPED", "ERROR"})


def _endpoint(attrs: dict[str, Any], ep: schema.FlowEndpoint | None, service: schema.FlowService | None,
              namespace: str, pod: str, identity: str, workload: str, svc: str) -> None:
    if ep is not None:
        if ep.namespace:
            attrs[namespace] = ep.namespace
        if ep.pod_name:
            attrs[pod] = ep.pod_name
        if ep.identity:
            attrs[identity] = ep.identity
        if ep.workloads and ep.workloads[0].name:
            attrs[workload] = ep.workloads[0].name
    if service is not None and service.name:
        attrs[svc] = f"{service.namespace}/{service.name}" if service.namespace else service.name


def flow_attributes(flow: schema.Flow) -> dict[str, Any]:
    """The log record attributes of one flow."""
    attrs: dict[str, Any] = {}
    if flow.verdict:
        attrs[A_VERDICT] = flow.verdict
    if flow.drop_reason_desc:
        attrs[A_DROP_REASON] = flow.drop_reason_desc
    if flow.flow_type:
        attrs[A_TYPE] = flow.flow_type
    if flow.traffic_direction:
        attrs[A_DIRECTION] = flow.traffic_direction
    if flow.trace_observation_point:
        attrs[A_OBSERVATION] = flow.trace_observation_point
    if flow.is_reply is not None:
        attrs[A_IS_REPLY] = flow.is_reply
    if flow.node_name:
        attrs[A_NODE] = flow.node_name
    if flow.uuid:
        attrs[A_UUID] = flow.uuid
    if flow.ip is not None:
        if flow.ip.source:
            attrs[A_SRC_ADDR] = flow.ip.source
        if flow.ip.destination:
            attrs[A_DST_ADDR] = flow.ip.destination
        if flow.ip.ipVersion:
            attrs[A_NETWORK] = flow.ip.ipVersion.lower()
    l4 = flow.l4
    if l4 is not None:
        ports = l4.TCP or l4.UDP or l4.SCTP
        if ports is not None:
            if ports.source_port:
                attrs[A_SRC_PORT] = ports.source_port
            if ports.destination_port:
                attrs[A_DST_PORT] = ports.destination_port
        attrs[A_TRANSPORT] = ("tcp" if l4.TCP else "udp" if l4.UDP else "sctp" if l4.SCTP else "icmp")
    _endpoint(attrs, flow.source, flow.source_service, A_SRC_NAMESPACE, A_SRC_POD, A_SRC_IDENTITY,
              A_SRC_WORKLOAD, A_SRC_SERVICE)
    _endpoint(attrs, flow.destination, flow.destination_service, A_DST_NAMESPACE, A_DST_POD, A_DST_IDENTITY,
              A_DST_WORKLOAD, A_DST_SERVICE)
    policies = [f"{p.namespace}/{p.name}" if p.namespace else p.name
                for group in (flow.egress_allowed_by, flow.ingress_allowed_by, flow.egress_denied_by,
                              flow.ingress_denied_by) for p in group]
    if policies:
        attrs[A_POLICIES] = policies
    if flow.l7 is not None and flow.l7.dns is not None:
        if flow.l7.dns.query:
            attrs[A_DNS_QUERY] = flow.l7.dns.query
        attrs[A_DNS_RCODE] = flow.l7.dns.rcode
    return attrs


def flow_time_ns(flow: schema.Flow) -> int | None:
    """The flow's time (RFC 3339 with nanoseconds) as Unix nanoseconds; None if unreadable."""
    text = flow.time
    if not text:
        return None
    try:
        head, _, frac = text.rstrip("Z").partition(".")
        seconds = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
        return int(seconds) * 1_000_000_000 + int((frac + "000000000")[:9])
    except ValueError:
        return None


def logs_protocol(env: Mapping[str, str]) -> str | None:
    """The OTLP protocol flow logs are exported with, or None when they are off. Raises
    ``telemetry.TracingSettingError`` for an unsupported protocol."""
    if env.get(ENV_FLOW_LOGS, "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    return telemetry.otlp_protocol(env, "LOGS")


class FlowLogs:
    """Emits flows as log records through its own batch processor and OTLP exporter."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry._logs import SeverityNumber

        self._provider = provider
        self._logger = provider.get_logger("ciliary.flows")
        self._info = SeverityNumber.INFO
        self._warn = SeverityNumber.WARN
        self.emitted = 0

    @classmethod
    def from_env(cls, process: str, *, cluster: str = "", instance: str = "",
                 env: Mapping[str, str] = os.environ, exporter: Any = None) -> FlowLogs | None:
        """Flow logs as the environment asks (None when off); ``exporter`` overrides the
        OTLP one (tests pass an in-memory exporter). A bad setting is logged, never raised."""
        try:
            protocol = logs_protocol(env)
        except telemetry.TracingSettingError as err:
            log.error("flow logs off: %s", err)
            return None
        if protocol is None and exporter is None:
            return None
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource

        if exporter is None:
            if protocol == telemetry.PROTOCOL_GRPC:
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            else:
                from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[assignment]
                    OTLPLogExporter,
                )
            exporter = OTLPLogExporter()
        provider = LoggerProvider(resource=Resource.create(telemetry.resource_attributes(
            process, cluster=cluster, instance=instance, env=env)))
        provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
        return cls(provider)

    def emit(self, flows: Sequence[schema.Flow]) -> None:
        """Queue one log record per flow."""
        emit = self._logger.emit
        for flow in flows:
            warn = flow.verdict in _WARN_VERDICTS
            emit(timestamp=flow_time_ns(flow), body=flow.summary or flow.verdict,
                 severity_number=self._warn if warn else self._info,
                 severity_text="WARN" if warn else "INFO",
                 attributes=flow_attributes(flow), event_name=EVENT_NAME)
        self.emitted += len(flows)

    def force_flush(self) -> None:
        self._provider.force_flush()

    def shutdown(self) -> None:
        """Export what is queued, then stop (blocking: call it off the event loop)."""
        try:
            self._provider.shutdown()
        except Exception as err:  # an unreachable backend must not fail the exit
            log.warning("flow logs: flushing failed: %s", err)
