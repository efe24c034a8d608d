"""Loader for socket-level load balancing (``bpf/bpf_sock.c``) on the node's cgroup.

Invariants:
- Mode comes from ``CILIARY_SOCKET_LB``: ``on`` (every socket of the node cgroup),
  ``hostns-only`` (only sockets of the node's own network namespace; the default) or
  ``off`` (nothing attached, and whatever an earlier run attached is detached).
  Anything else is a ``SockLBError`` naming the variable and the value.
- Scope is one cgroup v2 directory per node, ``<cgroup2 mount>/ciliary-<cluster>-<node>``;
  the programs are never attached to the root cgroup, so no process outside the
  node's cgroup is affected. If no cgroup2 is mounted, one is mounted at
  ``/run/ciliary/cgroup2``.
- The programs are compiled with the tc datapath's cflags (``Datapath.cflags()``), so
  they open the same pinned lb4 maps; the socket layer's own maps
  (``ciliary_lb4_reverse_sk``, ``ciliary_lb4_affinity_sock``) are pinned in the same
  directory and removed with it (``Datapath.unpin``).
- Attaching uses the exclusive cgroup mode (no ``BPF_F_ALLOW_MULTI``): attaching again
  replaces the program in place, so a restarted executor converges without a window
  and without stacking copies. ``detach`` needs no program handle.
- The hostns-only switch is compiled in (``-DSOCK_LB_HOSTNS_ONLY``, and the node netns
  cookie as ``-DHOST_NETNS_COOKIE``), read with ``SO_NETNS_COOKIE`` on a socket made
  inside the node's namespace.
- Pure functions (mode parsing, mount parsing, paths, cflags) are separate from the
  kernel I/O; every I/O method blocks and is run in a thread by the agent.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ciliary import cgroups

ENV_MODE = "CILIARY_SOCKET_LB"
MODE_ON = "on"
MODE_HOSTNS_ONLY = "hostns-only"
MODE_OFF = "off"
MODES = (MODE_ON, MODE_HOSTNS_ONLY, MODE_OFF)
DEFAULT_MODE = MODE_HOSTNS_ONLY

FALLBACK_CGROUP2 = "/run/ciliary/cgroup2"
CGROUP_PREFIX = "ciliary-"
SO_NETNS_COOKIE = 71

# enum bpf_attach_type
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
PROGRAMS: dict[str, int] = {
    "sock4_connect": BPF_CGROUP_INET4_CONNECT,
    "sock4_sendmsg": BPF_CGROUP_UDP4_SENDMSG,
    "sock4_recvmsg": BPF_CGROUP_UDP4_RECVMSG,
    "sock4_getpeername": BPF_CGROUP_INET4_GETPEERNAME,
}
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18

REVERSE_SK = "ciliary_lb4_reverse_sk"
AFFINITY_SOCK = "ciliary_lb4_affinity_sock"
SOCK_MAPS = (REVERSE_SK, AFFINITY_SOCK)

PROGRAM = Path(__file__).resolve().parents[2] / "bpf" / "bpf_sock.c"


class SockLBError(ValueError):
    """Bad socket-LB configuration or a failed kernel operation, with a readable message."""


# ---------------------------------------------------------------- pure


def parse_mode(value: str | None) -> str:
    """``CILIARY_SOCKET_LB`` → one of ``MODES``; unset or empty → ``DEFAULT_MODE``."""
    if value is None or value.strip() == "":
        return DEFAULT_MODE
    mode = value.strip().lower()
    if mode not in MODES:
        raise SockLBError(f"{ENV_MODE}={value!r}: must be one of {', '.join(MODES)}")
    return mode


def cgroup2_mount(mounts: str) -> str | None:
    """The first cgroup2 mount point in ``/proc/mounts`` text, or None."""
    return next(iter(cgroups.cgroup2_mounts(mounts)), None)


def cgroup_name(cluster: str, node: str) -> str:
    """``ciliary-<cluster>-<node>``: the node's cgroup, named like its namespace."""
    from services.node import netns

    return netns.node_netns(cluster, node)


def node_cgroup(mount: str, cluster: str, node: str) -> Path:
    return Path(mount) / cgroup_name(cluster, node)


def cflags(base: Iterable[str], mode: str, host_netns_cookie: int,
           revnat_size: int, affinity_size: int) -> list[str]:
    """The tc datapath's cflags plus the socket layer's."""
    if mode not in (MODE_ON, MODE_HOSTNS_ONLY):
        raise SockLBError(f"no programs to compile in mode {mode!r}")
    if mode == MODE_HOSTNS_ONLY and host_netns_cookie <= 0:
        raise SockLBError("hostns-only needs the node's netns cookie")
    return [
        *base,
        f"-DSOCK_LB_HOSTNS_ONLY={1 if mode == MODE_HOSTNS_ONLY else 0}",
        f"-DHOST_NETNS_COOKIE={host_netns_cookie}ULL",
        f"-DSOCK_REVNAT_MAP_SIZE={revnat_size}",
        f"-DSOCK_AFFINITY_MAP_SIZE={affinity_size}",
    ]


# ctypes twins of lib/sock.h (sizes checked against gcc by the unit tests)
class SockRevNatKey(ct.Structure):
    _fields_ = [("cookie", ct.c_uint64), ("address", ct.c_uint32), ("port", ct.c_uint16),
                ("pad", ct.c_uint16)]


class SockRevNatValue(ct.Structure):
    _fields_ = [("address", ct.c_uint32), ("port", ct.c_uint16), ("rev_nat_index", ct.c_uint16)]


class SockAffinityKey(ct.Structure):
    _fields_ = [("netns_cookie", ct.c_uint64), ("rev_nat_id", ct.c_uint16),
                ("pad", ct.c_uint16 * 3)]


class SockAffinityValue(ct.Structure):  # struct lb_affinity_val (lib/types.h)
    _fields_ = [("last_used", ct.c_uint64), ("backend_id", ct.c_uint32), ("pad", ct.c_uint32)]


MAP_LAYOUTS: dict[str, tuple[type[ct.Structure], type[ct.Structure]]] = {
    REVERSE_SK: (SockRevNatKey, SockRevNatValue),
    AFFINITY_SOCK: (SockAffinityKey, SockAffinityValue),
}


def sock_cookie_hash(cookie: int, seed: int = 0x50C1B5EE) -> int:
    """Python twin of ``sock_cookie_hash`` (lib/sock.h)."""
    h = ((cookie & 0xFFFFFFFF) ^ (cookie >> 32) ^ seed) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def sock_slot(rnd: int, cookie: int, udp: bool, count: int) -> int:
    """Python twin of ``sock_slot``: slot 1..count of a new socket."""
    h = sock_cookie_hash(cookie) if udp else rnd & 0xFFFFFFFF
    return h % count + 1


# ---------------------------------------------------------------- kernel I/O

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_PROG_ATTACH, _BPF_PROG_DETACH, _BPF_PROG_QUERY = 8, 9, 16
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long


def _bpf(cmd: int, attr: ct.Array) -> None:
    if _libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr)) < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))


def _attr(*words: int, size: int = 64) -> ct.Array:
    buf = (ct.c_uint32 * (size // 4))()
    for i, w in enumerate(words):
        buf[i] = w
    return buf


def ensure_cgroup2() -> str:
    """The cgroup2 mount point; mounts one at ``FALLBACK_CGROUP2`` when there is none."""
    with open("/proc/mounts") as f:
        found = cgroup2_mount(f.read())
    if found:
        return found
    Path(FALLBACK_CGROUP2).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup2", "none", FALLBACK_CGROUP2], check=True)
    return FALLBACK_CGROUP2


def netns_cookie(netns_name: str | None) -> int:
    """The netns cookie of namespace ``netns_name`` (``SO_NETNS_COOKIE``; ``None``: the
    caller's own, a host-mode node)."""
    from services.node import netns

    def read() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

    return read() if netns_name is None else netns.run_in_netns(netns_name, read)


def attach_prog(cgroup: Path, prog_fd: int, attach_type: int) -> None:
    """Attach exclusively (replacing whatever this cgroup has for ``attach_type``)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _bpf(_BPF_PROG_ATTACH, _attr(fd, prog_fd, attach_type, 0))
    finally:
        os.close(fd)


def detach_all(cgroup: Path, attach_type: int) -> bool:
    """Detach the program of ``attach_type`` from ``cgroup``; False when none was attached."""
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False
    try:
        # An invalid program fd detaches the single exclusive program (the kernel's
        # legacy detach), so no handle of the program that was attached is needed.
        _bpf(_BPF_PROG_DETACH, _attr(fd, 0xFFFFFFFF, attach_type, 0))
        return True
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    finally:
        os.close(fd)


def attached_ids(cgroup: Path, attach_type: int) -> list[int]:
    """Ids of the programs attached to ``cgroup`` itself for ``attach_type``."""
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return []
    ids = (ct.c_uint32 * 64)()
    try:
        attr = _attr(fd, attach_type, 0, 0, size=64)
        ptr = ct.cast(ids, ct.c_void_p).value or 0
        attr[4], attr[5] = ptr & 0xFFFFFFFF, ptr >> 32
        attr[6] = len(ids)
        _bpf(_BPF_PROG_QUERY, attr)
        return list(ids[: attr[6]])
    finally:
        os.close(fd)


def add_pid(cgroup: Path, pid: int) -> None:
    with open(cgroup / "cgroup.procs", "w") as f:
        f.write(str(pid))


def remove_cgroup(cgroup: Path, attempts: int = 20) -> None:
    """Remove ``cgroup``; processes still in it are moved to its parent first."""
    for _ in range(attempts):
        if not cgroup.exists():
            return
        try:
            pids = (cgroup / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                add_pid(cgroup.parent, int(pid))
            except OSError:
                pass  # exited meanwhile
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        time.sleep(0.05)
    raise SockLBError(f"cgroup {cgroup} is still busy")


@dataclass
class SockLB:
    """The socket-LB programs of one node and the cgroup they are attached to."""

    cluster: str
    node: str
    netns_name: str | None
    mode: str
    base_cflags: list[str]
    pin_dir: Path
    cgroup_root: str | None = None  # default: the cgroup2 mount (``ensure_cgroup2``)
    revnat_size: int = 262144
    affinity_size: int = 65536
    host_netns_cookie: int = 0
    load_seconds: float | None = None

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode)
        self._bpf = None
        self._progs: dict[str, object] = {}

    @classmethod
    def for_datapath(cls, dp, mode: str, **kw) -> SockLB:
        return cls(dp.cluster, dp.node, dp.netns_name, mode, dp.cflags(), dp.pin_dir, **kw)

    @property
    def cgroup(self) -> Path:
        return node_cgroup(self.cgroup_root or ensure_cgroup2(), self.cluster, self.node)

    def ensure_cgroup(self) -> Path:
        """Create the node's cgroup (in every mode: pods are placed in it regardless)."""
        if self.cgroup_root is None:
            self.cgroup_root = ensure_cgroup2()
        path = self.cgroup
        path.mkdir(exist_ok=True)
        return path

    def load(self) -> float:
        """Compile and load the four programs (nothing in mode ``off``)."""
        if self.mode == MODE_OFF:
            return 0.0
        from bcc import BPF

        from services.node import datapath

        if self.mode == MODE_HOSTNS_ONLY:
            self.host_netns_cookie = netns_cookie(self.netns_name)
        flags = cflags(self.base_cflags, self.mode, self.host_netns_cookie,
                       self.revnat_size, self.affinity_size)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with datapath.compiling():
            bpf = BPF(src_file=str(PROGRAM).encode(), cflags=flags)
            progs = {name: bpf.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=at)
                     for name, at in PROGRAMS.items()}
        self.load_seconds = time.monotonic() - start
        self._bpf, self._progs = bpf, progs
        return self.load_seconds

    def attach(self) -> None:
        """Attach (replace) the programs on the node cgroup; in ``off`` detach them."""
        cgroup = self.ensure_cgroup()
        if self.mode == MODE_OFF:
            self.detach()
            return
        if not self._progs:
            raise SockLBError("socket LB programs not loaded")
        for name, attach_type in PROGRAMS.items():
            try:
                attach_prog(cgroup, self._progs[name].fd, attach_type)
            except OSError as e:
                raise SockLBError(f"attaching {name} to {cgroup}: {e.strerror}") from e

    def _existing(self) -> Path | None:
        """The node cgroup's path without mounting anything; None without cgroup2."""
        root = self.cgroup_root or cgroup2_mount(Path("/proc/mounts").read_text())
        return node_cgroup(root, self.cluster, self.node) if root else None

    def detach(self) -> int:
        """Detach every socket-LB program from the node cgroup; returns how many were."""
        path = self._existing()
        return sum(detach_all(path, at) for at in PROGRAMS.values()) if path else 0

    def attached(self) -> dict[str, list[int]]:
        """{program name: ids attached to the node cgroup} (empty lists when none)."""
        path = self._existing()
        return {name: attached_ids(path, at) if path else [] for name, at in PROGRAMS.items()}

    def dump(self, name: str) -> list[tuple[ct.Structure, ct.Structure]]:
        """Entries of one of ``SOCK_MAPS`` as their ctypes twins."""
        if self._bpf is None:
            raise SockLBError("socket LB programs not loaded")
        kt, vt = MAP_LAYOUTS[name]
        return [(kt.from_buffer_copy(ct.string_at(ct.addressof(k), ct.sizeof(kt))),
                 vt.from_buffer_copy(ct.string_at(ct.addressof(v), ct.sizeof(vt))))
                for k, v in self._bpf[name.encode()].items()]

    def close(self) -> None:
        """Release this process's handles; attached programs stay in the kernel."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._progs = {}

    def teardown(self) -> None:
        """Detach and remove the node cgroup."""
        self.detach()
        path = self._existing()
        if path is not None:
            remove_cgroup(path)


__all__ = [
    "DEFAULT_MODE", "ENV_MODE", "MODES", "PROGRAMS", "SOCK_MAPS", "SockAffinityKey", "SockLB",
    "SockAffinityValue", "SockLBError", "SockRevNatKey", "SockRevNatValue", "add_pid", "attached_ids", "cflags",
    "cgroup2_mount", "cgroup_name", "detach_all", "ensure_cgroup2", "netns_cookie",
    "node_cgroup", "parse_mode", "remove_cgroup", "sock_cookie_hash", "sock_slot",
]
