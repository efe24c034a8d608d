"""The CNI plugin called exactly as a container runtime calls it: env + stdin, JSON out."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from ciliary import schema
from services.node import netns as N

from .podnet import EchoServer, tcp_roundtrip

CNI_BIN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "ciliary-cni")


def netconf(cluster: str, ipam_dir: Path, subnet: str = "10.200.1.0/24", nats_url: str = "") -> dict:
    conf = {
        "cniVersion": "1.0.0",
        "name": "ciliary",
        "type": "ciliary-cni",
        "cluster": cluster,
        "node": "node-1",
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(ipam_dir)},
    }
    if nats_url:
        conf["natsUrl"] = nats_url
    return conf


def cni(command: str, stdin: str, *, container: str = "", netns: str = "", ifname: str = "eth0",
        args: str = "") -> tuple[int, dict | None]:
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_PATH": str(Path(CNI_BIN).parent)}
    if container:
        env["CNI_CONTAINERID"] = container
    if netns:
        env["CNI_NETNS"] = netns
    if ifname:
        env["CNI_IFNAME"] = ifname
    if args:
        env["CNI_ARGS"] = args
    result = subprocess.run([CNI_BIN], input=stdin, capture_output=True, text=True, env=env, timeout=30)
    assert result.stderr == "" or "Traceback" not in result.stderr, result.stderr
    out = result.stdout.strip()
    return result.returncode, (json.loads(out) if out else None)


@pytest.fixture
def node(cluster_name: str):
    N.create_node(cluster_name, "node-1", "172.31.9.1/24")
    yield cluster_name
    N.delete_cluster(cluster_name)


def _pod_netns(cluster: str, name: str) -> str:
    ns = N.pod_netns(cluster, "node-1", name)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    return ns


def test_version_and_malformed_input(node: str, tmp_path: Path) -> None:
    code, out = cni("VERSION", json.dumps({"cniVersion": "1.0.0"}))
    assert code == 0 and out["cniVersion"] == "1.0.0" and "1.0.0" in out["supportedVersions"]

    code, out = cni("ADD", "{not json", container="c1", netns="/var/run/netns/x")
    assert code == 1 and out["code"] == 6 and "JSON" in out["msg"]
    code, out = cni("ADD", json.dumps({"cniVersion": "9.9.9"}), container="c1", netns="/var/run/netns/x")
    assert code == 1 and out["code"] == 1
    code, out = cni("ADD", json.dumps(netconf(node, tmp_path)), container="", netns="/var/run/netns/x")
    assert code == 1 and out["code"] == 4 and "CNI_CONTAINERID" in out["msg"]
    code, out = cni("BOGUS", json.dumps(netconf(node, tmp_path)), container="c1")
    assert code == 1 and out["code"] == 4
    bad_subnet = netconf(node, tmp_path, subnet="10.200.1.7/24")
    code, out = cni("ADD", json.dumps(bad_subnet), container="c1", netns="/var/run/netns/x")
    assert code == 1 and out["code"] == 7 and "subnet" in out["msg"]


def test_add_check_del_as_a_runtime_does(node: str, tmp_path: Path) -> None:
    conf = json.dumps(netconf(node, tmp_path / "ipam"))
    ns_a = _pod_netns(node, "a")
    ns_b = _pod_netns(node, "b")
    code, res_a = cni("ADD", conf, container="ctr-a", netns=f"/var/run/netns/{ns_a}",
                      args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a")
    assert code == 0, res_a
    code, res_b = cni("ADD", conf, container="ctr-b", netns=f"/var/run/netns/{ns_b}")
    assert code == 0, res_b
    ip_a = res_a["ips"][0]["address"].split("/")[0]
    ip_b = res_b["ips"][0]["address"].split("/")[0]
    assert ip_a != ip_b and ip_a.startswith("10.200.1.")
    assert res_a["interfaces"][1] == {"name": "eth0", "mac": res_a["interfaces"][1]["mac"], "sandbox": f"/var/run/netns/{ns_a}"}
    assert res_a["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]

    # real sockets between the two pods
    server = EchoServer(ns_b, 8080)
    try:
        assert tcp_roundtrip(ns_a, ip_b, 8080) == b"ping"
    finally:
        server.close()

    assert cni("CHECK", conf, container="ctr-a", netns=f"/var/run/netns/{ns_a}") == (0, None)
    # ADD again is idempotent: same address
    code, again = cni("ADD", conf, container="ctr-a", netns=f"/var/run/netns/{ns_a}")
    assert code == 0 and again["ips"] == res_a["ips"]

    assert cni("DEL", conf, container="ctr-a", netns=f"/var/run/netns/{ns_a}") == (0, None)
    code, out = cni("CHECK", conf, container="ctr-a", netns=f"/var/run/netns/{ns_a}")
    assert code == 1 and out["code"] in (3, 103)
    # DEL is idempotent, also for containers never seen and without a netns
    assert cni("DEL", conf, container="ctr-a", netns=f"/var/run/netns/{ns_a}") == (0, None)
    assert cni("DEL", conf, container="never-seen") == (0, None)
    # a released address is not handed out while others exist; restart safety is in IPAM unit tests
    assert cni("DEL", conf, container="ctr-b", netns=f"/var/run/netns/{ns_b}") == (0, None)
    for ns in (ns_a, ns_b):
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_add_registers_with_the_node_executor(node: str, tmp_path: Path, request) -> None:
    """ADD fails (code 11) and rolls back when no executor answers; succeeds when one does."""
    from ciliary.bus import Bus
    from ciliary.supervisor import free_port, nats_server_binary

    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request.addfinalizer(server.kill)
    url = f"nats://127.0.0.1:{port}"
    conf = json.dumps(netconf(node, tmp_path / "ipam", nats_url=url))
    ns = _pod_netns(node, "reg")
    try:
        code, out = cni("ADD", conf, container="ctr-r", netns=f"/var/run/netns/{ns}")
        assert code == 1 and out["code"] == 11, out
        assert not list((tmp_path / "ipam" / node / "node-1").glob("10.*"))  # address released

        got: list[schema.EndpointRegistration] = []
        ready = threading.Event()
        stop = threading.Event()

        def executor() -> None:
            async def run() -> None:
                bus = await Bus.connect(url, "fake-executor")

                async def on_reg(reg: schema.EndpointRegistration, msg) -> None:
                    got.append(reg)
                    await msg.respond(schema.encode(schema.EndpointReply(ok=True, endpoint_id=7)))

                await bus.subscribe(schema.SUBJECT_NODE_ENDPOINT.format(cluster=node, node="node-1"),
                                    schema.EndpointRegistration, on_reg)
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                await bus.close()

            asyncio.run(run())

        thread = threading.Thread(target=executor, daemon=True)
        thread.start()
        assert ready.wait(10)
        code, out = cni("ADD", conf, container="ctr-r", netns=f"/var/run/netns/{ns}",
                        args="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web")
        assert code == 0, out
        assert cni("DEL", conf, container="ctr-r", netns=f"/var/run/netns/{ns}") == (0, None)
        stop.set()
        thread.join(5)
        assert [r.op for r in got] == ["add", "del"]
        assert (got[0].pod_namespace, got[0].pod_name, got[0].netns) == ("shop", "web", ns)
        assert got[0].ip and got[0].ip == got[1].ip and got[0].host_ifindex > 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
