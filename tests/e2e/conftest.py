"""Fixtures for privileged end-to-end tests against the real kernel.

Invariants:
- Every test builds its own cluster named ``t<4 hex>``; everything it creates is
  named ``ciliary-<cluster>-...`` (namespaces) or ``ciliary-<hash>`` (links, only
  inside those namespaces) and is pinned under ``/sys/fs/bpf/ciliary/<cluster>``.
- Nothing is created in the root network namespace; traffic only flows between
  namespaces the test created.
- The autouse ``no_leaks`` fixture fails a test that leaves a namespace, pin
  directory or node cgroup (``ciliary-<cluster>-*`` under the cgroup2 mount) of any
  cluster it registered.
- Without root or bcc the tier does not pass quietly: every e2e test fails naming what is
  missing, unless ``CILIARY_SKIP_E2E=1`` asks to skip it (never under CI=true), and the
  session ends with one line saying the tier did not run.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.node import layouts as L
from services.node import maps as M
from services.node import netns as N

from .instance import leftovers
from .podnet import PIN_ROOT, SMALL_MAPS, EchoServer


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


SKIP_ENV = "CILIARY_SKIP_E2E"


def require_privileges() -> None:
    reason = _unavailable()
    if reason is None:
        return
    print(f"e2e: {reason}")
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{reason} ({SKIP_ENV}=1)")
    pytest.fail(f"{reason}: run the tests as root, or set {SKIP_ENV}=1 to skip the e2e tier")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reason = _unavailable()
    if reason is not None:
        verdict = "SKIPPED" if os.environ.get(SKIP_ENV) == "1" else "FAILED"
        terminalreporter.write_line(f"e2e tier {verdict}: {reason}", red=True, bold=True)


# ---- leak check ----------------------------------------------------------------


@pytest.fixture
def cluster_names() -> list[str]:
    return []


@pytest.fixture(autouse=True)
def no_leaks(cluster_names) -> Iterator[None]:
    """Runs its check after every fixture that built a cluster was torn down."""
    yield
    for name in cluster_names:
        left = leftovers(name)
        assert not left, f"cluster {name} left: {left}"


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
            dp.unpin()


# ---- sockets ------------------------------------------------------------------------------


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
