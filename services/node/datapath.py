"""Loader for the endpoint datapath (``bpf/bpf_lxc.c``) of one node.

Invariants:
- This module and ``netns``/``maps`` are the only code that talks to the kernel.
- Maps are pinned at ``<pin_root>/<cluster>/<node>/<map name>``. ``load`` reuses
  pins that exist (bcc ``BPF_TABLE_PINNED``) and creates the missing ones, so a
  restarted agent finds the state of the previous one; map sizes must not change
  between loads of the same pin directory.
- Configuration reaches C only as ``-D`` cflags (``MapSizes``, ``CtTimeouts``,
  the pin directory); the C source is never assembled in Python.
- Programs are attached with tc clsact, direct action, fixed priority and
  handle, so ``attach`` replaces in place (no window without a program) and is
  idempotent. The tc filters keep the programs alive after this process exits.
- One ``RingReader`` thread per loaded datapath polls the ring buffer and hands
  decoded ``FlowEvent`` batches to a callback; no packet is ever handled in
  Python.
- ``load``/``attach``/``detach`` block; the async executor runs them in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.node import layouts as L
from services.node.maps import BccMapOps, gc_conntrack, gc_nat

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
PROGRAM = BPF_DIR / "bpf_lxc.c"
BPFFS = "/sys/fs/bpf"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/ciliary"

TC_INGRESS = "ffff:fff2"  # clsact ingress: from the pod (host veth) / from the underlay
TC_EGRESS = "ffff:fff3"  # clsact egress: to the pod (host veth) / to the underlay
TC_PRIO = 1
TC_HANDLE = 1

_compile_lock = threading.Lock()


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """One bcc compilation at a time in this process. Afterwards the heap LLVM freed is handed
    back to the system: glibc would keep it, about 30 MB of the node executor's RSS."""
    with _compile_lock:
        try:
            yield
        finally:
            _release_freed_heap()


def _release_freed_heap() -> None:
    try:
        ct.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        pass


@dataclass(frozen=True, slots=True)
class MapSizes:
    """Max entries per map (Cilium defaults). ``ct`` is one map for TCP and non-TCP."""

    ipcache: int = 512000
    lxc: int = 65535
    policy: int = 16384
    ct: int = 1048576
    lb: int = 65536
    metrics: int = 1024
    events_pages: int = 256
    maglev: int = 1048576  # {service, index} entries (no prealloc): 64 tables at M = 16381
    maglev_table: int = 16381  # M, entries per service table (prime)
    affinity: int = 65536
    nat: int = 65536  # NodePort SNAT entries, two per flow


@dataclass(frozen=True, slots=True)
class CtTimeouts:
    """Conntrack lifetimes in seconds (Cilium defaults)."""

    tcp: int = 21600
    nontcp: int = 60
    syn: int = 60
    close: int = 10


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when it is not mounted."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == BPFFS and parts[2] == "bpf":
                return
    subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)


@dataclass
class RingReader:
    """One thread polling the ring buffer of a loaded datapath."""

    bpf: object
    callback: Callable[[list[L.FlowEvent]], None]
    poll_ms: int = 100
    events: int = 0
    malformed: int = 0
    callback_errors: int = 0
    _batch: list[L.FlowEvent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RingReader:
        self.bpf[L.EVENTS.encode()].open_ring_buffer(self._on_event)
        self._thread = threading.Thread(target=self._run, name="ciliary-ringbuf", daemon=True)
        self._thread.start()
        return self

    def _on_event(self, _ctx, data, size) -> int:
        if size < ct.sizeof(L.FlowEvent):
            self.malformed += 1
            return 0
        self._batch.append(L.FlowEvent.from_buffer_copy(ct.string_at(data, ct.sizeof(L.FlowEvent))))
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bpf.ring_buffer_poll(self.poll_ms)
            if self._batch:
                batch, self._batch = self._batch, []
                self.events += len(batch)
                try:
                    self.callback(batch)
                except Exception:
                    self.callback_errors += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Datapath:
    """The compiled programs and pinned maps of one node."""

    def __init__(self, cluster: str, node: str, netns_name: str | None,
                 pin_root: str = DEFAULT_PIN_ROOT, map_sizes: MapSizes = MapSizes(),
                 ct_timeouts: CtTimeouts = CtTimeouts()):
        self.cluster = cluster
        self.node = node
        self.netns_name = netns_name
        self.pin_dir = Path(pin_root) / cluster / node
        self.map_sizes = map_sizes
        self.ct_timeouts = ct_timeouts
        self.load_seconds: float | None = None
        self._bpf = None
        self._progs: dict[str, object] = {}
        self._maps: BccMapOps | None = None
        self._reader: RingReader | None = None

    def cflags(self) -> list[str]:
        s, t = self.map_sizes, self.ct_timeouts
        return [
            f'-DCILIARY_PIN_DIR="{self.pin_dir}"',
            f"-I{BPF_DIR}",
            f"-DIPCACHE_MAP_SIZE={s.ipcache}",
            f"-DLXC_MAP_SIZE={s.lxc}",
            f"-DPOLICY_MAP_SIZE={s.policy}",
            f"-DCT_MAP_SIZE={s.ct}",
            f"-DLB_MAP_SIZE={s.lb}",
            f"-DMETRICS_MAP_SIZE={s.metrics}",
            f"-DEVENTS_PAGES={s.events_pages}",
            f"-DMAGLEV_MAP_SIZE={s.maglev}",
            f"-DLB_MAGLEV_TABLE_SIZE={s.maglev_table}",
            f"-DAFFINITY_MAP_SIZE={s.affinity}",
            f"-DNAT_MAP_SIZE={s.nat}",
            f"-DCT_LIFETIME_TCP={t.tcp}",
            f"-DCT_LIFETIME_NONTCP={t.nontcp}",
            f"-DCT_SYN_TIMEOUT={t.syn}",
            f"-DCT_CLOSE_TIMEOUT={t.close}",
        ]

    def load(self) -> float:
        """Compile and load the programs, opening or creating the pinned maps.

        Returns the seconds spent (compile + verifier)."""
        from bcc import BPF  # imported here: only the node executor needs bcc

        ensure_bpffs()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with compiling():
            bpf = BPF(src_file=str(PROGRAM).encode(), cflags=self.cflags())
            progs = {name: bpf.load_func(name.encode(), BPF.SCHED_CLS)
                     for name in ("from_container", "to_container", "from_netdev", "to_netdev")}
        self.load_seconds = time.monotonic() - start
        self._bpf, self._progs = bpf, progs
        self._maps = BccMapOps({name: bpf[name.encode()] for name in L.ALL_MAPS})
        return self.load_seconds

    @property
    def maps(self) -> BccMapOps:
        if self._maps is None:
            raise RuntimeError("datapath not loaded")
        return self._maps

    def attach(self, host_ifname: str) -> None:
        """Attach from_container (tc ingress) and to_container (tc egress) to a host veth."""
        self._attach(host_ifname, "from_container", "to_container")

    def attach_host(self, ifname: str | None = None) -> None:
        """Attach from_netdev (tc ingress) and to_netdev (tc egress) to the node's
        underlay interface (default: the one ``netns.create_node`` made,
        ``netns.link_name(cluster, node, "node")``), so NodePort and externalIPs
        frontends answer traffic from other nodes. Idempotent; ``detach`` removes it."""
        if ifname is None:
            from services.node import netns

            ifname = netns.link_name(self.cluster, self.node, "node")
        self._attach(ifname, "from_netdev", "to_netdev")

    def _attach(self, host_ifname: str, ingress: str, egress: str) -> None:
        if not self._progs:
            raise RuntimeError("datapath not loaded")
        with IPRoute(netns=self.netns_name) as ipr:
            found = ipr.link_lookup(ifname=host_ifname)
            if not found:
                raise LookupError(f"{host_ifname} not found in {self.netns_name}")
            idx = found[0]
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: already there
                    raise
            for parent, name in ((TC_INGRESS, ingress), (TC_EGRESS, egress)):
                fn = self._progs[name]
                ipr.tc("replace-filter", "bpf", idx, TC_HANDLE, fd=fn.fd, name=name,
                       parent=parent, prio=TC_PRIO, classid=1, direct_action=True)

    def detach(self, host_ifname: str) -> None:
        """Remove the clsact qdisc (and both filters). Idempotent."""
        try:
            with IPRoute(netns=self.netns_name) as ipr:
                for idx in ipr.link_lookup(ifname=host_ifname):
                    try:
                        ipr.tc("del", "clsact", idx)
                    except NetlinkError:
                        pass
        except (FileNotFoundError, NetlinkError):
            pass

    def ring_reader(self, callback: Callable[[list[L.FlowEvent]], None],
                    poll_ms: int = 100) -> RingReader:
        """Start the (single) ring-buffer reader thread of this datapath."""
        if self._bpf is None:
            raise RuntimeError("datapath not loaded")
        if self._reader is not None:
            raise RuntimeError("ring reader already running")
        self._reader = RingReader(self._bpf, callback, poll_ms).start()
        return self._reader

    def metrics(self) -> dict[tuple[int, int], L.MetricsValue]:
        """{(reason, direction): packets/bytes summed over CPUs}."""
        return {(k.reason, k.direction): v for k, v in self.maps.dump(L.METRICS).items()}

    def events_lost(self) -> int:
        v = self.metrics().get((L.REASON_EVENT_LOST, 0))
        return v.packets if v is not None else 0

    def gc_conntrack(self, now_ns: int | None = None) -> int:
        """Delete expired conntrack and NodePort SNAT entries (``maps.gc_conntrack``,
        ``maps.gc_nat``); returns how many conntrack entries were deleted."""
        removed = gc_conntrack(self.maps, now_ns)
        gc_nat(self.maps, now_ns)
        return removed

    def close(self) -> None:
        """Stop the reader and release this process's handles. Attached programs
        and pinned maps stay in the kernel."""
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._progs = {}
        self._maps = None

    def unpin(self) -> None:
        """Remove this node's pinned maps and the now-empty pin directories."""
        if self.pin_dir.is_dir():
            for p in self.pin_dir.iterdir():
                p.unlink()
            self.pin_dir.rmdir()
        try:
            self.pin_dir.parent.rmdir()  # cluster dir, only when empty
        except OSError:
            pass

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CtTimeouts", "Datapath", "MapSizes", "RingReader", "ensure_bpffs"]

