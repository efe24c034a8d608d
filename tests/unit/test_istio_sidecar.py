"""The Envoy sidecar plan: annotations, redirection rules, a bootstrap Envoy accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ciliary import schema
from services.node import sidecar


def pod(annotations: dict[str, str] | None = None, ports: list[int] | None = None,
        labels: dict[str, str] | None = None) -> schema.ResourceRecord:
    manifest = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "payments-1", "namespace": "shop", "labels": labels or {"app": "payments"},
                     "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "x", "command": ["true"],
                                 "ports": [{"containerPort": p} for p in (ports or [8080])]}]},
    }
    return schema.ResourceRecord(kind="Pod", api_version="v1", namespace="shop", name="payments-1",
                                 uid="u1", generation=1, created="2026-01-01T00:00:00Z", manifest=manifest)


INJECT = {sidecar.INJECT_ANNOTATION: "true"}


def test_no_annotation_or_false_means_no_sidecar() -> None:
    assert sidecar.plan(pod(), "/run/x.sock") is None
    assert sidecar.plan(pod({sidecar.INJECT_ANNOTATION: "false"}), "/run/x.sock") is None


def test_bad_annotation_names_pod_and_annotation() -> None:
    with pytest.raises(sidecar.SidecarError, match=r"shop/payments-1.*sidecar.istio.io/inject"):
        sidecar.plan(pod({sidecar.INJECT_ANNOTATION: "yes"}), "/run/x.sock")
    with pytest.raises(sidecar.SidecarError, match="excludeOutboundPorts.*'http'"):
        sidecar.plan(pod({**INJECT, sidecar.EXCLUDE_OUTBOUND_PORTS: "5432,http"}), "/run/x.sock")
    with pytest.raises(sidecar.SidecarError, match="15001 is the sidecar's own"):
        sidecar.plan(pod(INJECT, ports=[15001]), "/run/x.sock")


def test_redirection_covers_app_ports_and_spares_proxy_loopback_dns() -> None:
    plan = sidecar.plan(pod({**INJECT, sidecar.EXCLUDE_OUTBOUND_PORTS: "5432"}, ports=[8080, 9090]), "/s")
    assert plan is not None and plan.inbound_ports == (8080, 9090)
    rules = plan.iptables.splitlines()
    assert "-A CILIARY_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006" in rules
    assert "-A CILIARY_INBOUND -p tcp --dport 9090 -j REDIRECT --to-ports 15006" in rules
    out = [r for r in rules if r.startswith("-A CILIARY_OUTPUT")]
    # exclusions come before the catch-all redirect
    assert out[-1] == "-A CILIARY_OUTPUT -p tcp -j REDIRECT --to-ports 15001"
    for exclusion in ("--gid-owner 1337 -j RETURN", "-d 127.0.0.0/8 -j RETURN",
                      "--dport 53 -j RETURN", "--dport 5432 -j RETURN"):
        assert any(exclusion in r for r in out[:-1]), exclusion


def test_bootstrap_traces_to_the_socket_with_connection_tags() -> None:
    plan = sidecar.plan(pod(INJECT, labels={"app": "payments", sidecar.CANONICAL_NAME_LABEL: "pay"}),
                        "/run/ciliary/otlp/t1.sock")
    assert plan is not None and plan.canonical_service == "pay"
    listeners = plan.bootstrap["static_resources"]["listeners"]
    assert [lst["address"]["socket_address"]["port_value"] for lst in listeners] == [15006, 15001]
    hcm = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    tags = {t["tag"]: t.get("value") or t.get("literal", {}).get("value") for t in hcm["tracing"]["custom_tags"]}
    assert tags[sidecar.TAG_CANONICAL_SERVICE] == "pay"
    assert tags[sidecar.TAG_DOWNSTREAM_REMOTE] == "%DOWNSTREAM_REMOTE_ADDRESS%"
    assert tags[sidecar.TAG_UPSTREAM_LOCAL] == "%UPSTREAM_LOCAL_ADDRESS%"
    assert tags[sidecar.TAG_ATTEMPTS] == "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"
    clusters = {c["name"]: c for c in plan.bootstrap["static_resources"]["clusters"]}
    otlp = clusters[sidecar.OTLP_CLUSTER]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert otlp["endpoint"]["address"]["pipe"]["path"] == "/run/ciliary/otlp/t1.sock"
    fmt = hcm["access_log"][0]["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    for field in ("%DOWNSTREAM_REMOTE_ADDRESS%", "%UPSTREAM_HOST%", "%RESPONSE_CODE%", "%RESPONSE_FLAGS%"):
        assert field in fmt


def test_envoy_accepts_the_bootstrap(tmp_path: Path) -> None:
    plan = sidecar.plan(pod(INJECT, ports=[8080, 9090]), str(tmp_path / "otlp.sock"))
    assert plan is not None
    config = sidecar.write_bootstrap(tmp_path, plan)
    result = subprocess.run([sidecar.envoy_binary(), "--mode", "validate", "-c", str(config),
                             "--log-level", "warn"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_status_says_which_socket_lb_mode_is_on() -> None:
    assert sidecar.effective_socket_lb("on", 0) == "on"
    assert sidecar.effective_socket_lb("on", 2) == "on (hostns-only in 2 sidecar pods)"
    assert sidecar.effective_socket_lb("hostns-only", 3) == "hostns-only"
