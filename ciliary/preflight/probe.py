"""Probe the running kernel for each check of ``ciliary.preflight.kernel.CHECKS``.

The kernel is asked, never guessed from its version: map types are created, tiny programs
loaded (a helper is missing when the verifier names it unknown or forbidden for the
program type, as bpftool's feature probe decides), a program is attached with tc clsact
in a throw-away network namespace and at each socket-LB hook of a throw-away cgroup.

Invariants:
- Every check returns a ``CheckResult``; a probe that cannot run gives ``unknown`` with
  the reason (not root, no tc, an unexpected error as ``<type>: <message>``), never an
  exception.
- Whatever a probe creates is removed before it returns: program and map handles are
  closed, the pin under bpffs unlinked, the namespace ``ciliary-preflight-<hex>`` and the
  cgroup ``ciliary-preflight-<hex>`` deleted. Nothing is attached outside them.
- bpf(2) goes through ctypes (``syscall``), not bcc: this module needs neither bcc nor
  pyroute2, so it runs where the datapath cannot load; tc is iproute2's command, entered
  into the namespace with ``nsenter --net`` (the mount namespace, and so bpffs, stays).
- Paths (``/proc/mounts``, ``/sys/fs/bpf``, …) are parameters of ``Probe`` so a test can
  point them elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import os
import platform
import secrets
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable
from contextlib import ExitStack, suppress
from pathlib import Path

from ciliary.preflight.kernel import (
    CHECKS,
    DEGRADED,
    MISSING,
    OK,
    PROG_SCHED_CLS,
    UNKNOWN,
    CheckResult,
    CheckSpec,
)

SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "s390x": 351, "ppc64le": 361}
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_OBJ_PIN, BPF_PROG_ATTACH, BPF_PROG_DETACH = 0, 5, 6, 8, 9
ATTR_SIZE = 128
LOG_SIZE = 65536
NAME_PREFIX = "ciliary-preflight-"
HELPER_MISSING_MARKS = ("invalid func ", "unknown func ", "program of this type cannot use helper ")
TC_TIMEOUT = 10.0


class BpfError(OSError):
    """A failed bpf(2) call; ``log`` holds the verifier's log of a failed program load."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


class Bpf:
    """The few bpf(2) commands the probes need, on raw attribute buffers."""

    def __init__(self) -> None:
        number = SYS_BPF.get(platform.machine())
        if number is None:
            raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
        self.number = number
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def call(self, cmd: int, attr: ctypes.Array, what: str) -> int:
        ret = self.libc.syscall(self.number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        if ret < 0:
            raise BpfError(ctypes.get_errno(), what)
        return int(ret)

    def map_create(self, map_type: int, key: int, value: int, entries: int, flags: int) -> int:
        attr = (ctypes.c_uint8 * ATTR_SIZE)()
        struct.pack_into("<IIIII", attr, 0, map_type, key, value, entries, flags)
        return self.call(BPF_MAP_CREATE, attr, f"map create (type {map_type})")

    def prog_load(self, prog_type: int, insns: bytes, expected_attach: int = 0) -> int:
        """Load a GPL program; raises ``BpfError`` carrying the verifier log."""
        code = ctypes.create_string_buffer(insns, len(insns))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(LOG_SIZE)
        attr = (ctypes.c_uint8 * ATTR_SIZE)()
        struct.pack_into("<IIQQIIQ", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(code),
                         ctypes.addressof(license_), 1, LOG_SIZE, ctypes.addressof(log))
        attr[48:48 + 10] = (ctypes.c_uint8 * 10)(*b"ciliary_pf")
        struct.pack_into("<I", attr, 68, expected_attach)
        try:
            return self.call(BPF_PROG_LOAD, attr, f"program load (type {prog_type})")
        except BpfError as err:
            raise BpfError(err.errno or 0, f"program load (type {prog_type})",
                           log.value.decode(errors="replace")) from None

    def obj_pin(self, fd: int, path: str) -> None:
        name = ctypes.create_string_buffer(path.encode())
        attr = (ctypes.c_uint8 * ATTR_SIZE)()
        struct.pack_into("<QI", attr, 0, ctypes.addressof(name), fd)
        self.call(BPF_OBJ_PIN, attr, f"pin at {path}")

    def prog_attach(self, target_fd: int, prog_fd: int, attach_type: int, *, detach: bool = False) -> None:
        attr = (ctypes.c_uint8 * ATTR_SIZE)()
        struct.pack_into("<IIII", attr, 0, target_fd, prog_fd, attach_type, 0)
        cmd = BPF_PROG_DETACH if detach else BPF_PROG_ATTACH
        self.call(cmd, attr, f"{'detach' if detach else 'attach'} (type {attach_type})")


def insn(code: int, imm: int = 0) -> bytes:
    """One instruction with registers and offset zero (r0 is the only register used)."""
    return struct.pack("<BBhi", code, 0, 0, imm)


MOV_R0 = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
CALL = 0x85  # BPF_JMP | BPF_CALL
EXIT = 0x95  # BPF_JMP | BPF_EXIT


def returning(value: int) -> bytes:
    """``r0 = value; exit``."""
    return insn(MOV_R0, value) + insn(EXIT)


def calling(helper: int, value: int) -> bytes:
    """``call helper; r0 = value; exit``: the verifier checks the helper exists for the
    program type before it checks the call's arguments."""
    return insn(CALL, helper) + returning(value)


def mount_points(mounts_text: str, fstype: str) -> list[str]:
    """Mount points of ``fstype`` in ``/proc/mounts`` text."""
    out = []
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == fstype:
            out.append(parts[1].replace("\\040", " "))
    return out


def _errno_reason(err: OSError) -> str:
    if err.errno in (errno.EPERM, errno.EACCES):
        return "not permitted: run ciliary preflight as root"
    return err.strerror or str(err)


class Probe:
    """Runs checks; one instance per preflight run (the paths are this node's)."""

    def __init__(self, *, proc: str = "/proc", sys: str = "/sys", bpffs: str = "/sys/fs/bpf",
                 modules: str = "/lib/modules", run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
        self.proc = Path(proc)
        self.sys = Path(sys)
        self.bpffs = bpffs
        self.modules = Path(modules)
        self.run_cmd = run
        self.token = f"{os.getpid()}-{secrets.token_hex(2)}"
        self._bpf: Bpf | None = None
        self._bpf_error: str = ""

    # ------------------------------------------------------------ driver

    def run(self, specs: Iterable[CheckSpec] = CHECKS) -> dict[str, CheckResult]:
        return {spec.name: self.check(spec) for spec in specs}

    def check(self, spec: CheckSpec) -> CheckResult:
        method = getattr(self, f"_check_{spec.kind}", None)
        if method is None:
            return CheckResult(spec.name, UNKNOWN, f"no probe for kind {spec.kind!r}")
        try:
            status, detail = method(spec)
        except _Unknown as err:
            status, detail = UNKNOWN, str(err)
        except BpfError as err:
            status, detail = (UNKNOWN if err.errno in (errno.EPERM, errno.EACCES) else MISSING), _errno_reason(err)
        except Exception as err:  # a probe never raises: the reason is the answer
            status, detail = UNKNOWN, f"{type(err).__name__}: {err}"
        return CheckResult(spec.name, status, detail)

    def bpf(self) -> Bpf:
        """The bpf(2) wrapper once ``bpf_syscall`` worked; else raises with its reason."""
        if self._bpf is None:
            if not self._bpf_error:
                self._check_syscall(None)
            if self._bpf is None:
                raise _Unknown(f"bpf(2) unusable ({self._bpf_error})")
        return self._bpf

    def _mounts(self) -> str:
        return (self.proc / "mounts").read_text()

    def _filesystems(self) -> str:
        try:
            return (self.proc / "filesystems").read_text()
        except OSError:
            return ""

    # ------------------------------------------------------------ basics

    def _check_syscall(self, _spec: CheckSpec | None) -> tuple[str, str]:
        try:
            bpf = Bpf()
            fd = bpf.map_create(2, 4, 4, 1, 0)  # BPF_MAP_TYPE_ARRAY
        except OSError as err:
            self._bpf_error = _errno_reason(err)
            if err.errno in (errno.EPERM, errno.EACCES):
                return UNKNOWN, self._bpf_error
            return MISSING, self._bpf_error
        os.close(fd)
        self._bpf = bpf
        return OK, ""

    def _check_jit(self, _spec: CheckSpec) -> tuple[str, str]:
        path = self.proc / "sys/net/core/bpf_jit_enable"
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            return DEGRADED, "this kernel has no BPF JIT: programs run in the interpreter"
        if value == "0":
            return DEGRADED, "net.core.bpf_jit_enable=0: programs run in the interpreter"
        return OK, f"net.core.bpf_jit_enable={value}"

    def _check_bpffs(self, _spec: CheckSpec) -> tuple[str, str]:
        mounted = self.bpffs in mount_points(self._mounts(), "bpf")
        if not mounted:
            known = "bpf" in self._filesystems().split()
            return MISSING, (f"not mounted at {self.bpffs}"
                             + ("" if known else "; this kernel has no bpf filesystem"))
        bpf = self.bpf()
        fd = bpf.map_create(2, 4, 4, 1, 0)
        path = f"{self.bpffs}/{NAME_PREFIX}{self.token}-pin"
        try:
            bpf.obj_pin(fd, path)
        except BpfError as err:
            return MISSING, f"mounted at {self.bpffs} but a map cannot be pinned there: {err}"
        finally:
            os.close(fd)
            with suppress(FileNotFoundError):
                os.unlink(path)
        return OK, f"mounted at {self.bpffs}; a map was pinned and removed"

    def _check_cgroup2(self, _spec: CheckSpec) -> tuple[str, str]:
        found = mount_points(self._mounts(), "cgroup2")
        if found:
            return OK, f"mounted at {found[0]}"
        if "cgroup2" in self._filesystems().split():
            return DEGRADED, "not mounted; the node executor mounts its own at /run/ciliary/cgroup2"
        return MISSING, "this kernel has no cgroup2 filesystem"

    def _check_btf(self, _spec: CheckSpec) -> tuple[str, str]:
        path = self.sys / "kernel/btf/vmlinux"
        if path.exists():
            return OK, f"{path} ({path.stat().st_size:,} bytes)"
        return MISSING, f"no {path}"

    def _check_headers(self, _spec: CheckSpec) -> tuple[str, str]:
        release = os.uname().release
        for sub in ("build", "source"):
            path = self.modules / release / sub
            if (path / "include").is_dir():
                return OK, f"{path} -> {path.resolve()}"
        if (self.sys / "kernel/kheaders.tar.xz").exists():
            return OK, "built in (CONFIG_IKHEADERS, /sys/kernel/kheaders.tar.xz)"
        if any((self.modules / release).glob("kernel/kernel/kheaders.ko*")):
            return OK, "the kheaders module (bcc loads it)"
        return MISSING, f"no {self.modules / release / 'build'} and no kheaders"

    def _check_bcc(self, _spec: CheckSpec) -> tuple[str, str]:
        spec = importlib.util.find_spec("bcc")
        if spec is None or not spec.submodule_search_locations:
            return MISSING, "the bcc Python module is not installed in this environment"
        version = ""
        version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
        with suppress(OSError):
            for line in version_file.read_text().splitlines():
                if line.startswith("__version__"):
                    version = line.split("=", 1)[1].strip().strip("'\"")
        library = ctypes.util.find_library("bcc")
        if library is None:
            return MISSING, "the bcc Python module is installed but libbcc is not"
        return OK, f"bcc {version or '(version unknown)'}, {library}"

    # ------------------------------------------------------------ maps and programs

    def _check_map(self, spec: CheckSpec) -> tuple[str, str]:
        map_type, key, value, entries, flags = spec.params
        if entries == 4096:  # a ring buffer: one page, a power of two
            entries = os.sysconf("SC_PAGE_SIZE")
        fd = self.bpf().map_create(map_type, key, value, entries, flags)
        os.close(fd)
        return OK, ""

    def _check_prog(self, spec: CheckSpec) -> tuple[str, str]:
        prog_type, attach = spec.params
        fd = self.bpf().prog_load(prog_type, returning(0 if prog_type == PROG_SCHED_CLS else 1), attach)
        os.close(fd)
        return OK, ""

    def _check_helper(self, spec: CheckSpec) -> tuple[str, str]:
        prog_type, attach, helper = spec.params
        bpf = self.bpf()
        try:
            fd = bpf.prog_load(prog_type, returning(0 if prog_type == PROG_SCHED_CLS else 1), attach)
        except BpfError as err:
            if err.errno in (errno.EPERM, errno.EACCES):
                raise
            return MISSING, f"its program type does not load ({err})"
        os.close(fd)
        try:
            fd = bpf.prog_load(prog_type, calling(helper, 0 if prog_type == PROG_SCHED_CLS else 1), attach)
        except BpfError as err:
            marked = [ln for ln in err.log.splitlines() if any(m in ln for m in HELPER_MISSING_MARKS)]
            if marked:
                return MISSING, f"verifier: {marked[0].strip()}"
            if not err.log.strip():
                raise _Unknown(f"the probe program was refused before verification ({err})") from None
            return OK, ""  # known to the verifier, which objected to the arguments, not the helper
        os.close(fd)
        return OK, ""

    # ------------------------------------------------------------ attach points

    def _check_tc_attach(self, _spec: CheckSpec) -> tuple[str, str]:
        for tool in ("tc", "ip", "nsenter"):
            if shutil.which(tool) is None:
                return UNKNOWN, f"{tool} is not installed (iproute2 / util-linux)"
        if self.bpffs not in mount_points(self._mounts(), "bpf"):
            return UNKNOWN, f"tc takes the program from a pin and no bpffs is mounted at {self.bpffs}"
        bpf = self.bpf()
        netns = f"{NAME_PREFIX}{self.token}"
        pin = f"{self.bpffs}/{netns}-tc"
        with ExitStack() as cleanup:
            fd = bpf.prog_load(PROG_SCHED_CLS, returning(0))
            cleanup.callback(os.close, fd)
            bpf.obj_pin(fd, pin)
            cleanup.callback(lambda: os.path.exists(pin) and os.unlink(pin))
            self._cmd(["ip", "netns", "add", netns])
            cleanup.callback(lambda: self._cmd(["ip", "netns", "del", netns], check=False))
            enter = ["nsenter", f"--net=/run/netns/{netns}"]
            done = self._cmd([*enter, "tc", "qdisc", "add", "dev", "lo", "clsact"], check=False)
            if done.returncode != 0:
                return MISSING, f"clsact qdisc: {_first_line(done.stderr)}"
            done = self._cmd([*enter, "tc", "filter", "add", "dev", "lo", "ingress", "prio", "1", "handle", "1",
                              "bpf", "direct-action", "object-pinned", pin], check=False)
            if done.returncode != 0:
                return MISSING, f"bpf filter: {_first_line(done.stderr)}"
            shown = self._cmd([*enter, "tc", "filter", "show", "dev", "lo", "ingress"], check=False)
            if "direct-action" not in shown.stdout:
                return MISSING, "the bpf filter was accepted but is not listed as direct-action"
        return OK, "clsact + direct-action bpf filter attached in a throw-away namespace"

    def _check_cgroup_attach(self, spec: CheckSpec) -> tuple[str, str]:
        (attach,) = spec.params
        found = mount_points(self._mounts(), "cgroup2")
        if not found:
            return UNKNOWN, "no cgroup v2 mounted to attach to"
        bpf = self.bpf()
        cgroup = Path(found[0]) / f"{NAME_PREFIX}{self.token}"
        with ExitStack() as cleanup:
            try:
                fd = bpf.prog_load(18, returning(1), attach)  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR
            except BpfError as err:
                if err.errno in (errno.EPERM, errno.EACCES):
                    raise
                return MISSING, f"its program type does not load ({err})"
            cleanup.callback(os.close, fd)
            cgroup.mkdir(exist_ok=True)
            cleanup.callback(lambda: cgroup.rmdir())
            cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            cleanup.callback(os.close, cg_fd)
            bpf.prog_attach(cg_fd, fd, attach)
            bpf.prog_attach(cg_fd, fd, attach, detach=True)
        return OK, ""

    def _cmd(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
        done = self.run_cmd(argv, capture_output=True, text=True, timeout=TC_TIMEOUT)
        if check and done.returncode != 0:
            raise _Unknown(f"{' '.join(argv[:3])}: {_first_line(done.stderr)}")
        return done


class _Unknown(Exception):
    """A probe that cannot decide: the message is the reason."""


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "failed")


def probe_kernel(**paths: str) -> dict[str, CheckResult]:
    """Every check of ``CHECKS`` on this node."""
    return Probe(**paths).run()
