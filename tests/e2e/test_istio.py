"""End-to-end: Envoy sidecars in the shop (checkout -> payments), their spans joined to the
datapath's flows, ``trace show`` and ``diagnose`` on a real 2-node instance.

checkout (node-1) calls the payments Service through its sidecar; payments (node-2)
answers through its own. The client sends its own W3C ``traceparent`` so the test knows
the trace id; Envoy continues that trace on both sides. A second instance forces
socket-LB (mode on) into the sidecar pods: Envoy then sees a backend instead of the
ClusterIP, and diagnose reports the bypass.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .instance import ciliary, embedded_instance, pods_ready
from .podnet import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

# payments: HTTP on 8080 answering the status written in STATUS_FILE (200 when absent)
APP = r"""
import socket, sys
status_file = sys.argv[1]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080)); srv.listen(64)
while True:
    conn, _ = srv.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    try:
        status = open(status_file).read().strip() or "200"
    except OSError:
        status = "200"
    conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 8\r\nConnection: close\r\n\r\npayments".encode())
    conn.close()
"""

CLIENT = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=float(sys.argv[3]))
try:
    c.request("GET", "/pay", headers={"traceparent": f"00-{sys.argv[2]}-{'1' * 16}-01"})
    print(c.getresponse().status)
except OSError as e:
    print("error", e)
"""


def manifests(status_file: Path, *, dns: bool = False) -> str:
    def pod(name: str, node: str, command: list[str]) -> dict:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default", "labels": {"app": name},
                             "annotations": {"sidecar.istio.io/inject": "true"}},
                "spec": {"nodeName": node, "containers": [{
                    "name": "app", "image": "x", "command": command,
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"tcpSocket": {"port": 8080}}}]}}
    docs = [
        pod("checkout", "node-1", [sys.executable, "-m", "ciliary.workload", "serve", "--tcp", "8080",
                                   "--name", "checkout"]),
        pod("payments", "node-2", [sys.executable, "-c", APP, str(status_file)]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "payments", "namespace": "default"},
         "spec": {"selector": {"app": "payments"}, "ports": [{"port": 8080, "targetPort": 8080}]}},
    ]
    if dns:  # a DNS server that knows only payments.shop.example
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": "coredns", "namespace": "default", "labels": {"app": "coredns"}},
                     "spec": {"nodeName": "node-2", "containers": [{
                         "name": "dns", "image": "x",
                         "command": [sys.executable, "-m", "ciliary.workload", "serve", "--dns", "53",
                                     "--name", "coredns", "--dns-record", "payments.shop.example=10.96.0.99"]}]}})
    return "\n---\n".join(json.dumps(d) for d in docs)


DENY = json.dumps({
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "payments-deny-checkout", "namespace": "default"},
    "spec": {"endpointSelector": {"matchLabels": {"app": "payments"}},
             "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "checkout"}}]}]}})


@pytest.fixture
def stack(tmp_path: Path, cluster_name: str) -> Iterator[Path]:
    with embedded_instance(tmp_path / "instance", cluster_name, nodes=2, cluster_id=23) as data_dir:
        yield data_dir


def test_sidecar_spans_join_flows_and_diagnose_walks_the_layers(stack, tmp_path: Path) -> None:
    data_dir = stack
    status_file = tmp_path / "payments-status"
    ciliary("apply", "-f", "-", stdin=manifests(status_file, dns=True), data_dir=data_dir)
    pods = wait_for(lambda: pods_ready(data_dir, 3), 60, "checkout, payments and coredns ready")
    svc = json.loads(ciliary("get", "svc", "payments", "-o", "json", data_dir=data_dir).stdout)
    vip = svc.get("status", {}).get("clusterIP") or svc["spec"]["clusterIP"]

    def request(trace_id: str, timeout: float = 5.0) -> str:
        out = ciliary("exec", "checkout", "--", sys.executable, "-c", CLIENT, vip, trace_id, str(timeout),
                      data_dir=data_dir, check=False, timeout=timeout + 30)
        return out.stdout.strip()

    # 1. checkout -> payments through both sidecars: the Envoy spans join the FORWARDED flow
    trace_id = secrets.token_hex(16)
    wait_for(lambda: request(trace_id) == "200", 30, "200 through the sidecars")

    def timeline() -> dict | None:
        out = ciliary("trace", "show", trace_id, "-o", "json", data_dir=data_dir, check=False)
        if out.returncode != 0:
            return None
        rows = json.loads(out.stdout)["timeline"]
        spans = [r["span"] for r in rows if "span" in r]
        joined = [s for s in spans if s.get("joined") and s.get("verdict") == "FORWARDED"]
        flows = [r for r in rows if r["layer"] == "L4"]
        return {"rows": rows, "spans": spans} if joined and flows else None

    shown = wait_for(timeline, 30, f"trace {trace_id} with a joined span and its flows")
    directions = {s.get("direction") for s in shown["spans"]}
    assert {"outbound", "inbound"} <= directions, shown["spans"]
    outbound = next(s for s in shown["spans"] if s.get("direction") == "outbound")
    assert outbound["upstream_address"] == f"{vip}:8080"  # Envoy saw the ClusterIP (no socket-LB in the pod)
    observed = ciliary("observe", "--trace-id", trace_id, "-o", "json", "--last", "50", data_dir=data_dir).stdout
    flows = [json.loads(line)["flow"] for line in observed.splitlines() if line.strip()]
    assert flows and all(f["trace_context"]["parent"]["trace_id"] == trace_id for f in flows)
    assert any(f["verdict"] == "FORWARDED" for f in flows)
    text = ciliary("trace", "show", trace_id, data_dir=data_dir).stdout
    assert "L7 outbound" in text and "L4" in text and "FORWARDED" in text

    diagnosis = json.loads(ciliary("diagnose", "default/checkout", "default/payments", "--port", "8080",
                                   "-o", "json", data_dir=data_dir, check=False).stdout)
    assert diagnosis["layer"] == "healthy", diagnosis
    assert diagnosis["seconds"] < 5

    # 2. a name the DNS server does not know: diagnose says DNS, with the rcode and the server
    dns_ip = pods["coredns"]["podIP"]
    looked_up = ciliary("exec", "checkout", "--", sys.executable, "-m", "ciliary.workload", "resolve", dns_ip,
                        "nope.shop.example", data_dir=data_dir, check=False)
    assert "NXDOMAIN" in looked_up.stdout, looked_up.stdout + looked_up.stderr

    def dns_fault() -> dict | None:
        out = ciliary("diagnose", "default/checkout", "nope.shop.example", "-o", "json", data_dir=data_dir, check=False)
        found = json.loads(out.stdout)
        return found if found["layer"] == "dns" and found["details"].get("rcode") == "NXDOMAIN" else None

    found = wait_for(dns_fault, 20, "diagnose to report the NXDOMAIN")
    assert found["details"]["server"] == dns_ip, found

    # 3. payments answers 503: diagnose says L7 with the status and the upstream
    status_file.write_text("503")
    assert request(secrets.token_hex(16)) == "503"

    def l7_fault() -> dict | None:
        out = ciliary("diagnose", "default/checkout", "default/payments", "--port", "8080", "-o", "json",
                      data_dir=data_dir, check=False)
        found = json.loads(out.stdout)
        return found if found["layer"] == "l7" else None

    found = wait_for(l7_fault, 20, "diagnose to report the L7 failure")
    assert found["details"]["status"] == 503 and vip in found["details"]["upstream"], found

    # 4. a deny policy: diagnose says policy and names it
    status_file.write_text("200")
    ciliary("apply", "-f", "-", stdin=DENY, data_dir=data_dir)

    def denied() -> dict | None:
        request(secrets.token_hex(16), timeout=2.0)
        out = ciliary("diagnose", "default/checkout", "default/payments", "--port", "8080", "-o", "json",
                      data_dir=data_dir, check=False)
        found = json.loads(out.stdout)
        return found if found["layer"] == "policy" else None

    found = wait_for(denied, 40, "diagnose to report the policy drop", interval=1.0)
    assert "payments-deny-checkout" in found["summary"], found
    assert any("policy trace" in line for line in found["evidence"]), found
    status = ciliary("status", data_dir=data_dir).stdout
    assert "socket-lb=" in status

    # 5. checkout loses its default route: its packets (the app's and its sidecar's) never
    # reach the datapath any more; once the sidecar's last upstream retries above are older
    # than the window, diagnose finds no flow at all
    ciliary("exec", "checkout", "--", "ip", "route", "del", "default", data_dir=data_dir)
    assert request(secrets.token_hex(16), timeout=2.0).startswith("error")

    def no_flow() -> dict | None:
        out = ciliary("diagnose", "default/checkout", "default/payments", "--port", "8080", "--since", "2s",
                      "-o", "json", data_dir=data_dir, check=False)
        found = json.loads(out.stdout)
        return found if found["layer"] == "no-flow" else None

    found = wait_for(no_flow, 30, "diagnose to report no flow once checkout has no route", interval=1.0)
    assert found["looked_at"]["flows"] == 0, found


def test_socket_lb_forced_into_sidecar_pods_is_reported_as_a_bypass(tmp_path: Path, cluster_name: str) -> None:
    env = {"CILIARY_SOCKET_LB": "on", "CILIARY_SIDECAR_SOCKET_LB": "1"}
    with embedded_instance(tmp_path / "instance", cluster_name, nodes=2, cluster_id=24, env=env) as data_dir:
        ciliary("apply", "-f", "-", stdin=manifests(tmp_path / "status"), data_dir=data_dir, env=env)
        pods = wait_for(lambda: pods_ready(data_dir, 2), 60, "checkout and payments ready")
        svc = json.loads(ciliary("get", "svc", "payments", "-o", "json", data_dir=data_dir).stdout)
        vip = svc.get("status", {}).get("clusterIP") or svc["spec"]["clusterIP"]
        assert "socket-lb=on" in ciliary("status", data_dir=data_dir).stdout

        trace_id = secrets.token_hex(16)

        def answered() -> bool:
            out = ciliary("exec", "checkout", "--", sys.executable, "-c", CLIENT, vip, trace_id, "3",
                          data_dir=data_dir, check=False, timeout=40)
            return out.stdout.strip() == "200"

        wait_for(answered, 30, "an answer through the sidecars")

        def outbound_upstream() -> str:
            out = ciliary("trace", "show", trace_id, "-o", "json", data_dir=data_dir, check=False)
            rows = json.loads(out.stdout)["timeline"] if out.returncode == 0 else []
            return next((r["span"]["upstream_address"] for r in rows
                         if "span" in r and r["span"].get("direction") == "outbound"), "")

        # Envoy saw the backend the socket layer chose, never the ClusterIP
        upstream = wait_for(outbound_upstream, 20, "the outbound span")
        assert upstream == f"{pods['payments']['podIP']}:8080" and vip not in upstream

        def bypass() -> dict | None:
            out = ciliary("diagnose", "default/checkout", "default/payments", "--port", "8080", "-o", "json",
                          data_dir=data_dir, check=False)
            found = json.loads(out.stdout)
            return found if found["layer"] == "sidecar-bypass" and found["looked_at"]["spans"] else None

        found = wait_for(bypass, 20, "diagnose to report the socket-LB bypass")
        assert found["details"]["socket_lb_in_pods"] is True
        assert "socket-LB" in found["summary"]
