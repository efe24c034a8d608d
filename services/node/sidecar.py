"""Envoy sidecars for pods annotated ``sidecar.istio.io/inject: "true"`` (Istio's data plane).

Invariants:
- Injection is pure: ``plan(record, ...)`` returns the sidecar's bootstrap (an Envoy v3
  config as a dict), the iptables rules of the pod namespace and the container argv, or
  ``None`` for a pod that does not ask for a sidecar. A bad annotation value is a
  ``SidecarError`` naming the pod and the annotation.
- Redirection is Istio's: iptables ``REDIRECT`` in the pod's own network namespace only
  (never the node's or the machine's). Inbound TCP to the app's declared container ports
  goes to the inbound listener (``INBOUND_PORT``), which forwards to ``127.0.0.1:<port>``;
  outbound TCP of the app goes to the outbound listener (``OUTBOUND_PORT``), which
  forwards to the original destination (``SO_ORIGINAL_DST``). Envoy's own sockets
  (group ``PROXY_GID``), loopback, DNS and excluded ports are never redirected.
- Every HTTP connection manager traces with the OpenTelemetry tracer (W3C
  ``traceparent``, every request sampled) and exports OTLP/HTTP protobuf over a Unix
  socket (``otlp_socket``), so Envoy in a pod namespace reaches the receiver without a
  route out of the pod. Spans carry the connection's addresses as tags (the join's key),
  the upstream cluster, response flags and ``istio.canonical_service``.
- Access logs go to the sidecar container's stdout with downstream and upstream address
  and port, response code and response flags.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciliary import atomicfile, schema
from ciliary.resources import decode

INJECT_ANNOTATION = "sidecar.istio.io/inject"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
CANONICAL_NAME_LABEL = "service.istio.io/canonical-name"
CONTAINER_NAME = "istio-proxy"
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
PROXY_GID = 1337
OTLP_CLUSTER = "ciliary-otlp"
PASSTHROUGH_CLUSTER = "PassthroughCluster"

# Span tags carrying the connection's addresses (Envoy access-log substitutions).
TAG_DOWNSTREAM_REMOTE = "downstream.remote_address"
TAG_DOWNSTREAM_LOCAL = "downstream.local_address"
TAG_UPSTREAM_LOCAL = "upstream.local_address"
TAG_UPSTREAM_REMOTE = "upstream.remote_address"
TAG_ATTEMPTS = "upstream.attempts"  # 1 + retries
TAG_DIRECTION = "istio.direction"  # inbound | outbound
TAG_CANONICAL_SERVICE = "istio.canonical_service"
TAG_POD = "k8s.pod.name"
TAG_NAMESPACE = "k8s.namespace.name"

# Spans leave Envoy at least once a second, however few (Envoy's defaults: 5 s, 5 spans).
FLUSH_RUNTIME = {"tracing.opentelemetry.flush_interval_ms": 1000, "tracing.opentelemetry.min_flush_spans": 1}

ACCESS_LOG_FORMAT = (
    '[%START_TIME%] %DOWNSTREAM_LOCAL_ADDRESS% "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %DURATION%ms "
    "downstream=%DOWNSTREAM_REMOTE_ADDRESS% upstream=%UPSTREAM_HOST% "
    "upstream_local=%UPSTREAM_LOCAL_ADDRESS% cluster=%UPSTREAM_CLUSTER% "
    "traceparent=%REQ(TRACEPARENT)%\n"
)


class SidecarError(ValueError):
    """A pod's sidecar annotations cannot be honoured."""


@dataclass(frozen=True)
class SidecarPlan:
    pod: str  # namespace/name
    canonical_service: str
    inbound_ports: tuple[int, ...]
    excluded_outbound: tuple[int, ...]
    bootstrap: dict[str, Any]
    iptables: str  # iptables-restore input for the pod namespace's nat table


def wants_sidecar(record: schema.ResourceRecord) -> bool:
    annotations = (record.manifest.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(INJECT_ANNOTATION)
    if value is None:
        return False
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise SidecarError(f"Pod {record.namespace}/{record.name}: metadata.annotations"
                           f"[{INJECT_ANNOTATION}]: expected \"true\" or \"false\", got {value!r}")
    return text == "true"


def _ports(record: schema.ResourceRecord, annotation: str) -> tuple[int, ...]:
    annotations = (record.manifest.get("metadata") or {}).get("annotations") or {}
    text = str(annotations.get(annotation) or "").strip()
    if not text:
        return ()
    ports: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise SidecarError(f"Pod {record.namespace}/{record.name}: metadata.annotations"
                               f"[{annotation}]: {part!r} is not a port number")
        ports.append(int(part))
    return tuple(sorted(set(ports)))


def canonical_service(record: schema.ResourceRecord) -> str:
    """Istio's canonical service: label ``service.istio.io/canonical-name``, else ``app``,
    else the pod's name."""
    labels = (record.manifest.get("metadata") or {}).get("labels") or {}
    return str(labels.get(CANONICAL_NAME_LABEL) or labels.get("app") or record.name)


def plan(record: schema.ResourceRecord, otlp_socket: str) -> SidecarPlan | None:
    """The sidecar of one pod, or None when it asks for none."""
    if not wants_sidecar(record):
        return None
    pod = decode("Pod", record.manifest)
    excluded_in = set(_ports(record, EXCLUDE_INBOUND_PORTS))
    inbound = tuple(sorted({
        p.container_port for c in pod.spec.containers for p in c.ports
        if (p.protocol or "TCP").upper() == "TCP" and p.container_port not in excluded_in
    }))
    reserved = {INBOUND_PORT, OUTBOUND_PORT} & set(inbound)
    if reserved:
        raise SidecarError(f"Pod {record.namespace}/{record.name}: spec.containers[].ports: "
                           f"port {min(reserved)} is the sidecar's own")
    service = canonical_service(record)
    excluded_out = _ports(record, EXCLUDE_OUTBOUND_PORTS)
    name = f"{record.namespace}/{record.name}"
    return SidecarPlan(
        pod=name, canonical_service=service, inbound_ports=inbound, excluded_outbound=excluded_out,
        bootstrap=bootstrap(record.namespace, record.name, service, inbound, otlp_socket),
        iptables=iptables_rules(inbound, excluded_out),
    )


def iptables_rules(inbound_ports: tuple[int, ...], excluded_outbound: tuple[int, ...] = ()) -> str:
    """``iptables-restore --noflush`` input for the pod namespace's nat table."""
    lines = ["*nat", ":CILIARY_INBOUND - [0:0]", ":CILIARY_OUTPUT - [0:0]",
             "-A PREROUTING -p tcp -j CILIARY_INBOUND",
             "-A OUTPUT -p tcp -j CILIARY_OUTPUT"]
    lines += [f"-A CILIARY_INBOUND -p tcp --dport {port} -j REDIRECT --to-ports {INBOUND_PORT}"
              for port in inbound_ports]
    lines += [f"-A CILIARY_OUTPUT -m owner --gid-owner {PROXY_GID} -j RETURN",
              "-A CILIARY_OUTPUT -d 127.0.0.0/8 -j RETURN",
              "-A CILIARY_OUTPUT -p tcp --dport 53 -j RETURN"]
    lines += [f"-A CILIARY_OUTPUT -p tcp --dport {port} -j RETURN" for port in excluded_outbound]
    lines += [f"-A CILIARY_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}", "COMMIT", ""]
    return "\n".join(lines)


def _address_tags(direction: str, namespace: str, pod: str, service: str) -> list[dict[str, Any]]:
    return [
        {"tag": TAG_DIRECTION, "literal": {"value": direction}},
        {"tag": TAG_CANONICAL_SERVICE, "literal": {"value": service}},
        {"tag": TAG_NAMESPACE, "literal": {"value": namespace}},
        {"tag": TAG_POD, "literal": {"value": pod}},
        {"tag": TAG_DOWNSTREAM_REMOTE, "value": "%DOWNSTREAM_REMOTE_ADDRESS%"},
        {"tag": TAG_DOWNSTREAM_LOCAL, "value": "%DOWNSTREAM_LOCAL_ADDRESS%"},
        {"tag": TAG_UPSTREAM_LOCAL, "value": "%UPSTREAM_LOCAL_ADDRESS%"},
        {"tag": TAG_UPSTREAM_REMOTE, "value": "%UPSTREAM_HOST%"},
        {"tag": TAG_ATTEMPTS, "value": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"},
    ]


def _http_manager(direction: str, namespace: str, pod: str, service: str,
                  cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": f"{direction}_http",
            "generate_request_id": True,
            "tracing": {
                "random_sampling": {"value": 100},
                "spawn_upstream_span": False,
                "custom_tags": _address_tags(direction, namespace, pod, service),
                "provider": {
                    "name": "envoy.tracers.opentelemetry",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                        "service_name": f"{service}.{namespace}",
                        "http_service": {
                            "http_uri": {"uri": "http://otlp/v1/traces", "cluster": OTLP_CLUSTER,
                                         "timeout": "2s"},
                        },
                    },
                },
            },
            "access_log": [{
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                },
            }],
            "route_config": {
                "name": f"{direction}",
                "virtual_hosts": [{"name": direction, "domains": ["*"],
                                   "routes": [{"match": {"prefix": "/"},
                                               "route": {"cluster": cluster, "timeout": "15s"}}]}],
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    }


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


def bootstrap(namespace: str, pod: str, service: str, inbound_ports: tuple[int, ...],
              otlp_socket: str) -> dict[str, Any]:
    """The Envoy v3 bootstrap of one sidecar (static listeners and clusters)."""
    original_dst = [{"name": "envoy.filters.listener.original_dst", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]
    inbound = {
        "name": "virtualInbound",
        "traffic_direction": "INBOUND",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": INBOUND_PORT}},
        "listener_filters": original_dst,
        "filter_chains": [
            {"filter_chain_match": {"destination_port": port},
             "filters": [_http_manager("inbound", namespace, pod, service, inbound_cluster(port))]}
            for port in inbound_ports
        ],
    }
    outbound = {
        "name": "virtualOutbound",
        "traffic_direction": "OUTBOUND",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
        "listener_filters": original_dst,
        "filter_chains": [{"filters": [_http_manager("outbound", namespace, pod, service,
                                                     PASSTHROUGH_CLUSTER)]}],
    }
    clusters: list[dict[str, Any]] = [
        {"name": PASSTHROUGH_CLUSTER, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
         "connect_timeout": "5s"},
        {"name": OTLP_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": OTLP_CLUSTER, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"pipe": {"path": otlp_socket}}}}]}]}},
    ]
    clusters += [
        {"name": inbound_cluster(port), "type": "STATIC", "connect_timeout": "5s",
         "load_assignment": {"cluster_name": inbound_cluster(port), "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
        for port in inbound_ports
    ]
    return {
        "node": {"id": f"sidecar~{namespace}~{pod}", "cluster": f"{service}.{namespace}"},
        "layered_runtime": {"layers": [{"name": "sidecar", "static_layer": FLUSH_RUNTIME}]},
        "static_resources": {"listeners": [inbound, outbound] if inbound_ports else [outbound],
                             "clusters": clusters},
    }


def envoy_binary() -> str:
    return str(Path(sys.executable).parent / "envoy")


def container_argv(config_path: Path) -> tuple[str, ...]:
    """The sidecar's command: Envoy under group ``PROXY_GID`` (the iptables exclusion)."""
    return ("setpriv", f"--regid={PROXY_GID}", "--clear-groups", envoy_binary(),
            "-c", str(config_path), "--log-level", "warn", "--base-id-path", "/dev/null",
            "--use-dynamic-base-id")


def write_bootstrap(directory: Path, sidecar: SidecarPlan) -> Path:
    """Write the bootstrap as JSON (Envoy reads it as YAML); blocking."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "envoy.json"
    atomicfile.write_atomically(path, json.dumps(sidecar.bootstrap, indent=1).encode(), 0o644)
    return path


__all__ = ["CONTAINER_NAME", "INJECT_ANNOTATION", "SidecarError", "SidecarPlan", "bootstrap",
           "container_argv", "iptables_rules", "plan", "wants_sidecar", "write_bootstrap"]


def effective_socket_lb(mode: str, sidecar_pods: int) -> str:
    """The socket-LB mode as ``ciliary status`` shows it: sidecar pods never join the node
    cgroup, so with sidecars present mode ``on`` acts as ``hostns-only`` for them."""
    if mode == "on" and sidecar_pods:
        return f"on (hostns-only in {sidecar_pods} sidecar pod{'s' if sidecar_pods != 1 else ''})"
    return mode
