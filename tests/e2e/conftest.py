"""Fixtures for privileged end-to-end tests against the real kernel.

Invariants:
- Every test builds its own cluster named ``t<4 hex>``; everything it creates is
  named ``ciliary-<cluster>-...`` (namespaces) or ``ciliary-<hash>`` (links, only
  inside those namespaces) and is pinned under ``/sys/fs/bpf/ciliary/<cluster>``.
- Nothing is created in the root network namespace; traffic only flows between
  namespaces the test created.
- The autouse ``no_leaks`` fixture fails a test that leaves a namespace or pin
  directory of any cluster it registered.
- Without root or bcc the tests skip with the reason printed, except under
  CI=true, where they fail.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.node import layouts as L
from services.node import maps as M
from services.node import netns as N

PIN_ROOT = "/sys/fs/bpf/ciliary"
SMALL_MAPS = dict(ipcache=4096, lxc=1024, policy=1024, ct=65536, lb=1024, metrics=256,
                  events_pages=64)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "e2e datapath tests need root"
    try:
        import bcc  # noqa: F401
    except Exception as e:  # ImportError or a broken libbcc
        return f"bcc is not importable: {e}"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel without BTF"
    return None


def require_privileges() -> None:
    reason = _unavailable()
    if reason is None:
        return
    print(f"e2e: {reason}")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


# ---- leak check ----------------------------------------------------------------


@pytest.fixture
def cluster_names() -> list[str]:
    return []


@pytest.fixture(autouse=True)
def no_leaks(request) -> Iterator[None]:
    yield
    if "cluster_names" not in request.fixturenames:
        return
    names = request.getfixturevalue("cluster_names")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in names:
        left = [line.split()[0] for line in listed.splitlines()
                if line.startswith(f"ciliary-{name}-")]
        assert not left, f"leaked namespaces: {left}"
        assert not Path(PIN_ROOT, name).exists(), f"leaked pins: {PIN_ROOT}/{name}"


@pytest.fixture
def cluster_name(cluster_names) -> str:
    require_privileges()
    name = "t" + secrets.token_hex(2)
    cluster_names.append(name)
    return name


# ---- topology ----------------------------------------------------------------------


@dataclass(frozen=True)
class PodSpec:
    name: str
    node: str
    ip: str
    identity: int
    ep_id: int


PODS = (
    PodSpec("pod-a", "node-1", "10.200.1.10", 1001, 11),
    PodSpec("pod-b", "node-1", "10.200.1.11", 1002, 12),
    PodSpec("pod-c", "node-2", "10.200.2.10", 1003, 21),
)
NODES = {"node-1": ("172.31.7.1/24", "10.200.1.0/24"), "node-2": ("172.31.7.2/24", "10.200.2.0/24")}


@dataclass
class Topology:
    cluster: str
    nodes: dict[str, N.NodeNet]
    pods: dict[str, N.Endpoint]
    specs: dict[str, PodSpec]

    def pods_on(self, node: str) -> list[N.Endpoint]:
        return [p for p in self.pods.values() if p.node == node]

    def desired_entries(self, node: str, policy: dict[str, dict] | None = None) -> list[M.Entry]:
        """Endpoint entries for ``node``'s pods and ipcache entries for every pod."""
        policy = policy or {}
        entries = []
        for ep in self.pods_on(node):
            spec = self.specs[ep.pod]
            entries.append(M.endpoint_entry(ep.host_ifindex, spec.ep_id, spec.identity, ep.ip,
                                            **policy.get(ep.pod, {})))
        for spec in self.specs.values():
            entries.append(M.ipcache_entry(f"{spec.ip}/32", spec.identity))
        return entries


def build_topology(cluster: str) -> Topology:
    nodes = {name: N.create_node(cluster, name, ul) for name, (ul, _) in NODES.items()}
    for name in NODES:
        for other, (ul, cidr) in NODES.items():
            if other != name:
                N.route_pod_cidr(cluster, name, cidr, ul.split("/")[0])
    pods = {s.name: N.create_endpoint(cluster, s.node, s.name, s.ip) for s in PODS}
    return Topology(cluster, nodes, pods, {s.name: s for s in PODS})


@pytest.fixture
def topology(cluster_name) -> Iterator[Topology]:
    try:
        yield build_topology(cluster_name)
    finally:
        N.delete_cluster(cluster_name)
        _remove_pins(cluster_name)


def _remove_pins(cluster: str) -> None:
    root = Path(PIN_ROOT, cluster)
    if not root.exists():
        return
    for node_dir in root.iterdir():
        for p in node_dir.iterdir():
            p.unlink()
        node_dir.rmdir()
    root.rmdir()


# ---- events ------------------------------------------------------------------------------


@dataclass
class EventLog:
    events: list[L.FlowEvent] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, batch: list[L.FlowEvent]) -> None:
        with self.cond:
            self.events.extend(batch)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[L.FlowEvent], bool], timeout: float = 3.0) -> L.FlowEvent:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event among {len(self.events)}: "
                                         f"{self.events[-5:]}")
                self.cond.wait(left)


@dataclass
class Cluster:
    topo: Topology
    datapaths: dict  # node -> Datapath
    events: EventLog

    @property
    def pods(self) -> dict[str, N.Endpoint]:
        return self.topo.pods

    def dp_of(self, pod: str):
        return self.datapaths[self.topo.pods[pod].node]

    def metric(self, pod: str, reason: int, direction: int) -> int:
        v = self.dp_of(pod).metrics().get((reason, direction))
        return v.packets if v is not None else 0


@pytest.fixture
def cluster(topology) -> Iterator[Cluster]:
    """Topology with a datapath loaded (in this process) and attached on every node."""
    from services.node.datapath import Datapath, MapSizes

    events = EventLog()
    dps = {}
    try:
        for node, net in topology.nodes.items():
            dp = Datapath(topology.cluster, node, net.netns, pin_root=PIN_ROOT,
                          map_sizes=MapSizes(**SMALL_MAPS))
            dp.load()
            dps[node] = dp
            M.apply(dp.maps, topology.desired_entries(node))
            for ep in topology.pods_on(node):
                dp.attach(ep.host_ifname)
            dp.ring_reader(events.add, poll_ms=50)
        yield Cluster(topology, dps, events)
    finally:
        for dp in dps.values():
            dp.close()


# ---- sockets inside pods ------------------------------------------------------------------


class EchoServer:
    """TCP or UDP echo server whose socket lives in a pod namespace."""

    def __init__(self, netns: str, port: int, udp: bool = False, reply_prefix: bytes = b""):
        self.udp = udp
        self.prefix = reply_prefix
        self.peers: list[tuple[str, int]] = []
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            if not udp:
                s.listen(64)
            s.settimeout(0.1)
            return s

        self.sock = N.run_in_netns(netns, make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.udp:
                    data, addr = self.sock.recvfrom(2048)
                    self.peers.append(addr)
                    self.sock.sendto(self.prefix + data, addr)
                else:
                    conn, addr = self.sock.accept()
                    self.peers.append(addr)
                    threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while not self._stop.is_set():
                    data = conn.recv(2048)
                    if not data:
                        return
                    conn.sendall(self.prefix + data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=2)


@pytest.fixture
def servers() -> Iterator[Callable[..., EchoServer]]:
    made: list[EchoServer] = []

    def make(netns: str, port: int, udp: bool = False, reply_prefix: bytes = b"") -> EchoServer:
        s = EchoServer(netns, port, udp, reply_prefix)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def tcp_connect(netns: str, ip: str, port: int, timeout: float = 2.0) -> socket.socket:
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
    except BaseException:
        s.close()
        raise
    return s


def tcp_roundtrip(netns: str, ip: str, port: int, payload: bytes = b"ping",
                  timeout: float = 2.0) -> bytes:
    with tcp_connect(netns, ip, port, timeout) as s:
        s.sendall(payload)
        return s.recv(2048)


def udp_roundtrip(netns: str, ip: str, port: int, payload: bytes = b"ping",
                  timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with s:
        s.settimeout(timeout)
        s.sendto(payload, (ip, port))
        return s.recvfrom(2048)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_ping(netns: str, ip: str, timeout: float = 2.0) -> bool:
    """One ICMP echo over a raw socket in ``netns``; True when the reply arrives."""
    s = N.run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                    socket.IPPROTO_ICMP))
    ident = secrets.randbits(16)
    with s:
        s.settimeout(timeout)
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ciliary"
        body = body[:2] + struct.pack("!H", _icmp_checksum(body)) + body[4:]
        s.sendto(body, (ip, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, addr = s.recvfrom(2048)
            except (TimeoutError, socket.timeout):
                return False
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if typ == 0 and rid == ident and addr[0] == ip:
                return True
    return False
