"""End-to-end: socket-level load balancing (bpf/bpf_sock.c) on node-1's cgroup.

One cluster per test (see conftest): node-1 (pod-a, pod-b) and node-2 (pod-c), with
the tc datapath loaded on both nodes and the socket-LB programs attached to the
cgroup ``ciliary-<cluster>-node-1``. Clients are separate processes that join that
cgroup before they enter a namespace (as the pod runner starts containers), because a
socket belongs to the cgroup of the task that creates it. Frontends are written with
``translate.lb_frontend_entries`` as the node agent does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ciliary import schema
from services.node import layouts as L
from services.node import maps as M
from services.node import socklb as S
from services.node import translate as T
from services.node.runner import CGROUP_PROLOGUE
from services.servicelb import maglev

from .instance import ciliary, embedded_instance

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

VIP, UDP_VIP, AFF_VIP, EMPTY_VIP, MAGLEV_VIP = (
    "10.96.7.10", "10.96.7.53", "10.96.7.20", "10.96.7.30", "10.96.7.40")
NODE1_IP = "172.31.7.1"  # conftest NODES

CLIENT = r"""
import json, socket, sys
req = json.loads(sys.argv[1])
out = []
for _ in range(req["n"]):
    kind = req["kind"]
    try:
        if kind == "tcp":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(req["timeout"])
            s.connect((req["ip"], req["port"]))
            s.sendall(b"x")
            row = {"peer": list(s.getpeername()), "reply": s.recv(100).decode()}
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(req["timeout"])
            if kind == "udp-connected":
                s.connect((req["ip"], req["port"]))
                s.send(b"x")
                data = s.recv(100)
                row = {"peer": list(s.getpeername()), "reply": data.decode()}
            else:
                s.sendto(b"x", (req["ip"], req["port"]))
                data, addr = s.recvfrom(100)
                row = {"from": list(addr), "reply": data.decode()}
        row["cookie"] = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")
        s.close()
    except OSError as e:
        row = {"error": e.__class__.__name__ + ": " + str(e)}
    out.append(row)
print(json.dumps(out))
"""


def run_client(netns: str, kind: str, ip: str, port: int, n: int = 1, cgroup: Path | None = None,
               timeout: float = 2.0) -> list[dict]:
    """``n`` sockets from a fresh process in ``netns`` (and ``cgroup``, when given)."""
    req = json.dumps({"kind": kind, "ip": ip, "port": port, "n": n, "timeout": timeout})
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, req]
    if cgroup is not None:
        argv = ["sh", "-c", CGROUP_PROLOGUE, str(cgroup), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60 + n * timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _backend(bid: int, ip: str, port: int, node: str, proto: str = "TCP") -> schema.LBBackend:
    return schema.LBBackend(id=bid, ip=ip, port=port, proto=proto, node=node)


def _frontend(address: str, port: int, rev: int, backends: list[schema.LBBackend], *,
              proto: str = "TCP", type_: str = "ClusterIP", node: str = "",
              algorithm: str = "random", affinity: int = 0,
              m: int = maglev.DEFAULT_TABLE_SIZE) -> schema.LBFrontend:
    table = (maglev.maglev_table(((f"{b.ip}:{b.port}", b.id) for b in backends), m)
             if algorithm == "maglev" and backends else [])
    return schema.LBFrontend(namespace="default", name=f"svc{rev}", type=type_, address=address,
                             port=port, proto=proto, service_id=rev, rev_nat_id=rev,
                             backends=backends, slots=[b.id for b in backends],
                             algorithm=algorithm, maglev=table, affinity_timeout=affinity,
                             node=node)


def _program(dp, fe: schema.LBFrontend) -> None:
    M.apply(dp.maps, T.lb_frontend_entries(fe, "node-1", dp.map_sizes.maglev_table))


def _who(row: dict) -> str:
    assert "error" not in row, row
    return row["reply"].split(":", 1)[0]


def _service_ct(dp, vip: str) -> list:
    """Conntrack entries of the per-packet service translation towards ``vip``."""
    return [k for k in dp.maps.dump(L.CT)
            if k.flags & L.CT_KEY_F_SERVICE and L.ip4_str(k.daddr) == vip]


def _sock_lb(cluster, mode: str) -> S.SockLB:
    dp = cluster.datapaths["node-1"]
    return S.SockLB.for_datapath(dp, mode, cgroup_root=S.ensure_cgroup2(),
                                 revnat_size=4096, affinity_size=1024)


@pytest.fixture
def socket_lb(cluster, request):
    """node-1's socket LB in the mode given by ``request.param`` (default ``on``)."""
    lb = _sock_lb(cluster, getattr(request, "param", S.MODE_ON))
    try:
        lb.load()
        lb.attach()
        yield lb
    finally:
        lb.close()
        lb.teardown()
    assert not lb.cgroup.exists()


@pytest.fixture
def backends(cluster, servers):
    """TCP pod-b:8080 "b1", pod-b:8081 "b2", pod-c:8080 "c"; UDP pod-b:5353 "u1",
    pod-c:5353 "u2"."""
    b, c = cluster.pods["pod-b"], cluster.pods["pod-c"]
    servers(b.netns, 8080, reply_prefix=b"b1:")
    servers(b.netns, 8081, reply_prefix=b"b2:")
    servers(c.netns, 8080, reply_prefix=b"c:")
    servers(b.netns, 5353, udp=True, reply_prefix=b"u1:")
    servers(c.netns, 5353, udp=True, reply_prefix=b"u2:")
    tcp = [_backend(1, b.ip, 8080, "node-1"), _backend(2, b.ip, 8081, "node-1"),
           _backend(3, c.ip, 8080, "node-2")]
    udp = [_backend(4, b.ip, 5353, "node-1", "UDP"), _backend(5, c.ip, 5353, "node-2", "UDP")]
    return tcp, udp


# ---- mode on -----------------------------------------------------------------------------


def test_on_translates_pod_sockets_at_connect_and_restores_the_vip(cluster, socket_lb, backends):
    tcp, udp = backends
    dp1 = cluster.datapaths["node-1"]
    a = cluster.pods["pod-a"]
    _program(dp1, _frontend(VIP, 80, 41, tcp))
    _program(dp1, _frontend(UDP_VIP, 53, 42, udp, proto="UDP"))
    assert all(len(ids) == 1 for ids in socket_lb.attached().values())

    rows = run_client(a.netns, "tcp", VIP, 80, n=60, cgroup=socket_lb.cgroup)
    assert all(r.get("peer") == [VIP, 80] for r in rows), rows[:3]  # getpeername4
    used = {_who(r) for r in rows}
    assert len(used) > 1 and used <= {"b1", "b2", "c"}, used

    # The socket connected to the backend itself: the tc program saw no VIP at all.
    assert _service_ct(dp1, VIP) == []
    ct = dp1.maps.dump(L.CT)
    assert any(L.ip4_str(k.daddr) in (cluster.pods["pod-b"].ip, cluster.pods["pod-c"].ip)
               and L.ip4_str(k.saddr) == a.ip and k.flags == L.DIR_EGRESS for k in ct)
    # ... and every translated socket has its reverse entry, keyed by its cookie.
    rev = {k.cookie: v for k, v in socket_lb.dump(S.REVERSE_SK)}
    for r in rows:
        v = rev[r["cookie"]]
        assert (L.ip4_str(v.address), L.port_int(v.port), v.rev_nat_index) == (VIP, 80, 41)

    # Unconnected UDP: sendmsg4 per datagram, recvmsg4 restores the VIP as the source.
    rows = run_client(a.netns, "udp", UDP_VIP, 53, n=20, cgroup=socket_lb.cgroup)
    assert all(r.get("from") == [UDP_VIP, 53] for r in rows), rows[:3]
    for r in rows:  # a UDP socket's backend follows its cookie (lib/sock.h sock_slot)
        slot = S.sock_slot(0, r["cookie"], udp=True, count=2)
        assert _who(r) == ("u1", "u2")[slot - 1]
    assert {_who(r) for r in rows} == {"u1", "u2"}
    # Connected UDP: connect4 + getpeername4.
    rows = run_client(a.netns, "udp-connected", UDP_VIP, 53, n=5, cgroup=socket_lb.cgroup)
    assert all(r.get("peer") == [UDP_VIP, 53] and _who(r) in ("u1", "u2") for r in rows)
    assert _service_ct(dp1, UDP_VIP) == []

    # The same client outside the node cgroup takes the per-packet path.
    rows = run_client(a.netns, "tcp", VIP, 80, n=3)
    assert all(r.get("peer") == [VIP, 80] for r in rows)
    assert len(_service_ct(dp1, VIP)) == 3


def test_on_maglev_affinity_and_empty_services(cluster, socket_lb, backends):
    tcp, _ = backends
    dp1 = cluster.datapaths["node-1"]
    a = cluster.pods["pod-a"]
    m = dp1.map_sizes.maglev_table
    fe = _frontend(MAGLEV_VIP, 80, 43, tcp, algorithm="maglev", m=m)
    _program(dp1, fe)
    _program(dp1, _frontend(AFF_VIP, 80, 44, tcp, affinity=60))
    _program(dp1, _frontend(EMPTY_VIP, 80, 45, []))

    # Maglev: the table entry of the socket cookie's hash.
    names = {1: "b1", 2: "b2", 3: "c"}
    rows = run_client(a.netns, "tcp", MAGLEV_VIP, 80, n=20, cgroup=socket_lb.cgroup)
    for r in rows:
        assert _who(r) == names[fe.maglev[S.sock_cookie_hash(r["cookie"]) % m]], r
    assert len({_who(r) for r in rows}) > 1

    # ClientIP affinity keyed by the socket's network namespace: one backend for all.
    rows = run_client(a.netns, "tcp", AFF_VIP, 80, n=20, cgroup=socket_lb.cgroup)
    assert len({_who(r) for r in rows}) == 1, rows
    aff = socket_lb.dump(S.AFFINITY_SOCK)
    cookie = S.netns_cookie(a.netns)
    assert [(k.netns_cookie, k.rev_nat_id) for k, _ in aff] == [(cookie, 44)]
    assert names[aff[0][1].backend_id] == _who(rows[0])
    assert _service_ct(dp1, AFF_VIP) == []

    # No backends: not translated; the packet path drops with 158 and counts it.
    before = cluster.metric("pod-a", L.DROP_NO_SERVICE, L.DIR_EGRESS)
    rows = run_client(a.netns, "tcp", EMPTY_VIP, 80, cgroup=socket_lb.cgroup, timeout=0.7)
    assert "error" in rows[0]
    assert cluster.metric("pod-a", L.DROP_NO_SERVICE, L.DIR_EGRESS) > before


# ---- mode hostns-only -------------------------------------------------------------------------


@pytest.mark.parametrize("socket_lb", [S.MODE_HOSTNS_ONLY], indirect=True)
def test_hostns_only_serves_the_node_namespace_and_leaves_pods_to_tc(cluster, socket_lb, backends):
    tcp, udp = backends
    dp1 = cluster.datapaths["node-1"]
    a = cluster.pods["pod-a"]
    node1 = cluster.topo.nodes["node-1"].netns
    _program(dp1, _frontend(VIP, 80, 46, tcp))
    _program(dp1, _frontend(UDP_VIP, 53, 47, udp, proto="UDP"))
    assert socket_lb.host_netns_cookie == S.netns_cookie(node1)

    # The node's own namespace, in the node cgroup, reaches the ClusterIP.
    rows = run_client(node1, "tcp", VIP, 80, n=10, cgroup=socket_lb.cgroup)
    assert all(r.get("peer") == [VIP, 80] and _who(r) in ("b1", "b2", "c") for r in rows), rows
    rows = run_client(node1, "udp", UDP_VIP, 53, n=4, cgroup=socket_lb.cgroup)
    assert all(r.get("from") == [UDP_VIP, 53] and _who(r) in ("u1", "u2") for r in rows), rows
    assert len(socket_lb.dump(S.REVERSE_SK)) == 14
    # Outside the cgroup the node namespace has no route to a ClusterIP.
    assert "error" in run_client(node1, "tcp", VIP, 80, timeout=0.7)[0]

    # A pod in the same cgroup is left to the per-packet path: service conntrack entries.
    rows = run_client(a.netns, "tcp", VIP, 80, n=5, cgroup=socket_lb.cgroup)
    assert all(r.get("peer") == [VIP, 80] for r in rows)
    assert len(_service_ct(dp1, VIP)) == 5
    assert len(socket_lb.dump(S.REVERSE_SK)) == 14


# ---- mode off and reattach ----------------------------------------------------------------------


def test_reattach_replaces_and_off_detaches(cluster, backends):
    tcp, _ = backends
    dp1 = cluster.datapaths["node-1"]
    node1 = cluster.topo.nodes["node-1"].netns
    _program(dp1, _frontend(VIP, 80, 48, tcp))
    first, second, off = (_sock_lb(cluster, mode) for mode in (S.MODE_ON, S.MODE_ON, S.MODE_OFF))
    try:
        first.load()
        first.attach()
        first.attach()  # idempotent
        ids1 = first.attached()
        assert all(len(ids) == 1 for ids in ids1.values()), ids1
        # A restarted executor loads again and replaces in place: still one program each.
        second.load()
        second.attach()
        ids2 = second.attached()
        assert all(len(ids) == 1 for ids in ids2.values()), ids2
        assert ids1 != ids2
        assert run_client(node1, "tcp", VIP, 80, cgroup=second.cgroup)[0]["peer"] == [VIP, 80]

        # Mode off: nothing compiled, and what an earlier run attached is detached.
        assert off.load() == 0.0
        off.attach()
        assert off.attached() == {name: [] for name in S.PROGRAMS}
        assert "error" in run_client(node1, "tcp", VIP, 80, cgroup=off.cgroup, timeout=0.7)[0]
        assert off.detach() == 0
    finally:
        for lb in (first, second, off):
            lb.close()
        off.teardown()
    assert not off.cgroup.exists()


# ---- full stack: a hostNetwork pod reaches a ClusterIP ----------------------------------------

WEB = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
    - name: web
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "serve", "--tcp", "8080", "--name", "web"]
      readinessProbe: {tcpSocket: {port: 8080}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
"""

HOST_CLIENT = """\
apiVersion: v1
kind: Pod
metadata: {name: hostclient, namespace: default}
spec:
  nodeName: node-1
  hostNetwork: true
  restartPolicy: OnFailure
  containers:
    - name: c
      image: ciliary/workload
      command: ["python3", "-m", "ciliary.workload", "connect", "%s", "80", "--timeout", "2"]
"""


def _cli(*args: str, data_dir: Path, stdin: str | None = None, timeout: float = 60) -> str:
    return ciliary(*args, data_dir=data_dir, stdin=stdin, timeout=timeout).stdout


def _pod_status(data_dir: Path, name: str) -> dict:
    return json.loads(_cli("get", "pod", name, "-o", "json", data_dir=data_dir)).get("status", {})


def test_stack_host_network_pod_reaches_a_cluster_ip(tmp_path: Path, cluster_name: str) -> None:
    """``ciliary up`` with the default mode (hostns-only): a ``hostNetwork: true`` pod runs
    in node-1's namespace and cgroup, and its connection to a ClusterIP is answered."""
    from .podnet import wait_for

    with embedded_instance(tmp_path / "instance", cluster_name, nodes=1, cluster_id=9) as data_dir:
        _cli("apply", "-f", "-", stdin=WEB, data_dir=data_dir)
        wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True"
                             for c in _pod_status(data_dir, "web").get("conditions", [])),
                 60, "the backend pod ready")
        svc = json.loads(_cli("get", "svc", "web", "-o", "json", data_dir=data_dir))
        vip = svc.get("status", {}).get("clusterIP") or svc["spec"]["clusterIP"]
        _cli("apply", "-f", "-", stdin=HOST_CLIENT % vip, data_dir=data_dir)
        status = wait_for(lambda: (s := _pod_status(data_dir, "hostclient")).get("phase") == "Succeeded"
                          and s, 60, "the hostNetwork client to reach the ClusterIP")
        node = json.loads(_cli("get", "node", "node-1", "-o", "json", data_dir=data_dir))["status"]
        node_ip = next(a["address"] for a in node["addresses"] if a["type"] == "InternalIP")
        assert status["podIP"] == node_ip
        assert status["ciliary"]["hostNetwork"] is True
        assert status["ciliary"]["netns"] == f"ciliary-{cluster_name}-node-1"
        assert status["ciliary"]["cgroup"].endswith(f"/ciliary-{cluster_name}-node-1")
        log = (data_dir / "nodes" / cluster_name / "node-1" / "logs" / "default_hostclient" / "c.log")
        assert f"web {node_ip}" in log.read_text()  # the backend saw the node's address
