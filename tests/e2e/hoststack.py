"""Namespaces that play hosts, with ciliary installed on them as deploy/ installs it.

A "host" is a network namespace ``ciliary-<cluster>-<host>`` created here (never the
machine's root namespace). Processes are started inside one with ``nsenter --net``, so
they run in it exactly as a hostNetwork pod runs in a node's namespace: nats-server,
the control-plane services and the node executor in host mode (``CILIARY_NODE_MODE=host``),
which writes its conflist into the host's CNI directory and answers the installed
``ciliary-cni``. The CLI runs inside the first host too (NATS listens there).

Invariants:
- Hosts are joined only to each other (one veth pair per pair, addresses in
  172.29.<cluster id>.0/24); nothing is added to the root namespace.
- ``close`` stops every process it started (SIGTERM, then SIGKILL), the executors with
  teardown (pins, cgroup, conflist), then removes every namespace it created.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute

from ciliary import config
from services.node import cniinstall
from services.node import netns as N

from .podnet import SMALL_MAPS

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NATS_PORT = 4222


class HostStack:
    def __init__(self, cluster: str, cluster_id: int, workdir: Path) -> None:
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.workdir = workdir
        self.hosts: dict[str, str] = {}  # host name -> netns
        self.addresses: dict[str, str] = {}
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.extra_netns: list[str] = []
        self.data_dir = workdir / "data"
        self.nats_url = ""

    # ---- hosts

    def host(self, name: str) -> str:
        ns = f"{N.PREFIX}{self.cluster}-{name}"
        N.ensure_netns(ns)
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        self.hosts[name] = ns
        return ns

    def wire(self, a: str, b: str) -> None:
        """A veth pair between hosts ``a`` and ``b`` with addresses .1 and .2."""
        subnet = f"172.29.{self.cluster_id}"
        if_a, if_b = N.link_name(self.cluster, a, b), N.link_name(self.cluster, b, a)
        N.veth_into(self.hosts[a], if_a, self.hosts[b], if_b)
        for host, ifname, last in ((a, if_a, 1), (b, if_b, 2)):
            with IPRoute(netns=self.hosts[host]) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=f"{subnet}.{last}", prefixlen=24)
                ipr.link("set", index=idx, state="up")
            self.addresses[host] = f"{subnet}.{last}"

    def netns_for_pod(self, name: str) -> str:
        """A namespace as a runtime would make one for a pod sandbox."""
        ns = f"{N.PREFIX}{self.cluster}-{name}"
        N.ensure_netns(ns)
        self.extra_netns.append(ns)
        return ns

    # ---- processes

    def _env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/root"),
            "PYTHONPATH": str(REPO), "CILIARY_CLUSTER": self.cluster,
            "CILIARY_CLUSTER_ID": str(self.cluster_id), "CILIARY_LOG_LEVEL": "INFO",
            "CILIARY_DATA_DIR": str(self.data_dir), **extra,
        }

    def _start(self, name: str, host: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.hosts[host]}", *argv], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def start_nats(self, host: str) -> str:
        store = self.workdir / "nats"
        store.mkdir()
        self._start("nats-server", host, [str(VENV_BIN / "nats-server"), "-js", "-a", "0.0.0.0",
                                          "-p", str(NATS_PORT), "-sd", str(store)], self._env())
        self.nats_url = f"nats://127.0.0.1:{NATS_PORT}"
        self.nats_host = host
        config.write_instance(self.data_dir, config.InstanceState(
            nats_url=self.nats_url, supervisor_pid=os.getpid(), cluster=self.cluster,
            cluster_id=self.cluster_id))
        self.wait(lambda: self._port_open(host, NATS_PORT), 10, "nats-server")
        return self.nats_url

    def _port_open(self, host: str, port: int) -> bool:
        def probe() -> bool:
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", port)) == 0
        return N.run_in_netns(self.hosts[host], probe)

    def start_service(self, service: str, host: str) -> None:
        self._start(service, host, [sys.executable, "-m", f"services.{service}"],
                    self._env(CILIARY_NATS_URL=self._nats_from(host), CILIARY_INSTANCE=f"{service}-{host}"))

    def _nats_from(self, host: str) -> str:
        return self.nats_url if host == self.nats_host else \
            f"nats://{self.addresses[self.nats_host]}:{NATS_PORT}"

    def cni_dirs(self, host: str) -> tuple[Path, Path]:
        """(conf dir, bin dir) of ``host``."""
        return self.workdir / host / "net.d", self.workdir / host / "bin"

    def start_node(self, host: str, *, teardown: bool = True) -> Path:
        """The executor in host mode on ``host``, with ciliary-cni installed as the
        DaemonSet's init container installs it; returns the CNI conf dir. Without
        ``teardown`` a SIGTERM leaves the datapath (as in a DaemonSet rollout)."""
        conf_dir, bin_dir = self.cni_dirs(host)
        subprocess.run([sys.executable, "-m", "services.node.cniinstall", "--bin-dir", str(bin_dir)],
                       check=True, capture_output=True, cwd=REPO)
        proc = self._start(f"node-{host}", host, [sys.executable, "-m", "services.node"], self._env(
            CILIARY_NATS_URL=self._nats_from(host), CILIARY_NODE=host, CILIARY_INSTANCE=f"node-{host}",
            CILIARY_NODE_MODE="host", CILIARY_NODE_IP=self.addresses.get(host, ""),
            CILIARY_CNI_CONF_DIR=str(conf_dir), CILIARY_CNI_BIN_DIR=str(bin_dir),
            CILIARY_CNI_IPAM_DIR=str(self.workdir / host / "ipam"),
            CILIARY_NODE_STATE_DIR=str(self.workdir / host / "state"),
            CILIARY_TEARDOWN_ON_EXIT="1" if teardown else "0",
            **{f"CILIARY_MAP_{name.upper()}": str(size) for name, size in SMALL_MAPS.items()}))
        self.nodes[host] = proc
        return conf_dir

    def stop_node(self, host: str) -> None:
        """SIGTERM the executor of ``host`` (as a rollout does) and wait for it to exit."""
        proc = self.nodes.pop(host)
        _stop(proc, 30)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def wait_conflist(self, host: str, timeout: float = 90) -> dict:
        path = self.cni_dirs(host)[0] / cniinstall.CONFLIST
        self.wait(path.exists, timeout, f"{host}'s conflist")
        return json.loads(path.read_text())

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            dead = [name for name, p in self.procs if p.poll() is not None]
            assert not dead, f"exited while waiting for {what}: {dead}\n{self.logs()}"
            time.sleep(0.2)
        raise AssertionError(f"{what} not there after {timeout:.0f}s\n{self.logs()}")

    def logs(self, tail: int = 25) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # ---- clients

    def ciliary(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.hosts[self.nats_host]}", sys.executable, "-m", "ciliary.cli",
             *args, "--data-dir", str(self.data_dir)],
            input=stdin, capture_output=True, text=True, env=self._env(), cwd=REPO, timeout=60)
        if check:
            assert result.returncode == 0, f"ciliary {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def endpoints(self) -> list[dict]:
        """The endpoint rows of every node that answers (``ciliary endpoint list -o json``)."""
        nodes = json.loads(self.ciliary("endpoint", "list", "-o", "json", check=False).stdout or "[]")
        return [row for node in nodes for row in node["rows"]]

    def cni(self, host: str, command: str, *, container: str, netns: str = "", args: str = "") -> tuple[int, dict | None]:
        """The installed plugin, called in ``host`` exactly as a runtime calls it."""
        conf_dir, bin_dir = self.cni_dirs(host)
        conflist = json.loads((conf_dir / cniinstall.CONFLIST).read_text())
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container,
               "CNI_IFNAME": "eth0", "CNI_PATH": str(bin_dir)}
        if netns:
            env["CNI_NETNS"] = f"/var/run/netns/{netns}"
        if args:
            env["CNI_ARGS"] = args
        result = subprocess.run(["nsenter", f"--net=/run/netns/{self.hosts[host]}", str(bin_dir / "ciliary-cni")],
                                input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=30)
        out = result.stdout.strip()
        return result.returncode, (json.loads(out) if out else None)

    # ---- teardown

    def close(self) -> None:
        for proc in self.nodes.values():  # executors first: their teardown needs NATS only for the Node status
            _stop(proc, 30)
        for _name, proc in reversed(self.procs):
            _stop(proc, 10)
        for ns in [*self.extra_netns, *self.hosts.values()]:
            N.remove_netns(ns)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def root_links() -> set[str]:
    """Links of the machine's root namespace (the test process's own)."""
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
