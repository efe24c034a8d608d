"""toFQDNs with the real stack and real packets: a pod may reach an outside address only
after its own DNS lookup returned it for the allowed name.

Pods: a DNS server answering ``api.payment-gateway.example`` with 203.0.113.10, a world
pod serving TCP 443 on the whole 203.0.113.0/24 range, and a client whose egress policy
allows DNS to the DNS pod and ``toFQDNs: matchName`` on 443. Driven through the CLI and,
for the timing-sensitive part, one script run inside the client's namespace. The flows
of those connections carry the resolved name (``destination_names``/``source_names``) and
``ciliary observe --to-fqdn/--from-fqdn`` selects them.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_privileges
from .instance import ciliary, embedded_instance, pods_ready
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
NAME = "api.payment-gateway.example"
GATEWAY = "203.0.113.10"
OTHER = "203.0.113.11"

MANIFESTS = f"""
apiVersion: v1
kind: Pod
metadata: {{name: dns, namespace: default, labels: {{app: dns}}}}
spec:
  containers:
    - name: dns
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--dns", "53", "--name", "dns",
                "--dns-record", "{NAME}={GATEWAY}", "--dns-record", "other.example={OTHER}"]
---
apiVersion: v1
kind: Pod
metadata:
  name: gateway
  namespace: default
  labels: {{app: gateway}}
  annotations: {{sandbox.ciliary.io/outside-world: "true"}}
spec:
  containers:
    - name: gateway
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--tcp", "443", "--name", "gateway"]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec:
  containers:
    - name: client
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--tcp", "8080", "--name", "client"]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-egress, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
    - toEndpoints: [{{matchLabels: {{app: dns}}}}]
      toPorts: [{{ports: [{{port: "53", protocol: UDP}}]}}]
    - toFQDNs: [{{matchName: {NAME}}}]
      toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"""

# Resolve, then try fresh connections (50 ms timeout, 10 ms apart: each one a new SYN, so
# no 1 s retransmit hides the moment the allow reaches the kernel); print the delay.
RESOLVE_THEN_CONNECT = """
import json, socket, sys, time
from ciliary.workload import resolve
server, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rcode, ips = resolve(server, name)
answered = time.monotonic()
attempts = 0
while time.monotonic() - answered < 15:
    attempts += 1
    try:
        with socket.create_connection((ips[0], port), timeout=0.05) as s:
            s.sendall(b"ping\\n")
            reply = s.recv(100).decode()
        break
    except OSError:
        time.sleep(0.01)
else:
    reply = ""
print(json.dumps({"rcode": rcode, "ips": ips, "reply": reply, "attempts": attempts,
                  "delay_ms": round((time.monotonic() - answered) * 1000)}))
"""


cli = ciliary


@pytest.fixture
def stack(tmp_path: Path, cluster_names: list[str]) -> Iterator[Path]:
    require_privileges()
    cluster = "q" + secrets.token_hex(2)
    cluster_names.append(cluster)
    with embedded_instance(tmp_path / "instance", cluster, nodes=1, cluster_id=9) as data_dir:
        yield data_dir


def egress_enforced(data_dir: Path) -> bool:
    rows = json.loads(cli("endpoint", "list", "-o", "json", data_dir=data_dir).stdout)
    client = [r for node in rows for r in node["rows"] if r["pod"] == "default/client"]
    return bool(client) and client[0]["egress_enforcement"]


def connect(data_dir: Path, host: str, port: int, timeout: float = 1.5) -> subprocess.CompletedProcess[str]:
    return cli("exec", "client", "--", sys.executable, "-m", "ciliary.workload", "connect", host,
               str(port), "--timeout", str(timeout), data_dir=data_dir, check=False)


def test_to_fqdns_allows_only_resolved_addresses(stack: Path) -> None:
    data_dir = stack
    cli("apply", "-f", "-", data_dir=data_dir, stdin=MANIFESTS)
    pods = wait_for(lambda: pods_ready(data_dir, 3), 60, "dns, gateway and client running")
    wait_for(lambda: egress_enforced(data_dir), 30, "client egress policy in the datapath")
    dns_ip = pods["dns"]["podIP"]

    # before any lookup the gateway is just "world": dropped
    assert connect(data_dir, GATEWAY, 443).returncode != 0
    # resolving a name the policy does not select opens nothing
    other = cli("exec", "client", "--", sys.executable, "-m", "ciliary.workload", "resolve",
                dns_ip, "other.example", data_dir=data_dir)
    assert other.stdout.split() == ["NOERROR", OTHER], other.stdout

    netns = pods["client"]["ciliary"]["netns"]
    run = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", RESOLVE_THEN_CONNECT,
                          dns_ip, NAME, "443"], capture_output=True, text=True, timeout=40,
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["rcode"], result["ips"]) == ("NOERROR", [GATEWAY]), result
    assert result["reply"].startswith("gateway"), result
    print(f"DNS answer -> first allowed connection: {result['delay_ms']} ms "
          f"({result['attempts']} attempts)")

    # the learned address stays allowed (plain connect, no retries) ...
    ok = connect(data_dir, GATEWAY, 443)
    assert ok.returncode == 0 and ok.stdout.startswith("gateway"), ok.stdout + ok.stderr
    # ... another outside address is still dropped, as is the unselected name's address
    assert connect(data_dir, OTHER, 443).returncode != 0
    assert connect(data_dir, "203.0.113.12", 443).returncode != 0

    # the identity carries the fqdn label, and policy trace names the toFQDNs rule
    identities = json.loads(cli("identity", "list", "-o", "json", data_dir=data_dir).stdout)
    labelled = [i for i in identities if f"fqdn:{NAME}" in i["labels"]]
    assert len(labelled) == 1 and f"cidr:{GATEWAY}/32" in labelled[0]["labels"], labelled
    traced = cli("policy", "trace", "--from", "default/client", "--to", GATEWAY, "--port", "443/TCP",
                 data_dir=data_dir).stdout
    assert "Final verdict: ALLOW" in traced, traced
    assert "CiliumNetworkPolicy/default/client-egress spec[0].egress[1]" in traced, traced
    denied = cli("policy", "trace", "--from", "default/client", "--to", OTHER, "--port", "443/TCP",
                 data_dir=data_dir).stdout
    assert "Final verdict: DENY" in denied, denied

    # the flows to the gateway carry the name the client resolved (its own DNS cache) and
    # Hubble's FQDN filters select them; the unselected name's address has its own name
    def named_flows(*flags: str) -> list[dict] | None:
        out = cli("observe", *flags, "--last", "100", "-o", "json", data_dir=data_dir).stdout
        flows = [json.loads(line)["flow"] for line in out.splitlines() if line.strip()]
        return flows or None

    to_gateway = wait_for(lambda: named_flows("--to-fqdn", NAME), 20, "flows with destination_names")
    assert all(f["destination_names"] == [NAME] and f["IP"]["destination"] == GATEWAY for f in to_gateway)
    assert any(f["source"].get("pod_name") == "client" for f in to_gateway), to_gateway
    from_gateway = wait_for(lambda: named_flows("--from-fqdn", "*.payment-gateway.example"), 20,
                            "replies with source_names")
    assert all(f["source_names"] == [NAME] and f["IP"]["source"] == GATEWAY for f in from_gateway)
    to_other = wait_for(lambda: named_flows("--to-fqdn", "other.example"), 20, "flows to other.example")
    assert all(f["IP"]["destination"] == OTHER for f in to_other), to_other
    compact = cli("observe", "--to-fqdn", NAME, "--last", "5", data_dir=data_dir).stdout
    assert f"-> {NAME}:443" in compact, compact
