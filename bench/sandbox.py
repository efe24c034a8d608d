"""Shared sandbox harness of the benchmarks: namespaces, echo servers, clients, cleanup.

Used by the scripts under bench/. Invariants:

- Everything a benchmark creates lives in namespaces ``ciliary-<cluster>-*`` (the node and
  pod namespaces of ``services/node/netns.py``) and pins under ``PIN_ROOT/<cluster>``, with
  ``<cluster>`` a fresh ``<prefix><4 hex>`` name (``new_cluster``); nothing is created in
  the machine's root namespace and no packet is addressed outside those namespaces.
- ``run_in`` starts a child that joined a ``ciliary-`` namespace before exec; it refuses any
  other namespace, so an iptables restore can never reach the root namespace.
- ``Sandbox.cleanup`` removes servers, datapaths, namespaces and pins of its own cluster
  only, never raises, and returns the problems it saw; ``install_sigterm`` turns SIGTERM
  into KeyboardInterrupt, so a benchmark's ``try/finally`` cleans up on Ctrl-C and kill too.
- ``NatsServer`` listens on 127.0.0.1 only; ``stop_processes`` ends the processes it is
  given (SIGTERM, SIGKILL after a timeout) and no other.
- ``EmbeddedInstance`` drives ``ciliary up -d`` / ``ciliary down`` with a data directory of
  its own (a temporary directory), and ``down`` runs on every exit path.
- ``PinnedMap`` only reads: it opens a pinned map read-only and looks entries up with the
  bpf(2) syscall; it never creates, updates or deletes anything (``KernelFrontend`` reads
  a frontend's lb4 slots through it).
- Timed client loops run with the cyclic garbage collector off (``no_gc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.node import layouts as L  # noqa: E402
from services.node import netns as N  # noqa: E402

PIN_ROOT = "/sys/fs/bpf/ciliary"
CLOSE_MSG = b"q" * 32  # echoed, then the server closes first (TIME_WAIT stays on the server)
T = TypeVar("T")
_ALLOWED_CPUS = os.sched_getaffinity(0)  # before any pin_one_cpu: the instance's processes get all
_libc = ctypes.CDLL(None, use_errno=True)


# ---- names and process setup ---------------------------------------------------------------


def new_cluster(prefix: str) -> str:
    """A fresh cluster name ``<prefix><4 hex>`` (namespaces ``ciliary-<name>-*``)."""
    return prefix + secrets.token_hex(2)


def install_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main process (so ``finally`` cleans up); a
    forked helper (pyroute2 namespace sockets) takes the default action instead."""
    main_pid = os.getpid()

    def on_term(signum, _frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)


def pin_one_cpu() -> int:
    """Pin this process (and every thread created afterwards) to its highest allowed CPU.
    Client, server and the softirq work they trigger then run serially, so a transaction
    costs its CPU time and cross-CPU wake-ups (bimodal in a VM) stay out of the numbers."""
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


# ---- statistics ---------------------------------------------------------------------------


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def ms_stats(secs: list[float]) -> dict[str, Any]:
    """Median / min / max / p50 / p99 in milliseconds of a list of durations in seconds."""
    ms = sorted(x * 1000 for x in secs)
    return {"median": round(statistics.median(ms), 3), "min": round(ms[0], 3), "max": round(ms[-1], 3),
            "p50": round(pct(ms, 0.50), 3), "p99": round(pct(ms, 0.99), 3), "samples": len(ms)}


def no_gc(fn: Callable[[], T]) -> T:
    """Run ``fn`` with the cyclic garbage collector off (a collection pauses every thread)."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return fn()
    finally:
        if was:
            gc.enable()


# ---- echo server and clients ------------------------------------------------------------------


class Server:
    """TCP echo server in a pod namespace. Connections are served one at a time by the accept
    thread (the benchmarks have one client thread), so no thread is spawned per connection.
    A request starting with ``q`` is echoed and then the server closes (as an HTTP/1.0 server
    would): TIME_WAIT stays on the server, so tens of thousands of sequential connections do
    not use up the client's ephemeral ports. Other requests are echoed on a connection that
    stays open."""

    def __init__(self, netns: str, port: int, backlog: int = 256):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(backlog)
            s.settimeout(0.2)
            return s

        self.sock = N.run_in_netns(netns, make)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"bench-srv-{netns}:{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(5)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    while True:
                        data = conn.recv(4096)
                        if not data:
                            break
                        conn.sendall(data)
                        if data[:1] == b"q":
                            break
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=3)


def client_socket(timeout: float = 2.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(timeout)
    return s


def recv_exact(s: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = s.recv(n - got)
        if not chunk:
            raise ConnectionError("connection closed mid-reply")
        got += len(chunk)


def connections(netns: str, ip: str, port: int, count: int, seconds: float) -> dict[str, Any]:
    """Sequential connections from ``netns`` (socket + connect + CLOSE_MSG request/response +
    the server's FIN + close), ``count`` or ``seconds``, whichever first; connect() is timed
    per connection. The loop runs in a thread that joined the namespace, GC off."""

    def run() -> tuple[list[int], float]:
        lat: list[int] = []
        clock = time.perf_counter_ns
        start = time.perf_counter()
        deadline = start + seconds
        while len(lat) < count and time.perf_counter() < deadline:
            with client_socket() as s:
                t0 = clock()
                s.connect((ip, port))
                lat.append(clock() - t0)
                s.sendall(CLOSE_MSG)
                recv_exact(s, len(CLOSE_MSG))
                if s.recv(1):  # the server's FIN
                    raise ConnectionError("server did not close")
        return lat, time.perf_counter() - start

    lat, elapsed = no_gc(lambda: N.run_in_netns(netns, run))
    lat.sort()
    out: dict[str, Any] = {"connections": len(lat), "seconds": round(elapsed, 3),
                           "conn_per_s": round(len(lat) / elapsed, 1) if elapsed else 0.0}
    if lat:
        out["connect_p50_us"] = round(pct(lat, 0.50) / 1000, 1)
        out["connect_p99_us"] = round(pct(lat, 0.99) / 1000, 1)
    return out


def request_latency(netns: str, ip: str, port: int, count: int, seconds: float,
                    msg: bytes = b"x" * 32) -> dict[str, Any]:
    """Round trips of ``msg`` on one persistent connection (50 warm-up), p50/p99/mean in us."""

    def run() -> list[int]:
        samples: list[int] = []
        with client_socket() as s:
            s.connect((ip, port))
            for _ in range(50):
                s.sendall(msg)
                recv_exact(s, len(msg))
            deadline = time.perf_counter() + seconds
            clock = time.perf_counter_ns
            for _ in range(count):
                t0 = clock()
                s.sendall(msg)
                recv_exact(s, len(msg))
                samples.append(clock() - t0)
                if time.perf_counter() >= deadline:
                    break
        return samples

    samples = sorted(no_gc(lambda: N.run_in_netns(netns, run)))
    return {"round_trips": len(samples), "p50_us": round(pct(samples, 0.50) / 1000, 1),
            "p99_us": round(pct(samples, 0.99) / 1000, 1),
            "mean_us": round(statistics.fmean(samples) / 1000, 1)}


def probe(netns: str, ip: str, port: int, timeout: float = 2.0, sport: int = 0) -> bool:
    """One connect + round trip (from client port ``sport`` when given); False on failure."""

    def run() -> bool:
        with client_socket(timeout) as s:
            try:
                if sport:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("0.0.0.0", sport))
                s.connect((ip, port))
                s.sendall(b"x" * 32)
                recv_exact(s, 32)
                return True
            except OSError:
                return False

    return N.run_in_netns(netns, run)


# ---- namespace helpers ----------------------------------------------------------------------


TCP_COUNTERS = {"Tcp": ("OutRsts", "RetransSegs", "AttemptFails"), "TcpExt": ("TCPSynRetrans", "TCPTimeouts")}


def tcp_counters(netns: str, every: bool = False) -> dict[str, int]:
    """A namespace's TCP counters: resets sent, retransmitted segments, failed attempts
    (/proc/net/snmp) and SYN retransmits, timeouts (/proc/net/netstat); with ``every``,
    all Tcp and TcpExt counters (keys of TcpExt prefixed ``TcpExt.``)."""

    def read() -> dict[str, int]:
        out = {}
        for path in ("/proc/thread-self/net/snmp", "/proc/thread-self/net/netstat"):
            with open(path) as f:
                lines = f.read().splitlines()
            for head, vals in zip(lines[::2], lines[1::2], strict=True):
                names, values = head.split(), vals.split()
                group = names[0].rstrip(":")
                if group not in TCP_COUNTERS:
                    continue
                for k, v in zip(names[1:], values[1:], strict=True):
                    if k in TCP_COUNTERS[group]:
                        out[k] = int(v)
                    elif every:
                        out[f"{group}.{k}"] = int(v)
        return out

    return N.run_in_netns(netns, read)


def _setns(netns: str) -> None:
    fd = os.open(os.path.join(N.NETNS_RUN_DIR, netns), os.O_RDONLY)
    try:
        if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {netns}")
    finally:
        os.close(fd)


def run_in(netns: str, argv: list[str], stdin_path: str | None = None, capture: bool = False,
           timeout: float = 900) -> tuple[float, bytes]:
    """Run ``argv`` in a child that joined ``netns`` (never the root namespace); returns the
    seconds it took and its stdout (when ``capture``). A non-zero exit raises RuntimeError."""
    if not netns.startswith(N.PREFIX):
        raise ValueError(f"refusing to run outside a ciliary namespace: {netns}")
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    try:
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdin=stdin, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, preexec_fn=lambda: _setns(netns), timeout=timeout)
        sec = time.perf_counter() - t0
    finally:
        if stdin_path:
            stdin.close()
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} in {netns}: rc {p.returncode}: {p.stderr.decode()[:400]}")
    return sec, p.stdout or b""


# ---- the sandbox cluster ------------------------------------------------------------------------


class Sandbox:
    """One throw-away cluster: node and pod namespaces, echo servers, datapaths.

    Everything made through it is recorded and removed by ``cleanup``."""

    def __init__(self, prefix: str):
        self.cluster = new_cluster(prefix)
        self.nodes: dict[str, N.NodeNet] = {}
        self.servers: list[Server] = []
        self.datapaths: list[Any] = []  # every Datapath created (closed + unpinned at cleanup)
        self.tmp = tempfile.mkdtemp(prefix=f"ciliary-bench-{self.cluster}-")

    @property
    def pin_dir(self) -> Path:
        return Path(PIN_ROOT, self.cluster)

    def node(self, name: str, underlay_cidr: str) -> N.NodeNet:
        self.nodes[name] = N.create_node(self.cluster, name, underlay_cidr)
        return self.nodes[name]

    def endpoint(self, node: str, pod: str, ip: str) -> N.Endpoint:
        return N.create_endpoint(self.cluster, node, pod, ip)

    def server(self, netns: str, port: int) -> Server:
        s = Server(netns, port)
        self.servers.append(s)
        return s

    def datapath(self, node: str, netns: str, sizes: dict[str, int] | None = None):
        """A Datapath pinned under ``PIN_ROOT/<cluster>/<node>`` (not loaded yet)."""
        from services.node.datapath import Datapath, MapSizes

        dp = Datapath(self.cluster, node, netns, pin_root=PIN_ROOT,
                      map_sizes=MapSizes(**sizes) if sizes else MapSizes())
        self.datapaths.append(dp)
        return dp

    def use_bpf_at_head(self) -> str:
        """Point the datapath loader at ``bpf/`` as committed at git HEAD (read with
        ``git archive`` into this sandbox's temp dir; nothing in the repository changes),
        for a working tree whose ``bpf/`` is mid-edit. Returns a description."""
        from services.node import datapath as D

        head = Path(self.tmp) / "head"
        head.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "bpf"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(head)], input=archive, check=True)
        D.BPF_DIR, D.PROGRAM = head / "bpf", head / "bpf" / "bpf_lxc.c"
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        return f"git HEAD {rev} (working tree did not load)"

    def leftovers(self) -> list[str]:
        problems = []
        left = N.cluster_netns(self.cluster)
        if left:
            problems.append(f"namespaces left: {left}")
        if self.pin_dir.exists():
            problems.append(f"pins left: {self.pin_dir}")
        return problems

    def cleanup(self) -> list[str]:
        """Remove everything of this cluster; never raises; returns the problems seen."""
        problems: list[str] = []
        for s in self.servers:
            try:
                s.close()
            except Exception as e:
                problems.append(f"server close: {e}")
        for dp in self.datapaths:
            try:
                dp.close()
            except Exception as e:
                problems.append(f"datapath close: {e}")
        try:
            N.delete_cluster(self.cluster)
        except Exception as e:
            problems.append(f"delete_cluster: {e}")
        for dp in self.datapaths:
            try:
                dp.unpin()
            except Exception as e:
                problems.append(f"unpin: {e}")
        root = self.pin_dir
        try:
            if root.exists() and root.parent == Path(PIN_ROOT):
                for node_dir in root.iterdir():
                    for p in node_dir.iterdir():
                        p.unlink()
                    node_dir.rmdir()
                root.rmdir()
        except OSError as e:
            problems.append(f"pins: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems + self.leftovers()


# ---- local processes -------------------------------------------------------------------------


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after ``timeout``)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class NatsServer:
    """A throw-away nats-server with JetStream on a free loopback port (127.0.0.1 only), its
    store in ``store_dir``, output to ``log`` (discarded when None); ready (accepting
    connections) when the constructor returns."""

    def __init__(self, store_dir: Path, log: Path | None = None, timeout: float = 10) -> None:
        from ciliary.supervisor import free_port, nats_server_binary

        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._log = open(log, "wb") if log else None  # noqa: SIM115
        self.proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                      "-sd", str(store_dir)],
                                     stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nats-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        stop_processes([self.proc])
        if self._log:
            self._log.close()


# ---- machine description ----------------------------------------------------------------------


def machine(tools: tuple[str, ...] = ()) -> dict[str, Any]:
    """Kernel, CPUs, Python, the versions of ``tools`` (``--version``), date and the
    1-minute load average at the time of the call."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out: dict[str, Any] = {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": cpu,
                           "python": platform.python_version()}
    for tool in tools:
        try:
            out[Path(tool).name] = subprocess.run([tool, "--version"], capture_output=True,
                                                  text=True).stdout.strip()
        except OSError:
            out[Path(tool).name] = "?"
    out["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    out["git"] = git_state()
    return out


def load_averages() -> list[float]:
    """The 1, 5 and 15 minute load averages now, rounded to 2 places."""
    return [round(x, 2) for x in os.getloadavg()]


def results_header(command: str, tools: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first keys of a results file: ``date`` (UTC, seconds), ``command``, ``machine``."""
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command,
            "machine": machine(tools)}


def write_results(path: Path, res: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Write ``res`` to ``path`` as indented JSON, then print ``render(res)`` and the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(render(res))
    print(f"\nwrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def sized_bench(doc: str, script: str, measure: Callable[[int, int], dict[str, Any]],
                render: Callable[[dict[str, Any]], str], *, sizes: str, repeat: int,
                results: Path) -> int:
    """The ``main`` of a bench that measures one thing at several sizes in this process:
    flags ``--sizes`` (comma-separated), ``--repeat`` and ``--output``; ``measure(size,
    repeat)`` per size into ``sizes`` of the results (after `results_header`), written and
    rendered by `write_results`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sizes", default=sizes)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--output", type=Path, default=results)
    args = parser.parse_args()
    res = results_header(" ".join([".venv/bin/python", script, *sys.argv[1:]]))
    res["sizes"] = [measure(int(n), args.repeat) for n in args.sizes.split(",")]
    write_results(args.output, res, render)
    return 0


def git_state() -> dict[str, Any]:
    """The commit the numbers were measured on and whether the tree had uncommitted changes
    (``dirty``); ``{}`` outside a git checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "dirty": bool(status.strip())}


# ---- pinned maps (read-only) ----------------------------------------------------------------


_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_GET_NEXT_KEY, _BPF_OBJ_GET = 1, 4, 7
_BPF_F_RDONLY = 1 << 3


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 96)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32),
                ("rest", ctypes.c_uint8 * 112)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    if _SYS_BPF is None:
        raise OSError(f"bpf(2) syscall number unknown on {platform.machine()}")
    r = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


class PinnedMap:
    """Read-only view of a pinned BPF map (bpf(2) ``BPF_OBJ_GET`` with ``BPF_F_RDONLY``),
    keys and values as the ctypes layouts of ``services/node/layouts.py``."""

    def __init__(self, path: str | Path, key_type: type[ctypes.Structure], value_type: type[ctypes.Structure]):
        self.path = str(path)
        self.key_type, self.value_type = key_type, value_type
        name = ctypes.create_string_buffer(self.path.encode())
        attr = _ObjAttr(pathname=ctypes.addressof(name), file_flags=_BPF_F_RDONLY)
        self.fd = _bpf(_BPF_OBJ_GET, attr)
        self._value = value_type()
        self._attr = _ElemAttr(map_fd=self.fd, value=ctypes.addressof(self._value))

    def get(self, key: ctypes.Structure) -> ctypes.Structure | None:
        """The value at ``key`` (a copy), or None when the key is absent."""
        self._attr.key = ctypes.addressof(key)
        self._attr.value = ctypes.addressof(self._value)
        try:
            _bpf(_BPF_MAP_LOOKUP_ELEM, self._attr)
        except OSError as e:
            if e.errno == 2:  # ENOENT
                return None
            raise
        return self.value_type.from_buffer_copy(self._value)

    def keys(self) -> Iterator[ctypes.Structure]:
        """Every key (BPF_MAP_GET_NEXT_KEY; a map changing meanwhile may skip or repeat one)."""
        cur, nxt = self.key_type(), self.key_type()
        attr = _ElemAttr(map_fd=self.fd, key=0, value=ctypes.addressof(nxt))
        while True:
            try:
                _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as e:
                if e.errno == 2:
                    return
                raise
            yield self.key_type.from_buffer_copy(nxt)
            ctypes.memmove(ctypes.addressof(cur), ctypes.addressof(nxt), ctypes.sizeof(nxt))
            attr.key = ctypes.addressof(cur)

    def count(self) -> int:
        return sum(1 for _ in self.keys())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- an embedded ciliary instance --------------------------------------------------------------


class EmbeddedInstance:
    """A throw-away ``ciliary up -d --nodes N`` with its own data directory and cluster name
    ``<prefix><4 hex>``; use as a context manager: ``ciliary down`` runs on every exit path,
    and the data directory is removed afterwards."""

    def __init__(self, prefix: str, cluster_id: int, nodes: int = 1, timeout: float = 120.0):
        self.cluster = new_cluster(prefix)
        self.cluster_id = cluster_id
        self.nodes = nodes
        self.timeout = timeout
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"ciliary-instance-{self.cluster}-"))
        self.up_seconds = 0.0
        self.problems: list[str] = []

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ciliary <args>`` against this instance (``CILIARY_DATA_DIR`` = its data dir), on
        every CPU the benchmark was allowed before it pinned itself to one."""
        p = subprocess.run([sys.executable, "-m", "ciliary.cli", *args], capture_output=True, text=True,
                           env=dict(os.environ, CILIARY_DATA_DIR=str(self.data_dir)), cwd=REPO,
                           timeout=timeout, preexec_fn=lambda: os.sched_setaffinity(0, _ALLOWED_CPUS))
        if check and p.returncode != 0:
            raise RuntimeError(f"ciliary {' '.join(args)}: rc {p.returncode}: {(p.stdout + p.stderr)[-600:]}")
        return p

    def pin(self, node: str, map_name: str) -> Path:
        return Path(PIN_ROOT, self.cluster, node, map_name)

    def nats_url(self) -> str:
        from ciliary import config

        state = config.read_instance(self.data_dir)
        if state is None:
            raise RuntimeError(f"no instance state in {self.data_dir}")
        return state.nats_url

    async def connect(self, name: str, **options: Any) -> Any:
        """A ``ciliary.bus.Bus`` on the instance's NATS as its CLI user (``ciliary up``
        writes one credential per user; an instance without them takes none)."""
        return await connect_as_cli(self.nats_url(), self.data_dir, name, **options)

    def pids(self) -> dict[str, int]:
        """Process name (``identity``, ``node/node-1``, ``nats-server`` ...) -> pid."""
        from ciliary import config

        state = config.read_instance(self.data_dir)
        return {p.name: p.pid for p in state.processes} if state else {}


    def __enter__(self) -> EmbeddedInstance:
        t0 = time.monotonic()
        try:
            self.cli("up", "-d", "--nodes", str(self.nodes), "--cluster", self.cluster,
                     "--cluster-id", str(self.cluster_id), "--timeout", str(self.timeout),
                     timeout=self.timeout + 30)
        except BaseException:
            self.down()
            raise
        self.up_seconds = time.monotonic() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.problems = self.down()

    def down(self) -> list[str]:
        """``ciliary down``; then check that no namespace or pin of the cluster is left."""
        from ciliary import config

        problems = []
        state = config.read_instance(self.data_dir)
        try:
            p = self.cli("down", timeout=60, check=False)
            if p.returncode != 0 and "no ciliary instance" not in p.stdout + p.stderr:
                problems.append(f"ciliary down: {(p.stdout + p.stderr)[-300:]}")
        except Exception as e:
            problems.append(f"ciliary down: {e}")
        if problems and state is not None:  # stop the supervisor itself: its children die with it
            _terminate(state.supervisor_pid, timeout=30)
        if N.cluster_netns(self.cluster):
            problems.append(f"namespaces left: {N.cluster_netns(self.cluster)}")
        if Path(PIN_ROOT, self.cluster).exists():
            problems.append(f"pins left: {Path(PIN_ROOT, self.cluster)}")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        return problems


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM ``pid`` and wait until it is gone (SIGKILL after ``timeout``)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class KernelFrontend:
    """A node's view of one frontend, read from its pinned lb4 maps the way the datapath
    reads them: slot 0 (count), slots 1..count (backend ids), backends (addresses)."""

    def __init__(self, inst: EmbeddedInstance, node: str, vip: str, port: int):
        self.where = f"{inst.cluster}/{node}"
        self.services = PinnedMap(inst.pin(node, L.LB4_SERVICES), L.Lb4Key, L.Lb4Service)
        self.backends = PinnedMap(inst.pin(node, L.LB4_BACKENDS), L.Lb4BackendKey, L.Lb4Backend)
        self.key = L.Lb4Key(address=L.ip4(vip), dport=L.port(port), backend_slot=0, proto=L.IPPROTO_TCP)

    def slot_addresses(self) -> set[str]:
        self.key.backend_slot = 0
        head = self.services.get(self.key)
        out = set()
        for slot in range(1, (head.count if head else 0) + 1):
            self.key.backend_slot = slot
            ent = self.services.get(self.key)
            be = self.backends.get(L.Lb4BackendKey(backend_id=ent.backend_id)) if ent else None
            if be is not None:
                out.add(L.ip4_str(be.address))
        return out

    async def wait(self, cond: Callable[[set[str]], bool], timeout: float, what: str,
                   poll: float = 0.0005) -> float:
        """Poll until ``cond(slot addresses)``; perf_counter time of the first poll that saw it
        (the event loop keeps running in between, so the KV watch gets its timestamps)."""
        deadline = time.perf_counter() + timeout
        while True:
            now = time.perf_counter()
            if cond(self.slot_addresses()):
                return now
            if now > deadline:
                raise TimeoutError(f"{what}: not in the kernel of {self.where} after {timeout:.0f}s")
            await asyncio.sleep(poll)

    def close(self) -> None:
        self.services.close()
        self.backends.close()


_MEMORY_FIELDS = {"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib", "RssAnon": "anon_mib", "RssFile": "file_mib"}


async def connect_as_cli(url: str, data_dir: Path, name: str, **options: Any) -> Any:
    """``Bus.connect`` to an instance's NATS with the credential its CLI uses."""
    from ciliary import natscreds
    from ciliary.bus import Bus

    credential = natscreds.instance_credential(data_dir, "cli")
    return await Bus.connect(url, name, credential=credential, **options)


def process_memory(pid: int) -> dict[str, float]:
    """Resident set size now and at its peak (``VmRSS``, ``VmHWM``) and the part of it that
    is the process's own memory (``RssAnon``) vs mapped files such as shared libraries
    (``RssFile``: clean pages shared with every process that maps them), MiB; ``{}`` when
    gone."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in _MEMORY_FIELDS:
                    out[_MEMORY_FIELDS[name]] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        return {}
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far (0.0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
