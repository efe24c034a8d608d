"""Flow visibility on the whole embedded stack with real packets, driven through the CLI.

Each test runs its own ``ciliary up -d --nodes 2`` (cluster ``f<4 hex>``, registered for
the leak check) and always ``ciliary down``s it. Pod traffic only flows between the
cluster's namespaces; the flows service's HTTP server (metrics + service map) listens on
127.0.0.1 and headless Chromium only loads that origin.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ciliary import config, hubble, natsauth, natscreds, schema
from ciliary.bus import Bus

from .conftest import require_privileges
from .instance import leftovers
from .podnet import wait_for

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
SCREENSHOT_DOC = REPO / "docs" / "img" / "servicemap.png"
DNS_NAME = "payments.default.svc.cluster.local"
DNS_ADDRESS = "10.96.0.50"

DNS_MANIFEST = f"""
apiVersion: v1
kind: Namespace
metadata:
  name: kube-system
---
apiVersion: v1
kind: Pod
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  nodeName: node-2
  containers:
    - name: dns
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--name", "coredns", "--dns", "53",
                "--dns-record", "{DNS_NAME}={DNS_ADDRESS}"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, data_dir: Path, cluster: str, env: dict[str, str], ui_port: int) -> None:
        self.data_dir, self.cluster, self.env, self.ui_port = data_dir, cluster, env, ui_port

    def cli(self, *args: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "ciliary.cli", *args], capture_output=True, text=True,
                                env=self.env, cwd=REPO, timeout=timeout, input=input)
        if check:
            assert result.returncode == 0, f"ciliary {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def observe(self, *args: str) -> list[dict]:
        out = self.cli("observe", *args, "-o", "json", check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def pods(self) -> dict[str, dict]:
        items = json.loads(self.cli("get", "pods", "-A", "-o", "json").stdout)["items"]
        return {f"{p['metadata'].get('namespace', 'default')}/{p['metadata']['name']}": p for p in items}

    def ready_pods(self, count: int) -> dict[str, dict] | None:
        ready = {
            ref: p["status"] for ref, p in self.pods().items()
            if p.get("status", {}).get("phase") == "Running" and p["status"].get("podIP")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        }
        return ready if len(ready) >= count else None

    def cluster_ip(self, name: str) -> str | None:
        svc = json.loads(self.cli("get", "svc", name, "-o", "json").stdout)
        return svc.get("status", {}).get("clusterIP") or svc.get("spec", {}).get("clusterIP")

    def policy_in_force(self, pod: str = "default/payments") -> bool:
        rows = json.loads(self.cli("endpoint", "list", "-o", "json").stdout)
        found = [r for node in rows for r in node["rows"] if r["pod"] == pod]
        return bool(found) and found[0]["ingress_enforcement"]

    def in_pod(self, status: dict, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run a command in a pod's network namespace (as ``ciliary exec`` does, minus the CLI start-up)."""
        return subprocess.run(["ip", "netns", "exec", status["ciliary"]["netns"], *argv],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def workload(self, status: dict, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return self.in_pod(status, sys.executable, "-m", "ciliary.workload", *args, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Every series of ``ciliary metrics`` as {'name{labels}': value}."""
        text = self.cli("metrics").stdout
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out | {"__text__": text}  # type: ignore[dict-item]

    def flows_detail(self) -> dict:
        status = json.loads(self.cli("status", "-o", "json").stdout)
        flows = [s for s in status["services"] if s.get("name") == "flows" or s.get("service") == "flows"]
        assert flows, status
        return flows[0].get("detail", {})

    def http_get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}{path}", timeout=5) as r:  # noqa: S310
            return r.read()




@pytest.fixture
def make_stack(tmp_path: Path, cluster_names: list[str]) -> Iterator[Callable[..., Stack]]:
    """``make_stack(**extra_env)`` brings up one 2-node instance; teardown always downs it."""
    require_privileges()
    made: list[Stack] = []

    def make(**extra_env: str) -> Stack:
        assert not made, "one stack per test"
        cluster = "f" + secrets.token_hex(2)
        cluster_names.append(cluster)
        data_dir = tmp_path / "instance"
        port = free_port()
        env = dict(os.environ, CILIARY_DATA_DIR=str(data_dir), CILIARY_FLOWS_UI_PORT=str(port),
                   CILIARY_FLOWS_HTTP_HOST="127.0.0.1", **extra_env)
        stack = Stack(data_dir, cluster, env, port)
        made.append(stack)
        stack.cli("up", "-d", "--nodes", "2", "--cluster", cluster, "--cluster-id", "9", timeout=120)
        return stack

    try:
        yield make
    finally:
        for stack in made:
            state = config.read_instance(stack.data_dir)
            stack.cli("down", check=False, timeout=120)
            if state is not None:
                assert not any(config.pid_alive(p.pid) for p in state.processes), "process left behind"
            left = leftovers(stack.cluster)
            assert not left, f"cluster {stack.cluster} left: {left}"


def shop(stack: Stack, *, policies: bool = True, extra: str = "") -> dict[str, dict]:
    files = ["10-workloads.yaml", "20-services.yaml"] + (["30-policies.yaml"] if policies else [])
    args = [a for f in files for a in ("-f", str(SHOP / f))]
    stack.cli("apply", *args)
    count = 3
    if extra:
        stack.cli("apply", "-f", "-", input=extra)
        count += 1
    pods = wait_for(lambda: stack.ready_pods(count), 60, f"{count} ready pods")
    if policies:
        wait_for(stack.policy_in_force, 30, "payments ingress policy in the datapath")
    return pods


def flow_age_s(line: dict) -> float:
    return time.time() - hubble.flow_time_ns(schema.Flow(time=line["time"])) / 1e9


# ------------------------------------------------------------------------------ (a) drops


def test_policy_drop_is_observed_within_2s(make_stack) -> None:
    stack = make_stack()
    pods = shop(stack)
    payments_ip = pods["default/payments"]["podIP"]
    attempt_started = time.time()
    # frontend -> payments is denied by payments-ingress (only checkout may call it)
    client = subprocess.Popen(["ip", "netns", "exec", pods["default/frontend"]["ciliary"]["netns"],
                               sys.executable, "-m", "ciliary.workload", "connect", payments_ip, "8080",
                               "--timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        found: list[dict] = []

        def dropped() -> list[dict]:
            lines = stack.observe("--verdict", "DROPPED", "--to-pod", "default/payments", "--last", "10")
            fresh = [x for x in lines if hubble.flow_time_ns(schema.Flow(time=x["time"])) / 1e9
                     >= attempt_started - 0.5]
            found[:] = fresh
            return fresh

        wait_for(dropped, 10, "the frontend -> payments drop", interval=0.05)
        seen_at = time.time()
    finally:
        out, err = client.communicate(timeout=10)
    assert client.returncode != 0, f"frontend reached payments: {out}{err}"
    kinds = {(x["flow"]["event_type"]["type"], x["flow"].get("drop_reason_desc")) for x in found}
    drop = next(x for x in found if x["flow"]["event_type"]["type"] == 1)
    flow = drop["flow"]
    # within 2 s of the packet (the drop's own kernel timestamp)
    packet_time = hubble.flow_time_ns(schema.Flow(time=drop["time"])) / 1e9
    assert seen_at - packet_time < 2.0, f"drop visible {seen_at - packet_time:.2f}s after the packet"
    assert flow["verdict"] == "DROPPED"
    assert flow["drop_reason_desc"] == "POLICY_DENIED" and flow["drop_reason"] == 133
    assert flow["source"]["pod_name"] == "frontend" and flow["source"]["namespace"] == "default"
    assert flow["destination"]["pod_name"] == "payments"
    assert flow["IP"] == {"source": pods["default/frontend"]["podIP"], "destination": payments_ip,
                          "ipVersion": "IPv4"}
    assert flow["l4"]["TCP"]["destination_port"] == 8080 and flow["l4"]["TCP"]["flags"]["SYN"]
    assert flow["node_name"] == f"{stack.cluster}/node-2" and drop["node_name"] == flow["node_name"]
    assert flow["traffic_direction"] == "INGRESS" and "is_reply" not in flow
    assert (5, "POLICY_DENIED") in kinds  # the policy-verdict (DENIED) flow of the same packet
    # the compact format reads like hubble's
    compact = stack.cli("observe", "--verdict", "DROPPED", "--to-pod", "default/payments", "--last", "1").stdout
    assert "default/frontend:" in compact and "<> default/payments:8080" in compact
    assert "Policy denied DROPPED (TCP Flags: SYN)" in compact


# ------------------------------------------------------------------------------ (b) DNS


def test_dns_queries_are_l7_flows(make_stack) -> None:
    stack = make_stack()
    pods = shop(stack, policies=False, extra=DNS_MANIFEST)
    dns_ip = pods["kube-system/coredns"]["podIP"]
    checkout = pods["default/checkout"]
    # a Ready pod has started its process; the responder binds port 53 a moment later
    ok = wait_for(lambda: (r := stack.workload(checkout, "resolve", dns_ip, DNS_NAME)).returncode == 0 and r,
                  15, "the DNS responder to answer")
    assert ok.returncode == 0 and ok.stdout.split() == ["NOERROR", DNS_ADDRESS], ok.stdout + ok.stderr
    bad = stack.workload(checkout, "resolve", dns_ip, "nothing.example.org")
    assert bad.returncode == 0 and bad.stdout.split() == ["NXDOMAIN"], bad.stdout + bad.stderr

    def l7() -> list[dict] | None:
        lines = stack.observe("--type", "l7", "--from-pod", "default/checkout", "--protocol", "dns", "--all")
        lines += stack.observe("--type", "l7", "--to-pod", "default/checkout", "--protocol", "dns", "--all")
        responses = [x for x in lines if x["flow"]["l7"]["type"] == "RESPONSE"]
        return lines if len(responses) >= 2 and len(lines) >= 4 else None

    lines = wait_for(l7, 10, "two DNS requests and two responses")
    by = {(x["flow"]["l7"]["type"], x["flow"]["l7"]["dns"]["query"]): x["flow"] for x in lines}
    req = by[("REQUEST", DNS_NAME + ".")]
    assert req["Type"] == "L7" and req["event_type"] == {"type": 129}
    assert req["l7"]["dns"]["qtypes"] == ["A"] and req["l7"]["dns"]["observation_source"] == "datapath"
    assert req["source"]["pod_name"] == "checkout" and req["destination"]["pod_name"] == "coredns"
    assert req["destination"]["namespace"] == "kube-system" and req["traffic_direction"] == "EGRESS"
    assert req["Summary"] == f"DNS Query {DNS_NAME}. A"
    ok_resp = by[("RESPONSE", DNS_NAME + ".")]
    assert ok_resp["l7"]["dns"].get("rcode", 0) == 0  # NOERROR (zero is omitted, as protojson does)
    assert ok_resp["l7"]["dns"]["ips"] == [DNS_ADDRESS] and ok_resp["l7"]["dns"]["ttl"] == 30
    assert ok_resp["l7"]["dns"]["rrtypes"] == ["A"] and ok_resp["is_reply"] is True
    assert ok_resp["source"]["pod_name"] == "coredns" and ok_resp["destination"]["pod_name"] == "checkout"
    nx = by[("RESPONSE", "nothing.example.org.")]
    assert nx["l7"]["dns"]["rcode"] == 3 and not nx["l7"]["dns"].get("ips")
    assert "RCode: Non-Existent Domain" in nx["Summary"]
    assert ("REQUEST", "nothing.example.org.") in by
    # --dns-query filters by query name; metrics count queries and responses by rcode
    only = stack.observe("--dns-query", "nothing\\.example", "--all")
    assert only and all(x["flow"]["l7"]["dns"]["query"] == "nothing.example.org." for x in only)
    m = stack.metrics()
    assert m['hubble_dns_responses_total{ips_returned="1",qtypes="A",rcode="No Error"}'] >= 1
    assert m['hubble_dns_responses_total{ips_returned="0",qtypes="A",rcode="Non-Existent Domain"}'] >= 1
    assert m['hubble_dns_queries_total{ips_returned="",qtypes="A",rcode=""}'] >= 2


# ------------------------------------------------------------------------------ (c) follow


def test_observe_follow_streams_new_flows(make_stack) -> None:
    stack = make_stack()
    pods = shop(stack, policies=False)
    vip = wait_for(lambda: stack.cluster_ip("payments"), 20, "a cluster IP")
    proc = subprocess.Popen([sys.executable, "-m", "ciliary.cli", "observe", "--follow", "--from-pod",
                             "default/checkout", "--to-port", "8080", "--type", "trace:from-endpoint",
                             "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env, cwd=REPO)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    started = time.time()
    got: dict | None = None
    try:
        deadline = time.monotonic() + 15
        while got is None and time.monotonic() < deadline:
            stack.workload(pods["default/checkout"], "connect", vip, "8080", "--timeout", "2")
            try:
                got = json.loads(lines.get(timeout=3))
            except queue.Empty:
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert got is not None, "observe --follow printed nothing within 15 s"
    flow = got["flow"]
    assert flow["source"]["pod_name"] == "checkout" and flow["l4"]["TCP"]["destination_port"] == 8080
    assert flow["trace_observation_point"] == "FROM_ENDPOINT"  # the client's hook: before/at DNAT
    assert flow["destination_service"] == {"name": "payments", "namespace": "default"}
    assert hubble.flow_time_ns(schema.Flow(time=got["time"])) / 1e9 >= started - 1  # a new flow
    assert flow_age_s(got) < 30


# ------------------------------------------------------------------------------ (d) losses


async def _publish(nats_url: str, subject: str, payloads: list[bytes],
                   credential: config.NatsCredential | None) -> None:
    bus = await Bus.connect(nats_url, "test-publish", allow_reconnect=False, credential=credential)
    try:
        for p in payloads:
            await bus.publish(subject, p)
    finally:
        await bus.close()  # drains: every publish reached the server


UDP_BURST = """
import os, socket, sys
host, n, senders, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
children = []
for k in range(senders - 1):  # parallel senders: outrun the executor's reader on a busy machine
    pid = os.fork()
    if pid == 0:
        break
    children.append(pid)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", base + len(children)))  # a source port of its own: every datagram is a new flow
for i in range(n):
    s.sendto(b"x", (host, 20000 + i % 40000))
if len(children) < senders - 1:
    os._exit(0)
for pid in children:
    os.waitpid(pid, 0)
print(n * senders)
"""


def lost_by_source(m: dict[str, float]) -> dict[str, float]:
    prefix = 'hubble_lost_events_total{source="'
    return {k[len(prefix):-2]: v for k, v in m.items() if k.startswith(prefix)}


def test_lost_events_are_counted(make_stack) -> None:
    # a 1-page (4 KiB) ring buffer: a burst of new UDP flows overflows it in the kernel
    stack = make_stack(CILIARY_MAP_EVENTS_PAGES="1")
    pods = shop(stack, policies=False)
    m = stack.metrics()
    assert "# TYPE hubble_lost_events_total counter" in m["__text__"]  # type: ignore[operator]
    processed_before = sum(v for k, v in m.items() if k.startswith("hubble_flows_processed_total{"))
    lost_before = sum(lost_by_source(m).values())
    bursts = []

    def burst() -> None:
        done = stack.in_pod(pods["default/frontend"], sys.executable, "-c", UDP_BURST,
                            pods["default/checkout"]["podIP"], "5000", "3", str(61000 + 10 * len(bursts)))
        assert done.returncode == 0, done.stderr
        bursts.append(int(done.stdout.split()[-1]))

    burst()

    def kernel_lost() -> dict[str, float] | None:
        lost = lost_by_source(stack.metrics())
        if lost.get("perf_event_ring_buffer", 0) > 0:
            return lost
        if len(bursts) < 5:  # the reader kept up (it may, on an idle machine): burst again
            burst()
        return None

    lost = wait_for(kernel_lost, 40, "ring-buffer losses in hubble_lost_events_total")
    # what is not lost is seen: the burst's new-connection events plus losses cover the burst
    time.sleep(1.5)  # let the last batches arrive
    m = stack.metrics()
    lost = lost_by_source(m)
    processed = sum(v for k, v in m.items() if k.startswith("hubble_flows_processed_total{"))
    detail = wait_for(lambda: (d := stack.flows_detail().get("flows")) and d["seen"] == processed and d,
                      10, "the flows service's seen counter to match hubble_flows_processed_total")
    assert detail["lost"] == sum(lost.values())
    # every datagram opened a new flow (one event at least): each was seen or counted lost
    seen_now = processed - processed_before
    lost_now = sum(lost.values()) - lost_before
    assert seen_now + lost_now >= sum(bursts), (seen_now, lost, bursts)
    assert stack.observe("--from-pod", "default/frontend", "--protocol", "udp", "--last", "5")
    # a history larger than one bus message arrives in chunks
    everything = stack.cli("observe", "--all", "-o", "json", check=False, timeout=30)
    assert everything.returncode == 0, everything.stderr[-500:]
    assert len(everything.stdout.splitlines()) >= seen_now, (len(everything.stdout.splitlines()), seen_now)
    # undecodable payloads and losses reported by an executor are counted too, never dropped
    state = config.read_instance(stack.data_dir)
    assert state is not None
    batch = schema.RawEventBatch(cluster=stack.cluster, node="node-1", lost=7)  # seq 0: not sequenced
    subject = schema.SUBJECT_FLOWS_RAW.format(cluster=stack.cluster, node="node-1")
    before = lost_by_source(stack.metrics())
    node_credential = natscreds.instance_credential(stack.data_dir, natsauth.node_user("node-1"))
    asyncio.run(_publish(state.nats_url, subject, [b"\x00not msgpack", schema.encode(batch)], node_credential))

    def counted() -> dict[str, float] | None:
        now = lost_by_source(stack.metrics())
        return now if (now.get("decode", 0) == before.get("decode", 0) + 1 and now.get(
            "perf_event_ring_buffer", 0) >= before.get("perf_event_ring_buffer", 0) + 7) else None

    after = wait_for(counted, 10, "decode and ring-buffer losses counted")
    detail = stack.flows_detail()["flows"]
    assert detail["lost"] >= sum(after.values())


# ------------------------------------------------------------------------------ (e) service map UI


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    reason = "chromium is not installed (make setup installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


def chromium(binary: str, profile: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-proxy-server", "--window-size=1200,800", *args]
    assert args[-1].startswith("http://127.0.0.1:"), args
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def png_colours(data: bytes) -> set[tuple[int, int, int]]:
    """Distinct RGB colours of an 8-bit RGB/RGBA PNG (no interlace), decoded with zlib."""
    width, height = png_size(data)
    depth, ctype, interlace = data[24], data[25], data[28]
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    pos, idat = 8, b""
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[tuple[int, int, int]] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        colours.update(tuple(line[i:i + 3]) for i in range(0, stride, bpp))  # type: ignore[misc]
        prev = line
    return colours


def test_service_map_in_headless_chromium(make_stack, tmp_path: Path) -> None:
    binary = chromium_binary()
    stack = make_stack()
    pods = shop(stack, extra=DNS_MANIFEST)
    payments_ip = pods["default/payments"]["podIP"]
    vip = wait_for(lambda: stack.cluster_ip("payments"), 20, "a cluster IP")
    # forwarded: checkout -> payments (VIP, allowed), frontend -> checkout; dropped: frontend -> payments
    wait_for(lambda: stack.workload(pods["default/checkout"], "connect", vip, "8080").returncode == 0, 20,
             "payments to answer checkout")
    wait_for(lambda: stack.workload(pods["default/frontend"], "connect", pods["default/checkout"]["podIP"],
                                    "8080").returncode == 0, 20, "checkout to answer frontend")
    for _ in range(3):
        assert stack.workload(pods["default/checkout"], "connect", vip, "8080").returncode == 0
        assert stack.workload(pods["default/frontend"], "connect", pods["default/checkout"]["podIP"],
                              "8080").returncode == 0
    assert stack.workload(pods["default/frontend"], "connect", payments_ip, "8080", "--timeout", "1").returncode != 0
    wait_for(lambda: stack.workload(pods["default/checkout"], "resolve", pods["kube-system/coredns"]["podIP"],
                                    DNS_NAME).returncode == 0, 15, "a DNS answer")

    def edges() -> dict | None:
        m = json.loads(stack.http_get("/api/servicemap"))
        have = {(e["source"], e["destination"], e["verdict"]) for e in m["edges"]}
        want = {("default/checkout", "default/payments", "forwarded"),
                ("default/frontend", "default/checkout", "forwarded"),
                ("default/frontend", "default/payments", "dropped")}
        return m if want <= have else None

    m = wait_for(edges, 10, "forwarded and dropped edges in /api/servicemap")
    by = {(e["source"], e["destination"], e["verdict"]): e for e in m["edges"]}
    assert by[("default/frontend", "default/payments", "dropped")]["drop_reasons"].get("POLICY_DENIED", 0) >= 1
    assert by[("default/frontend", "default/payments", "dropped")]["colour"] == "#d93636"
    assert by[("default/checkout", "default/payments", "forwarded")]["colour"] == "#2e9d4f"
    assert by[("default/checkout", "default/payments", "forwarded")]["services"] == ["default/payments"]
    assert by[("default/checkout", "default/payments", "forwarded")]["flows"] >= 3
    assert {"default", "kube-system"} <= set(m["namespaces"])
    page = stack.http_get("/")
    assert b"/api/servicemap" in page and b"<svg" in page

    # the page as a browser renders it: the script fetched the map and drew the edges
    dom = chromium(binary, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom",
                   f"http://127.0.0.1:{stack.ui_port}/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="edge verdict-dropped"' in dom.stdout and 'class="edge verdict-forwarded"' in dom.stdout
    assert 'data-id="default/payments"' in dom.stdout and "namespace kube-system" in dom.stdout

    shot = tmp_path / "servicemap.png"
    result = chromium(binary, tmp_path / "profile-shot", "--virtual-time-budget=5000",
                      f"--screenshot={shot}", f"http://127.0.0.1:{stack.ui_port}/")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    data = shot.read_bytes()
    assert png_size(data) == (1200, 800)
    assert len(data) > 20_000, len(data)  # a drawn page, not a blank one
    colours = png_colours(data)
    assert (0x2E, 0x9D, 0x4F) in colours and (0xD9, 0x36, 0x36) in colours  # green and red edges
    assert len(colours) > 50
    if os.environ.get("CILIARY_UPDATE_DOC_SCREENSHOT") == "1":  # refresh docs/img on request only
        SCREENSHOT_DOC.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_DOC)


# ------------------------------------------------------------------------------ (f) policy verdicts


def test_allowed_connections_give_one_policy_verdict_each_naming_the_policy(make_stack) -> None:
    """checkout -> payments:8080 is allowed by payments-ingress ({checkout, 8080, TCP}:
    L3-L4) at payments' ingress; checkout's egress is not enforced. Every connection gives
    exactly one FORWARDED policy-verdict flow, at its first packet; its later packets
    (ACKs, data, FIN) none. A denied connection still gives the DENIED one."""
    stack = make_stack()
    pods = shop(stack)
    payments_ip = pods["default/payments"]["podIP"]
    checkout_ip = pods["default/checkout"]["podIP"]
    started = time.time()
    for _ in range(3):
        ok = stack.workload(pods["default/checkout"], "connect", payments_ip, "8080", "--timeout", "3")
        assert ok.returncode == 0 and ok.stdout.startswith("payments "), ok.stdout + ok.stderr
    denied = stack.workload(pods["default/frontend"], "connect", payments_ip, "8080", "--timeout", "1")
    assert denied.returncode != 0, denied.stdout

    def fresh(lines: list[dict]) -> list[dict]:
        return [x for x in lines if hubble.flow_time_ns(schema.Flow(time=x["time"])) / 1e9 >= started - 0.5]

    def is_pv(x: dict) -> bool:
        return x["flow"]["event_type"]["type"] == 5

    def from_checkout(x: dict) -> bool:
        return x["flow"]["IP"]["source"] == checkout_ip

    def everything() -> list[dict] | None:
        lines = fresh(stack.observe("--to-pod", "default/payments", "--last", "500"))
        allowed = [x for x in lines if is_pv(x) and from_checkout(x)]
        fins = [x for x in lines if from_checkout(x) and x["flow"]["l4"]["TCP"]["flags"].get("FIN")
                and x["flow"].get("trace_observation_point") == "TO_ENDPOINT"]
        denials = [x for x in lines if is_pv(x) and x["flow"]["verdict"] == "DROPPED"]
        return lines if len(allowed) >= 3 and len(fins) >= 3 and denials else None

    lines = wait_for(everything, 15, "three allowed connections (with their FINs) and one denial")
    conn_pvs = [x["flow"] for x in lines if is_pv(x) and from_checkout(x)]
    syns = {x["flow"]["l4"]["TCP"]["source_port"] for x in lines if from_checkout(x)
            and x["flow"].get("trace_observation_point") == "TO_ENDPOINT"
            and x["flow"]["l4"]["TCP"]["flags"].get("SYN")}
    fins = {x["flow"]["l4"]["TCP"]["source_port"] for x in lines if from_checkout(x)
            and x["flow"].get("trace_observation_point") == "TO_ENDPOINT"
            and x["flow"]["l4"]["TCP"]["flags"].get("FIN")}
    ports = [f["l4"]["TCP"]["source_port"] for f in conn_pvs]
    # exactly one verdict per connection: on its SYN, none for the packets after it
    assert sorted(ports) == sorted(syns) and len(set(ports)) == len(ports) == 3, (ports, syns)
    assert fins == syns  # the FIN of each connection went through the same hook, without a verdict
    for f in conn_pvs:
        assert f["verdict"] == "FORWARDED" and f["traffic_direction"] == "INGRESS"
        assert f["policy_match_type"] == 2 and f["is_reply"] is False
        assert f["l4"]["TCP"]["flags"] == {"SYN": True} and f["l4"]["TCP"]["destination_port"] == 8080
        assert f["source"]["pod_name"] == "checkout" and f["destination"]["pod_name"] == "payments"
        (pol,) = f["ingress_allowed_by"]
        assert (pol["name"], pol["namespace"], pol["kind"]) == ("payments-ingress", "default", "CiliumNetworkPolicy")
        assert pol["labels"] == ["k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
                                 "k8s:io.cilium.k8s.policy.name=payments-ingress",
                                 "k8s:io.cilium.k8s.policy.namespace=default"]
        assert int(pol["revision"]) > 0
        assert not any(k in f for k in ("egress_allowed_by", "ingress_denied_by", "egress_denied_by"))
    # checkout's egress is not enforced: no verdict at its own hook
    egress = [x for x in fresh(stack.observe("--from-pod", "default/checkout", "--type", "policy-verdict",
                                             "--last", "100")) if x["flow"]["traffic_direction"] == "EGRESS"]
    assert egress == []
    # the denied connection: a DENIED verdict without a match (default deny names no policy)
    denials = [x["flow"] for x in lines if is_pv(x) and x["flow"]["verdict"] == "DROPPED"]
    for deny in denials:  # one per SYN the client sent (retransmissions are dropped too)
        assert deny["source"]["pod_name"] == "frontend" and deny["drop_reason_desc"] == "POLICY_DENIED"
        assert "policy_match_type" not in deny and "ingress_denied_by" not in deny
    # --type policy-verdict with --verdict FORWARDED, compact like hubble
    compact = stack.cli("observe", "--type", "policy-verdict", "--verdict", "FORWARDED", "--from-pod",
                        "default/checkout", "--last", "1").stdout
    assert "-> default/payments:8080" in compact and "policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)" in compact
    m = stack.metrics()
    assert m['hubble_policy_verdicts_total{action="forwarded",direction="ingress",match="l3-l4"}'] >= 3
    assert m['hubble_policy_verdicts_total{action="dropped",direction="ingress",match="none"}'] >= 1
