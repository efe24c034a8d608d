"""What ciliary's datapath needs from a kernel, and what a node's probe results mean for
each ciliary feature.

Pure: the catalogue of checks (``CHECKS``: what to probe, with the numbers the probe
needs and which kernel or package brings it) and of features (``FEATURES``: which checks
each needs), and ``feature_verdicts`` from results to verdicts. ``ciliary.preflight.probe``
runs the checks.

Invariants:
- A check result is ``ok``, ``degraded`` (works, with a cost named in its detail),
  ``missing`` or ``unknown`` (the probe could not run; its detail says why). A check with
  no result counts as ``unknown: not probed``.
- A feature is ``not built`` when ciliary does not implement it yet; else ``missing``
  when a required check is missing, else ``unknown`` when one is unknown, else
  ``degraded`` when a required or degrading check is degraded or a degrading check is
  missing, else ``available``. Its reasons name each check that is not ok, with what
  brings it.
- The catalogue follows what the programs use: ``bpf/bpf_lxc.c`` (one object: policy,
  per-packet service LB, Maglev, flows and the DNS answers FQDN policy learns from all
  load together or not at all) and ``bpf/bpf_sock.c`` (socket LB, which opens the lb maps
  the tc datapath pins). Helper and type numbers are the kernel's UAPI values
  (``include/uapi/linux/bpf.h``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

OK = "ok"
DEGRADED = "degraded"
MISSING = "missing"
UNKNOWN = "unknown"
CHECK_STATES = (OK, DEGRADED, MISSING, UNKNOWN)

AVAILABLE = "available"
NOT_BUILT = "not built"
FEATURE_STATES = (AVAILABLE, DEGRADED, MISSING, UNKNOWN, NOT_BUILT)

# enum bpf_map_type / bpf_prog_type / bpf_attach_type
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_LRU_HASH, MAP_LPM_TRIE, MAP_RINGBUF = 1, 2, 5, 9, 11, 27
PROG_SCHED_CLS, PROG_CGROUP_SOCK_ADDR = 3, 18
ATTACH_INET4_CONNECT, ATTACH_UDP4_SENDMSG, ATTACH_UDP4_RECVMSG, ATTACH_INET4_GETPEERNAME = 10, 14, 19, 29
F_NO_PREALLOC = 1

# helper name -> (UAPI number, kernel that brings it)
HELPERS: dict[str, tuple[int, str]] = {
    "map_lookup_elem": (1, "Linux 3.19"),
    "map_update_elem": (2, "Linux 3.19"),
    "map_delete_elem": (3, "Linux 3.19"),
    "ktime_get_ns": (5, "Linux 4.1"),
    "get_prandom_u32": (7, "Linux 4.1"),
    "skb_store_bytes": (9, "Linux 4.1"),
    "l3_csum_replace": (10, "Linux 4.1"),
    "l4_csum_replace": (11, "Linux 4.1"),
    "skb_load_bytes": (26, "Linux 4.5"),
    "get_socket_cookie": (46, "Linux 5.7 (every helper socket LB calls)"),
    "fib_lookup": (69, "Linux 4.18"),
    "get_netns_cookie": (122, "Linux 5.7"),
    "ringbuf_reserve": (131, "Linux 5.8"),
    "ringbuf_submit": (132, "Linux 5.8"),
    "redirect_neigh": (152, "Linux 5.10"),
}
TC_HELPERS = ("map_lookup_elem", "map_update_elem", "map_delete_elem", "ktime_get_ns",
              "get_prandom_u32", "skb_load_bytes", "skb_store_bytes", "l3_csum_replace",
              "l4_csum_replace", "fib_lookup", "redirect_neigh", "ringbuf_reserve", "ringbuf_submit")
SOCK_HELPERS = ("map_lookup_elem", "map_update_elem", "map_delete_elem", "ktime_get_ns",
                "get_prandom_u32", "get_socket_cookie", "get_netns_cookie")

# socket-LB hook -> (attach type, kernel that brings it)
SOCK_HOOKS: dict[str, tuple[int, str]] = {
    "connect4": (ATTACH_INET4_CONNECT, "Linux 4.17"),
    "sendmsg4": (ATTACH_UDP4_SENDMSG, "Linux 4.18"),
    "recvmsg4": (ATTACH_UDP4_RECVMSG, "Linux 5.2"),
    "getpeername4": (ATTACH_INET4_GETPEERNAME, "Linux 5.8"),
}


@dataclass(frozen=True)
class CheckSpec:
    """One thing to probe. ``kind`` says how (``ciliary.preflight.probe`` dispatches on it)
    and ``params`` carries the numbers: ``map`` (type, key size, value size, max entries,
    flags), ``prog`` (type, expected attach type), ``helper`` (program type, expected attach
    type, helper number), ``cgroup_attach`` (attach type); the others take none."""

    name: str
    title: str
    kind: str
    brings: str
    params: tuple[int, ...] = ()


def _helper_checks(prefix: str, prog_type: int, attach: int, names: tuple[str, ...],
                   where: str) -> tuple[CheckSpec, ...]:
    return tuple(
        CheckSpec(f"{prefix}_{name}", f"helper bpf_{name} in {where} programs", "helper",
                  HELPERS[name][1], (prog_type, attach, HELPERS[name][0]))
        for name in names
    )


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("bpf_syscall", "bpf(2) usable (a 1-entry array map is created)", "syscall",
              "Linux 3.18 with CONFIG_BPF_SYSCALL; run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"),
    CheckSpec("jit", "BPF JIT compiler enabled", "jit",
              "CONFIG_BPF_JIT and sysctl net.core.bpf_jit_enable=1 (without it programs are interpreted)"),
    CheckSpec("bpffs", "bpf filesystem at /sys/fs/bpf (pinned maps outlive the node executor)", "bpffs",
              "mount -t bpf bpf /sys/fs/bpf in the node image (Linux 4.4); the node executor mounts it at start when it can"),
    CheckSpec("cgroup2", "cgroup v2 mounted (socket LB attaches to the node's cgroup)", "cgroup2",
              "a cgroup v2 mount (systemd's unified hierarchy); without one the node executor mounts its own at /run/ciliary/cgroup2"),
    CheckSpec("btf", "kernel BTF at /sys/kernel/btf/vmlinux", "btf",
              "CONFIG_DEBUG_INFO_BTF (Linux 5.4); ciliary's bcc programs compile against the headers instead"),
    CheckSpec("kernel_headers", "kernel headers for bcc (/lib/modules/$(uname -r)/build or CONFIG_IKHEADERS)", "headers",
              "the linux-headers package of the running kernel (or a kernel with CONFIG_IKHEADERS)"),
    CheckSpec("bcc", "bcc (Python module and libbcc) to compile and load the programs", "bcc",
              "bcc 0.26 or newer: its Python module in ciliary's environment and libbcc (bpfcc packages)"),
    CheckSpec("map_hash", "map type hash", "map", "Linux 3.19", (MAP_HASH, 8, 8, 16, 0)),
    CheckSpec("map_hash_no_prealloc", "map type hash without preallocation (Maglev tables)", "map",
              "Linux 4.6", (MAP_HASH, 8, 8, 16, F_NO_PREALLOC)),
    CheckSpec("map_percpu_hash", "map type percpu_hash (drop and forward counters)", "map",
              "Linux 4.6", (MAP_PERCPU_HASH, 4, 16, 16, 0)),
    CheckSpec("map_lru_hash", "map type lru_hash (conntrack, NAT, affinity)", "map",
              "Linux 4.10", (MAP_LRU_HASH, 16, 8, 16, 0)),
    CheckSpec("map_lpm_trie", "map type lpm_trie (the ipcache)", "map",
              "Linux 4.11", (MAP_LPM_TRIE, 8, 8, 16, F_NO_PREALLOC)),
    CheckSpec("map_ringbuf", "map type ringbuf (flow events)", "map",
              "Linux 5.8", (MAP_RINGBUF, 0, 0, 4096, 0)),
    CheckSpec("prog_sched_cls", "program type sched_cls (tc)", "prog", "Linux 4.1", (PROG_SCHED_CLS, 0)),
    CheckSpec("attach_tc_clsact", "tc clsact qdisc with a direct-action bpf filter", "tc_attach",
              "Linux 4.5 (clsact) with CONFIG_NET_SCH_INGRESS and CONFIG_NET_CLS_BPF; iproute2's tc"),
    *_helper_checks("tc_helper", PROG_SCHED_CLS, 0, TC_HELPERS, "tc"),
    *(CheckSpec(f"prog_sock_{hook}", f"program type cgroup/sock_addr for {hook}", "prog", brings,
                (PROG_CGROUP_SOCK_ADDR, attach)) for hook, (attach, brings) in SOCK_HOOKS.items()),
    *(CheckSpec(f"attach_cgroup_{hook}", f"attach to a cgroup v2 at {hook}", "cgroup_attach",
                f"{brings} with CONFIG_CGROUP_BPF", (attach,)) for hook, (attach, brings) in SOCK_HOOKS.items()),
    *_helper_checks("sock_helper", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, SOCK_HELPERS,
                    "cgroup/sock_addr"),
)
CHECKS_BY_NAME: dict[str, CheckSpec] = {c.name: c for c in CHECKS}

TC_DATAPATH: tuple[str, ...] = (
    "bpf_syscall", "bpffs", "bcc", "kernel_headers", "map_hash", "map_hash_no_prealloc",
    "map_percpu_hash", "map_lru_hash", "map_lpm_trie", "map_ringbuf", "prog_sched_cls",
    "attach_tc_clsact", *(f"tc_helper_{h}" for h in TC_HELPERS),
)
SOCKET_LAYER: tuple[str, ...] = (
    "cgroup2", *(f"prog_sock_{h}" for h in SOCK_HOOKS), *(f"attach_cgroup_{h}" for h in SOCK_HOOKS),
    *(f"sock_helper_{h}" for h in SOCK_HELPERS),
)


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    title: str
    requires: tuple[str, ...]
    degraded_by: tuple[str, ...] = ("jit",)
    built: bool = True
    core: bool = False  # without it ciliary cannot replace the incumbent data plane
    note: str = ""  # for a feature that is not built: what it would need


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("policy", "network policy (tc datapath, bpf_lxc.c)", TC_DATAPATH, core=True),
    FeatureSpec("service_lb", "service load balancing per packet (tc datapath)", TC_DATAPATH, core=True),
    FeatureSpec("maglev", "Maglev backend selection (tc datapath)", TC_DATAPATH),
    FeatureSpec("flows", "flow visibility (ring buffer of the tc datapath)", TC_DATAPATH, core=True),
    FeatureSpec("fqdn", "FQDN policy (DNS answers from flow events)", TC_DATAPATH),
    FeatureSpec("socket_lb", "socket load balancing (cgroup sock_addr, bpf_sock.c)",
                TC_DATAPATH + SOCKET_LAYER),
    FeatureSpec("encryption", "transparent encryption", (), built=False,
                note="not built in ciliary yet (Cilium uses WireGuard, Linux 5.6, or IPsec xfrm)"),
)
FEATURES_BY_NAME: dict[str, FeatureSpec] = {f.name: f for f in FEATURES}


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # one of CHECK_STATES
    detail: str = ""


@dataclass(frozen=True)
class FeatureVerdict:
    name: str
    title: str
    status: str  # one of FEATURE_STATES
    reasons: tuple[str, ...] = ()
    core: bool = False


def check_reason(spec: CheckSpec, result: CheckResult) -> str:
    """``<name> <status>: <detail>; brought by <brings>`` for a check that is not ok."""
    detail = f": {result.detail}" if result.detail else ""
    if result.status == UNKNOWN:
        return f"{spec.name} unknown{detail}"
    return f"{spec.name} {result.status}{detail}; brought by {spec.brings}"


def feature_verdict(feature: FeatureSpec, results: Mapping[str, CheckResult]) -> FeatureVerdict:
    if not feature.built:
        return FeatureVerdict(feature.name, feature.title, NOT_BUILT, (feature.note,), feature.core)

    def result(name: str) -> CheckResult:
        return results.get(name) or CheckResult(name, UNKNOWN, "not probed")

    required = [result(n) for n in feature.requires]
    degrading = [result(n) for n in feature.degraded_by if n not in feature.requires]
    missing = [r for r in required if r.status == MISSING]
    unknown = [r for r in required if r.status == UNKNOWN]
    degraded = [r for r in required if r.status == DEGRADED]
    degraded += [r for r in degrading if r.status in (DEGRADED, MISSING)]
    if missing:
        status, why = MISSING, missing
    elif unknown:
        status, why = UNKNOWN, unknown
    elif degraded:
        status, why = DEGRADED, degraded
    else:
        status, why = AVAILABLE, []
    return FeatureVerdict(feature.name, feature.title, status, _reasons(why), feature.core)


def _reasons(results: list[CheckResult]) -> tuple[str, ...]:
    """One reason per check; unknown checks that share a reason (``not root``) are one line."""
    out: list[str] = []
    unknown: dict[str, list[str]] = {}
    for r in results:
        if r.status == UNKNOWN:
            unknown.setdefault(r.detail, []).append(r.name)
        elif r.name in CHECKS_BY_NAME:
            out.append(check_reason(CHECKS_BY_NAME[r.name], r))
        else:
            out.append(f"{r.name} {r.status}: {r.detail}")
    for detail, names in unknown.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        out.append(f"{shown} unknown: {detail}" if detail else f"{shown} unknown")
    return tuple(out)


def feature_verdicts(results: Mapping[str, CheckResult]) -> list[FeatureVerdict]:
    """The verdict of every feature in ``FEATURES`` order."""
    return [feature_verdict(f, results) for f in FEATURES]


def not_ok(results: Mapping[str, CheckResult]) -> list[CheckResult]:
    """Results that are not ok, in catalogue order."""
    return [results[c.name] for c in CHECKS if c.name in results and results[c.name].status != OK]
